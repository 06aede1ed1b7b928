"""End-to-end time ratios of a finished ``deepclean run``, read from its result JSON files.

Run: ``python benchmarks/bench_run.py RESULTS_DIR [RESULTS_DIR ...] --out benchmarks/results``

For every results folder and (dataset, model, scenario, seed) it reports DeepClean's unlearning
time against the gold model's training time and against Fine-tune's unlearning time (same epochs
in the default run), with how DeepClean got I_Dr (``two_passes``: Fisher passes over D_f and D_r,
as in the paper; ``precomputed``: ``--precompute-fisher``, a pass over D_f only, the training-set
Fisher I_D computed once per original model, whose time is shown apart and also added in the last
two columns). It writes one JSON per row plus ``env_run.json`` to ``--out`` and prints a Markdown
table. The times are those the runs measured (the unlearning step alone; the gold model's training
time), so compare ratios within one row only.
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
    ap.add_argument("results_dirs", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "threads": torch.get_num_threads(), "sources": [str(d) for d in args.results_dirs]}
    (args.out / "env_run.json").write_text(json.dumps(env, indent=2) + "\n")
    lines = ["| run | scenario | seed | I_Dr | DeepClean (s) | I_D once (s) | Fine-tune (s) "
             "| gold (s) | DeepClean / gold | DeepClean / Fine-tune | (DeepClean + I_D) / gold "
             "| (DeepClean + I_D) / Fine-tune |", "|" + "---|" * 12]
    for results_dir in args.results_dirs:
        records = _records(results_dir)
        if not records:
            print(f"no result JSON files under {results_dir}/results", file=sys.stderr)
            return 2
        groups: dict[tuple, dict[str, dict]] = {}
        for r in records:
            key = (r["dataset"], r["model"], r["scenario"], r["seed"])
            groups.setdefault(key, {})[r["method"]] = r
        for (dataset, model, scenario, seed), by_method in sorted(groups.items()):
            dc, ft, gold = (by_method.get(m) for m in ("deepclean", "finetune", "gold"))
            if dc is None or gold is None:
                continue
            once = dc.get("precompute_time_s") or 0.0
            ft_s = ft["time_s"] if ft else None
            row = {"source": str(results_dir), "dataset": dataset, "model": model,
                   "scenario": scenario, "seed": seed,
                   "fisher_mode": dc.get("fisher_mode", "two_passes"),
                   "deepclean_s": dc["time_s"], "precompute_s": once, "gold_s": gold["time_s"],
                   "finetune_s": ft_s,
                   "deepclean_over_gold": dc["time_s"] / gold["time_s"],
                   "deepclean_over_finetune": dc["time_s"] / ft_s if ft_s else None,
                   "with_precompute_over_gold": (dc["time_s"] + once) / gold["time_s"],
                   "with_precompute_over_finetune": (dc["time_s"] + once) / ft_s if ft_s else None}
            name = f"run_{results_dir.name}_{dataset}_{model}_{scenario}_seed{seed}.json"
            (args.out / name).write_text(json.dumps(row, indent=2) + "\n")

            def f(v, digits=2):
                return "-" if v is None else f"{v:.{digits}f}"

            lines.append(
                f"| {results_dir.name} | {scenario} | {seed} | {row['fisher_mode']} "
                f"| {f(dc['time_s'], 1)} | {f(once or None, 1)} | {f(ft_s, 1)} "
                f"| {f(gold['time_s'], 1)} | {f(row['deepclean_over_gold'])} "
                f"| {f(row['deepclean_over_finetune'])} "
                f"| {f(row['with_precompute_over_gold'] if once else None)} "
                f"| {f(row['with_precompute_over_finetune'] if once else None)} |")
    if len(lines) == 2:
        print("no run with both a deepclean and a gold result under "
              f"{[str(d) for d in args.results_dirs]}; run deepclean run with --methods "
              "including deepclean", file=sys.stderr)
        return 2
    table = "\n".join(lines)
    (args.out / "run_table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
