"""Benchmark of the exact Fisher diagonal against one plain forward+backward pass.

Run: ``python benchmarks/bench_fisher.py --out benchmarks/results`` (add ``--device cuda`` on a GPU).

Every measurement runs in its own subprocess, so that its peak memory can be read alone:

- time: best of ``--repeats`` runs (wall clock; CUDA synchronised);
- memory (CPU): ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the subprocess after the first
  run minus its value just before it (model and data already built), i.e. the peak
  *extra* resident memory of the operation; (CUDA): ``torch.cuda.max_memory_allocated`` minus the
  allocation before the runs.

Measurements: ``alternate`` (the time ratio of the table: ``plain`` and ``fisher`` run in turns
``--repeats`` times in one process, best of each, so both see the same machine state; repeated in
``--trials`` processes, the table shows the median and the range), ``plain``
(forward, sum cross-entropy, ``loss.backward()`` per batch, model in eval mode) and ``fisher``
(:func:`deepclean.fisher_diagonal`, same batch size) each in its own process for peak memory, ``naive`` (one
forward+backward per sample on a subset, scaled to N), and ``dataload`` vs ``train_epoch`` (one
epoch of :func:`deepclean.data.datasets.iterate_batches` over 60000x1x28x28 in-memory tensors against one
training epoch of ResNet-18 width 0.125 measured on a subset and scaled to 60000 samples).
One JSON file per measurement plus ``env.json`` go to ``--out``; a Markdown table of the ratios
is printed (and written to ``table.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

CONFIGS = [  # model, width, N
    ("small_cnn", 1.0, 512),
    ("resnet18", 0.125, 512),
    ("resnet18", 1.0, 128),
    ("vgg16_bn", 1.0, 128),
]
INPUTS = [(1, 28), (3, 32)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from deepclean.data.datasets import iterate_batches
    from deepclean.data.models import build_model
    from deepclean.fisher.diagonal import fisher_diagonal

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    record = {"kind": args.kind, "model": args.model, "width": args.width, "device": str(device),
              "input": [args.channels, args.hw, args.hw], "batch_size": args.batch_size,
              "threads": torch.get_num_threads()}
    if args.kind in ("plain", "fisher", "naive", "alternate"):
        model = build_model(args.model, in_channels=args.channels, num_classes=10,
                            width=args.width, seed=0).to(device).eval()
        n = args.n if args.kind != "naive" else min(args.n, args.naive_n)
        x = torch.randn(n, args.channels, args.hw, args.hw, generator=gen).to(device)
        y = torch.randint(0, 10, (n,), generator=gen).to(device)
        data = TensorDataset(x, y)
        bs = args.batch_size if args.kind != "naive" else 1

        def plain() -> None:
            for s in range(0, n, bs):
                loss = nn.functional.cross_entropy(model(x[s : s + bs]), y[s : s + bs],
                                                   reduction="sum")
                model.zero_grad(set_to_none=True)
                loss.backward()

        def fisher() -> None:
            fisher_diagonal(model, data, batch_size=bs, device=device)

        if args.kind == "alternate":
            # plain and fisher in turns in one process: both see the same machine state
            best = {"plain": float("inf"), "fisher": float("inf")}
            for _ in range(args.repeats):
                for name, f in (("plain", plain), ("fisher", fisher)):
                    _sync(device)
                    t = time.perf_counter()
                    f()
                    _sync(device)
                    best[name] = min(best[name], time.perf_counter() - t)
            record.update(n=n, plain_best_s=best["plain"], fisher_best_s=best["fisher"],
                          ratio=best["fisher"] / best["plain"])
            return record
        fn = fisher if args.kind == "fisher" else plain
        record.update(n=args.n, measured_samples=n)
    else:
        n_full = 60000
        if args.kind == "dataload":
            x = torch.randn(n_full, 1, 28, 28, generator=gen)
            y = torch.randint(0, 10, (n_full,), generator=gen)

            def fn() -> None:
                for _, xb, yb in iterate_batches(x, y, batch_size=args.batch_size, shuffle=True,
                                                 generator=torch.Generator().manual_seed(1),
                                                 device=device):
                    pass
                _sync(device)

            n = n_full
        else:  # train_epoch, on a subset, without the loading
            model = build_model("resnet18", in_channels=1, num_classes=10, width=0.125,
                                seed=0).to(device).train()
            n = args.train_n
            x = torch.randn(n, 1, 28, 28, generator=gen).to(device)
            y = torch.randint(0, 10, (n,), generator=gen).to(device)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

            def fn() -> None:
                for s in range(0, n, args.batch_size):
                    loss = nn.functional.cross_entropy(model(x[s : s + args.batch_size]),
                                                       y[s : s + args.batch_size])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

        record.update(n=n_full, measured_samples=n)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _peak(device)
    times = []
    peak = None
    for _ in range(args.repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
        if peak is None:  # the peak of one call: later calls add the allocator's leftovers
            peak = _peak(device)
    scale = record["n"] / record["measured_samples"]
    record.update(times_s=times, best_s=min(times), best_scaled_s=min(times) * scale,
                  peak_extra_bytes=max(0, peak - base), base_bytes=base)
    return record


def env_record(args: argparse.Namespace) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {"cpu": cpu, "cpu_count": os.cpu_count(), "threads": args.threads,
           "torch": torch.__version__, "python": platform.python_version(),
           "device": args.device, "platform": platform.platform(),
           "memory_method": "CUDA max_memory_allocated" if args.device.startswith("cuda") else
           "ru_maxrss of a fresh subprocess per measurement after its first run, minus its value before",
           "time_method": f"best of {args.repeats}, wall clock"}
    if args.device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    env["allocator_environment"] = {k: v for k, v in os.environ.items()
                                    if k.startswith(("MALLOC_", "LD_PRELOAD"))}
    try:
        env["load_average"] = os.getloadavg()
    except OSError:
        pass
    return env


def run_one(args: argparse.Namespace, **kw) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--device", args.device,
           "--threads", str(args.threads), "--repeats", str(args.repeats),
           "--batch-size", str(args.batch_size), "--naive-n", str(args.naive_n),
           "--train-n", str(args.train_n)]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--trials", type=int, default=3,
                    help="processes measuring the time ratio; the table shows their median")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--n", type=int, default=512, help="samples for the narrow models")
    ap.add_argument("--n-full", type=int, default=128, help="samples for full-width ResNet/VGG")
    ap.add_argument("--naive-n", type=int, default=16, help="samples of the batch-1 loop (0: skip)")
    ap.add_argument("--train-n", type=int, default=1024)
    ap.add_argument("--models", default=None, help="comma list, e.g. small_cnn,resnet18")
    ap.add_argument("--no-dataload", action="store_true")
    ap.add_argument("--table-only", action="store_true",
                    help="measure nothing: rebuild the table from the JSON files in --out")
    # worker mode
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kind", default="plain")
    ap.add_argument("--model", default="small_cnn")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--hw", type=int, default=28)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = set(args.models.split(",")) if args.models else None
    configs = [(model, width, args.n if width < 1 or model == "small_cnn" else args.n_full, c, hw)
               for model, width, _ in CONFIGS if not wanted or model in wanted
               for c, hw in INPUTS]
    if not args.table_only:
        (out / "env.json").write_text(json.dumps(env_record(args), indent=2))
        for model, width, n, c, hw in configs:
            kinds = ([f"alternate{t}" for t in range(args.trials)] + ["plain", "fisher"]
                     + (["naive"] if args.naive_n > 0 else []))
            for kind in kinds:
                r = run_one(args, kind=kind.rstrip("0123456789"), model=model, width=width,
                            channels=c, hw=hw, n=n)
                name = f"{kind}_{model}_w{width:g}_{c}x{hw}x{hw}_{args.device}.json"
                (out / name).write_text(json.dumps(r, indent=2))
                if kind.startswith("alternate"):
                    print(f"  {name}: fisher/plain {r['ratio']:.2f}", file=sys.stderr, flush=True)
                else:
                    print(f"  {name}: {r['best_scaled_s']:.3f} s, "
                          f"+{r['peak_extra_bytes'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
        if not args.no_dataload:
            for kind in ("dataload", "train_epoch"):
                r = run_one(args, kind=kind)
                (out / f"{kind}_{args.device}.json").write_text(json.dumps(r, indent=2))
    if not any((out / f"plain_{m}_w{w:g}_{c}x{hw}x{hw}_{args.device}.json").is_file()
               for m, w, _, c, hw in configs):
        sys.exit(f"no measurements in {out}: run without --table-only first")
    print(build_table(out, configs, args.device))


def build_table(out: Path, configs: list, device: str) -> str:
    """The Markdown table of the JSON files in ``out`` (also written to ``table.md``), and
    ``fisher_summary.json``."""
    lines = ["| model | width | input | N | plain s (alternating) | fisher s (alternating) "
             "| fisher/plain time, alternating "
             "(median) | range over trials | fisher/plain time, separate processes "
             "| plain extra MiB | fisher extra MiB | fisher/plain memory |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = []
    for model, width, n, c, hw in configs:
        stem = f"{model}_w{width:g}_{c}x{hw}x{hw}_{device}.json"
        if not (out / f"plain_{stem}").is_file():
            continue
        trials = sorted((json.loads(p.read_text()) for p in out.glob(f"alternate*_{stem}")),
                        key=lambda r: r["ratio"])
        p, f = (json.loads((out / f"{k}_{stem}").read_text()) for k in ("plain", "fisher"))
        a = trials[len(trials) // 2]
        pm, fm = p["peak_extra_bytes"] / 2**20, f["peak_extra_bytes"] / 2**20
        separate = f["best_s"] / p["best_s"]
        lines.append(f"| {model} | {width:g} | {c}x{hw}x{hw} | {n} | {a['plain_best_s']:.3f} "
                     f"| {a['fisher_best_s']:.3f} | {a['ratio']:.2f} "
                     f"| {trials[0]['ratio']:.2f}-{trials[-1]['ratio']:.2f} | {separate:.2f} "
                     f"| {pm:.0f} | {fm:.0f} | {fm / pm if pm > 0 else float('nan'):.2f} |")
        summary.append({"model": model, "width": width, "input": [c, hw, hw], "n": n,
                        "ratio_alternating_median": a["ratio"],
                        "ratios_alternating": [r["ratio"] for r in trials],
                        "ratio_separate_processes": separate,
                        "memory_ratio": fm / pm if pm > 0 else None})
    (out / "fisher_summary.json").write_text(json.dumps(summary, indent=2))
    d_path, t_path = out / f"dataload_{device}.json", out / f"train_epoch_{device}.json"
    if d_path.is_file() and t_path.is_file():
        d, t = json.loads(d_path.read_text()), json.loads(t_path.read_text())
        share = d["best_s"] / (d["best_s"] + t["best_scaled_s"])
        lines += ["", "| data loading epoch s (60000x1x28x28) | training epoch s (resnet18 w0.125, "
                  f"scaled from {t['measured_samples']}) | loading share |", "|---|---|---|",
                  f"| {d['best_s']:.3f} | {t['best_scaled_s']:.1f} | {100 * share:.2f} % |"]
        (out / "dataload_share.json").write_text(json.dumps({"share": share}, indent=2))
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
