"""Tables, figures and the HTML report, built only from result records (the JSON files).

One table per (data set, model, scenario), one row per method, in the layout of the paper's
Tables 1-3: Acc_Dr, Acc_Df, Acc_test, MIA (all %), dAcc_Df and dMIA against the gold model
(percentage points), the weights reset (number and %), and the unlearning time (seconds); Table 4
(the "Zero Weights" ablation) has the same columns for original, gold, Zero Weights and DeepClean.
Three more tables carry the evaluation beyond the paper: the MIA family, the distances to gold
and the summaries (Avg. Gap, tug of war, RTE), each with an "ideal" row stating the direction of
every column, and the gold model's row first. With several seeds each cell is the mean ± the
half-width of the 95 % t-interval over seeds.

:func:`build_report` (``deepclean report RESULTS_DIR``) rebuilds everything from the files:
``results.md`` / ``.csv`` / ``.tex`` (paper layout), ``tables/<name>.{md,csv,tex}`` for every
table, ``figures/*.png`` and ``.svg`` (:mod:`deepclean.report.figures`), and ``report.html``
(:mod:`deepclean.report.html`).
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from deepclean.checkpoint import atomic_write_text
from deepclean.errors import CheckpointError
from deepclean.report.catalogue import columns
from deepclean.report.common import (
    auto_gamma_note,
    behaviour_notes,
    gold_spread_note,
    mean_ci,
    memorisation_note,
    precompute_note,
    verdict_lines,
)

__all__ = ["load_records", "load_sweep_records", "summarise", "markdown_tables", "csv_table",
           "latex_tables", "write_tables", "mean_ci", "is_failed", "missing_references",
           "precompute_note", "TABLES"]



_ORDER = {"original": 0, "gold": 1}

_PAPER_COLUMNS = columns(["acc_retain", "acc_forget", "acc_test", "mia", "d_acc_forget", "d_mia",
                          "n_reset", "share_reset", "time_s"], ideal=False)
_MIA_COLUMNS = columns(["mia_entropy", "mia_efficacy", "loss_lr", "lira_auc", "lira_tpr"])
_DIST_COLUMNS = columns(["js_forget", "kl_forget", "act_forget", "js_test", "kl_test", "act_test",
                         "w_gold", "w_original", "js_forget_norm", "act_forget_norm",
                         "w_gold_norm"])
_SUMMARY_COLUMNS = columns(["avg_gap", "tug_of_war", "rte", "time_s"])
_COLUMNS = _PAPER_COLUMNS

#: name -> (title, columns, methods kept or None for all, note)
TABLES: dict[str, tuple[str, list, tuple[str, ...] | None, str]] = {
    "paper": ("Tables 1-3 (paper layout)", _PAPER_COLUMNS, None,
              "Accuracies and MIA in %; dAcc_Df and dMIA in points against gold (closer to 0 is "
              "better); time in seconds: the unlearning step alone (gold: its training time; "
              "original: not an unlearning method)."),
    "ablation": ("Table 4 (ablation: Zero Weights)", _PAPER_COLUMNS,
                 ("original", "gold", "zero_weights", "deepclean"),
                 "Zero Weights: DeepClean's reset without the fine-tune."),
    "mia": ("Membership inference family", _MIA_COLUMNS, None,
            "Target: the gold model's value for every attack (row 'gold'). MIA entropy: % of D_f "
            "called member (paper). MIA-efficacy: % of D_f called non-member (RBF SVC on p_y). "
            "Loss-LR: attack accuracy D_f vs test, 5-fold CV on balanced sets. LiRA: per-example "
            "offline attack against K gold models (needs --gold-models >= 2; gold's own value "
            "needs K >= 3)."),
    "distances": ("Distances to gold", _DIST_COLUMNS, None,
                  "JS in bits (base 2), KL(gold || model) in nats averaged over samples, "
                  "activation distance = mean L2 between probability vectors, W = L2 over all "
                  "parameters. '/ gold-gold': divided by the same distance between two gold "
                  "seeds (needs --gold-models >= 2)."),
    "summary": ("Summaries", _SUMMARY_COLUMNS, None,
                "Avg. Gap: mean |gap to gold| over Acc_Df, Acc_Dr, Acc_test, MIA (points). Tug of "
                "war: product over D_f, D_r, test of (1 - |accuracy gap| / 100). RTE: gold "
                "training time / unlearning time."),
}


def load_records(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every result record under ``results_dir`` (its ``results/`` folder, or itself).

    JSON files that are not result records (``config.json``, ``sweep_config.json``) are skipped.
    A record whose metrics are missing or not numbers is kept, marked ``status: "damaged"`` with
    the reason, so that the tables show it instead of dropping the row.

    Raises:
        CheckpointError: a file that is not readable JSON, or a JSON object in ``results/``
            without the keys that identify a result; the message names the file.
    """

    root = Path(results_dir)
    folder = root / "results" if (root / "results").is_dir() else root
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise CheckpointError(
                f"{path} is not readable JSON ({exc}); restore it, or delete it and run the same "
                "'deepclean run' again to recompute that result"
            ) from exc
        if not isinstance(record, dict) or path.name in _NOT_RECORDS:
            continue
        if not _ID_KEYS <= record.keys():
            if folder.name == "results":
                missing = sorted(_ID_KEYS - record.keys())
                raise CheckpointError(
                    f"{path} is not a result record (missing {missing}); restore it or delete "
                    "it and run the same 'deepclean run' again"
                )
            continue
        why = _damage(record)
        if why:
            record = record | {"status": "damaged", "failure": f"{path.name}: {why}"}
        out.append(record)
    return out


_ID_KEYS = {"dataset", "model", "scenario", "method", "seed"}
_NOT_RECORDS = {"config.json", "sweep_config.json", "hyperparameters.json"}


def _damage(record: dict[str, Any]) -> str:
    """Why a record cannot be tabulated ('' when it can): metrics missing or not numbers."""
    if record.get("status") == "failed":
        return ""
    metrics = record.get("metrics")
    if not isinstance(metrics, dict):
        return "no 'metrics'"
    for key in ("acc_retain", "acc_forget", "acc_test", "mia"):
        value = metrics.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"metric {key!r} is {value!r}, not a number"
    return ""


def missing_references(records: Iterable[dict[str, Any]]) -> list[str]:
    """Sentences naming each (data set, model, scenario, seed) that has method results but no
    gold or no original record (a deleted file): its gaps to gold cannot be re-checked."""
    have: dict[tuple, set[str]] = defaultdict(set)
    for r in records:
        have[(r["dataset"], r["model"], r["scenario"], r["seed"])].add(r["method"])
    out = []
    for key, methods in sorted(have.items(), key=lambda kv: tuple(map(str, kv[0]))):
        for ref in ("gold", "original"):
            if ref not in methods:
                out.append(f"MISSING: no {ref} record for {key[0]} / {key[1]} / {key[2]} forgetting, "
                           f"seed {key[3]}; the gaps shown were computed when the run was made")
    return out


def load_sweep_records(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every gamma-sweep record under ``results_dir/sweep`` (``deepclean sweep-gamma``)."""
    folder = Path(results_dir) / "sweep"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() \
        else []




def summarise(records: Iterable[dict[str, Any]], columns: list | None = None
              ) -> dict[tuple, list[dict[str, Any]]]:
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
            ok = [r for r in recs if not is_failed(r)]
            row: dict[str, Any] = {
                "method": method, "seeds": sorted(r["seed"] for r in ok),
                "failed": sorted((r["seed"], str(r.get("failure", "")), str(r["status"]))
                                 for r in recs if is_failed(r)),
            }
            for label, get, *_ in (columns or _COLUMNS):
                values = [get(r) for r in ok]
                values = [v for v in values if v is not None]
                row[label] = mean_ci([float(v) for v in values]) if values else None
            rows.append(row)
        rows.sort(key=lambda row: (_ORDER.get(row["method"], 2), row["method"]))
        out[key] = rows
    return out


def is_failed(record: dict[str, Any]) -> bool:
    """Whether a result record has no usable metrics: the method run failed (diverged), or its
    file was damaged."""
    return record.get("status") in ("failed", "damaged")


def _label(row: dict[str, Any]) -> str:
    """The method's name, marked when some or all of its seeds failed."""
    if not row["failed"]:
        return row["method"]
    word = "DAMAGED" if all(st == "damaged" for *_, st in row["failed"]) else "FAILED"
    if not row["seeds"]:
        return f"{row['method']} ({word})"
    return f"{row['method']} ({word.lower()} on seed {', '.join(str(s) for s, *_ in row['failed'])})"


def hp_sources(records: Iterable[dict[str, Any]]) -> str:
    """One line saying where each method's hyperparameters came from ("defaults", "tuned" with
    ``--hp-file``, "user" with ``--hp``), or '' when every method ran at its defaults."""
    seen: dict[str, set[str]] = defaultdict(set)
    for r in records:
        if r.get("hp_source"):
            seen[r["method"]].add(r["hp_source"])
    if all(v == {"defaults"} for v in seen.values()):
        return ""
    return "Hyperparameters: " + ", ".join(f"{m} {'/'.join(sorted(v))}"
                                           for m, v in sorted(seen.items())) + "."


def failure_notes(rows: Iterable[dict[str, Any]]) -> list[str]:
    """One line per failed (method, seed) with the reason."""
    return [f"{status.upper()}: {row['method']}, seed {seed}: {why}"
            for row in rows for seed, why, status in row["failed"]]


def _cell(value: tuple[float, float | None] | None, digits: int) -> str:
    if value is None:
        return "-"
    mean, half = value
    text = f"{mean:.{digits}f}"
    return text if half is None else f"{text} ± {half:.{digits}f}"


def _groups(records: Iterable[dict[str, Any]], table: str):
    title, columns, keep, note = TABLES[table]
    records = [r for r in records if keep is None or r["method"] in keep]
    if keep is not None and not any(r["method"] == "zero_weights" for r in records):
        return title, columns, note, {}
    return title, columns, note, dict(sorted(summarise(records, columns).items()))


def _ideal_row(columns: list) -> list[str] | None:
    if all(c[3] is None for c in columns):
        return None
    return ["ideal"] + [c[3] or "" for c in columns]




def markdown_tables(records: Iterable[dict[str, Any]], table: str = "paper") -> str:
    """Markdown tables of kind ``table`` (a key of :data:`TABLES`), one per (data set, model,
    scenario); an empty string when no record applies."""
    records = list(records)
    title, columns, note, groups = _groups(records, table)
    parts = []
    for (dataset, model, scenario), rows in groups.items():
        seeds = sorted({s for row in rows for s in row["seeds"]})
        header = ["Method"] + [c[0] for c in columns]
        lines = [
            f"### {title}: {dataset} / {model} / {scenario} forgetting (seeds {seeds})",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|",
        ]
        ideal = _ideal_row(columns)
        if ideal:
            lines.append("| " + " | ".join(f"*{c}*" if c else "" for c in ideal) + " |")
        for row in rows:
            if row["failed"] and not row["seeds"]:
                cells = [_label(row)] + ["failed"] * len(columns)
            else:
                cells = [_label(row)] + [_cell(row[c[0]], c[2]) for c in columns]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", note, *failure_notes(rows)]
        lines += [m for m in missing_references(records)
                  if f"{dataset} / {model} / {scenario} forgetting" in m]
        group = [r for r in records if (r.get("dataset"), r.get("model"),
                                        r.get("scenario")) == (dataset, model, scenario)]
        if memorisation_note(group):
            lines.append(memorisation_note(group))
        if table == "paper" and gold_spread_note(group):
            lines.append(gold_spread_note(group))
        if table == "paper":  # once per group (results.md), not under every other table
            findings = behaviour_notes(group)
            if findings:
                lines += ["", "Findings:", *(f"- {f}" for f in findings), ""]
            if auto_gamma_note(group):
                lines.append(auto_gamma_note(group))
            verdicts = verdict_lines(group)
            if verdicts:
                lines += ["", *verdicts, ""]
        sources = hp_sources(group)
        if sources:
            lines.append(sources)
        once = precompute_note(r for r in records if (r.get("dataset"), r.get("model"),
                                                      r.get("scenario")) == (dataset, model, scenario))
        if once:
            lines.append(once)
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n" if parts else ""


def csv_table(records: Iterable[dict[str, Any]], table: str = "paper") -> str:
    """One CSV row per (data set, model, scenario, method) with means and interval half-widths
    (columns of ``table``); the row with method ``ideal`` states each column's direction."""
    title, columns, note, groups = _groups(list(records), table)
    buf = io.StringIO()
    writer = csv.writer(buf)
    header = ["dataset", "model", "scenario", "method", "n_seeds"]
    for c in columns:
        header += [c[0], f"{c[0]} ci95"]
    writer.writerow(header)
    for (dataset, model, scenario), rows in groups.items():
        ideal = _ideal_row(columns)
        if ideal:
            line = [dataset, model, scenario, "ideal", ""]
            for text in ideal[1:]:
                line += [text, ""]
            writer.writerow(line)
        for row in rows:
            line = [dataset, model, scenario, row["method"], len(row["seeds"])]
            for c in columns:
                value = row[c[0]]
                if value is None:
                    line += ["failed" if row["failed"] and not row["seeds"] else "", ""]
                else:
                    line += [value[0], "" if value[1] is None else value[1]]
            writer.writerow(line)
    return buf.getvalue()


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}


def _tex(text: str) -> str:
    out = "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))
    return out.replace("±", r"$\pm$").replace("<=", r"$\le$")


def latex_tables(records: Iterable[dict[str, Any]], table: str = "paper") -> str:
    """LaTeX ``table`` environments (booktabs rules) of kind ``table``, one per group."""
    records = list(records)
    title, columns, note, groups = _groups(records, table)
    parts = []
    for (dataset, model, scenario), rows in groups.items():
        seeds = sorted({s for row in rows for s in row["seeds"]})
        lines = [
            r"\begin{table}[t]",
            r"\centering",
            r"\caption{" + _tex(f"{title}: {dataset} / {model} / {scenario} forgetting, "
                                f"seeds {seeds}. {note}") + "}",
            r"\begin{tabular}{l" + "r" * len(columns) + "}",
            r"\toprule",
            " & ".join(["Method"] + [_tex(c[0]) for c in columns]) + r" \\",
            r"\midrule",
        ]
        ideal = _ideal_row(columns)
        if ideal:
            lines.append(" & ".join([r"\emph{ideal}"] + [_tex(c) for c in ideal[1:]]) + r" \\")
            lines.append(r"\midrule")
        for row in rows:
            if row["failed"] and not row["seeds"]:
                cells = [_tex(_label(row))] + ["failed"] * len(columns)
            else:
                cells = [_tex(_label(row))] + [_tex(_cell(row[c[0]], c[2])) for c in columns]
            lines.append(" & ".join(cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n" if parts else ""


def write_tables(records: list[dict[str, Any]], out_dir: str | Path) -> str:
    """Write every table of :data:`TABLES` into ``out_dir``; return the Markdown of all of them.

    Files: ``results.md`` / ``results.csv`` / ``results.tex`` (the paper layout) and
    ``tables/<name>.md`` / ``.csv`` / ``.tex`` for every table that has rows.
    """
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "results.md", markdown_tables(records))
    atomic_write_text(out_dir / "results.csv", csv_table(records))
    atomic_write_text(out_dir / "results.tex", latex_tables(records))
    parts = []
    for name in TABLES:
        md = markdown_tables(records, name)
        if not md:
            continue
        parts.append(md)
        atomic_write_text(out_dir / "tables" / f"{name}.md", md)
        atomic_write_text(out_dir / "tables" / f"{name}.csv", csv_table(records, name))
        atomic_write_text(out_dir / "tables" / f"{name}.tex", latex_tables(records, name))
    return "\n".join(parts)


