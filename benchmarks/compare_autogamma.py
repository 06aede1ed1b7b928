"""DeepClean at the paper's thresholds against ``--gamma auto``, seed by seed, beside the gold
model's own spread and the closest tuned baseline: the table of docs/autogamma.md.

    python benchmarks/compare_autogamma.py --paper runs/paper --auto runs/auto \\
        --tuned runs/tuned --out benchmarks/results/autogamma_3seeds.json

Each option takes ``deepclean run`` folders (pooled; e.g. one per seed or per scenario). Every
folder must be run on the same test half (``--test-half report`` to compare with tuned
baselines) and share the cache of original and gold models: a (scenario, seed) whose gold
metrics differ between folders is refused, since its gaps would be to different targets.

Per scenario and seed: the gold-versus-gold spread (``--gold-models 2`` in the auto run:
|dAcc_Df| and |dMIA| of a second gold model, points), DeepClean's reset share and Avg. Gap at
the paper's gamma and with auto (its chosen gamma, dAcc_Dr, dAcc_Df, dMIA to gold), the tuned
baseline with the smallest Avg. Gap in that seed, and the time of auto over the paper run. Then,
per scenario, the means over seeds with 95 % intervals and the mean Avg. Gap of every tuned
baseline, and counts of the seeds where each target of the issue holds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deepclean.report.common import mean_ci

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_runs import (  # noqa: E402  (a sibling script: one way to load and write results)
    InputError,
    check_same_gold,
    description,
    emit,
    load_side,
)

#: methods that are not baselines of the comparison
NOT_BASELINES = ("original", "gold", "deepclean")


def _index(folders: list[Path], option: str) -> dict[tuple[str, int, str], dict]:
    return {(r["scenario"], r["seed"], r["method"]): r for r in load_side(folders, option)}


def _check_gamma(records: dict, option: str, auto: bool) -> None:
    for (scenario, seed, method), r in records.items():
        if method != "deepclean":
            continue
        is_auto = (r.get("hyperparameters") or {}).get("gamma") == "auto"
        if is_auto != auto:
            raise InputError(
                f"{option}: DeepClean's {scenario} result of seed {seed} was run with gamma "
                f"{(r.get('hyperparameters') or {}).get('gamma')!r}; {option} takes runs "
                + ("with --gamma auto" if auto else "at fixed gammas (the paper's: the default)"))


def compare(paper: list[Path], auto: list[Path], tuned: list[Path]) -> dict:
    p, a = _index(paper, "--paper"), _index(auto, "--auto")
    t = _index(tuned, "--tuned") if tuned else {}
    _check_gamma(p, "--paper", auto=False)
    _check_gamma(a, "--auto", auto=True)
    keys = sorted({(s, seed) for (s, seed, m) in a if m == "deepclean"}
                  & {(s, seed) for (s, seed, m) in p if m == "deepclean"})
    if not keys:
        raise InputError("no (scenario, seed) has a deepclean result in both the --paper and the "
                         "--auto folders; run both on the same seeds and scenarios")
    rows = []
    for scenario, seed in keys:
        rp, ra = p[(scenario, seed, "deepclean")], a[(scenario, seed, "deepclean")]
        check_same_gold(rp, ra, f"{scenario} seed {seed}")
        spread = ra.get("gold_spread") or rp.get("gold_spread") or []
        base = {m: r for (s, sd, m), r in t.items()
                if (s, sd) == (scenario, seed) and m not in NOT_BASELINES}
        for m, r in base.items():
            check_same_gold(ra, r, f"{scenario} seed {seed} ({m}, tuned)")
        best = min(base, key=lambda m: base[m]["summary"]["avg_gap"]) if base else None
        rows.append({
            "scenario": scenario, "seed": seed,
            "gold_spread_acc_forget": abs(spread[0]["d_acc_forget"]) if spread else None,
            "gold_spread_mia": abs(spread[0]["d_mia"]) if spread else None,
            "paper_gamma": rp.get("gamma"), "paper_reset_pct": 100 * rp["share_reset"],
            "paper_avg_gap": rp["summary"]["avg_gap"], "paper_time_s": rp["time_s"],
            "auto_gamma": ra.get("gamma"), "auto_reset_pct": 100 * ra["share_reset"],
            "auto_avg_gap": ra["summary"]["avg_gap"], "auto_time_s": ra["time_s"],
            **{f"auto_{k}": ra["gaps"][k] for k in ("d_acc_retain", "d_acc_forget", "d_mia")},
            "auto_verdict": (ra.get("verdict") or {}).get("summary"),
            "time_ratio": ra["time_s"] / rp["time_s"],
            "best_tuned": best, "best_tuned_avg_gap": base[best]["summary"]["avg_gap"] if best else None,
            "tuned_avg_gap": {m: r["summary"]["avg_gap"] for m, r in sorted(base.items())},
        })
    summary = {}
    for scenario in sorted({r["scenario"] for r in rows}):
        rs = [r for r in rows if r["scenario"] == scenario]
        within = [r for r in rs if r["gold_spread_acc_forget"] is not None]
        tuned_means = {}
        for m in sorted({m for r in rs for m in r["tuned_avg_gap"]}):
            vals = [r["tuned_avg_gap"][m] for r in rs if m in r["tuned_avg_gap"]]
            if len(vals) == len(rs):
                tuned_means[m] = mean_ci(vals)
        summary[scenario] = {
            "seeds": [r["seed"] for r in rs],
            "paper_avg_gap": mean_ci([r["paper_avg_gap"] for r in rs]),
            "auto_avg_gap": mean_ci([r["auto_avg_gap"] for r in rs]),
            "auto_d_acc_retain": mean_ci([r["auto_d_acc_retain"] for r in rs]),
            "time_ratio": mean_ci([r["time_ratio"] for r in rs]),
            "tuned_avg_gap": tuned_means,
            "auto_below_paper": sum(r["auto_avg_gap"] < r["paper_avg_gap"] for r in rs),
            "auto_acc_retain_within_1": sum(abs(r["auto_d_acc_retain"]) <= 1 for r in rs),
            "auto_within_gold_spread": sum(
                abs(r["auto_d_acc_forget"]) <= r["gold_spread_acc_forget"]
                and abs(r["auto_d_mia"]) <= r["gold_spread_mia"] for r in within),
            "seeds_with_spread": len(within),
            "time_ratio_at_most_1_5": sum(r["time_ratio"] <= 1.5 for r in rs),
        }
    return {"paper": [str(x) for x in paper], "auto": [str(x) for x in auto],
            "tuned": [str(x) for x in tuned], "rows": rows, "summary": summary}


def _f(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ci(pair, digits: int = 2) -> str:
    m, h = pair
    return f"{m:.{digits}f}" + (f" ± {h:.{digits}f}" if h is not None else "")


def markdown(result: dict) -> str:
    lines = ["| scenario | seed | gold spread \\|dAcc_Df\\| / \\|dMIA\\| | paper: reset % | Avg. Gap "
             "| auto: gamma | reset % | dAcc_Dr / dAcc_Df / dMIA | Avg. Gap | closest tuned "
             "baseline (Avg. Gap) | time auto / paper |",
             "|---|---:|---|---:|---:|---:|---:|---|---:|---|---:|"]
    for r in result["rows"]:
        spread = (f"{_f(r['gold_spread_acc_forget'])} / {_f(r['gold_spread_mia'])}"
                  if r["gold_spread_acc_forget"] is not None else "-")
        gaps = " / ".join(f"{r[k]:+.2f}" for k in ("auto_d_acc_retain", "auto_d_acc_forget",
                                                   "auto_d_mia"))
        best = f"{r['best_tuned']} ({_f(r['best_tuned_avg_gap'])})" if r["best_tuned"] else "-"
        gamma = r["auto_gamma"]
        lines.append(
            f"| {r['scenario']} | {r['seed']} | {spread} | {_f(r['paper_reset_pct'])} | "
            f"{_f(r['paper_avg_gap'])} | {_f(gamma, 3) if isinstance(gamma, float) else gamma} | "
            f"{_f(r['auto_reset_pct'])} | {gaps} | {_f(r['auto_avg_gap'])} | {best} | "
            f"{_f(r['time_ratio'])} |")
    lines.append("")
    for scenario, s in result["summary"].items():
        n = len(s["seeds"])
        tuned = ", ".join(f"{m} {_ci(v)}" for m, v in
                          sorted(s["tuned_avg_gap"].items(), key=lambda kv: kv[1][0]))
        lines += [
            f"**{scenario} forgetting, seeds {s['seeds']}:** Avg. Gap paper {_ci(s['paper_avg_gap'])}, "
            f"auto {_ci(s['auto_avg_gap'])}; auto's dAcc_Dr {_ci(s['auto_d_acc_retain'])}; "
            f"time auto / paper {_ci(s['time_ratio'])}. Auto below paper in {s['auto_below_paper']} "
            f"of {n} seeds; Acc_Dr within 1 point of gold in {s['auto_acc_retain_within_1']} of {n}; "
            f"|dAcc_Df| and |dMIA| within the gold spread in {s['auto_within_gold_spread']} of "
            f"{s['seeds_with_spread']} seeds with a second gold model; time <= 1.5 x in "
            f"{s['time_ratio_at_most_1_5']} of {n}."
            + (f" Tuned baselines' Avg. Gap: {tuned}." if tuned else ""), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--paper", type=Path, nargs="+", required=True,
                        help="run folders with DeepClean at the paper's gamma")
    parser.add_argument("--auto", type=Path, nargs="+", required=True,
                        help="run folders with DeepClean at --gamma auto")
    parser.add_argument("--tuned", type=Path, nargs="*", default=[],
                        help="run folders with the tuned baselines (--hp-file)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    return emit(lambda: compare(args.paper, args.auto, args.tuned), args.out, markdown)


if __name__ == "__main__":
    sys.exit(main())
