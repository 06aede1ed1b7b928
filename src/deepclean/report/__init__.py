"""Reports built only from result records (JSON): tables in Markdown, CSV and LaTeX (tables), the
paper's figures (figures), a single-file HTML report (html), and all of them at once (build)."""

from deepclean.report.build import build_report
from deepclean.report.common import get_field, mean_ci, precompute_note
from deepclean.report.tables import (
    TABLES,
    csv_table,
    is_failed,
    latex_tables,
    load_records,
    load_sweep_records,
    markdown_tables,
    missing_references,
    summarise,
    write_tables,
)

__all__ = [
    "TABLES",
    "build_report",
    "csv_table",
    "get_field",
    "is_failed",
    "latex_tables",
    "load_records",
    "load_sweep_records",
    "markdown_tables",
    "mean_ci",
    "missing_references",
    "precompute_note",
    "summarise",
    "write_tables",
]
