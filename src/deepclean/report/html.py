"""A single-file HTML report for a reviewer who does not read JSON.

Per (data set, model, scenario): what was forgotten (scenario, |D_f|, the forget set's SHA-256 per
seed), by which methods, a table of every metric with the gold model's value beside each method's
and the ideal direction, the unlearning times, the forget samples LiRA finds most remembered,
and every figure embedded as a base64 PNG (no external files, scripts or styles).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
from collections import defaultdict
from pathlib import Path
from typing import Any

from deepclean.checkpoint import atomic_write_text
from deepclean.report.catalogue import columns
from deepclean.report.common import (
    auto_gamma_note,
    behaviour_notes,
    get_field,
    gold_spread_note,
    mean_ci,
    memorisation_note,
    precompute_note,
    verdict_lines,
)

__all__ = ["render_html_report", "write_html_report", "REPORT_METRICS"]

#: (label, getter, digits, ideal) of each row of the per-scenario table (from the catalogue).
REPORT_METRICS = columns(["acc_retain", "acc_forget", "acc_test", "mia", "mia_efficacy", "loss_lr",
                          "lira_auc", "lira_tpr", "js_forget", "kl_forget", "act_forget",
                          "js_test", "w_gold", "avg_gap", "tug_of_war", "rte", "n_reset",
                          "share_reset", "time_s"], long=True)

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:0.6em 0 1.2em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}
th{background:#f2f2f2} td:first-child,th:first-child{text-align:left}
td.gold{background:#fff6e0} .note{color:#555;font-size:13px} code{font-size:12px}
img{max-width:100%;border:1px solid #eee;margin:0.4em 0}
"""


def _fmt(values: list[float], digits: int) -> str:
    values = [float(v) for v in values if v is not None]
    if not values:
        return "-"
    mean, half = mean_ci(values)
    return f"{mean:.{digits}f}" + ("" if half is None else f" ± {half:.{digits}f}")


def _order(method: str) -> tuple[int, str]:
    return ({"gold": 0, "original": 1}.get(method, 2), method)


def forgotten_text(r: dict[str, Any]) -> str:
    """What a record's forget set is, in words: the classes, the fraction or the request."""
    if r.get("forgotten"):
        return str(r["forgotten"])
    n_f, n = r.get("n_forget"), r.get("n_train")
    share = f" ({100.0 * n_f / n:.1f} % of {n} training samples)" if n_f and n else ""
    if r.get("scenario") == "class":
        return f"a whole class, {n_f} samples{share}"
    if r.get("scenario") == "random":
        return f"{n_f} random samples{share}"
    return f"{n_f} requested samples{share}"


def _section(key: tuple, recs: list[dict[str, Any]]) -> str:
    dataset, model, scenario = key
    e = html.escape
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in recs:
        by_method[r["method"]].append(r)
    methods = sorted(by_method, key=_order)
    unlearning = [m for m in methods if m not in ("gold", "original")]
    seeds = sorted({r["seed"] for r in recs})
    ref = by_method.get("gold") or recs
    forgotten = "".join(
        f"<tr><td>{r['seed']}</td><td>{e(forgotten_text(r))}</td><td>{r.get('n_forget', '-')}"
        f"</td><td>{r.get('n_retain', '-')}</td><td>{r.get('n_train', '-')}</td><td><code>"
        f"{e(str(r.get('forget_sha256', '-')))}</code></td><td>{r.get('gold_seeds', 1)}</td></tr>"
        for r in sorted(ref, key=lambda r: r["seed"])
    )
    spread = ("Mean ± 95 % interval over seeds." if len(seeds) > 1 else
              "One seed: single values, no interval (run --seeds 0 1 2 for intervals).")
    parts = [
        f"<h2>{e(dataset)} / {e(model)} / {e(scenario)} forgetting</h2>",
        f"<p>Unlearning methods: {', '.join(e(m) for m in unlearning) or 'none'}. References: "
        "the gold model (retrained without D_f) and the original model. "
        f"Seeds: {seeds}.</p>",
        "<h3>What was forgotten</h3>",
        "<table><tr><th>seed</th><th>forgotten</th><th>|D_f|</th><th>|D_r|</th>"
        "<th>training samples</th><th>forget set SHA-256</th><th>gold models</th></tr>"
        + forgotten + "</table>",
        "<h3>Each metric against gold</h3>",
        f"<p class='note'>{spread} The gold model is the target: its column is shaded; 'ideal' "
        "says which value is best.</p>",
    ]
    head = "".join(f"<th>{e(m)}</th>" for m in methods)
    rows = []
    for label, get, digits, ideal in REPORT_METRICS:
        cells = "".join(
            f"<td{' class=gold' if m == 'gold' else ''}>"
            f"{e(_fmt([get(r) for r in by_method[m]], digits))}</td>" for m in methods)
        rows.append(f"<tr><td>{e(label)}</td>{cells}<td>{e(ideal)}</td></tr>")
    parts.append(f"<table><tr><th>metric</th>{head}<th>ideal</th></tr>{''.join(rows)}</table>")
    once = precompute_note(recs)
    if once:
        parts.append(f"<p class='note'>{e(once)}</p>")
    if memorisation_note(recs):
        parts.append(f"<p class='note'>{e(memorisation_note(recs))}</p>")
    if gold_spread_note(recs):
        parts.append(f"<p class='note'>{e(gold_spread_note(recs))}</p>")
    findings = behaviour_notes(recs)
    if findings:
        parts.append("<h3>Findings</h3><ul>" + "".join(f"<li>{e(f)}</li>" for f in findings)
                     + "</ul>")
    if auto_gamma_note(recs):
        parts.append(f"<p class='note'>{e(auto_gamma_note(recs))}</p>")
    verdicts = verdict_lines(recs)
    if verdicts:
        items = "".join(f"<li>{e(line.removeprefix('- '))}</li>" for line in verdicts[1:])
        parts.append(f"<h3>Forgetting verdict</h3><p class='note'>{e(verdicts[0])}</p>"
                     f"<ul>{items}</ul>")
    if any(get_field(r, "mia_family", "lira_reason") for r in recs):
        k = max(int(r.get("gold_seeds") or 1) for r in recs)
        parts.append(
            f"<p class='note'>LiRA: this run has {k} gold model(s) per seed; the attack needs at "
            "least 2 reference gold models for a method (--gold-models 2) and 3 for the gold "
            "model's own value (it cannot be its own reference).</p>")
    remembered = []
    for m in methods:
        for r in sorted(by_method[m], key=lambda r: r["seed"])[:1]:
            top = get_field(r, "mia_family", "lira", "top_remembered")
            if top:
                items = ", ".join(f"{t['index']} (z {t['z']:.1f})" for t in top)
                remembered.append(f"<li>{e(m)} (seed {r['seed']}): {e(items)}</li>")
    if remembered:
        parts.append("<h3>Forget samples still remembered most (LiRA z-score)</h3><p class='note'>"
                     "Indices into the training subset, as in the split manifest.</p><ul>"
                     + "".join(remembered) + "</ul>")
    return "\n".join(parts)


def render_html_report(records: list[dict[str, Any]], sweep: list[dict[str, Any]],
                       figures: list[dict[str, str]],
                       failed: list[dict[str, Any]] | None = None) -> str:
    """The report as one HTML string (figures embedded from their PNG files); ``failed`` are the
    records of method runs that failed, listed with their reasons at the top."""
    e = html.escape
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["dataset"], r["model"], r["scenario"])].append(r)
    body = [
        "<h1>DeepClean unlearning report</h1>",
        f"<p class='note'>Built from {len(records)} result records and {len(sweep)} gamma-sweep "
        f"records on {_dt.datetime.now().isoformat(timespec='seconds')}. Time is the unlearning "
        "step alone; the gold model's time is its training time.</p>",
    ]
    if failed:
        body.append("<h2>Failed method runs</h2><ul>" + "".join(
            f"<li><b>{e(r['method'])}</b> ({e(str(r['dataset']))} / {e(str(r['model']))} / "
            f"{e(str(r['scenario']))}, seed {r['seed']}): {e(str(r.get('failure', '')))}</li>"
            for r in failed) + "</ul>")
    if not records:
        body.append("<p>No result records.</p>")
    for key in sorted(groups):
        body.append(_section(key, groups[key]))
    if sweep:
        body.append("<h2>Gamma sweep</h2><table><tr><th>data / model / scenario</th><th>seed</th>"
                    "<th>gamma</th><th>|W_f|</th><th>Acc_Dr</th><th>Acc_Df</th><th>MIA</th></tr>")
        for r in sorted(sweep, key=lambda r: (r["dataset"], r["model"], r["scenario"],
                                              r["seed"], r["gamma"])):
            body.append(
                f"<tr><td>{e(r['dataset'])} / {e(r['model'])} / {e(r['scenario'])}</td>"
                f"<td>{r['seed']}</td><td>{r['gamma']:g}</td><td>{r['n_reset']}</td>"
                f"<td>{r['metrics']['acc_retain']:.2f}</td><td>{r['metrics']['acc_forget']:.2f}"
                f"</td><td>{r['metrics']['mia']:.2f}</td></tr>")
        body.append("</table>")
    if figures:
        body.append("<h2>Figures</h2>")
    for fig in figures:
        data = base64.b64encode(Path(fig["png"]).read_bytes()).decode("ascii")
        body.append(f"<h3>{e(fig['title'])}</h3>"
                    f"<img alt='{e(fig['title'])}' src='data:image/png;base64,{data}'>")
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<title>DeepClean unlearning report</title><style>" + _STYLE + "</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_html_report(records: list[dict[str, Any]], sweep: list[dict[str, Any]],
                      figures: list[dict[str, str]], path: str | Path,
                      failed: list[dict[str, Any]] | None = None) -> Path:
    """Write :func:`render_html_report` atomically to ``path``; return it."""
    path = Path(path)
    atomic_write_text(path, render_html_report(records, sweep, figures, failed))
    return path
