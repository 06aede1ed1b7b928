"""Weights on disk: safetensors files with JSON metadata, written atomically, never unpickled.

A checkpoint holds a model's ``state_dict`` (parameters and buffers) and a ``deepclean`` metadata
entry: a JSON object with whatever the caller records (configuration, forget-set hash, seed,
timings) plus the library and torch versions and ``state_sha256``, a hash of every tensor, which
:func:`load_checkpoint` checks so that a truncated or altered file is detected, never used.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from deepclean._digest import state_digest
from deepclean._torch import strip_module_prefix, unwrap_model
from deepclean._version import __version__
from deepclean.errors import CheckpointError

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "save_tensors",
    "load_weights",
    "state_digest",
    "atomic_write_text",
    "strip_module_prefix",
]

_META_KEY = "deepclean"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename, so a
    reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _readable_by_umask(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _readable_by_umask(path: str | Path) -> None:
    """Give a temporary file (``mkstemp`` makes them 0600) the mode a plain ``open`` would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_checkpoint(path: str | Path, model: nn.Module, metadata: dict[str, Any] | None = None) -> Path:
    """Save ``model``'s state dict (without any ``module.`` prefix) and ``metadata`` atomically.

    Returns:
        The path written.
    """

    return save_tensors(path, strip_module_prefix(unwrap_model(model).state_dict()), metadata)


def save_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None
) -> Path:
    """Save named tensors and JSON ``metadata`` (plus the tensors' SHA-256) as one safetensors
    file, atomically: a temporary file in the same folder, then a rename. Read it back with
    :func:`load_checkpoint`.

    Returns:
        The path written.
    """

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    meta = dict(metadata or {})
    meta.update(
        state_sha256=state_digest(state),
        deepclean_version=__version__,
        torch_version=torch.__version__,
    )
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
        _readable_by_umask(tmp)
        os.replace(tmp, path)
    except OSError as exc:  # a full disk, a folder that became read-only: name the file
        Path(tmp).unlink(missing_ok=True)
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Returns:
        ``(state_dict, metadata)``.

    Raises:
        CheckpointError: the file is missing, truncated, not a safetensors file, or its tensors do
            not match the recorded hash.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = (f.metadata() or {}).get(_META_KEY)
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a safetensors file ({exc}); delete it and "
            "run again to rebuild it"
        ) from exc
    meta = json.loads(raw_meta) if raw_meta else {}
    recorded = meta.get("state_sha256")
    if recorded is not None and recorded != state_digest(state):
        raise CheckpointError(
            f"checkpoint {path}: its tensors do not match the recorded hash (the file was altered "
            "or corrupted); delete it and run again to rebuild it"
        )
    return state, meta


def load_weights(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load weights into ``model`` (in place) from a safetensors checkpoint or a ``.pt`` file.

    ``.pt``/``.pth`` files are read with ``torch.load(weights_only=True)`` only. A ``module.``
    prefix on either side never causes a mismatch; the load is strict, never partial.

    Returns:
        The checkpoint's metadata (empty for ``.pt`` files).

    Raises:
        CheckpointError: unreadable file, or keys/shapes that do not match the model (the message
            lists missing and unexpected keys).
    """

    path = Path(path)
    if path.suffix in (".pt", ".pth", ".bin"):
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling refusal becomes one clear error
            raise CheckpointError(
                f"{path} could not be loaded with torch.load(weights_only=True) ({exc}); only plain "
                "state dicts of tensors are accepted. Save model.state_dict(), not the model."
            ) from exc
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        meta: dict[str, Any] = {}
    else:
        state, meta = load_checkpoint(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict (got {type(state).__name__})")
    target = unwrap_model(model)
    state = strip_module_prefix(state)
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit this model: missing keys {missing[:5]}, unexpected keys "
            f"{unexpected[:5]}. Build the model with the same architecture and width."
        )
    bad = [k for k in own if own[k].shape != state[k].shape]
    if bad:
        k = bad[0]
        raise CheckpointError(
            f"{path} does not fit this model: {k} has shape {tuple(state[k].shape)} in the file and "
            f"{tuple(own[k].shape)} in the model. Build the model with the same width."
        )
    target.load_state_dict(state, strict=True)
    return meta
