"""Reports built only from result records (JSON): tables in Markdown, CSV and LaTeX (tables), the
paper's figures (figures) and a single-file HTML report (html)."""

from deepclean.report.tables import build_report, load_records

__all__ = ["build_report", "load_records"]
