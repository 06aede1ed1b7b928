"""Defaults against tuned: one Markdown table per scenario from ``deepclean run`` folders (the
same test half; the tuned side run with ``--hp-file``; each side may pool folders, e.g. one per
scenario or per seed), with the tuning time of each method from the hyperparameter files.

    python benchmarks/compare_runs.py --defaults runs/defaults --tuned runs/tuned \\
        --hp-file runs/tune/hyperparameters.json --out benchmarks/results/defaults_vs_tuned.json

Per method and scenario: Acc_Dr / Acc_Df / MIA (%), Avg. Gap to gold (points) and the unlearning
time (s), each the mean over the seeds of that side (each side states its seeds; original and
gold are shown on both) with the half-width of the 95 % Student-t interval when there are several; a row that collapsed (Acc_Dr under half of gold's) or
left the model as it was (within 0.5 points of the original on every accuracy, 1 on MIA) says so,
by the rules of :func:`deepclean.report.common.behaviour_notes`. The JSON holds every number.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from deepclean.errors import DeepCleanError
from deepclean.report.common import NOOP_POINTS, mean_ci
from deepclean.report.tables import load_records

KEYS = ("acc_retain", "acc_forget", "mia")


class InputError(Exception):
    """Bad input to a comparison script: printed as one line, exit status 2."""


def load_side(folders: list[Path], option: str) -> list[dict]:
    """The result records of ``deepclean run`` folders (pooled), each folder checked to exist
    and to hold at least one finished result."""
    records = []
    for folder in folders:
        if not folder.is_dir():
            raise InputError(f"{option} {folder}: no such folder; expected the --out folder of a "
                             "deepclean run")
        try:
            found = [r for r in load_records(folder) if isinstance(r.get("metrics"), dict)]
        except DeepCleanError as exc:
            raise InputError(f"{option} {folder}: {exc}") from None
        if not found:
            raise InputError(f"{option} {folder}: holds no finished result (results/*.json); "
                             "expected the --out folder of a deepclean run")
        records += found
    return records


def check_same_gold(a: dict, b: dict, where: str) -> None:
    """Two records of one (scenario, seed) must be measured against the same gold metrics (the
    same test half and cache), or their gaps are to different targets."""
    ga, gb = a.get("gold_metrics") or {}, b.get("gold_metrics") or {}
    if ga.keys() != gb.keys() or any(abs(ga[k] - gb[k]) > 1e-9 for k in ga):
        raise InputError(f"{where}: the folders were evaluated against different gold metrics "
                         "(another --test-half or another cache of gold models); run them with "
                         "the same --test-half and --cache-dir")


def check_out(out: Path | None) -> None:
    if out is not None and out.is_dir():
        raise InputError(f"--out {out} is a folder; expected the path of a JSON file to write")


def _by_method(records: list[dict], scenario: str) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for r in records:
        if r.get("scenario") == scenario and isinstance(r.get("metrics"), dict):
            out.setdefault(r["method"], {})[r["seed"]] = r
    return out


def _flag(rec: list[dict], original: list[dict], gold: list[dict]) -> str:
    """'collapsed', 'no-op' or '' from the means over seeds (behaviour_notes' rules)."""
    def mean(rs, k):
        return sum(r["metrics"][k] for r in rs) / len(rs)
    if mean(rec, "acc_retain") < 0.5 * mean(gold, "acc_retain"):
        return "collapsed"
    same = all(abs(mean(rec, k) - mean(original, k)) <= NOOP_POINTS
               for k in ("acc_forget", "acc_retain", "acc_test"))
    if same and abs(mean(rec, "mia") - mean(original, "mia")) <= 2 * NOOP_POINTS:
        return "no-op"
    return ""


def _cell(values: list[float], digits: int = 2) -> str:
    m, h = mean_ci(values)
    return f"{m:.{digits}f}" + (f" ± {h:.{digits}f}" if h is not None else "")


def _tuning_times(hp_files: list[Path]) -> dict[str, dict]:
    tuning_time: dict[str, dict] = {}
    for hp_file in hp_files:
        try:
            protocol = json.loads(hp_file.read_text()).get("protocol", {})
            for scenario, times in protocol.get("time_s", {}).items():
                tuning_time.setdefault(scenario, {}).update(times)
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
            raise InputError(f"--hp-file {hp_file}: not a hyperparameter file of deepclean tune "
                             f"({exc})") from None
    return tuning_time


def compare(defaults: list[Path], tuned: list[Path], hp_files: list[Path] | None) -> dict:
    """Folders of one side are pooled (e.g. methods run apart); a record may appear once.

    Raises:
        InputError: a folder that is missing or holds no result, an unreadable result or
            hyperparameter file, or a seed whose two sides were measured against different gold
            metrics (another test half or cache).
    """
    d_recs, t_recs = load_side(defaults, "--defaults"), load_side(tuned, "--tuned")
    tuning_time = _tuning_times(hp_files or [])
    result: dict = {"defaults": [str(p) for p in defaults], "tuned": [str(p) for p in tuned],
                    "scenarios": {}}
    for scenario in sorted({r.get("scenario") for r in d_recs} & {r.get("scenario") for r in t_recs}):
        d, t = _by_method(d_recs, scenario), _by_method(t_recs, scenario)
        for seed in set(d.get("gold", {})) & set(t.get("gold", {})):
            check_same_gold(d["gold"][seed], t["gold"][seed], f"{scenario} seed {seed}")
        side_seeds = {side: sorted(set(recs.get("gold", {})) & set(recs.get("original", {})))
                      for side, recs in (("defaults", d), ("tuned", t))}
        rows = []
        for method in ["original", "gold"] + sorted((set(d) | set(t)) - {"original", "gold"}):
            row: dict = {"method": method}
            for side, recs in (("defaults", d), ("tuned", t)):
                seeds = side_seeds[side]
                rs = [recs[method][s] for s in seeds if s in recs.get(method, {})]
                if not rs:
                    continue
                orig = [recs["original"][s] for s in seeds]
                gold = [recs["gold"][s] for s in seeds]
                row[side] = {
                    **{k: [r["metrics"][k] for r in rs] for k in KEYS},
                    "avg_gap": [r["summary"]["avg_gap"] for r in rs],
                    "time_s": [r["time_s"] for r in rs if isinstance(r.get("time_s"), (int, float))],
                    "hp_source": sorted({r.get("hp_source", "-") for r in rs}),
                    "flag": "" if method in ("original", "gold") else _flag(rs, orig, gold),
                    "seeds": [r["seed"] for r in rs],
                }
            row["tuning_time_s"] = tuning_time.get(scenario, {}).get(method)
            rows.append(row)
        result["scenarios"][scenario] = {"seeds": side_seeds, "rows": rows}
    return result


def markdown(result: dict) -> str:
    lines = []
    for scenario, block in result["scenarios"].items():
        seeds = block["seeds"]
        lines += [f"### {scenario} forgetting (defaults: seeds {seeds['defaults']}; tuned: "
                  f"seeds {seeds['tuned']})", "",
                  "| method | defaults: Acc_Dr / Acc_Df / MIA | Avg. Gap | time (s) "
                  "| tuned: Acc_Dr / Acc_Df / MIA | Avg. Gap | time (s) | tuning (s) |",
                  "|---|---|---:|---:|---|---:|---:|---:|"]
        for row in block["rows"]:
            cells = []
            for side in ("defaults", "tuned"):
                s = row.get(side)
                if s is None:
                    cells += ["", "", ""]
                    continue
                acc = " / ".join(_cell(s[k]) for k in KEYS)
                if s["flag"]:
                    acc += f" ({s['flag']})"
                cells += [acc, _cell(s["avg_gap"]), _cell(s["time_s"], 1) if s["time_s"] else "-"]
            tt = row.get("tuning_time_s")
            cells.append(f"{tt:.0f}" if isinstance(tt, (int, float)) else "")
            lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--defaults", type=Path, nargs="+", required=True)
    parser.add_argument("--tuned", type=Path, nargs="+", required=True)
    parser.add_argument("--hp-file", type=Path, nargs="+",
                        help="hyperparameter files of deepclean tune (one per scenario is fine)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    return emit(lambda: compare(args.defaults, args.tuned, args.hp_file), args.out, markdown)


def description(doc: str) -> str:
    """The first paragraph of a script's docstring, on one line (its --help description)."""
    return " ".join(doc.split("\n\n")[0].split())


def emit(compute, out: Path | None, to_markdown) -> int:
    """Run ``compute()``, write its result as JSON to ``out`` (when given) and print its
    Markdown table: 0; bad input (:class:`InputError`) is one line on stderr: 2."""
    try:
        check_out(out)
        result = compute()
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
