"""The unlearning contract and the registry of methods.

Every method is a class whose constructor only stores keyword-only hyperparameters (validated at
once) and whose :meth:`Unlearner.unlearn` takes ``(model, forget, retain)`` and returns a *new*
model, leaving the given one bitwise untouched. All randomness comes from the method's ``seed``.
After a call, ``info_`` holds method-specific facts (e.g. the number of weights reset).
"""

from __future__ import annotations

import copy
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from deepclean.data.datasets import as_tensors, dataset_size, in_memory, stream_batches
from deepclean.errors import ConfigurationError, DataError, DivergenceError
from deepclean.methods.space import Param, SpaceContext
from deepclean.training import resolve_device
from deepclean.validation import (
    check_disjoint,
    check_forward,
    check_inputs,
    check_labels_fit,
    check_positive,  # noqa: F401  (the methods import it from here)
    check_trainable,
    check_unique,
    unwrap_model,
)

__all__ = [
    "Unlearner",
    "register_method",
    "available_methods",
    "make_method",
    "method_class",
    "prepare_inputs",
    "prepare_datasets",
    "check_finite_weights",
    "EXECUTION_OPTIONS",
]

#: Constructor arguments that say where and how the work runs, never what it computes: not
#: hyperparameters, so :meth:`Unlearner.hyperparameters` (and every record and resume key built
#: from it) leaves them out. ``num_workers``, ``pin_memory`` and ``persistent_workers`` are the
#: ``DataLoader`` options of methods that stream their data (:attr:`Unlearner.streams`).
EXECUTION_OPTIONS = ("device", "progress", "num_workers", "pin_memory", "persistent_workers")

#: Samples of a streamed D_f or D_r that :func:`prepare_datasets` reads before any work.
FIRST_BATCH = 256

_REGISTRY: dict[str, type[Unlearner]] = {}


class Unlearner(ABC):
    """Base class of unlearning methods.

    Subclasses set ``name``, ``summary`` (one line) and ``reference`` (paper), and implement
    :meth:`_unlearn` on in-memory tensors. The public :meth:`unlearn` validates the inputs before
    any work, copies the model and converts the data. A method that declares ``streams = True``
    implements :meth:`_unlearn_data` on the ``Dataset`` objects instead, which are then never
    read into memory as a whole (:func:`prepare_datasets`).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    reference: ClassVar[str] = ""

    # What the method needs from an experiment harness, declared here so that no runner, CLI or
    # report names methods (``deepclean run`` reads these):
    #: constructor argument that receives the scenario's threshold (``--gamma-random`` /
    #: ``--gamma-class``), or None: only DeepClean-like methods take it.
    scenario_threshold: ClassVar[str | None] = None
    #: whether the method takes a precomputed training-set Fisher (``train_fisher=``,
    #: ``--precompute-fisher``).
    accepts_train_fisher: ClassVar[bool] = False
    #: whether ``--methods all`` runs it (the gold model's retraining is always run apart).
    in_all: ClassVar[bool] = True
    #: constructor argument -> harness value: ``"unlearn_epochs"`` / ``"unlearn_lr"``
    #: (``--unlearn-epochs`` / ``--unlearn-lr``), ``"train_recipe"`` (the original model's
    #: training recipe), ``"model_builder"`` (a function ``seed -> fresh model``), ``"holdout"``
    #: (samples the original never trained on, for the method's own choices, e.g. auto-gamma).
    harness_args: ClassVar[dict[str, str]] = {}
    #: constructor arguments that are collaborators (models, functions, precomputed tensors),
    #: not hyperparameters: never recorded by :meth:`hyperparameters`.
    collaborators: ClassVar[tuple[str, ...]] = ()
    #: whether the method reads D_f and D_r as ``Dataset`` objects batch by batch (through
    #: ``DataLoader``s, memory bounded by the batch) instead of as tensors: :meth:`unlearn` then
    #: validates them without reading them whole (:func:`prepare_datasets`) and calls
    #: :meth:`_unlearn_data`. Data already in memory gives the same result either way.
    streams: ClassVar[bool] = False

    def __init__(self, *, seed: int = 0, device: str | torch.device | None = None,
                 progress: bool = False) -> None:
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ConfigurationError(f"seed must be an int >= 0, got {seed!r}; e.g. seed=0")
        if device is not None:

            resolve_device(device)  # an unknown or absent device fails now, before any work
        self.seed = seed
        self.device = device
        self.progress = progress
        self.info_: dict[str, Any] = {}

    def hyperparameters(self) -> dict[str, Any]:
        """The constructor's keyword arguments and their current values, JSON values only.

        Collaborators (:attr:`collaborators`) and execution options (:data:`EXECUTION_OPTIONS`:
        device, progress bars, ``DataLoader`` workers) are left out; a value with a ``to_dict()``
        method (a training recipe) is recorded as that dict.

        Raises:
            ConfigurationError: a hyperparameter holds a value that is not JSON and has no
                ``to_dict()`` (a method that should declare it a collaborator).
        """
        out: dict[str, Any] = {}
        for key in inspect.signature(type(self).__init__).parameters:
            if key == "self" or key in EXECUTION_OPTIONS or key in self.collaborators:
                continue
            value = getattr(self, key)
            if hasattr(value, "to_dict"):
                value = value.to_dict()
            elif not isinstance(value, (int, float, str, bool, type(None))):
                raise ConfigurationError(
                    f"{type(self).__name__}.{key} holds {type(value).__name__}, not a JSON value; "
                    "declare it in the class's `collaborators`"
                )
            out[key] = value
        return out

    def unlearn(self, model: nn.Module, forget: Dataset, retain: Dataset) -> nn.Module:
        """Return a new model from which the forget set D_f has been unlearned.

        Args:
            model: the trained classifier; not modified.
            forget: D_f, a ``Dataset`` of ``(x, y)`` pairs with integer labels.
            retain: D_r, same format.

        Returns:
            A new ``nn.Module`` in eval mode on the method's device (a DataParallel or
            DistributedDataParallel model is unwrapped: the result is the inner module, whose
            parameter names carry no ``module.`` prefix).

        Raises:
            ConfigurationError: the model has no trainable parameter.
            DivergenceError: the method produced non-finite weights; the message names the
                optimizer step after which it happened (or "after unlearning" for methods
                without an optimizer) and the first tensor affected.
            DataError: before any work, when D_f or D_r is empty, they share samples, their inputs
                are not finite floats or do not fit the model, or labels are not integers in
                ``[0, K)`` for a model with K outputs (see :func:`prepare_inputs`). For a method
                that streams (:attr:`streams`) a data set not in memory is checked on its first
                batch before any work (:func:`prepare_datasets`) and every later batch as it is
                read.
        """
        if self.streams:
            work, forget, retain, device = prepare_datasets(model, forget, retain, self.device)

            def run() -> nn.Module:
                return self._unlearn_data(work, forget, retain, device)
        else:
            work, xf, yf, xr, yr, device = prepare_inputs(model, forget, retain, self.device)

            def run() -> nn.Module:
                return self._unlearn(work, xf, yf, xr, yr, device)
        self.info_ = {}
        # Anything that draws from torch's global generator (dropout in a user's model) draws from
        # a private copy seeded from ``seed``: reproducible, and the caller's state is untouched.
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), _divergence_watch(self.name):
            torch.manual_seed(self.seed * 1_000_003 + 999_983)
            out = run()
        check_finite_weights(out, f"{self.name} after unlearning")
        return out.eval()

    @abstractmethod
    def _unlearn(
        self,
        model: nn.Module,
        xf: torch.Tensor,
        yf: torch.Tensor,
        xr: torch.Tensor,
        yr: torch.Tensor,
        device: torch.device,
    ) -> nn.Module:
        """Unlearn on a private copy ``model`` (may be modified in place) and return the result."""

    def _unlearn_data(self, model: nn.Module, forget: Dataset, retain: Dataset,
                      device: torch.device) -> nn.Module:
        """What a method with ``streams = True`` implements: unlearn on a private copy ``model``
        from the validated data sets (a ``TensorDataset`` each where the data were in memory)."""
        raise ConfigurationError(
            f"{type(self).__name__} declares streams = True but does not implement _unlearn_data; "
            "implement it, or set streams = False to receive tensors in _unlearn")

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator seeded from ``seed`` (plus ``offset`` for independent streams)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + offset)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"

    @classmethod
    def tuning_collaborators(cls, model: nn.Module, forget: Dataset, retain: Dataset, *,
                             device: torch.device | str | None = None) -> dict[str, Any]:
        """Work that no searched hyperparameter changes, done once per search by ``deepclean
        tune`` and passed to every trial as constructor arguments (collaborators).

        Args:
            model: the original model of the search; not modified.
            forget, retain: D_f and D_r of the search.
            device: where to compute.

        Returns:
            ``{constructor argument: value}``; the default, ``{}``, shares nothing.
        """
        return {}

    @classmethod
    def search_space(cls, context: SpaceContext) -> dict[str, Param]:
        """The hyperparameters ``deepclean tune`` searches, with their ranges.

        Args:
            context: the cap on unlearning work (``max_passes`` over D_r: epoch ranges stop
                there), |D_f|, |D_r| and the scenario (:class:`deepclean.methods.space.SpaceContext`).

        Returns:
            ``{hyperparameter: range}``; every key is a constructor argument. The default, ``{}``,
            means nothing to tune: the method runs once at its defaults.
        """
        return {}


def check_finite_weights(model: nn.Module, where: str) -> None:
    """Raise :class:`DivergenceError` if a floating-point parameter or buffer of ``model`` holds
    NaN or infinity; ``where`` says when (e.g. ``"neggrad after optimizer step 12"``)."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DivergenceError(
                f"{where}: non-finite weights (first: {name}); the method diverged. Lower its "
                "learning rate or its number of steps (--hp METHOD.lr=...)"
            )


@contextmanager
def _divergence_watch(method: str):
    """During an unlearning call, check the parameters after every optimizer step (of any
    ``torch.optim`` optimizer) and raise :class:`DivergenceError` at the first non-finite one,
    naming the step: a diverging method stops at once instead of running on NaN."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    steps = [0]

    def after_step(optimizer, args, kwargs) -> None:
        steps[0] += 1
        params = [p for group in optimizer.param_groups for p in group["params"]
                  if p.is_floating_point()]
        if params and not bool(torch.isfinite(torch.stack(
                [p.detach().abs().max() for p in params if p.numel()])).all()):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.numel() and not bool(torch.isfinite(p.detach()).all()):
                        raise DivergenceError(
                            f"{method} after optimizer step {steps[0]}: non-finite weights; the "
                            "method diverged. Lower its learning rate or its number of steps "
                            "(--hp METHOD.lr=...)"
                        )

    handle = register_optimizer_step_post_hook(after_step)
    try:
        yield
    finally:
        handle.remove()


def prepare_inputs(
    model: nn.Module,
    forget: Dataset,
    retain: Dataset,
    device: str | torch.device | None,
) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.device]:
    """Validate the model, D_f and D_r before any work, materialise the data, and deep-copy the
    model (unwrapped from DataParallel / DistributedDataParallel) to the device.

    Raises:
        ConfigurationError: not a module, or no trainable parameter.
        DataError: an empty set, the same samples in D_f and D_r (``Subset`` views of one data
            set), non-float or non-finite inputs, non-integer labels, inputs the model does not
            accept, or labels outside the model's outputs.
    """
    return _checked_copy(model, forget, retain, device, read=_whole)


def prepare_datasets(
    model: nn.Module,
    forget: Dataset,
    retain: Dataset,
    device: str | torch.device | None,
) -> tuple[nn.Module, Dataset, Dataset, torch.device]:
    """:func:`prepare_inputs` for methods that stream (:attr:`Unlearner.streams`).

    When D_f and D_r are both in memory (``TensorDataset`` or ``Subset`` of one) the checks are
    exactly those of :func:`prepare_inputs` and the sets come back as ``TensorDataset`` s of the
    same tensors. Otherwise nothing is read whole: the sizes, repeated and shared samples (by
    index, :func:`deepclean.validation.check_unique` and
    :func:`deepclean.validation.check_disjoint`) are checked, and of a set not in memory only
    the first batch (up to :data:`FIRST_BATCH` samples) is read: finite inputs, integer labels,
    the same input shape in both sets, one sample through the model, labels within the model's
    outputs. The remaining batches are checked as the method reads them.

    Returns:
        ``(model copy on the device, forget, retain, device)``.

    Raises:
        ConfigurationError: not a module, or no trainable parameter.
        DataError: as :func:`prepare_inputs`, for the samples read.
    """
    if in_memory(forget) and in_memory(retain):
        work, xf, yf, xr, yr, dev = prepare_inputs(model, forget, retain, device)
        return work, TensorDataset(xf, yf), TensorDataset(xr, yr), dev
    work, *_, dev = _checked_copy(model, forget, retain, device, read=_first_batch)
    return work, forget, retain, dev


def _checked_copy(
    model: nn.Module, forget: Dataset, retain: Dataset, device: str | torch.device | None, *,
    read: Callable[[Dataset, str], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.device]:
    """The checks of :func:`prepare_inputs` and :func:`prepare_datasets` on the samples that
    ``read(set, label)`` returns (checked by ``check_inputs``): the whole set, or its first
    batch; then the model's private copy on the device."""
    check_trainable(model)
    model = unwrap_model(model)
    _check_sizes(forget, retain)
    check_unique(forget, "forget set D_f")
    check_unique(retain, "retain set D_r")
    check_disjoint(forget, retain)
    xf, yf = read(forget, "forget set D_f")
    xr, yr = read(retain, "retain set D_r")
    if xf.shape[1:] != xr.shape[1:]:
        raise DataError(
            f"D_f samples have shape {tuple(xf.shape[1:])} but D_r samples "
            f"{tuple(xr.shape[1:])}; expected the same input shape"
        )
    work, dev = _private_copy(model, device)
    outputs = check_forward(work, xf, "forget set D_f")
    check_labels_fit(yf, outputs, "forget set D_f")
    check_labels_fit(yr, outputs, "retain set D_r")
    return work, xf, yf, xr, yr, dev


def _check_sizes(forget: Dataset, retain: Dataset) -> None:
    for label, ds in (("forget set D_f", forget), ("retain set D_r", retain)):
        if dataset_size(ds, f"the {label}") == 0:
            raise DataError(
                f"the {label} is empty; unlearning needs at least one sample in D_f and in D_r"
            )


def _whole(ds: Dataset, label: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole set as tensors, checked by ``check_inputs``."""
    x, y = as_tensors(ds)
    check_inputs(x, y, label)
    return x, y


def _first_batch(ds: Dataset, label: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole set if in memory, else its first batch; checked by ``check_inputs``."""
    if in_memory(ds):
        return _whole(ds, label)
    try:
        batches = stream_batches(ds, batch_size=FIRST_BATCH)
        x, y = next(batches)
        batches.close()
    except DataError as exc:
        raise DataError(f"the {label}: {exc}") from exc
    check_inputs(x, y, label)
    return x, y


def _private_copy(model: nn.Module, device: str | torch.device | None
                  ) -> tuple[nn.Module, torch.device]:
    first = next(model.parameters(), None)
    if device is None:
        dev = first.device if first is not None else torch.device("cpu")
    else:
        dev = resolve_device(device)
    return copy.deepcopy(model).to(dev), dev


def register_method(cls: type[Unlearner]) -> type[Unlearner]:
    """Class decorator: add an :class:`Unlearner` subclass to the registry under ``cls.name``.

    Raises:
        ConfigurationError: the name is empty or already registered.
    """
    if not cls.name:
        raise ConfigurationError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY:
        raise ConfigurationError(f"a method named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Names of every registered unlearning method, in registration order."""
    import deepclean.methods  # noqa: F401  (fills the registry)

    return list(_REGISTRY)


def method_class(name: str) -> type[Unlearner]:
    """The class registered under ``name``.

    Raises:
        ConfigurationError: unknown name; the message lists the valid ones.
    """
    available = available_methods()
    if name not in _REGISTRY:
        raise ConfigurationError(f"unknown method {name!r}; expected one of {available}")
    return _REGISTRY[name]


def make_method(name: str, **hyperparameters: Any) -> Unlearner:
    """Build a registered method with the given hyperparameters.

    Raises:
        ConfigurationError: unknown name or hyperparameter; the message lists the valid ones.
    """
    cls = method_class(name)
    accepted = [
        k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "args", "kwargs")
    ]
    unknown = sorted(set(hyperparameters) - set(accepted))
    if unknown:
        raise ConfigurationError(
            f"method {name!r} has no hyperparameter {unknown}; valid ones: {accepted}"
        )
    return cls(**hyperparameters)


def check_positive_int(**values: int) -> None:
    """Raise :class:`ConfigurationError` unless every value is an int > 0 (e.g. batch sizes)."""
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigurationError(
                f"{key} must be an integer >= 1, got {value!r}; e.g. {key}=128"
            )


def check_non_negative_int(**values: int) -> None:
    """Raise :class:`ConfigurationError` unless every value is an int >= 0."""
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigurationError(f"{key} must be an int >= 0, got {value!r}")


Builder = Callable[[int], nn.Module]
