"""Small torch helpers every layer uses: eval mode with restore, unwrapping DataParallel /
DistributedDataParallel / ``torch.compile`` wrappers, and stripping their key prefixes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["WRAPPER_PREFIXES", "eval_mode", "strip_module_prefix", "unwrap_model"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own ``training`` flag afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, flag in modes.items():
            m.training = flag


_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def _compiled_inner(model: nn.Module) -> nn.Module | None:
    """The module that ``torch.compile`` wrapped (``OptimizedModule._orig_mod``), else None.
    Recognised by class name so that torch._dynamo is never imported here."""
    inner = getattr(model, "_orig_mod", None)
    if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
        return inner
    return None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DataParallel / DistributedDataParallel and ``torch.compile`` wrappers
    (nested in any order); any other model unchanged. Its parameter names carry no ``module.``
    or ``_orig_mod.`` prefix."""
    while True:
        if isinstance(model, _WRAPPERS):
            model = model.module
            continue
        inner = _compiled_inner(model)
        if inner is None:
            return model
        model = inner


#: Key prefixes of wrapped models: DataParallel / DistributedDataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the ``module.`` (DataParallel / DistributedDataParallel) and ``_orig_mod.``
    (``torch.compile``) prefixes that every key carries, nested in any order."""
    changed = True
    while state and changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state
