"""Held-out data for ``deepclean run``: samples the original model never trained on.

Nobody who honours a deletion request has a gold model; what they can measure is D_f against
held-out samples drawn like it (GUIDE.md section 9). The harness takes them from the training
images the original never saw (the default run trains on 20,000 of Fashion-MNIST's 60,000), or,
when it trained on all of them, from the validation half of the test set (never the half that
``--test-half report`` reports on).

The pool is split in two disjoint halves, drawn with the run's seed:

- ``choice``: what a method may use to choose its own settings (``DeepClean(gamma="auto",
  holdout=...)``);
- ``verdict``: what the forgetting verdict of every model is judged on
  (:func:`deepclean.evaluation.verdict.forgetting_verdict`).

A choice is never judged on the samples it was made with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset

from deepclean.data.datasets import ImageData

__all__ = ["HeldOut", "MAX_HALF", "held_out"]

#: Largest size of each half (bounds the verdict's cost: a forward pass over at most this many
#: samples per model).
MAX_HALF = 4000


@dataclass(frozen=True)
class HeldOut:
    """The held-out pool of one (seed, training subset) and its two halves.

    Attributes:
        x, y: the whole pool ``(N, C, H, W)``, ``(N,)`` (used by the memorisation measure).
        choice: half for a method's own choices (``DeepClean(gamma="auto")``).
        verdict: the other half, for the forgetting verdict.
        source: where the samples come from, in words.
    """

    x: torch.Tensor
    y: torch.Tensor
    choice: TensorDataset
    verdict: TensorDataset
    source: str


def held_out(data: ImageData, subset: torch.Tensor, *, seed: int, test_half: str,
             validation: tuple[torch.Tensor, torch.Tensor],
             max_half: int = MAX_HALF) -> HeldOut:
    """The held-out pool for the training subset ``subset`` (indices into ``data.train_x``).

    Args:
        data: the data set.
        subset: training indices the original model was trained on.
        seed: the run's seed; the halves are drawn with ``20_000 + seed``.
        test_half: the run's ``--test-half``; with ``"all"`` and no unused training image, the
            source says that the validation half is also reported.
        validation: ``(x, y)`` of the validation half of the whole test set (the fallback
            pool): never the half that ``test_half="report"`` reports on, even when ``data``'s
            test set has already been cut to that half.
        max_half: largest size of each half.

    Returns:
        A :class:`HeldOut`; the two halves are disjoint and each has at least one sample when the
        pool has two or more.
    """
    unused = torch.ones(data.train_x.shape[0], dtype=torch.bool)
    unused[subset] = False
    if bool(unused.any()):
        x, y, source = data.train_x[unused], data.train_y[unused], "unused training images"
    else:
        x, y = validation
        source = "validation half of the test set"
        if test_half == "all":
            source += ", also reported: pass --test-half report to keep them apart"
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(20_000 + seed))
    half = min(max(len(y) // 2, 1), max_half)
    choice, verdict = perm[:half], perm[half:2 * half]
    return HeldOut(x=x, y=y, choice=TensorDataset(x[choice], y[choice]),
                   verdict=TensorDataset(x[verdict], y[verdict]), source=source)
