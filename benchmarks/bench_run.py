"""End-to-end time ratios of a finished ``deepclean run``, read from its result JSON files.

Run: ``python benchmarks/bench_run.py RESULTS_DIR --out benchmarks/results``

For every (dataset, model, scenario, seed) it reports DeepClean's unlearning time against the gold
model's training time and against Fine-tune's unlearning time (same epochs in the default run),
writes one JSON per row plus ``env.json`` to ``--out`` and prints a Markdown table. The times are
those the run measured (the unlearning step alone; the gold model's training time), so compare
ratios from one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path


def _records(results_dir: Path) -> list[dict]:
    folder = results_dir / "results"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results_dir", type=Path)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    records = _records(args.results_dir)
    if not records:
        print(f"no result JSON files under {args.results_dir}/results", file=sys.stderr)
        return 2
    groups: dict[tuple, dict[str, dict]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["model"], r["scenario"], r["seed"]), {})[r["method"]] = r
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "threads": torch.get_num_threads(), "source": str(args.results_dir)}
    (args.out / "env_run.json").write_text(json.dumps(env, indent=2) + "\n")
    lines = ["| dataset | model | scenario | seed | DeepClean (s) | Fine-tune (s) | gold (s) "
             "| DeepClean / gold | DeepClean / Fine-tune |", "|" + "---|" * 9]
    for (dataset, model, scenario, seed), by_method in sorted(groups.items()):
        dc, ft, gold = (by_method.get(m) for m in ("deepclean", "finetune", "gold"))
        if dc is None or gold is None:
            continue
        row = {"dataset": dataset, "model": model, "scenario": scenario, "seed": seed,
               "deepclean_s": dc["time_s"], "gold_s": gold["time_s"],
               "finetune_s": ft["time_s"] if ft else None,
               "deepclean_over_gold": dc["time_s"] / gold["time_s"],
               "deepclean_over_finetune": dc["time_s"] / ft["time_s"] if ft else None}
        name = f"run_{dataset}_{model}_{scenario}_seed{seed}.json"
        (args.out / name).write_text(json.dumps(row, indent=2) + "\n")
        ft_s = "-" if ft is None else f"{ft['time_s']:.1f}"
        ratio_ft = "-" if ft is None else f"{row['deepclean_over_finetune']:.2f}"
        lines.append(f"| {dataset} | {model} | {scenario} | {seed} | {dc['time_s']:.1f} | {ft_s} "
                     f"| {gold['time_s']:.1f} | {row['deepclean_over_gold']:.2f} | {ratio_ft} |")
    table = "\n".join(lines)
    (args.out / "run_table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
