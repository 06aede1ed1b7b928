"""Forget/retain splits of a training set: a random fraction, whole classes, or a list of indices.

The paper's scenarios (Shi et al., arXiv 2311.10448, section 4): (i) a random 10 % of the training
samples; (ii) every sample of class 0. A user's deletion request is an explicit list of indices.
D_f and D_r are disjoint and together cover the training set; the same seed gives the same split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from deepclean._digest import indices_digest
from deepclean.errors import DataError
from deepclean.validation import check_index_values

__all__ = ["ForgetSplit", "random_split", "class_split", "index_split", "make_split", "SCENARIOS"]

SCENARIOS = ("random", "class", "indices")


@dataclass(frozen=True)
class ForgetSplit:
    """Indices of D_f and D_r within a training set of ``n`` samples.

    Attributes:
        scenario: ``"random"``, ``"class"`` or ``"indices"``.
        forget: sorted int64 indices of D_f, shape ``(|D_f|,)``.
        retain: sorted int64 indices of D_r, shape ``(n - |D_f|,)``.
        n: size of the training set.
        detail: how the split was made (fraction and seed, classes, or the request).
    """

    scenario: str
    forget: torch.Tensor
    retain: torch.Tensor
    n: int
    detail: dict

    @property
    def digest(self) -> str:
        """SHA-256 of ``n`` and the forget indices: identifies the split in caches and metadata."""
        return indices_digest(self.forget, self.n, sort=False)

    def manifest(self, *, store_indices: bool = True) -> dict:
        """A JSON-ready description; with ``store_indices=False`` only the hash is kept."""
        out = {
            "scenario": self.scenario,
            "n_train": self.n,
            "n_forget": int(self.forget.numel()),
            "n_retain": int(self.retain.numel()),
            "detail": self.detail,
            "forget_sha256": self.digest,
        }
        if store_indices:
            out["forget_indices"] = self.forget.tolist()
        return out


def _complement(n: int, forget: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[forget] = False
    return torch.nonzero(keep).flatten()


def random_split(n: int, fraction: float, *, seed: int) -> ForgetSplit:
    """D_f = ``round(fraction * n)`` samples drawn without replacement with ``seed``.

    Raises:
        DataError: ``fraction`` not in (0, 1), or it selects no sample or every sample.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise DataError(
            f"the forget fraction must lie in (0, 1), got {fraction!r}; e.g. 0.1 forgets 10 %"
        )
    k = int(round(fraction * n))
    if k < 1 or k >= n:
        raise DataError(
            f"a fraction of {fraction} of {n} samples gives {k} forget samples; D_f and D_r must "
            "both be non-empty. Choose a larger fraction or data set."
        )
    g = torch.Generator().manual_seed(seed)
    forget = torch.randperm(n, generator=g)[:k].sort().values
    return ForgetSplit("random", forget, _complement(n, forget), n,
                       {"fraction": fraction, "seed": seed})


def class_split(labels: torch.Tensor, classes: Sequence[int]) -> ForgetSplit:
    """D_f = every sample whose label is in ``classes``.

    Raises:
        DataError: no class given, a class with no sample, or every sample selected.
    """

    classes = sorted(set(check_index_values(list(classes), "forget classes")))
    if not classes:
        raise DataError("class forgetting needs at least one class to forget")
    present = set(labels.unique().tolist())
    missing = [c for c in classes if c not in present]
    if missing:
        raise DataError(
            f"class(es) {missing} have no training sample; the labels present are "
            f"{sorted(present)}. Choose a forget class among them."
        )
    forget = torch.nonzero(torch.isin(labels, torch.tensor(classes))).flatten()
    if forget.numel() == labels.numel():
        raise DataError(
            f"forgetting class(es) {classes} takes every training sample and leaves D_r empty; "
            "expected at least one class to remain. Forget fewer classes."
        )
    return ForgetSplit("class", forget, _complement(labels.numel(), forget), labels.numel(),
                       {"classes": classes})


def index_split(n: int, indices: Sequence[int]) -> ForgetSplit:
    """D_f = the training samples at ``indices`` (a user's deletion request).

    Raises:
        DataError: empty request, an index outside ``[0, n)``, a duplicate, or every sample.
    """

    if isinstance(indices, (str, bytes)):
        raise DataError(
            f"the forget indices must be a sequence of integers, got the string {indices!r}; "
            "pass e.g. [3, 17, 42]"
        )
    idx = torch.as_tensor(check_index_values(indices), dtype=torch.int64)
    if idx.numel() == 0:
        raise DataError(
            "the deletion request holds no index (empty forget set); expected at least one "
            "training-set index to forget"
        )
    negative = idx[idx < 0]
    if negative.numel():
        raise DataError(
            f"forget indices must be >= 0 (positions in the training set), got negative values "
            f"{negative[:5].tolist()}; Python-style negative indexing is not accepted"
        )
    bad = idx[idx >= n]
    if bad.numel():
        raise DataError(
            f"forget indices must lie in [0, {n}) for a training set of {n} samples; got "
            f"{bad[:5].tolist()}. Index the training set that is being unlearned (with "
            "--train-size, the drawn subset)."
        )
    uniq = idx.unique()
    if uniq.numel() != idx.numel():
        counts = torch.bincount(idx - idx.min())
        dup = (torch.nonzero(counts > 1).flatten() + idx.min())[:5].tolist()
        raise DataError(
            f"the deletion request lists some index more than once (e.g. {dup}); expected each "
            "index once. Remove the duplicates."
        )
    if uniq.numel() == n:
        raise DataError(
            f"the deletion request covers every one of the {n} training samples, so D_r would be "
            "empty; expected a strict subset. To forget everything, train a new model instead."
        )
    return ForgetSplit("indices", uniq, _complement(n, uniq), n, {"n_requested": int(idx.numel())})


def make_split(
    scenario: str,
    labels: torch.Tensor,
    *,
    fraction: float = 0.1,
    classes: Sequence[int] = (0,),
    indices: Sequence[int] | None = None,
    seed: int = 0,
) -> ForgetSplit:
    """Build the split of a scenario (one of :data:`SCENARIOS`) over a training set's ``labels``.

    Raises:
        DataError: unknown scenario, or the scenario's own errors.
    """
    n = int(labels.numel())
    if scenario == "random":
        return random_split(n, fraction, seed=seed)
    if scenario == "class":
        return class_split(labels, classes)
    if scenario == "indices":
        if indices is None:
            raise DataError("scenario 'indices' needs the list of training indices to forget")
        return index_split(n, indices)
    raise DataError(f"unknown scenario {scenario!r}; expected one of {list(SCENARIOS)}")
