"""A user's own model: ``--model`` factory specs and ``--weights`` files.

Model specs (:func:`build_user_model`):

- ``path/to/file.py:function`` or ``package.module:function``: the function is called with no
  arguments and must return an ``nn.Module``;
- ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None,
  num_classes=num_classes)`` (no weights are downloaded; they come from ``--weights``);
- one of DeepClean's architectures (``resnet18``, ``vgg16_bn``, ``small_cnn``), with
  ``in_channels`` and ``num_classes`` from the data and ``width`` (default 1.0).

Weights (:func:`load_user_weights`): a safetensors file, or a ``.pt``/``.pth``/``.bin`` state dict
read with ``torch.load(weights_only=True)`` (never unpickled otherwise; a ``{"state_dict": ...}``
or ``{"model": ...}`` wrapper is unwrapped). Keys may carry the ``module.`` (DataParallel / DDP)
or ``_orig_mod.`` (``torch.compile``) prefixes. A file that does not fit the model is refused
before any work, naming the missing, unexpected or mis-shaped keys. The key names and dtypes of
the file are remembered (:class:`WeightsFile`) so that the unlearned weights can be written back
under exactly the same names (:func:`save_like`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepclean.errors import CheckpointError, ConfigurationError

__all__ = [
    "WeightsFile",
    "build_user_model",
    "file_sha256",
    "load_user_weights",
    "save_like",
    "strip_prefixes",
]

_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 5


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_user_model(
    spec: str,
    *,
    num_classes: int | None = None,
    in_channels: int | None = None,
    width: float = 1.0,
    seed: int = 0,
) -> nn.Module:
    """Build the architecture named by ``--model`` (see the module docstring).

    Args:
        spec: ``file.py:function``, ``package.module:function``, ``torchvision:NAME`` or one of
            :func:`deepclean.available_models`.
        num_classes: outputs for ``torchvision:`` and DeepClean's models (from the data).
        in_channels: input channels for DeepClean's models (from the data).
        width: channel-width multiplier of DeepClean's models.
        seed: the initial weights' seed (they are replaced by ``--weights``).

    Returns:
        The model, in eval mode, on the CPU.

    Raises:
        ConfigurationError: a malformed spec, a file or module that cannot be imported, a missing
            function, a function that fails or does not return an ``nn.Module``, an unknown
            torchvision model, or a missing ``num_classes``.
    """
    from deepclean.data.models import available_models, build_model

    if not isinstance(spec, str) or not spec.strip():
        raise ConfigurationError("--model is empty; expected file.py:function, "
                                 "package.module:function, torchvision:NAME or "
                                 f"one of {available_models()}")
    spec = spec.strip()
    if spec in available_models():
        if num_classes is None or in_channels is None:
            raise ConfigurationError(f"--model {spec} needs the number of classes and input "
                                     "channels (taken from --data)")
        return build_model(spec, in_channels=in_channels, num_classes=num_classes, width=width,
                           seed=seed).eval()
    if ":" not in spec:
        raise ConfigurationError(
            f"--model {spec!r} is not a known architecture ({available_models()}) and has no "
            "':'; expected path/to/file.py:function, package.module:function or "
            "torchvision:NAME")
    left, _, func_name = spec.rpartition(":")
    if not left or not func_name.isidentifier():
        raise ConfigurationError(
            f"--model {spec!r}: expected SOURCE:FUNCTION with a Python function name after the "
            "last ':' (e.g. models.py:make_model)")
    if left == "torchvision":
        return _torchvision_model(func_name, num_classes, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        factory = _load_factory(left, func_name, spec)
        try:
            model = factory()
        except Exception as exc:  # the user's code: report any failure plainly
            raise ConfigurationError(
                f"--model {spec}: calling {func_name}() failed ({type(exc).__name__}: {exc}); the "
                "function must build the model with no arguments") from exc
    if not isinstance(model, nn.Module):
        raise ConfigurationError(
            f"--model {spec}: {func_name}() returned {type(model).__name__}; expected a "
            "torch.nn.Module (the architecture, without weights)")
    return model.eval()


def _load_factory(source: str, func_name: str, spec: str):
    if source.endswith(".py") or "/" in source or "\\" in source:
        path = Path(source)
        if not path.is_file():
            raise ConfigurationError(f"--model {spec}: no such file {path}; expected "
                                     "path/to/file.py:function")
        name = "deepclean_user_model_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ConfigurationError(f"--model {spec}: {path} cannot be imported as Python")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise ConfigurationError(
                f"--model {spec}: importing {path} failed ({type(exc).__name__}: {exc})") from exc
    else:
        try:
            module = importlib.import_module(source)
        except Exception as exc:  # ImportError, or an error inside the module
            raise ConfigurationError(
                f"--model {spec}: cannot import module {source!r} ({type(exc).__name__}: {exc}); "
                "put it on PYTHONPATH, or pass path/to/file.py:function") from exc
    factory = getattr(module, func_name, None)
    if not callable(factory):
        public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ConfigurationError(
            f"--model {spec}: {source} has no function {func_name!r}; callables there: "
            f"{public[:10]}")
    return factory


def _torchvision_model(name: str, num_classes: int | None, seed: int) -> nn.Module:
    from torchvision import models

    if num_classes is None:
        raise ConfigurationError(f"--model torchvision:{name} needs --num-classes")
    known = models.list_models()
    if name not in known:
        close = [k for k in known if name.lower() in k.lower()][:8]
        raise ConfigurationError(f"--model torchvision:{name}: torchvision has no model of that "
                                 f"name; similar: {close or known[:8]}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return models.get_model(name, weights=None, num_classes=num_classes).eval()
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"--model torchvision:{name} with num_classes="
                                     f"{num_classes} failed: {exc}") from exc


def strip_prefixes(keys) -> tuple[str, dict[str, str]]:
    """The ``module.`` / ``_orig_mod.`` prefix shared by every key (any nesting, e.g.
    ``_orig_mod.module.``), and the map from stripped name to the file's name."""
    keys = list(keys)
    prefix = ""
    while keys:
        for p in _PREFIXES:
            if all(k.startswith(prefix + p) for k in keys):
                prefix += p
                break
        else:
            break
    return prefix, {k[len(prefix):]: k for k in keys}


@dataclass(frozen=True)
class WeightsFile:
    """What was read from ``--weights``.

    Attributes:
        path: the file.
        format: ``"safetensors"`` or ``"torch"``.
        sha256: SHA-256 of the file's bytes.
        prefix: the prefix every key carried (``""``, ``"module."``, ``"_orig_mod."``, ...).
        names: the file's key names, in the file's order (with the prefix).
        dtypes: the dtype of each tensor, by the file's key name.
        state_sha256: :func:`deepclean.checkpoint.state_digest` of the loaded (unprefixed) state.
    """

    path: str
    format: str
    sha256: str
    prefix: str
    names: tuple[str, ...]
    dtypes: Mapping[str, torch.dtype]
    state_sha256: str

    def describe(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "file_sha256": self.sha256,
                "state_sha256": self.state_sha256, "key_prefix": self.prefix,
                "tensors": len(self.names)}


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _load_failure(exc: BaseException, limit: int = 160) -> str:
    """What ``torch.load(weights_only=True)`` refused, in one plain line: ANSI escape codes
    removed, torch's advice (which includes re-running with ``weights_only=False``, i.e.
    executing the file's pickle) left out, at most ``limit`` characters cut at a word."""
    text = " ".join(_ANSI.sub("", str(exc)).split())
    kind = type(exc).__name__
    if "Weights only load failed" in text or "weights_only" in text:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        what = f" (it pickles {found.group(1)})" if found else ""
        return f"{kind}: the file holds Python objects other than tensors{what}"
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:.") + " ..."
    return f"{kind}: {text}" if text else kind


def _read_state(path: Path, option: str = "--weights") -> tuple[dict[str, Any], str]:
    if path.is_dir():
        raise CheckpointError(f"{option} {path} is a folder; expected a weights file "
                              "(.safetensors, or a .pt/.pth state dict)")
    if not path.is_file():
        raise CheckpointError(f"{option} {path}: no such file; expected the path of a weights file "
                              "(.safetensors, or a .pt/.pth state dict)")
    if path.suffix in (".pt", ".pth", ".bin"):
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # any unpickling refusal becomes one clear error
            raise CheckpointError(
                f"{option} {path} could not be loaded with torch.load(weights_only=True) "
                f"({_load_failure(exc)}). Expected an intact state dict of tensors: save it "
                "with torch.save(model.state_dict(), path) (not the model object) or as "
                ".safetensors; a truncated or corrupt file needs to be saved again.") from exc
        if isinstance(state, dict):
            for wrapper in ("state_dict", "model", "model_state_dict"):
                if isinstance(state.get(wrapper), dict) and not any(
                        isinstance(v, torch.Tensor) for v in state.values()):
                    state = state[wrapper]
                    break
        return state, "torch"
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{option} {path} is not a readable safetensors file ({exc}); expected "
            ".safetensors, or a .pt/.pth state dict") from exc
    return state, "safetensors"


def _from_data_mismatch(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                        names: Mapping[str, str], inferred: Mapping[str, int],
                        source: str) -> str | None:
    """For a model built from the data (``inferred``: its ``in_channels`` and/or ``num_classes``),
    the sentence saying which of them the weights file disagrees with, or None."""
    matrices = [k for k, v in own.items() if v.ndim >= 2 and k in names]
    if not matrices:
        return None
    first, last = matrices[0], [k for k in matrices if own[k].ndim == 2][-1:] or [matrices[-1]]
    ours, theirs, what = [], [], []
    if "in_channels" in inferred and state[names[first]].ndim == own[first].ndim \
            and state[names[first]].shape[1] != own[first].shape[1]:
        what.append("input channels")
        ours.append(str(own[first].shape[1]))
        theirs.append(str(state[names[first]].shape[1]))
    if "num_classes" in inferred and state[names[last[0]]].shape[0] != own[last[0]].shape[0]:
        what.append("classes")
        ours.append(str(own[last[0]].shape[0]))
        theirs.append(str(state[names[last[0]]].shape[0]))
    if not what:
        return None
    return (f"the model built for this data has {' / '.join(ours)} {' / '.join(what)} (from "
            f"{source}), but the weights file has {' / '.join(theirs)}: check --data ("
            + ", ".join((["channels, --grayscale"] if "input channels" in what else [])
                        + (["label range"] if "classes" in what else []))
            + (") or pass --num-classes N" if "classes" in what else ")"))


def load_user_weights(model: nn.Module, path: str | Path, *,
                      option: str = "--weights", inferred: Mapping[str, int] | None = None,
                      inferred_from: str = "--data") -> WeightsFile:
    """Load ``--weights`` into ``model`` in place (strict), after checking every key and shape.

    ``option`` names the file in error messages (``"--unlearned"`` for ``deepclean verify``).
    ``inferred``: the ``in_channels`` and/or ``num_classes`` the model was built with from the
    data (``inferred_from``); a file that disagrees with them is reported as a data problem
    (wrong channels or label range) before the shape list.

    Returns:
        A :class:`WeightsFile` describing the file (hash, prefix, key names, dtypes).

    Raises:
        CheckpointError: a missing or unreadable file, a pickle that is not a plain state dict,
            non-tensor entries, or keys/shapes that do not fit the model (the message names the
            first missing, unexpected and mis-shaped keys). The model is untouched then.
    """
    from deepclean.checkpoint import state_digest

    p = Path(path)
    state, fmt = _read_state(p, option)
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{option} {p} does not hold a state dict of tensors (got "
                              f"{type(state).__name__}); save model.state_dict()")
    bad_values = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad_values:
        raise CheckpointError(f"{option} {p}: entries {bad_values[:_SHOW]} are not tensors; "
                              "expected a plain state dict (model.state_dict())")
    own = model.state_dict()
    if set(state) == set(own):  # exact names (even a model whose own names start "module.")
        prefix, names = "", {k: k for k in state}
    else:
        prefix, names = strip_prefixes(state)
    missing = sorted(set(own) - set(names))
    unexpected = sorted(names[k] for k in set(names) - set(own))
    shapes = [f"{k}: {tuple(state[names[k]].shape)} in the file, {tuple(own[k].shape)} in the "
              "model" for k in own if k in names and state[names[k]].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} key(s) of the model missing from the file: "
                         f"{missing[:_SHOW]}")
        if unexpected:
            parts.append(f"{len(unexpected)} key(s) in the file the model does not have: "
                         f"{unexpected[:_SHOW]}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es): {'; '.join(shapes[:_SHOW])}")
        hint = (_from_data_mismatch(own, state, names, inferred, inferred_from)
                if inferred and shapes else None)
        if hint is not None:
            raise CheckpointError(f"{option} {p} does not fit --model: {hint} ("
                                  + "; ".join(parts) + ")")
        raise CheckpointError(
            f"{option} {p} does not fit --model: " + "; ".join(parts) + ". Build the same "
            "architecture (and number of classes, width) the weights were trained with.")
    plain = {k: state[names[k]] for k in own}
    converted = {k: v.to(own[k].dtype) for k, v in plain.items()}
    model.load_state_dict(converted, strict=True)
    return WeightsFile(path=str(p), format=fmt, sha256=file_sha256(p), prefix=prefix,
                       names=tuple(state), dtypes={k: v.dtype for k, v in state.items()},
                       state_sha256=state_digest(plain))


def save_like(model: nn.Module, like: WeightsFile, path: str | Path,
              metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model``'s weights as safetensors under exactly the key names and dtypes of the
    ``--weights`` file (same prefix), atomically (:func:`deepclean.checkpoint.save_tensors`).

    Returns:
        The path written.
    """
    from deepclean.checkpoint import save_tensors
    from deepclean.validation import unwrap_model

    state = unwrap_model(model).state_dict()
    out = {}
    for name in like.names:
        t = state[name[len(like.prefix):]].detach().cpu()
        out[name] = t.to(like.dtypes[name])
    return save_tensors(path, out, dict(metadata or {}))
