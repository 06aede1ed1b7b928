"""The full evaluation of one model against gold: the MIA family and the distances to gold.

The harness (:mod:`deepclean.harness.experiment`) and the gamma sweep (:mod:`deepclean.harness.sweep`) build one
:class:`GoldReference` per (seed, model, scenario) (the gold model, the original model and any
extra gold models from other seeds, with their outputs computed once) and call
:func:`extended_metrics` for every evaluated model. Each model's logits on the training subset and
on the test set are computed once (:func:`model_outputs`) and shared by every metric.

The per-sample outputs of one model on one data set (logits, probabilities, losses) are
:func:`sample_outputs`. Both take tensors or any map-style ``Dataset`` of ``(x, y)`` pairs
(streamed through a ``DataLoader``, one batch in memory), and under ``torch.distributed`` each
rank computes its block of the samples and the per-sample rows are gathered in data-set order on
every rank (:func:`deepclean.evaluation.metrics.predict_logits`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from deepclean.data.splits import ForgetSplit
from deepclean.evaluation.distances import distances_to_gold
from deepclean.evaluation.metrics import sample_logits
from deepclean.evaluation.mia import cross_entropy_loss, mia_family, predict_logits

__all__ = ["SampleOutputs", "sample_outputs", "ModelOutputs", "model_outputs", "GoldReference",
           "build_reference", "extended_metrics"]


@dataclass
class SampleOutputs:
    """Per-sample outputs of one model on one data set, row ``i`` for sample ``i``.

    Attributes:
        logits: ``(N, K)`` float32, CPU.
        labels: ``(N,)`` int64, CPU: the data set's labels.
    """

    logits: torch.Tensor
    labels: torch.Tensor

    @property
    def probs(self) -> torch.Tensor:
        """Softmax outputs ``(N, K)``, float32."""
        return torch.softmax(self.logits, 1)

    @property
    def losses(self) -> torch.Tensor:
        """Cross-entropy ``-log p_y`` per sample ``(N,)``, float64, in nats."""
        return cross_entropy_loss(self.logits, self.labels)

    @property
    def correct(self) -> torch.Tensor:
        """Whether the top-1 prediction is the label ``(N,)``, bool."""
        return self.probs.argmax(1) == self.labels


def sample_outputs(model: nn.Module, data: Dataset, *, batch_size: int = 1000,
                   device: torch.device | str | None = None, precision: str = "fp32",
                   num_workers: int = 0, pin_memory: bool = False,
                   distributed: bool | None = None) -> SampleOutputs:
    """Logits, labels (and from them probabilities, losses) of ``model`` in eval mode on every
    sample of ``data``, a ``Dataset`` of ``(x, y)`` pairs, in the data set's order.

    A ``TensorDataset`` (or a ``Subset`` of one) is sliced in memory; any other map-style
    ``Dataset`` is read through a ``DataLoader`` (``num_workers``, ``pin_memory``), one batch of
    ``batch_size`` inputs in memory at a time. Under ``torch.distributed`` every rank passes the
    whole data set, computes its contiguous block and gets every sample's row exactly once
    (``distributed``: None automatic, True, False; see
    :func:`deepclean.evaluation.metrics.predict_logits`).

    Raises:
        DataError: ``data`` is empty, a tensor, or its items are not ``(x, y)`` pairs with
            integer labels.
        ConfigurationError: bad ``precision``, ``batch_size`` or loader options; under a process
            group, ranks that passed data of different lengths.
    """
    logits, labels = sample_logits(model, data, batch_size=batch_size, device=device,
                                   precision=precision, num_workers=num_workers,
                                   pin_memory=pin_memory, distributed=distributed)
    return SampleOutputs(logits, labels)


@dataclass
class ModelOutputs:
    """Logits (float32, CPU) of one model on the training subset and on the test set; the labels
    (int64, CPU) too when they were computed from ``Dataset`` s (else ``None``)."""

    logits_train: torch.Tensor
    logits_test: torch.Tensor
    y_train: torch.Tensor | None = None
    y_test: torch.Tensor | None = None

    @property
    def probs_train(self) -> torch.Tensor:
        return torch.softmax(self.logits_train, 1)

    @property
    def probs_test(self) -> torch.Tensor:
        return torch.softmax(self.logits_test, 1)


def model_outputs(model: nn.Module, x_train: torch.Tensor | Dataset,
                  x_test: torch.Tensor | Dataset, device: torch.device | str | None = None, *,
                  precision: str = "fp32", num_workers: int = 0, pin_memory: bool = False,
                  distributed: bool | None = None) -> ModelOutputs:
    """Logits (float32) of ``model`` (eval mode) on ``x_train`` and ``x_test``, the forward passes
    in ``precision`` (``"fp32"`` or ``"bf16"``, see :func:`deepclean.evaluation.metrics.predict_logits`).

    Each of ``x_train`` and ``x_test`` is inputs ``(N, ...)`` or a ``Dataset`` of ``(x, y)``
    pairs (streamed, and sharded and gathered under a process group, as :func:`sample_outputs`);
    for a ``Dataset`` its labels are kept in ``y_train`` / ``y_test``."""
    options = dict(device=device, precision=precision, num_workers=num_workers,
                   pin_memory=pin_memory, distributed=distributed)

    def one(x: torch.Tensor | Dataset) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(x, torch.Tensor):
            return predict_logits(model, x, **options), None
        return sample_logits(model, x, **options)

    (logits_train, y_train), (logits_test, y_test) = one(x_train), one(x_test)
    return ModelOutputs(logits_train, logits_test, y_train, y_test)


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
