"""Numeric precision and memory format: bfloat16 autocast and channels-last models, for GPUs.

Two options of ``deepclean run`` (``--precision``, ``--channels-last``) and of
:class:`deepclean.harness.experiment.ExperimentConfig` (``precision``, ``channels_last``):

- ``precision="bf16"`` runs forward passes under ``torch.autocast(dtype=torch.bfloat16)``:
  matmuls and convolutions compute in bfloat16 (8 bits of mantissa), while the parameters, their
  gradients and the optimiser state stay float32. bfloat16 has float32's exponent range, so no loss
  scaling is needed. ``"fp32"`` (the default) adds no autocast.
- ``channels_last=True`` stores 4-D weights (and 4-D input batches of :func:`train_model`) as
  NHWC (``torch.channels_last``), the layout that tensor-core convolutions prefer. Values are the
  same; only the strides change.

Both are meant for GPUs. On a CPU they work but are not faster. The empirical Fisher diagonal
(:func:`deepclean.fisher_diagonal`) always runs in full precision: it disables autocast itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from deepclean.errors import ConfigurationError

__all__ = [
    "PRECISIONS",
    "check_precision",
    "check_channels_last",
    "autocast",
    "to_memory_format",
    "to_input_format",
]

#: Accepted values of ``precision``: full float32, or bfloat16 autocast.
PRECISIONS = ("fp32", "bf16")


def check_precision(precision: object, device: torch.device | str | None = None) -> str:
    """Return ``precision`` if it is one of :data:`PRECISIONS` (and usable on ``device``).

    Args:
        precision: ``"fp32"`` or ``"bf16"``.
        device: where it will run; when given, ``"bf16"`` on a CUDA GPU without bfloat16 support
            is refused.

    Raises:
        ConfigurationError: an unknown value, or bf16 on a GPU that lacks it; the message says
            what was expected, what arrived and how to fix it.
    """
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ConfigurationError(
            f"precision must be one of {list(PRECISIONS)}, got {precision!r}; pass 'fp32' (full "
            "precision, the default) or 'bf16' (bfloat16 autocast, for GPUs; command line: "
            "--precision bf16)"
        )
    if device is not None and precision == "bf16":
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigurationError(
                f"precision 'bf16' was requested but the GPU {torch.cuda.get_device_name(dev)} "
                "does not support bfloat16; use --precision fp32"
            )
    return precision


def check_channels_last(channels_last: object) -> bool:
    """Return ``channels_last`` if it is a bool.

    Raises:
        ConfigurationError: any other value (``1``, ``"yes"``, ``None``).
    """
    if not isinstance(channels_last, bool):
        raise ConfigurationError(
            f"channels_last must be True or False, got {channels_last!r}; on the command line "
            "pass --channels-last to turn it on"
        )
    return channels_last


@contextmanager
def autocast(device: torch.device | str, precision: str) -> Iterator[None]:
    """A context in which forward passes on ``device`` run in ``precision``.

    ``"bf16"``: ``torch.autocast(device_type=device.type, dtype=torch.bfloat16)``; eligible ops
    (matmul, convolution, ...) return bfloat16 tensors, parameters stay float32, and weights are
    cast again at every use (no cast cache), so the context may wrap whole training loops.
    ``"fp32"``: a null
    context; it adds nothing and does not switch off an autocast already active around it.

    Args:
        device: the device the model runs on (only its type matters: ``"cpu"``, ``"cuda"``, ...).
        precision: one of :data:`PRECISIONS`.

    Raises:
        ConfigurationError: ``precision`` is not one of :data:`PRECISIONS`.
    """
    check_precision(precision)
    if precision == "fp32":
        yield
        return
    # No weight-cast cache: the context may span a whole training loop (an unlearning method),
    # and a cached bfloat16 copy of a weight would hide every optimizer update from the forward
    # passes that follow (the model would train on its first step's weights).
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                        cache_enabled=False):
        yield


def to_memory_format(model: nn.Module, channels_last: bool) -> nn.Module:
    """Convert ``model``'s 4-D parameters and buffers to ``torch.channels_last`` in place.

    Args:
        model: any module; tensors of other ranks are left as they are.
        channels_last: ``False`` leaves the model untouched (it is not converted back).

    Returns:
        The same module.

    Raises:
        ConfigurationError: ``channels_last`` is not a bool.
    """
    if check_channels_last(channels_last):
        model.to(memory_format=torch.channels_last)
    return model


def to_input_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A batch ``(B, C, H, W)`` in channels-last layout when ``channels_last`` (same values);
    other ranks, or ``channels_last=False``, are returned as they are."""
    if channels_last and x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x
