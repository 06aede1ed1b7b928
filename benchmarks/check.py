"""Regression check of the Fisher pass's cost, small enough for CI.

Measures, in one process and with the two passes taking turns, the time of the exact Fisher
diagonal (``deepclean.fisher_diagonal``) against one plain forward + backward pass over the same
samples, on the small CNN with 1x28x28 inputs, and compares the *ratio* (never seconds: machines
are noisy) with the committed baseline ``benchmarks/baseline/fisher_ratio.json``.

    python benchmarks/check.py                  # compare; exit status 1 on a regression
    python benchmarks/check.py --write-baseline # measure and write the baseline

A regression is a ratio above ``baseline * tolerance`` (default tolerance 2.0: generous, since a
2-core machine shared with other work varies by tens of percent).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

BASELINE = Path(__file__).resolve().parent / "baseline" / "fisher_ratio.json"


def measure(*, n: int = 256, batch_size: int = 128, repeats: int = 3, threads: int = 1) -> dict:
    """Best-of-``repeats`` seconds of the plain pass and of the Fisher pass, and their ratio."""
    from deepclean import build_model, fisher_diagonal

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    model = build_model("small_cnn", in_channels=1, num_classes=10, width=1.0, seed=0).eval()
    data = TensorDataset(x, y)

    def plain() -> None:
        for start in range(0, n, batch_size):
            model.zero_grad(set_to_none=True)
            logits = model(x[start:start + batch_size])
            torch.log_softmax(logits, 1).gather(1, y[start:start + batch_size, None]).sum().backward()

    def fisher() -> None:
        fisher_diagonal(model, data, batch_size=batch_size)

    plain(), fisher()  # warm-up
    best = {"plain": float("inf"), "fisher": float("inf")}
    for _ in range(repeats):
        for name, fn in (("plain", plain), ("fisher", fisher)):
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {"model": "small_cnn", "input": "1x28x28", "n": n, "batch_size": batch_size,
            "threads": threads, "plain_s": best["plain"], "fisher_s": best["fisher"],
            "ratio": best["fisher"] / best["plain"], "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-baseline", action="store_true")
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    parser.add_argument("--out", type=Path, help="also write this run's measurement as JSON")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=2.0)
    args = parser.parse_args(argv)
    result = measure(n=args.n, repeats=args.repeats)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.write_baseline:
        args.baseline.parent.mkdir(parents=True, exist_ok=True)
        args.baseline.write_text(json.dumps(result, indent=2) + "\n")
        print(f"baseline written: Fisher/plain = {result['ratio']:.2f} ({args.baseline})")
        return 0
    base = json.loads(args.baseline.read_text())
    limit = base["ratio"] * args.tolerance
    verdict = "ok" if result["ratio"] <= limit else "REGRESSION"
    print(f"Fisher/plain = {result['ratio']:.2f} (baseline {base['ratio']:.2f}, limit {limit:.2f}):"
          f" {verdict}")
    return 0 if verdict == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
