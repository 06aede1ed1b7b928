"""Rebuild every table, figure and the HTML report of a results folder from its JSON files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deepclean.report.figures import write_figures
from deepclean.report.html import write_html_report
from deepclean.report.tables import is_failed, load_records, load_sweep_records, write_tables

__all__ = ["build_report"]


def build_report(results_dir: str | Path, *, records: list[dict[str, Any]] | None = None) -> str:
    """Rebuild every table, figure and the HTML report of ``results_dir`` from its JSON files.

    Args:
        records: the result records; ``None`` reads ``results_dir/results/*.json``. Sweep
            records are always read from ``results_dir/sweep/*.json``.

    Returns:
        The Markdown of the tables.
    """

    results_dir = Path(results_dir)
    if records is None:
        records = load_records(results_dir)
    sweep = load_sweep_records(results_dir)
    md = write_tables(records, results_dir) if records else ""
    ok = [r for r in records if not is_failed(r)]
    figures = write_figures(ok, sweep, results_dir / "figures")
    write_html_report(ok, sweep, figures, results_dir / "report.html",
                      failed=[r for r in records if is_failed(r)])
    return md
