"""Progress bars (tqdm) that stay quiet where nobody watches them."""

from __future__ import annotations

from tqdm import tqdm

__all__ = ["progress_bar"]


def progress_bar(*, total: int, desc: str, enabled: bool) -> tqdm:
    """A tqdm bar of ``total`` steps, shown only when ``enabled`` *and* the output is a terminal:
    written to a log file or a pipe, carriage-return redraws would pile up as long lines
    (tqdm's ``disable=None``)."""
    return tqdm(total=total, desc=desc, disable=None if enabled else True, leave=False)
