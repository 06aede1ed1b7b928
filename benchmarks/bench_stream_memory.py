"""Peak memory of streamed data: the Fisher diagonal and DeepClean's whole unlearning on a data set
generated on the fly (nothing in memory); and the speed of the default in-memory path against
another source tree (e.g. the release before streaming).

    python benchmarks/bench_stream_memory.py --n 100000 --out benchmarks/results/stream_memory.json
    python benchmarks/bench_stream_memory.py --speed --before-src /tmp/before/src \\
        --out benchmarks/results/stream_speed.json

Memory: each mode runs in its own process; the JSON records the growth of peak resident memory
(MiB) above the process's state after building the model. Modes: ``streamed`` and
``materialised`` (``fisher_diagonal`` on the data set, or on a ``TensorDataset`` of it) and
``deepclean`` (``DeepClean(epochs=1).unlearn`` with D_f the first ``--n-forget`` samples and D_r
the rest, both ``Subset`` s of the generated set: two Fisher passes, the selection, the reset and
one epoch of the masked fine-tune, streamed) and ``train_step`` (a plain PyTorch training loop of
the same model at the fine-tune's batch of 128: the memory any training step needs, the floor of
"bounded by batch size times model").

Speed (``--speed``): DeepClean (gamma 1.1, one fine-tune epoch) on ``--speed-n`` random 1x28x28
images held as a ``TensorDataset`` (10 % forgotten), small CNN, one thread. Processes that import
the package from ``--before-src`` and from this checkout take turns (``--rounds`` each); each
times ``--repeats`` calls after one warm-up call and keeps the best. The JSON holds every time,
the per-round ratios after/before and their median, and each side's SHA-256 of the unlearned
weights (equal when the results are bitwise the same).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

HERE = Path(__file__).resolve().parent


class OnTheFly(Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, 32, 32, generator=g), int(torch.randint(0, 10, (1,), generator=g))


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(mode: str, n: int, batch_size: int, n_forget: int) -> dict:
    from torch.utils.data import Subset, TensorDataset

    from deepclean import DeepClean, build_model, fisher_diagonal

    torch.set_num_threads(1)
    model = build_model("small_cnn", in_channels=3, num_classes=10, width=1.0, seed=0)
    data = OnTheFly(n)
    base = _peak_mib()
    start = time.perf_counter()
    extra = {}
    if mode == "deepclean":
        forget, retain = Subset(data, range(n_forget)), Subset(data, range(n_forget, n))
        method = DeepClean(gamma=1.1, epochs=1, fisher_batch_size=batch_size, device="cpu")
        method.unlearn(model, forget, retain)
        extra = {"n_forget": n_forget, "share_reset": method.info_["share_reset"],
                 "fine_tune_batch_size": method.batch_size}
    elif mode == "train_step":
        # The floor any fine-tune of this model and batch has: a plain PyTorch loop (Adam,
        # DeepClean's fine-tune batch of 128) over 20 batches of the same generated images.
        from torch.utils.data import DataLoader

        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for step, (xb, yb) in enumerate(DataLoader(data, batch_size=128)):
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step == 19:
                break
        extra = {"steps": 20, "fine_tune_batch_size": 128}
    else:
        if mode == "materialised":
            xs, ys = zip(*(data[i] for i in range(n)), strict=True)
            data = TensorDataset(torch.stack(xs), torch.tensor(ys))
        fisher_diagonal(model, data, batch_size=batch_size)
    return {"mode": mode, "n": n, "batch_size": batch_size, "seconds": time.perf_counter() - start,
            "peak_growth_mib": _peak_mib() - base, **extra}


def speed_worker(n: int, repeats: int) -> dict:
    import hashlib

    from torch.utils.data import TensorDataset

    import deepclean
    from deepclean import DeepClean, build_model

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    n_f = n // 10
    forget, retain = TensorDataset(x[:n_f], y[:n_f]), TensorDataset(x[n_f:], y[n_f:])
    model = build_model("small_cnn", in_channels=1, num_classes=10, width=1.0, seed=0)
    times, out = [], None
    for _ in range(repeats + 1):
        start = time.perf_counter()
        out = DeepClean(gamma=1.1, epochs=1, device="cpu").unlearn(model, forget, retain)
        times.append(time.perf_counter() - start)
    h = hashlib.sha256()
    for k, v in sorted(out.state_dict().items()):
        h.update(k.encode() + v.detach().contiguous().numpy().tobytes())
    return {"source": str(Path(deepclean.__file__).resolve().parents[1]), "n": n,
            "warmup_s": times[0], "times_s": times[1:], "best_s": min(times[1:]),
            "state_sha256": h.hexdigest()}


def _run(args: list[str], src: Path | None = None) -> dict:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def speed(args: argparse.Namespace) -> int:
    after_src = HERE.parent / "src"
    rounds = []
    for _ in range(args.rounds):
        before = _run(["--worker", "speed", "--speed-n", str(args.speed_n),
                       "--repeats", str(args.repeats)], args.before_src)
        after = _run(["--worker", "speed", "--speed-n", str(args.speed_n),
                      "--repeats", str(args.repeats)], after_src)
        rounds.append({"before": before, "after": after,
                       "ratio_after_over_before": after["best_s"] / before["best_s"]})
    ratios = [r["ratio_after_over_before"] for r in rounds]
    result = {"kind": "deepclean_in_memory_speed", "n": args.speed_n, "rounds": rounds,
              "median_ratio": statistics.median(ratios), "ratios": ratios,
              "same_result": len({r[s]["state_sha256"] for r in rounds
                                  for s in ("before", "after")}) == 1}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for i, r in enumerate(rounds):
        print(f"round {i}: before {r['before']['best_s']:.3f} s, after {r['after']['best_s']:.3f} s,"
              f" after/before {r['ratio_after_over_before']:.3f}")
    print(f"median after/before {result['median_ratio']:.3f} (range {min(ratios):.3f}-"
          f"{max(ratios):.3f}); bitwise same weights: {result['same_result']}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--n-forget", type=int, default=1_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--modes", default="streamed,materialised,deepclean",
                        help="comma-separated memory modes to run")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", choices=["streamed", "materialised", "deepclean", "train_step",
                                             "speed"])
    parser.add_argument("--speed", action="store_true", help="the in-memory speed comparison")
    parser.add_argument("--before-src", type=Path, help="source folder of the package to compare")
    parser.add_argument("--speed-n", type=int, default=5_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.worker == "speed":
        print(json.dumps(speed_worker(args.speed_n, args.repeats)))
        return 0
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.batch_size, args.n_forget)))
        return 0
    if args.speed:
        if args.before_src is None:
            parser.error("--speed needs --before-src FOLDER (the src/ folder to compare with)")
        args.out = args.out or Path("benchmarks/results/stream_speed.json")
        return speed(args)
    args.out = args.out or Path("benchmarks/results/stream_memory.json")
    rows = []
    for mode in args.modes.split(","):
        rows.append(_run(["--worker", mode, "--n", str(args.n), "--batch-size",
                          str(args.batch_size), "--n-forget", str(args.n_forget)]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    for r in rows:
        print(f"{r['mode']:>12}: peak +{r['peak_growth_mib']:.0f} MiB, {r['seconds']:.1f} s "
              f"({r['n']} samples of 3x32x32, batch {r['batch_size']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
