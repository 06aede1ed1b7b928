"""The full evaluation of one model against gold: the MIA family and the distances to gold.

The harness (:mod:`deepclean.harness.experiment`) and the gamma sweep (:mod:`deepclean.harness.sweep`) build one
:class:`GoldReference` per (seed, model, scenario) (the gold model, the original model and any
extra gold models from other seeds, with their outputs computed once) and call
:func:`extended_metrics` for every evaluated model. Each model's logits on the training subset and
on the test set are computed once (:func:`model_outputs`) and shared by every metric.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deepclean.data.splits import ForgetSplit
from deepclean.evaluation.distances import distances_to_gold
from deepclean.evaluation.mia import mia_family, predict_logits

__all__ = ["ModelOutputs", "model_outputs", "GoldReference", "build_reference",
           "extended_metrics"]


@dataclass
class ModelOutputs:
    """Logits (float32, CPU) of one model on the training subset and on the test set."""

    logits_train: torch.Tensor
    logits_test: torch.Tensor

    @property
    def probs_train(self) -> torch.Tensor:
        return torch.softmax(self.logits_train, 1)

    @property
    def probs_test(self) -> torch.Tensor:
        return torch.softmax(self.logits_test, 1)


def model_outputs(model: nn.Module, x_train: torch.Tensor, x_test: torch.Tensor,
                  device: torch.device | str | None = None, *,
                  precision: str = "fp32") -> ModelOutputs:
    """Logits (float32) of ``model`` (eval mode) on ``x_train`` and ``x_test``, the forward passes
    in ``precision`` (``"fp32"`` or ``"bf16"``, see :func:`deepclean.evaluation.metrics.predict_logits`)."""
    return ModelOutputs(predict_logits(model, x_train, device=device, precision=precision),
                        predict_logits(model, x_test, device=device, precision=precision))


@dataclass
class GoldReference:
    """What every model is compared with, for one (seed, model, scenario).

    Attributes:
        gold, gold_outputs: the gold model (retrained on D_r with the run's seed).
        original: the model before unlearning (for the weight distance to it).
        extra: further gold models from other seeds, with their outputs (``--gold-models K``
            gives K - 1 of them).
        gold_vs_gold: distances of the first extra gold model to the gold model (the
            normalisers), or ``None`` with a single gold model.
    """

    gold: nn.Module
    gold_outputs: ModelOutputs
    original: nn.Module | None = None
    extra: list[tuple[nn.Module, ModelOutputs]] = field(default_factory=list)
    gold_vs_gold: dict[str, Any] | None = None


def _sets(outputs: ModelOutputs, split: ForgetSplit) -> dict[str, torch.Tensor]:
    return {"forget": torch.softmax(outputs.logits_train[split.forget].double(), 1),
            "test": torch.softmax(outputs.logits_test.double(), 1)}


def build_reference(
    *, gold: nn.Module, gold_outputs: ModelOutputs, split: ForgetSplit,
    original: nn.Module | None = None,
    extra: list[tuple[nn.Module, ModelOutputs]] | None = None,
) -> GoldReference:
    """A :class:`GoldReference`, with the gold-vs-gold distances when an extra gold exists."""
    extra = list(extra or [])
    ref = GoldReference(gold=gold, gold_outputs=gold_outputs, original=original, extra=extra)
    if extra:
        other, other_out = extra[0]
        ref.gold_vs_gold = distances_to_gold(
            probs=_sets(other_out, split), gold_probs=_sets(gold_outputs, split), model=other,
            gold=gold, original=None,
        )
    return ref


def extended_metrics(
    model: nn.Module,
    outputs: ModelOutputs,
    reference: GoldReference,
    *,
    split: ForgetSplit,
    y_train: torch.Tensor,
    y_test: torch.Tensor,
    seed: int = 0,
    is_gold: bool = False,
    top_k: int = 10,
) -> dict[str, Any]:
    """``{"mia_family": ..., "distances": ...}`` of ``model``.

    LiRA's reference models are every gold model except the evaluated one: for an unlearned
    model all K gold models, for the gold model itself the K - 1 others (so its own LiRA value,
    the target, needs K >= 3). ``forget_index`` in LiRA's ``top_remembered`` indexes the training
    subset, like the split manifest's ``forget_indices``.
    """
    refs = [out for _, out in reference.extra]
    if not is_gold:
        refs = [reference.gold_outputs, *refs]
    ytr = y_train.cpu()
    mia = mia_family(
        outputs.logits_train[split.retain], ytr[split.retain],
        outputs.logits_train[split.forget], ytr[split.forget],
        outputs.logits_test, y_test.cpu(),
        reference_forget=[o.logits_train[split.forget] for o in refs],
        reference_test=[o.logits_test for o in refs],
        forget_index=split.forget, seed=seed, top_k=top_k,
    )
    dist = distances_to_gold(
        probs=_sets(outputs, split), gold_probs=_sets(reference.gold_outputs, split),
        model=model, gold=reference.gold, original=reference.original,
        gold_reference=reference.gold_vs_gold,
    )
    return {"mia_family": mia, "distances": dist}
