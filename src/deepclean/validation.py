"""Input checks made before any work, with messages that say what was expected, what arrived and
how to fix it. Every check raises a :mod:`deepclean.errors` class (never ``assert``, which
``python -O`` removes).

The checks are cheap: at most one forward pass of a single sample, in eval mode and without
gradients, on the model given (its parameters, buffers and modes are left as they were).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset

from deepclean._torch import eval_mode, strip_module_prefix, unwrap_model
from deepclean.errors import ConfigurationError, DataError, MaskError, SplitMismatchError

__all__ = [
    "unwrap_model",
    "check_trainable",
    "check_inputs",
    "check_forward",
    "check_num_classes",
    "check_labels_fit",
    "check_index_values",
    "check_disjoint",
    "check_gamma",
    "check_unique",
    "sample_ids",
    "check_parameter_keys",
    "check_same_split",
    "num_workers_argument",
]

def check_trainable(model: Any) -> None:
    """Raise unless ``model`` is an ``nn.Module`` with at least one trainable parameter.

    Raises:
        ConfigurationError: not a module, or no parameter with ``requires_grad=True``.
    """
    if not isinstance(model, nn.Module):
        raise ConfigurationError(
            f"expected the model to be a torch.nn.Module, got {type(model).__name__}; pass the "
            "network itself (not its state_dict or a path)"
        )
    if not any(p.requires_grad for p in model.parameters()):
        n = sum(1 for _ in model.parameters())
        raise ConfigurationError(
            f"expected a model with trainable parameters, got one with {n} parameter tensors and "
            "none with requires_grad=True; unfreeze it first (model.requires_grad_(True))"
        )


def check_inputs(x: torch.Tensor, y: torch.Tensor, label: str) -> None:
    """Raise unless ``x`` holds finite real inputs and ``y`` integer labels >= 0.

    Integer inputs are allowed (token ids for an embedding); whether the model accepts them is
    checked by :func:`check_forward`.

    Raises:
        DataError: boolean or complex inputs, NaN or infinite inputs, non-integer or negative
            labels, or a different number of inputs and labels.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise DataError(
            f"the {label} must hold tensors (x, y); got {type(x).__name__} and {type(y).__name__}"
        )
    if x.dtype == torch.bool or x.dtype.is_complex:
        raise DataError(
            f"the {label} inputs must be real numbers, got dtype {x.dtype}; convert them with "
            "x.float()"
        )
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f"the {label} has {x.shape[0]} inputs but {y.shape[0]} labels; expected one label each"
        )
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).flatten(1).any(1).sum()) if x.ndim > 1 else -1
        raise DataError(
            f"the {label} inputs hold NaN or infinite values ({bad} samples affected); expected "
            "finite numbers. Clean or drop those samples first."
        )
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise DataError(
            f"the {label} labels must be integer class indices, got dtype {y.dtype}; convert "
            "with y.long() (one-hot labels: y.argmax(1))"
        )
    if y.numel() and int(y.min()) < 0:
        raise DataError(
            f"the {label} labels must be class indices >= 0, got a minimum of {int(y.min())}"
        )


@torch.no_grad()
def check_forward(model: nn.Module, x: torch.Tensor, label: str = "data") -> int:
    """Run one sample of ``x`` through ``model`` (eval mode, no gradients, modes restored) and
    return the number of outputs K.

    Raises:
        DataError: the sample does not fit the model (wrong shape or channels), or the model does
            not return logits of shape ``(batch, K)``.
    """

    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    sample = x[:1].to(device)
    if sample.is_floating_point() and first is not None and first.is_floating_point():
        sample = sample.to(first.dtype)
    try:
        with eval_mode(model):
            out = model(sample)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"the {label} samples have shape {tuple(x.shape[1:])} and dtype {x.dtype}, which the "
            f"model does not accept ({first_line}); expected inputs of the shape and type the "
            "model was built and trained for (float images of shape (channels, height, width))"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(
            f"expected the model to return logits of shape (batch, classes), got {shape}; wrap it "
            "so that forward returns one (B, K) tensor"
        )
    return int(out.shape[1])


def check_num_classes(model_outputs: int, num_classes: int, *, what: str = "the data set") -> None:
    """Raise unless the model's output width equals the number of classes of the data.

    Raises:
        DataError: the widths differ.
    """
    if model_outputs != num_classes:
        raise DataError(
            f"the model has {model_outputs} outputs but {what} has {num_classes} classes; expected "
            f"equal numbers. Build the model with num_classes={num_classes}."
        )


def check_labels_fit(y: torch.Tensor, num_outputs: int, label: str) -> None:
    """Raise unless every label lies in ``[0, num_outputs)``.

    Raises:
        DataError: a label the model cannot predict.
    """
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_outputs):
        raise DataError(
            f"the {label} has labels from {int(y.min())} to {int(y.max())} but the model has "
            f"{num_outputs} outputs; expected labels in [0, {num_outputs - 1}]. Check that the "
            "model was built for this data set's number of classes."
        )


def sample_ids(ds: Dataset) -> list[tuple[int, int]]:
    """The identity of every sample of ``ds`` as ``(id(base data set), index into it)``, seen
    through nested ``Subset`` and ``ConcatDataset`` views; any other data set is its own base.

    Two entries are equal exactly when they read the same sample of the same object: this is
    what the duplicate and overlap checks compare (never the sample values, so two distinct
    samples that happen to hold the same image are not duplicates).
    """
    if isinstance(ds, Subset):
        inner = sample_ids(ds.dataset)
        return [inner[int(i)] for i in ds.indices]
    if isinstance(ds, ConcatDataset):
        return [sid for part in ds.datasets for sid in sample_ids(part)]
    return [(id(ds), i) for i in range(len(ds))]  # type: ignore[arg-type]


def check_unique(ds: Dataset, label: str) -> None:
    """Raise if ``ds`` reads one sample more than once (a ``Subset`` with repeated indices, a
    ``ConcatDataset`` that repeats a data set or overlapping views).

    A repeated sample would count twice in every mean over the set (the Fisher diagonal, an
    accuracy), silently; :func:`deepclean.index_split` refuses repeated indices for the same
    reason.

    Raises:
        DataError: how many samples repeat, and the positions of the first few.
    """
    if not isinstance(ds, (Subset, ConcatDataset)):
        return  # a plain data set reads each of its samples once
    seen: dict[tuple[int, int], int] = {}
    repeats: list[tuple[int, int]] = []
    for pos, sid in enumerate(sample_ids(ds)):
        if sid in seen:
            repeats.append((seen[sid], pos))
        else:
            seen[sid] = pos
    if repeats:
        first = ", ".join(f"{a} and {b}" for a, b in repeats[:5])
        raise DataError(
            f"the {label} holds {len(repeats)} repeated samples (positions {first} read the same "
            "sample); expected each sample once. Drop the repeats (e.g. Subset(data, "
            "sorted(set(indices))))."
        )


def check_disjoint(forget: Dataset, retain: Dataset) -> None:
    """Raise if D_f and D_r are ``Subset`` views of the same data set that share samples, or are
    the very same object.

    Raises:
        DataError: the overlap (how many, and the first shared indices).
    """
    if forget is retain:
        raise DataError(
            "D_f and D_r are the same data set object; expected disjoint sets. Build them with "
            "deepclean.make_split (forget / retain indices)."
        )
    if not isinstance(forget, (Subset, ConcatDataset)) and \
            not isinstance(retain, (Subset, ConcatDataset)):
        return  # two distinct plain data sets never share a sample
    in_retain = set(sample_ids(retain))
    shared = sorted(sid[1] for sid in sample_ids(forget) if sid in in_retain)
    if shared:
        raise DataError(
            f"D_f and D_r share {len(shared)} samples of the same data set (indices "
            f"{shared[:5]}); expected disjoint sets. Build them with deepclean.make_split, whose "
            "forget and retain indices never overlap."
        )


def check_positive(**values: float) -> None:
    """Raise :class:`ConfigurationError` unless every value is a finite number > 0."""
    for key, value in values.items():
        if (not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0
                or not math.isfinite(value)):
            raise ConfigurationError(
                f"{key} must be a finite number > 0, got {value!r}; pass a positive value"
            )


def check_gamma(gamma: Any, name: str = "gamma") -> None:
    """Raise unless ``gamma`` is a finite real number > 0.

    Raises:
        ConfigurationError: anything else (0, negative, NaN, infinity, a string, a bool).
    """
    ok = isinstance(gamma, (int, float)) and not isinstance(gamma, bool)
    if not ok or not math.isfinite(gamma) or gamma <= 0:
        raise ConfigurationError(
            f"{name} must be a finite number > 0, got {gamma!r}; the paper uses 1.1 for random "
            "samples and 2.0 for a class"
        )


def check_parameter_keys(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], what: str = "Fisher diagonal"
) -> dict[str, torch.Tensor]:
    """Check that ``tensors`` has one entry per trainable parameter of ``model``, of its shape;
    a ``module.`` prefix on either side is ignored.

    Returns:
        ``tensors`` with the names of ``unwrap_model(model).named_parameters()``.

    Raises:
        MaskError: missing or unexpected names, or a shape mismatch.
    """

    params = {n: p for n, p in unwrap_model(model).named_parameters() if p.requires_grad}
    given = strip_module_prefix(dict(tensors))
    missing = sorted(set(params) - set(given))
    extra = sorted(set(given) - set(params))
    if missing or extra:
        raise MaskError(
            f"the {what}'s keys do not match the model's trainable parameters: missing "
            f"{missing[:5]}, unexpected {extra[:5]}; expected exactly the names of "
            "model.named_parameters(). Compute it on this model."
        )
    for name, p in params.items():
        if tuple(given[name].shape) != tuple(p.shape):
            raise MaskError(
                f"{name}: the {what} has shape {tuple(given[name].shape)}, the parameter "
                f"{tuple(p.shape)}; expected equal shapes. Compute it on this model."
            )
    return given


def check_same_split(
    metadata: Mapping[str, Any], split_or_digest: Any, *, what: str = "gold model"
) -> None:
    """Raise unless a model's checkpoint metadata records the forget set being evaluated.

    Args:
        metadata: the checkpoint metadata (from :func:`deepclean.checkpoint.load_checkpoint`); its
            ``forget_sha256`` (top level or under ``determinants``) names the split it was trained
            for.
        split_or_digest: a :class:`deepclean.ForgetSplit` or its ``digest``.

    Raises:
        SplitMismatchError: the metadata records no split, or another one.
    """
    expected = getattr(split_or_digest, "digest", split_or_digest)
    recorded = metadata.get("forget_sha256")
    if recorded is None and isinstance(metadata.get("determinants"), Mapping):
        recorded = metadata["determinants"].get("forget_sha256")
    if recorded is None:
        raise SplitMismatchError(
            f"the {what}'s metadata records no forget_sha256, so the split it was trained on is "
            f"unknown; expected {str(expected)[:16]}... Retrain it with deepclean run (which "
            "records the split), or save it with metadata={'forget_sha256': split.digest}."
        )
    if recorded != expected:
        raise SplitMismatchError(
            f"the {what} was trained on another forget/retain split (forget_sha256 "
            f"{str(recorded)[:16]}...) than the one being evaluated ({str(expected)[:16]}...); "
            "comparing them would be meaningless. Retrain the gold model on this split's D_r."
        )


def check_index_values(indices: Sequence[Any], label: str = "forget indices") -> list[int]:
    """Integers from ``indices``, refusing floats, bools, strings and other non-integers.

    Raises:
        DataError: a value that is not an integer (the first is named).
    """
    if isinstance(indices, torch.Tensor):
        if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.ndim > 1:
            raise DataError(
                f"the {label} must be a 1-d tensor of integers, got dtype {indices.dtype} and "
                f"shape {tuple(indices.shape)}; pass e.g. torch.tensor([3, 17], dtype=torch.long)"
            )
        return [int(v) for v in indices.tolist()]
    out = []
    for pos, v in enumerate(indices):
        if isinstance(v, torch.Tensor) and v.ndim == 0 and not v.dtype.is_floating_point \
                and v.dtype != torch.bool:
            out.append(int(v))
            continue
        if isinstance(v, bool) or not hasattr(v, "__index__"):
            raise DataError(
                f"the {label} must be integers, got {v!r} ({type(v).__name__}) at position {pos}; "
                "pass whole-number training-set indices such as [3, 17, 42]"
            )
        out.append(int(v.__index__()))
    return out


def threads_argument(text: str) -> int:
    """The ``type=`` of every ``--threads`` option (``deepclean run``, ``tune``, ``forget``,
    ``verify``): an integer from 1 to the number of CPUs of this machine, else
    :class:`argparse.ArgumentTypeError` (many more threads than CPUs only slow torch down, and
    tens of thousands make the process fail while starting them)."""
    import argparse
    import os

    cpus = os.cpu_count() or 1
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= cpus:
        raise argparse.ArgumentTypeError(
            f"expected a number of CPU threads from 1 to {cpus} (this machine's CPUs), got "
            f"{text!r}; leave it out to let torch choose")
    return value


def num_workers_argument(text: str) -> int:
    """The ``type=`` of every ``--num-workers`` option (``deepclean run``, ``deepclean forget``):
    an integer >= 0, else :class:`argparse.ArgumentTypeError` in the option's own words."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"expected a number of worker processes >= 0 (0 reads in the main process), "
            f"got {text!r}")
    return value
