"""Tables built only from result records (the JSON files ``deepclean run`` writes).

One table per (data set, model, scenario), one row per method, in the layout of the paper's
Tables 1-3: Acc_Dr, Acc_Df, Acc_test, MIA (all %), dAcc_Df and dMIA against the gold model
(percentage points), the weights reset (number and %), and the unlearning time (seconds). With
several seeds each cell is the mean ± the half-width of the 95 % t-interval over seeds.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from deepclean.checkpoint import atomic_write_text

__all__ = ["load_records", "summarise", "markdown_tables", "csv_table", "write_tables",
           "mean_ci"]

_COLUMNS = [
    ("Acc_Dr", lambda r: r["metrics"]["acc_retain"], 2),
    ("Acc_Df", lambda r: r["metrics"]["acc_forget"], 2),
    ("Acc_test", lambda r: r["metrics"]["acc_test"], 2),
    ("MIA", lambda r: r["metrics"]["mia"], 2),
    ("dAcc_Df", lambda r: r["gaps"]["d_acc_forget"], 2),
    ("dMIA", lambda r: r["gaps"]["d_mia"], 2),
    ("reset", lambda r: r.get("n_reset"), 0),
    ("reset %", lambda r: None if r.get("share_reset") is None else 100 * r["share_reset"], 2),
    ("time (s)", lambda r: r.get("time_s"), 1),
]
_ORDER = {"original": 0, "gold": 1}


def load_records(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every result record under ``results_dir`` (its ``results/`` folder, or itself)."""
    root = Path(results_dir)
    folder = root / "results" if (root / "results").is_dir() else root
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and half-width of the 95 % Student-t interval (``None`` for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(t.ppf(0.975, n - 1) * sd / math.sqrt(n))


def summarise(records: Iterable[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Group records by (dataset, model, scenario) and aggregate each method over seeds.

    Returns:
        ``{(dataset, model, scenario): [row, ...]}``; each row has ``method``, ``seeds`` and per
        column a ``(mean, half_width_or_None)`` pair, or ``None`` where the column does not apply.
    """
    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        groups[(r["dataset"], r["model"], r["scenario"])][r["method"]].append(r)
    out = {}
    for key, methods in groups.items():
        rows = []
        for method, recs in methods.items():
            row: dict[str, Any] = {"method": method, "seeds": sorted(r["seed"] for r in recs)}
            for label, get, _ in _COLUMNS:
                values = [get(r) for r in recs]
                values = [v for v in values if v is not None]
                row[label] = mean_ci([float(v) for v in values]) if values else None
            rows.append(row)
        rows.sort(key=lambda row: (_ORDER.get(row["method"], 2), row["method"]))
        out[key] = rows
    return out


def _cell(value: tuple[float, float | None] | None, digits: int) -> str:
    if value is None:
        return "-"
    mean, half = value
    text = f"{mean:.{digits}f}"
    return text if half is None else f"{text} ± {half:.{digits}f}"


def markdown_tables(records: Iterable[dict[str, Any]]) -> str:
    """Markdown tables, one per (data set, model, scenario)."""
    parts = []
    for (dataset, model, scenario), rows in sorted(summarise(records).items()):
        seeds = sorted({s for row in rows for s in row["seeds"]})
        header = ["Method"] + [label for label, _, _ in _COLUMNS]
        lines = [
            f"### {dataset} / {model} / {scenario} forgetting (seeds {seeds})",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] + ["---:"] * len(_COLUMNS)) + "|",
        ]
        for row in rows:
            cells = [row["method"]] + [_cell(row[label], d) for label, _, d in _COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(
            "Accuracies and MIA in %; dAcc_Df and dMIA in points against gold (closer to 0 is "
            "better); time in seconds: the unlearning step alone (gold: its training time; "
            "original: not an unlearning method)."
        )
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def csv_table(records: Iterable[dict[str, Any]]) -> str:
    """One CSV row per (data set, model, scenario, method) with means and interval half-widths."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    header = ["dataset", "model", "scenario", "method", "n_seeds"]
    for label, _, _ in _COLUMNS:
        header += [label, f"{label} ci95"]
    writer.writerow(header)
    for (dataset, model, scenario), rows in sorted(summarise(records).items()):
        for row in rows:
            line: list[Any] = [dataset, model, scenario, row["method"], len(row["seeds"])]
            for label, _, _ in _COLUMNS:
                value = row[label]
                line += ["", ""] if value is None else [value[0], "" if value[1] is None else value[1]]
            writer.writerow(line)
    return buf.getvalue()


def write_tables(records: list[dict[str, Any]], out_dir: str | Path) -> str:
    """Write ``results.md`` and ``results.csv`` into ``out_dir``; return the Markdown."""
    out_dir = Path(out_dir)
    md = markdown_tables(records)
    atomic_write_text(out_dir / "results.md", md)
    atomic_write_text(out_dir / "results.csv", csv_table(records))
    return md
