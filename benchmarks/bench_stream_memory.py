"""Peak memory of fisher_diagonal on a data set generated on the fly (nothing in memory):
streamed batch by batch versus materialised first.

    python benchmarks/bench_stream_memory.py --n 100000 --out benchmarks/results/stream_memory.json

Each mode runs in its own process; the JSON records the growth of peak resident memory (MiB)
above the process's state after building the model.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset


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


def worker(mode: str, n: int, batch_size: int) -> dict:
    from torch.utils.data import TensorDataset

    from deepclean import build_model, fisher_diagonal

    torch.set_num_threads(1)
    model = build_model("small_cnn", in_channels=3, num_classes=10, width=1.0, seed=0)
    data = OnTheFly(n)
    base = _peak_mib()
    start = time.perf_counter()
    if mode == "materialised":
        xs, ys = zip(*(data[i] for i in range(n)), strict=True)
        data = TensorDataset(torch.stack(xs), torch.tensor(ys))
    fisher_diagonal(model, data, batch_size=batch_size)
    return {"mode": mode, "n": n, "batch_size": batch_size, "seconds": time.perf_counter() - start,
            "peak_growth_mib": _peak_mib() - base}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/stream_memory.json"))
    parser.add_argument("--worker", choices=["streamed", "materialised"])
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.batch_size)))
        return 0
    rows = []
    for mode in ("streamed", "materialised"):
        out = subprocess.run([sys.executable, __file__, "--worker", mode, "--n", str(args.n),
                              "--batch-size", str(args.batch_size)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    for r in rows:
        print(f"{r['mode']:>12}: peak +{r['peak_growth_mib']:.0f} MiB, {r['seconds']:.1f} s "
              f"({r['n']} samples of 3x32x32, batch {r['batch_size']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
