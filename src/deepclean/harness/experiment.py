"""The paper's experiment as one library call: original model, gold model, unlearning, metrics.

:func:`run_experiment` is what ``deepclean run`` calls. For every seed, model and scenario it

1. trains the original model on the training set (or reuses a cached one),
2. draws the forget/retain split and writes its manifest,
3. retrains the gold model from scratch on D_r with the same recipe (or reuses a cached one),
4. runs each unlearning method on the original model and times the unlearning step alone,
5. evaluates every model (Acc_Dr, Acc_Df, Acc_test, the paper's entropy MIA, gaps to gold; the
   MIA family of :mod:`deepclean.evaluation.mia`, the distances to gold of :mod:`deepclean.evaluation.distances` and the
   summaries of :mod:`deepclean.evaluation.summaries`) and writes one JSON file per (dataset, model,
   scenario, method, seed), plus the tables, figures and HTML report (:func:`build_report`).

Cached models live under ``cache_dir`` with a key of everything that determines them (data set,
training subset, split, architecture, width, recipe, seed, and ``precision`` / ``channels_last``
when they are not the defaults), as safetensors files.

With ``precision="bf16"`` the training of the original and gold models, every unlearning method
(inside its timed region) and the evaluation run under bfloat16 autocast; the Fisher diagonals stay
in full precision (:mod:`deepclean.precision`). With ``channels_last`` every model is converted to
``torch.channels_last`` before it is trained, unlearned or evaluated.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from deepclean._version import __version__
from deepclean.checkpoint import (
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
    state_digest,
    strip_module_prefix,
)
from deepclean.data.datasets import ImageData, load_dataset
from deepclean.data.models import available_models, build_model
from deepclean.data.splits import SCENARIOS, ForgetSplit, make_split
from deepclean.errors import CheckpointError, ConfigurationError, DataError, DivergenceError
from deepclean.evaluation.metrics import accuracy, entropy_mia, predict_proba
from deepclean.evaluation.outputs import (
    ModelOutputs,
    build_reference,
    extended_metrics,
    model_outputs,
)
from deepclean.evaluation.summaries import summary as summary_of
from deepclean.fisher.train_fisher import TrainFisher, model_digest, precompute_train_fisher
from deepclean.harness.audit import audit_record, utc_now, write_audit
from deepclean.harness.locking import exclusive_lock
from deepclean.harness.resume import (
    check_cache_dir,
    check_out_dir,
    check_writable,
    load_finished,
    method_key,
    remove_stale_temporaries,
)
from deepclean.harness.tuning import test_halves
from deepclean.methods import available_methods, make_method, method_class
from deepclean.precision import (
    autocast,
    check_channels_last,
    check_precision,
    to_memory_format,
)
from deepclean.report.build import build_report
from deepclean.reproducibility import deterministic, preserve_global_rng
from deepclean.training import TrainConfig, resolve_device, synchronize, train_model
from deepclean.validation import check_gamma, check_index_values, check_same_split

__all__ = [
    "ExperimentConfig",
    "run_experiment",
    "preset",
    "PRESETS",
    "evaluate_model",
    "default_cache_dir",
]

PRESETS = ("default", "paper")
#: Seed of the validation/report split of the test set (:func:`deepclean.harness.tuning.test_halves`).
TEST_HALVES_SEED = 0


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines a run of ``deepclean run``.

    Attributes:
        dataset: data set name (:func:`deepclean.available_datasets`).
        data_dir: folder of the data set files; ``None`` uses the default location.
        download: let torchvision download missing data (needs internet).
        models: architectures (:func:`deepclean.available_models`).
        width: channel-width multiplier of every model (1.0 = the paper's size).
        train_size: number of training samples drawn (with the seed) from the training split;
            ``None`` uses all of it.
        train: the recipe of the original and the gold model.
        scenarios: ``"random"``, ``"class"`` and/or ``"indices"``.
        forget_fraction: share of the training set forgotten in the random scenario (fraction).
        forget_classes: classes forgotten in the class scenario.
        forget_indices: training-set indices forgotten in the ``indices`` scenario.
        methods: unlearning methods to compare (the gold model is always trained).
        seeds: one full run per seed (training subset, split, models, methods).
        gold_seeds: number K of gold models per (seed, model, scenario). The first is trained
            with the run's seed, the others with seeds ``seed * 1000 + j`` (j = 1 .. K - 1), all
            on the same D_r and cached alike. K >= 2 enables the per-example LiRA attack and
            distances normalised by the gold-vs-gold distance; K = 1 (default) skips both.
        gamma_random / gamma_class: DeepClean's threshold per scenario (paper: 1.1 and 2.0).
        unlearn_epochs: fine-tune epochs of DeepClean and Fine-tune.
        unlearn_lr: their Adam learning rate.
        hyperparameters: per-method overrides ``{method: {name: value}}`` (``--hp``); they win
            over tuned values.
        tuned_hyperparameters: values chosen by ``deepclean tune``, ``{scenario: {method: {name:
            value}}}`` (``--hp-file``, :func:`deepclean.harness.tuning.read_hp_file`); every result
            records ``hp_source`` ("defaults", "tuned", "user" or "tuned+user").
        tuning_protocol: the protocol record of the hyperparameter file (its tuning seed, which
            must not be a reported seed).
        test_half: ``"all"`` (default) evaluates on the whole test set; ``"report"`` on the half
            that tuning never sees (:func:`deepclean.harness.tuning.test_halves`). Required with tuned
            hyperparameters.
        out_dir: where results, tables, manifests and checkpoints go.
        cache_dir: where trained original and gold models are cached.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"``.
        precision: ``"fp32"`` (default) or ``"bf16"``: training, unlearning and evaluation under
            bfloat16 autocast; the Fisher diagonals are always computed in full precision
            (:mod:`deepclean.precision`). Part of the model cache key.
        channels_last: store every model's 4-D weights as ``torch.channels_last`` (NHWC), the
            layout GPU convolutions prefer. Part of the model cache key.
        progress: show progress bars.
        store_indices: write the forget indices into split manifests and audit records; with
            ``False`` only their SHA-256 and count are written.
        deterministic: run under :func:`deepclean.set_deterministic` (``warn_only``), for
            reproducible results on CUDA.
        precompute_fisher: compute the original model's Fisher diagonal on the whole training
            set once (cached with the model; :mod:`deepclean.fisher.train_fisher`) and give it to
            DeepClean and Zero Weights, whose timed step then runs the Fisher pass over D_f only
            (I_Dr follows exactly). Its one-off time is recorded as ``precompute_time_s``.
            Default False: both Fisher passes are timed, as in the paper.
    """

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    download: bool = False
    models: tuple[str, ...] = ("resnet18",)
    width: float = 0.125
    train_size: int | None = 20_000
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=12, lr=0.05))
    scenarios: tuple[str, ...] = ("random", "class")
    forget_fraction: float = 0.1
    forget_classes: tuple[int, ...] = (0,)
    forget_indices: tuple[int, ...] | None = None
    methods: tuple[str, ...] = ("finetune", "deepclean")
    seeds: tuple[int, ...] = (0,)
    gold_seeds: int = 1
    gamma_random: float = 1.1
    gamma_class: float = 2.0
    unlearn_epochs: int = 3
    unlearn_lr: float = 1e-3
    hyperparameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    tuned_hyperparameters: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    tuning_protocol: dict[str, Any] = field(default_factory=dict)
    test_half: str = "all"
    out_dir: str = "runs/default"
    cache_dir: str | None = None
    device: str = "auto"
    precision: str = "fp32"
    channels_last: bool = False
    progress: bool = True
    store_indices: bool = True
    deterministic: bool = False
    precompute_fisher: bool = False

    def validate(self) -> None:
        """Check every field before any work.

        Raises:
            ConfigurationError: an invalid value; the message names the field and the fix.
        """
        for name in self.models:
            if name not in available_models():
                raise ConfigurationError(
                    f"unknown model {name!r}; expected one of {available_models()}"
                )
        for s in self.scenarios:
            if s not in SCENARIOS:
                raise ConfigurationError(
                    f"unknown scenario {s!r}; expected one of {list(SCENARIOS)}"
                )
        if not self.scenarios:
            raise ConfigurationError("no scenario given; expected at least one of random, class")
        if "indices" in self.scenarios and not self.forget_indices:
            got = "an empty list (empty forget set)" if self.forget_indices is not None else "none"
            raise ConfigurationError(
                "scenario 'indices' needs the training indices to forget (--forget-indices FILE); "
                f"got {got}. Expected at least one index."
            )
        for m in self.methods:
            method_class(m)  # raises with the list of valid names
        for m in self.hyperparameters:
            method_class(m)
        _validate_tuned(self)
        _validate_more(self)
        if isinstance(self.unlearn_epochs, bool) or not isinstance(self.unlearn_epochs, int) \
                or self.unlearn_epochs < 0:
            raise ConfigurationError(
                f"unlearn_epochs must be an integer >= 0, got {self.unlearn_epochs!r} "
                "(command line: --unlearn-epochs)"
            )
        if not isinstance(self.precompute_fisher, bool):
            raise ConfigurationError(
                f"precompute_fisher must be True or False, got {self.precompute_fisher!r}"
            )
        if self.precompute_fisher and not any(m in fisher_methods() for m in self.methods):
            raise ConfigurationError(
                f"--precompute-fisher only changes {' and '.join(fisher_methods())}, but the methods "
                f"run are {list(self.methods)}; add deepclean to --methods or drop the flag"
            )
        for m, hps in self.hyperparameters.items():
            if "train_fisher" in hps:
                raise ConfigurationError(
                    f"{m}.train_fisher cannot be set as a hyperparameter; pass "
                    "--precompute-fisher (precompute_fisher=True) instead"
                )
        for m in self.methods:
            for scenario in self.scenarios:
                # builds each method once (constructors only store and check hyperparameters), so
                # that a bad value fails now rather than after the models are trained
                make_method(m, **_method_kwargs(self, m, scenario, 0, torch.device("cpu"),
                                                self.models[0], None))
        if not self.seeds:
            raise ConfigurationError("no seed given; expected at least one (e.g. --seeds 0)")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigurationError(f"seeds must be distinct, got {list(self.seeds)}")
        if not isinstance(self.gold_seeds, int) or self.gold_seeds < 1:
            raise ConfigurationError(
                f"gold_seeds (--gold-models) must be an integer >= 1, got {self.gold_seeds!r}"
            )
        if self.train_size is not None and self.train_size < 2:
            raise ConfigurationError(f"train_size must be >= 2 or None, got {self.train_size}")
        if not self.width > 0:
            raise ConfigurationError(f"width must be > 0, got {self.width}")
        check_precision(self.precision)
        check_channels_last(self.channels_last)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["train"] = self.train.to_dict()
        return d


def _validate_tuned(cfg: ExperimentConfig) -> None:
    """Checks of ``test_half`` and of the tuned hyperparameters (``--hp-file``)."""
    if cfg.test_half not in ("all", "report"):
        raise ConfigurationError(
            f"test_half must be 'all' or 'report', got {cfg.test_half!r} (command line: "
            "--test-half)"
        )
    if not cfg.tuned_hyperparameters:
        return
    if cfg.test_half != "report":
        raise ConfigurationError(
            "tuned hyperparameters were chosen on the validation half of the test set, so "
            "results must be reported on the other half: set test_half='report' "
            "(--hp-file does so)"
        )
    for scenario, methods in cfg.tuned_hyperparameters.items():
        if scenario not in SCENARIOS:
            raise ConfigurationError(
                f"the hyperparameter file names scenario {scenario!r}; expected one of "
                f"{list(SCENARIOS)}"
            )
        for m in methods:
            method_class(m)
    tune_seed = cfg.tuning_protocol.get("tune_seed")
    if tune_seed is not None and tune_seed in cfg.seeds:
        raise ConfigurationError(
            f"seed {tune_seed} is the seed the hyperparameters were tuned on; report other seeds "
            f"(--seeds), got {list(cfg.seeds)}"
        )


def hp_source(cfg: ExperimentConfig, name: str, scenario: str) -> str:
    """Where a method's hyperparameters came from: "defaults", "tuned" (``--hp-file``), "user"
    (``--hp``) or "tuned+user"."""
    tuned = bool(cfg.tuned_hyperparameters.get(scenario, {}).get(name))
    user = bool(cfg.hyperparameters.get(name))
    return {(False, False): "defaults", (True, False): "tuned", (False, True): "user",
            (True, True): "tuned+user"}[(tuned, user)]


def _validate_more(cfg: ExperimentConfig) -> None:
    """Checks of values that need no data: thresholds, fractions, indices, classes."""

    flags = {"gamma_random": "--gamma-random (or --gamma)", "gamma_class": "--gamma-class (or --gamma)"}
    for key, flag in flags.items():
        try:
            check_gamma(getattr(cfg, key), key)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{exc} (command line: {flag})") from exc
    lr = cfg.unlearn_lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ConfigurationError(
            f"unlearn_lr must be a finite number > 0, got {lr!r} (command line: --unlearn-lr); "
            "the paper uses 1e-3"
        )
    f = cfg.forget_fraction
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
        raise ConfigurationError(
            f"forget_fraction must lie in (0, 1), got {f!r}; e.g. 0.1 forgets 10 % of the "
            "training samples"
        )
    if cfg.forget_indices is not None:

        try:
            check_index_values(list(cfg.forget_indices))
        except DataError as exc:
            raise ConfigurationError(str(exc)) from exc
    for seed in cfg.seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigurationError(f"seeds must be integers >= 0, got {seed!r}; e.g. --seeds 0 1 2")
    unused = sorted(set(cfg.hyperparameters) - set(cfg.methods))
    if unused:
        raise ConfigurationError(
            f"hyperparameters were given for {unused}, which are not among the methods run "
            f"{list(cfg.methods)}; add them to --methods or drop those --hp options"
        )
    if "class" in cfg.scenarios:
        if not cfg.forget_classes:
            raise ConfigurationError(
                "scenario 'class' needs at least one class to forget (--forget-class 0)"
            )
        for c in cfg.forget_classes:
            if isinstance(c, bool) or not isinstance(c, int) or c < 0:
                raise ConfigurationError(
                    f"forget classes must be integers >= 0, got {c!r}; e.g. --forget-class 0"
                )


def _precheck(cfg: ExperimentConfig, data: ImageData) -> None:
    """Every split of the run, built before any training: a forget class absent from the data,
    forget indices out of range and the like fail here, not after an hour of training."""

    if "class" in cfg.scenarios:
        bad = [c for c in cfg.forget_classes if not 0 <= c < data.num_classes]
        if bad:
            raise DataError(
                f"forget class(es) {bad} are absent from {cfg.dataset}, whose classes are 0 to "
                f"{data.num_classes - 1}; pass --forget-class with one of those"
            )
    n_available = int(data.train_x.shape[0])
    if cfg.train_size is not None and cfg.train_size > n_available:
        raise DataError(
            f"train_size {cfg.train_size} exceeds the {n_available} training samples of "
            f"{cfg.dataset}; pass --train-size {n_available} (or 'all') or fewer"
        )
    for seed in cfg.seeds:
        subset = _subsample(data, cfg.train_size, seed)
        labels = data.train_y[subset]
        for scenario in cfg.scenarios:
            make_split(scenario, labels, fraction=cfg.forget_fraction,
                       classes=cfg.forget_classes, indices=cfg.forget_indices, seed=seed)


def preset(name: str, dataset: str = "fashion-mnist") -> dict[str, Any]:
    """Field values of a named preset, to pass to :class:`ExperimentConfig`.

    - ``default``: sized for a 2-core CPU. ResNet-18 at width 0.125 (176 k weights) on 20,000
      training samples, 12 epochs of SGD (lr 0.05, momentum 0.9, weight decay 5e-4, cosine), no
      augmentation, so that the original model memorises its training data (train accuracy about
      100 %, test about 90 % on Fashion-MNIST); unlearning fine-tunes 3 epochs.
    - ``paper``: the paper's section 4 for users with a GPU: full-width ResNet-18 and VGG-16-BN,
      the full training set, SGD lr 0.1 with step decays and random crop (and flip on CIFAR);
      MNIST-like data 10 epochs (decays at 4, 8), CIFAR-10 20 epochs (6, 12, 16), CIFAR-100
      200 epochs (60, 120, 160, factor 5); DeepClean fine-tunes 1 epoch on MNIST-like data and 3
      on CIFAR.

    Raises:
        ConfigurationError: unknown preset name.
    """
    if name == "default":
        return {}
    if name != "paper":
        raise ConfigurationError(f"unknown preset {name!r}; expected one of {list(PRESETS)}")
    if dataset in ("cifar10", "cifar100"):
        if dataset == "cifar10":
            recipe = TrainConfig(epochs=20, lr=0.1, schedule="multistep", milestones=(6, 12, 16),
                                 crop_padding=4, flip=True)
        else:
            recipe = TrainConfig(epochs=200, lr=0.1, schedule="multistep",
                                 milestones=(60, 120, 160), lr_factor=0.2, crop_padding=4,
                                 flip=True)
        unlearn_epochs = 3
    else:
        recipe = TrainConfig(epochs=10, lr=0.1, schedule="multistep", milestones=(4, 8),
                             crop_padding=2)
        unlearn_epochs = 1
    return {
        "models": ("resnet18", "vgg16_bn"),
        "width": 1.0,
        "train_size": None,
        "train": recipe,
        "unlearn_epochs": unlearn_epochs,
    }


def default_cache_dir() -> Path:
    """``$DEEPCLEAN_CACHE/models``, by default ``~/.cache/deepclean/models``."""
    import os

    root = os.environ.get("DEEPCLEAN_CACHE", str(Path.home() / ".cache" / "deepclean"))
    return Path(root) / "models"


def _precision_determinants(cfg: ExperimentConfig) -> dict[str, Any]:
    """``precision`` and ``channels_last`` for the model cache key and the method resume key.

    Only the values that differ from the defaults are included, so that the keys of fp32,
    contiguous runs are those of earlier versions (their cached models stay valid), while a bf16
    or channels-last model never shares a key with an fp32 one.
    """
    out: dict[str, Any] = {}
    if cfg.precision != "fp32":
        out["precision"] = cfg.precision
    if cfg.channels_last:
        out["channels_last"] = True
    return out


def _gaps(metrics: dict[str, float], gold_metrics: dict[str, float]) -> dict[str, float]:
    """dAcc_Df, dAcc_Dr, dAcc_test and dMIA: the method's value minus the gold model's, in
    points (paper section 4)."""
    return {
        "d_acc_forget": metrics["acc_forget"] - gold_metrics["acc_forget"],
        "d_acc_retain": metrics["acc_retain"] - gold_metrics["acc_retain"],
        "d_acc_test": metrics["acc_test"] - gold_metrics["acc_test"],
        "d_mia": metrics["mia"] - gold_metrics["mia"],
    }


def _key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _digest_indices(index: torch.Tensor) -> str:
    return hashlib.sha256(index.to(torch.int64).numpy().tobytes()).hexdigest()


@dataclass
class _Context:
    cfg: ExperimentConfig
    data: ImageData
    device: torch.device
    cache_dir: Path
    out_dir: Path
    log: Callable[[str], None]


def _train_or_load(
    ctx: _Context,
    *,
    kind: str,
    model_name: str,
    seed: int,
    x: torch.Tensor,
    y: torch.Tensor,
    determinants: dict[str, Any],
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A trained model of ``kind`` ("original" or "gold"), from the cache when its key matches."""
    cfg = ctx.cfg
    payload = {
        "kind": kind,
        "dataset": cfg.dataset,
        "model": model_name,
        "width": cfg.width,
        "in_channels": ctx.data.in_channels,
        "num_classes": ctx.data.num_classes,
        "recipe": cfg.train.to_dict(),
        "seed": seed,
        **determinants,
        **_precision_determinants(cfg),
    }
    key = _key(payload)
    path = ctx.cache_dir / f"{kind}-{cfg.dataset}-{model_name}-{key}.safetensors"

    # a second process that needs the same model waits here and then reuses it
    with exclusive_lock(path, purpose=f"training the {kind} model", wait=True):
        return _train_or_load_locked(ctx, kind=kind, model_name=model_name, seed=seed, x=x, y=y,
                                     payload=payload, key=key, path=path)


def _train_or_load_locked(ctx: _Context, *, kind: str, model_name: str, seed: int,
                          x: torch.Tensor, y: torch.Tensor, payload: dict[str, Any], key: str,
                          path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    cfg = ctx.cfg
    model = build_model(model_name, in_channels=ctx.data.in_channels,
                        num_classes=ctx.data.num_classes, width=cfg.width, seed=seed)
    if path.is_file():
        try:
            state, meta = load_checkpoint(path)
            if not meta.get("state_sha256"):
                raise CheckpointError(f"{path} records no tensor hash")
            if meta.get("key") == key:
                model.load_state_dict(strip_module_prefix(state), strict=True)
                ctx.log(f"  {kind} model: reused {path}")
                model = to_memory_format(model.to(ctx.device), cfg.channels_last)
                return model.eval(), meta
            ctx.log(f"  {kind} model: cache entry {path} has another key; retraining")
        except (CheckpointError, RuntimeError) as exc:
            ctx.log(f"  {kind} model: cache entry unusable ({exc}); retraining")
    ctx.log(f"  {kind} model: training on {x.shape[0]} samples ({cfg.train.epochs} epochs)")
    synchronize(ctx.device)
    start = time.perf_counter()
    train_model(model, x, y, cfg.train, seed=seed, device=ctx.device, desc=f"train {kind}",
                progress=cfg.progress, precision=cfg.precision, channels_last=cfg.channels_last)
    synchronize(ctx.device)
    seconds = time.perf_counter() - start
    meta = {"key": key, "determinants": payload, "train_time_s": seconds}
    save_checkpoint(path, model, meta)
    return model.eval(), {**meta}


def evaluate_model(
    model: torch.nn.Module,
    *,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    split: ForgetSplit,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    device: torch.device | str | None = None,
    outputs: ModelOutputs | None = None,
    precision: str = "fp32",
) -> dict[str, float]:
    """The paper's metrics of one model.

    Args:
        outputs: the model's logits on ``x_train`` and ``x_test`` when already computed
            (:func:`deepclean.evaluation.outputs.model_outputs`); the same softmax is applied.
        precision: ``"fp32"`` or ``"bf16"``: the forward passes when ``outputs`` is not given
            (:func:`deepclean.evaluation.metrics.predict_logits`; the logits are float32 either way).

    Returns:
        ``acc_retain``, ``acc_forget``, ``acc_test`` (accuracy in % on D_r, D_f, test) and ``mia``
        (% of D_f called member by the entropy attack fitted on D_r vs test).
    """
    if outputs is None:
        probs_train = predict_proba(model, x_train, device=device, precision=precision)
        probs_test = predict_proba(model, x_test, device=device, precision=precision)
    else:
        probs_train, probs_test = outputs.probs_train, outputs.probs_test
    p_r, p_f = probs_train[split.retain], probs_train[split.forget]
    return {
        "acc_retain": accuracy(p_r, y_train[split.retain]),
        "acc_forget": accuracy(p_f, y_train[split.forget]),
        "acc_test": accuracy(probs_test, y_test),
        "mia": entropy_mia(p_r, probs_test, p_f),
    }


def _method_kwargs(cfg: ExperimentConfig, name: str, scenario: str, seed: int,
                   device: torch.device, model_name: str,
                   data: ImageData | None, train_fisher: Any = None) -> dict[str, Any]:
    import inspect

    cls = method_class(name)
    accepted = inspect.signature(cls.__init__).parameters
    # what the harness can give; each method declares what it takes (Unlearner class attributes)
    harness_values = {
        "unlearn_epochs": cfg.unlearn_epochs,
        "unlearn_lr": cfg.unlearn_lr,
        "train_recipe": cfg.train,
        "model_builder": None if data is None else lambda s: to_memory_format(build_model(
            model_name, in_channels=data.in_channels, num_classes=data.num_classes,
            width=cfg.width, seed=s), cfg.channels_last),
    }
    wanted: dict[str, Any] = {"seed": seed, "device": device, "progress": cfg.progress}
    if cls.scenario_threshold is not None:
        wanted[cls.scenario_threshold] = cfg.gamma_class if scenario == "class" \
            else cfg.gamma_random
    for arg, source in cls.harness_args.items():
        wanted[arg] = harness_values[source]
    if train_fisher is not None and cls.accepts_train_fisher:
        wanted["train_fisher"] = train_fisher
    kwargs = {k: v for k, v in wanted.items() if k in accepted}
    kwargs.update(cfg.tuned_hyperparameters.get(scenario, {}).get(name, {}))
    kwargs.update(cfg.hyperparameters.get(name, {}))
    return kwargs


def _subsample(data: ImageData, train_size: int | None, seed: int) -> torch.Tensor:
    n = data.train_x.shape[0]
    if train_size is None or train_size >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(10_000 + seed)
    return torch.randperm(n, generator=g)[:train_size].sort().values


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def run_experiment(
    config: ExperimentConfig, *, log: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Run the experiment described by ``config`` (see :func:`_run_experiment` for the files).

    The caller's global random states (torch, NumPy, Python) are the same afterwards; with
    ``config.deterministic`` the run is under :func:`deepclean.reproducibility.deterministic`.
    An interrupted run started again with the same configuration and ``out_dir`` resumes: cached
    models and finished method results are reused (:mod:`deepclean.harness.resume`).
    """

    switch = deterministic(warn_only=True) if config.deterministic is True else nullcontext()
    config.validate()  # bad settings fail before the output folder is touched
    with preserve_global_rng(), switch, out_dir_lock(config.out_dir, "deepclean run"):
        return _run_experiment(config, log=log)


def out_dir_lock(out_dir: str | Path, purpose: str):
    """An exclusive lock on an output folder (:func:`deepclean.harness.locking.exclusive_lock`): a second
    process writing into the same ``--out`` is refused at once (``BusyError``) instead of mixing
    its results with the first one's. A path that is a file is left to the folder checks."""

    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        return nullcontext()
    return exclusive_lock(path, purpose=purpose)


def _run_experiment(
    config: ExperimentConfig, *, log: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Run the experiment described by ``config`` and write its files into ``config.out_dir``.

    Files written (each atomically):

    - ``results/<dataset>_<model>_<scenario>_<method>_seed<seed>.json``: one per method, and one
      for ``gold`` and ``original``, with metrics, gaps to gold, time and hyperparameters;
    - ``splits/<dataset>_<scenario>_seed<seed>.json``: the split manifest (forget indices);
    - ``checkpoints/<...>.safetensors``: every model evaluated;
    - ``results.md``, ``results.csv``, ``tables/``, ``figures/``, ``report.html``: tables,
      figures and the report (:func:`deepclean.report.tables.build_report`).

    Each record holds, besides ``metrics`` and ``gaps``, ``mia_family`` (the four attacks of
    :func:`deepclean.evaluation.mia.mia_family`), ``distances`` (:func:`deepclean.evaluation.distances.distances_to_gold`)
    and ``summary`` (Avg. Gap, tug of war, RTE).
    - ``audit/<...>.json`` and ``.txt``: the audit record of every unlearning.

    Returns:
        The result records (the JSON payloads).

    Raises:
        ConfigurationError, DataError, DataNotFoundError: invalid configuration or data, an
            output folder that is a file or holds another configuration's results, before any
            training starts.
        SplitMismatchError: a gold model recorded for another split.
    """


    config.validate()
    out_dir = Path(config.out_dir)
    config_record = config.to_dict() | {"device_used": str(resolve_device(config.device))}
    check_cache_dir(Path(config.cache_dir) if config.cache_dir else default_cache_dir())
    resuming = check_out_dir(out_dir, config_record)
    check_writable(out_dir, "--out")
    if resuming:
        log(f"resuming in {out_dir}: finished results of this configuration are reused")
        remove_stale_temporaries(out_dir)
    ctx = _make_context(config, log)
    data, device, out_dir = ctx.data, ctx.device, ctx.out_dir
    _precheck(config, data)
    _write_json(out_dir / "config.json", config_record)
    records: list[dict[str, Any]] = []
    for seed in config.seeds:
        subset, x_train, y_train = _training_subset(ctx, seed)
        for model_name in config.models:
            log(f"[seed {seed}] {config.dataset} / {model_name} (width {config.width}): "
                f"{x_train.shape[0]} training samples, device {device}")
            original, original_meta = _original_model(
                ctx, model_name=model_name, seed=seed, subset=subset, x_train=x_train,
                y_train=y_train,
            )
            train_fisher = _train_fisher(ctx, model_name=model_name, original=original,
                                         original_meta=original_meta, x_train=x_train,
                                         y_train=y_train)
            for scenario in config.scenarios:
                records += _run_scenario(
                    ctx, scenario=scenario, seed=seed, model_name=model_name, subset=subset,
                    x_train=x_train, y_train=y_train, original=original,
                    original_meta=original_meta, train_fisher=train_fisher,
                )
    tables = build_report(out_dir, records=records)
    log(tables)
    return records


def _run_scenario(
    ctx: _Context,
    *,
    scenario: str,
    seed: int,
    model_name: str,
    subset: torch.Tensor,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    original: torch.nn.Module,
    original_meta: dict[str, Any],
    train_fisher: Any = None,
) -> list[dict[str, Any]]:
    cfg, data, device = ctx.cfg, ctx.data, ctx.device
    split, gold, gold_meta = _split_and_gold(
        ctx, scenario=scenario, seed=seed, model_name=model_name, subset=subset,
        x_train=x_train, y_train=y_train,
    )
    evaluate = _evaluator(ctx, seed=seed, model_name=model_name, subset=subset, split=split,
                          x_train=x_train, y_train=y_train, original=original, gold=gold)
    gold_metrics, gold_extended = evaluate(gold, is_gold=True)
    base = {
        "dataset": cfg.dataset,
        "model": model_name,
        "width": cfg.width,
        "scenario": scenario,
        "seed": seed,
        "n_train": int(x_train.shape[0]),
        "n_forget": int(split.forget.numel()),
        "forgotten": _forgotten_text(cfg, scenario, split),
        "n_retain": int(split.retain.numel()),
        "forget_sha256": split.digest,
        "gold_metrics": gold_metrics,
        "gold_time_s": gold_meta["train_time_s"],
        "gold_seeds": cfg.gold_seeds,
        "recipe": cfg.train.to_dict(),
        "torch_version": torch.__version__,
        **_precision_determinants(cfg),
    }
    stem = f"{cfg.dataset}_{model_name}_{scenario}"
    records = []
    original_sha = original_meta.get("state_sha256") or _state_sha(original)

    def record(method: str, model: torch.nn.Module, evaluated: tuple[dict, dict],
               extra: dict, audit: dict | None = None) -> dict:
        metrics, extended = evaluated
        rec = base | {"method": method, "metrics": metrics, "precision": cfg.precision,
                      "channels_last": cfg.channels_last} | extended | extra
        rec["gaps"] = _gaps(metrics, gold_metrics)
        rec["summary"] = summary_of(metrics, gold_metrics, time_s=rec.get("time_s"),
                                    gold_time_s=gold_meta["train_time_s"])
        name = f"{stem}_{method}_seed{seed}"
        rec["state_sha256"] = _state_sha(model)
        # checkpoint, then audit record, then result JSON (the mark of a finished method)
        save_checkpoint(ctx.out_dir / "checkpoints" / f"{name}.safetensors", model,
                        {"method": method, "forget_sha256": split.digest, "seed": seed,
                         "dataset": cfg.dataset, "model": model_name, "width": cfg.width})
        if audit is not None:
            _write_audit(ctx, name, audit, original=original, unlearned=model, split=split,
                         metrics=metrics, gold_metrics=gold_metrics, rec=rec)
        _write_json(ctx.out_dir / "results" / f"{name}.json", rec)
        records.append(rec)
        return rec

    record("original", original, evaluate(original),
           {"time_s": None, "train_time_s": original_meta["train_time_s"], "hyperparameters": {}})
    record("gold", gold, (gold_metrics, gold_extended),
           {"time_s": gold_meta["train_time_s"], "hyperparameters": cfg.train.to_dict()})
    forget = TensorDataset(x_train[split.forget], y_train[split.forget])
    retain = TensorDataset(x_train[split.retain], y_train[split.retain])
    for name in cfg.methods:
        uses_tf = train_fisher is not None and method_class(name).accepts_train_fisher
        method = make_method(name, **_method_kwargs(cfg, name, scenario, seed, device,
                                                    model_name, data,
                                                    train_fisher if uses_tf else None))
        resume_key = _resume_key(base, original_sha, name,
                                 method.hyperparameters() | {"precomputed_fisher": uses_tf})
        done = _reuse_finished(ctx, f"{stem}_{name}_seed{seed}", resume_key)
        if done is not None:
            records.append(done)
            ctx.log(f"  {name}: reused the finished result of an earlier run")
            continue
        ctx.log(f"  unlearning with {name} ...")
        started_at = utc_now()
        synchronize(device)
        start = time.perf_counter()
        try:
            with autocast(device, cfg.precision):  # its overhead is part of the unlearning time
                unlearned = method.unlearn(original, forget, retain)
            synchronize(device)
            seconds = time.perf_counter() - start
            finished_at = utc_now()
            evaluated = _evaluate_unlearned(evaluate, unlearned, name)
        except DivergenceError as exc:
            records.append(_failed_record(ctx, base, stem, name, seed, exc, method,
                                          hp_source(cfg, name, scenario), resume_key))
            continue
        metrics = evaluated[0]
        rec = record(name, unlearned, evaluated, {
            "time_s": seconds,
            **({"precompute_time_s": train_fisher.time_s} if uses_tf else {}),
            "hyperparameters": method.hyperparameters(),
            "hp_source": hp_source(cfg, name, scenario),
            "resume_key": resume_key,
            **{k: v for k, v in method.info_.items() if isinstance(v, (int, float, str))},
        }, audit={"method": method, "started_at": started_at, "finished_at": finished_at,
                  "duration_s": seconds})
        ctx.log(f"  {name}: Acc_Dr {metrics['acc_retain']:.2f}  Acc_Df {metrics['acc_forget']:.2f}"
                f"  MIA {metrics['mia']:.2f}  dAcc_Df {rec['gaps']['d_acc_forget']:+.2f}"
                f"  time {seconds:.1f} s")
    return records


def _forgotten_text(cfg: ExperimentConfig, scenario: str, split: ForgetSplit) -> str:
    """What the scenario forgets, in words, for the report and the audit record."""
    n_f, n = int(split.forget.numel()), int(split.n)
    share = f"{n_f} of {n} training samples ({100.0 * n_f / n:.1f} %)"
    if scenario == "class":
        classes = ", ".join(str(c) for c in cfg.forget_classes)
        return f"class {classes}: {share}" if len(cfg.forget_classes) == 1 else \
            f"classes {classes}: {share}"
    if scenario == "random":
        return f"a random {100.0 * cfg.forget_fraction:g} % of the training samples: {share}"
    return f"the requested training indices: {share}"


def _evaluate_unlearned(evaluate: Callable, model: torch.nn.Module, name: str):
    """``evaluate(model)``; outputs with NaN or infinity (finite but huge weights) are a
    divergence of the method, not bad input: the inputs were checked before any work."""

    try:
        return evaluate(model)
    except DataError as exc:
        if "NaN or infinity" not in str(exc):
            raise
        raise DivergenceError(f"{name}: the unlearned model's outputs are not finite ({exc})") \
            from exc


def _failed_record(ctx: _Context, base: dict[str, Any], stem: str, name: str, seed: int,
                   exc: DivergenceError, method: Any, source: str, resume_key: str
                   ) -> dict[str, Any]:
    """Record a method that failed (diverged): ``status`` "failed" and the reason, no metrics.
    The other methods and scenarios still run; ``deepclean run`` exits with status 4."""
    rec = base | {"method": name, "status": "failed", "failure": str(exc), "metrics": None,
                  "time_s": None, "hyperparameters": method.hyperparameters(),
                  "hp_source": source, "resume_key": resume_key}
    _write_json(ctx.out_dir / "results" / f"{stem}_{name}_seed{seed}.json", rec)
    ctx.log(f"  {name}: FAILED: {exc}")
    return rec


def failed_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of methods that failed (``status == "failed"``)."""
    return [r for r in records if r.get("status") == "failed"]


# --- shared with the gamma sweep (deepclean.harness.sweep): data, original, split, gold, evaluation ---


def _make_context(config: ExperimentConfig, log: Callable[[str], None]) -> _Context:
    """Validate ``config``, pick the device, load the data set, create the output folder."""
    config.validate()
    device = resolve_device(config.device)
    check_precision(config.precision, device)
    data = load_dataset(config.dataset, data_dir=config.data_dir, download=config.download)
    if config.test_half == "report":

        _, report = test_halves(int(data.test_x.shape[0]), seed=TEST_HALVES_SEED)
        data = replace(data, test_x=data.test_x[report], test_y=data.test_y[report])
    out_dir = Path(config.out_dir)
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    return _Context(config, data, device, cache_dir, out_dir, log)


def _training_subset(ctx: _Context, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(subset indices, x_train, y_train) of ``seed``."""
    subset = _subsample(ctx.data, ctx.cfg.train_size, seed)
    return subset, ctx.data.train_x[subset], ctx.data.train_y[subset]


def _original_model(ctx: _Context, *, model_name: str, seed: int, subset: torch.Tensor,
                    x_train: torch.Tensor, y_train: torch.Tensor):
    """The original model (trained or from the cache) and its metadata."""
    return _train_or_load(
        ctx, kind="original", model_name=model_name, seed=seed, x=x_train, y=y_train,
        determinants={"train_subset_sha256": _digest_indices(subset)},
    )


def fisher_methods() -> list[str]:
    """Registered methods that take a precomputed training-set Fisher (``train_fisher``)."""

    return [m for m in available_methods() if method_class(m).accepts_train_fisher]


def _train_fisher(ctx: _Context, *, model_name: str, original: torch.nn.Module,
                  original_meta: dict[str, Any], x_train: torch.Tensor,
                  y_train: torch.Tensor) -> Any:
    """With ``precompute_fisher``, I_D of the original model on its training set, from the cache
    (next to the model, keyed by it) or computed and cached; else None."""

    cfg = ctx.cfg
    if not cfg.precompute_fisher or not any(m in fisher_methods() for m in cfg.methods):
        return None
    path = ctx.cache_dir / f"fisher-{cfg.dataset}-{model_name}-{original_meta['key']}.safetensors"
    digest = model_digest(original)
    if path.is_file():
        try:
            tf, _ = TrainFisher.load(path)
            if tf.model_sha256 == digest and tf.n_samples == x_train.shape[0]:
                ctx.log(f"  training-set Fisher I_D: reused {path} (computed in {tf.time_s:.1f} s)")
                return tf
            ctx.log(f"  training-set Fisher: cache entry {path} belongs to another model; "
                    "recomputing")
        except CheckpointError as exc:
            reason = str(exc).split(";")[0]  # without the advice to delete: it is rebuilt now
            ctx.log(f"  training-set Fisher: cache entry unusable ({reason}); recomputing it")
    batch = cfg.hyperparameters.get("deepclean", {}).get("fisher_batch_size", 256)
    tf = precompute_train_fisher(original, TensorDataset(x_train, y_train), batch_size=batch,
                                 device=ctx.device)
    tf.save(path, {"key": original_meta["key"]})
    ctx.log(f"  training-set Fisher I_D on {tf.n_samples} samples: {tf.time_s:.1f} s "
            "(once per original model)")
    return tf


def _split_and_gold(ctx: _Context, *, scenario: str, seed: int, model_name: str,
                    subset: torch.Tensor, x_train: torch.Tensor, y_train: torch.Tensor):
    """The forget split of ``scenario`` (manifest written) and its gold model with metadata."""
    cfg = ctx.cfg
    split = make_split(
        scenario, y_train, fraction=cfg.forget_fraction, classes=cfg.forget_classes,
        indices=cfg.forget_indices, seed=seed,
    )
    manifest = split.manifest(store_indices=cfg.store_indices) | {
        "dataset": cfg.dataset,
        "seed": seed,
        "train_subset": subset.tolist() if cfg.train_size is not None else "all",
        "note": "forget_indices index the training subset; train_subset maps them to the "
                "data set's training split",
    }
    _write_json(ctx.out_dir / "splits" / f"{cfg.dataset}_{scenario}_seed{seed}.json", manifest)
    ctx.log(f" scenario {scenario}: |D_f| = {split.forget.numel()}, "
            f"|D_r| = {split.retain.numel()}")
    gold, gold_meta = _gold_model(ctx, model_name=model_name, seed=seed, subset=subset,
                                  split=split, x_train=x_train, y_train=y_train)
    return split, gold, gold_meta


def _gold_model(ctx: _Context, *, model_name: str, seed: int, subset: torch.Tensor,
                split: ForgetSplit, x_train: torch.Tensor, y_train: torch.Tensor):
    """A gold model of ``split`` (trained or cached); one recorded for another split raises."""
    gold, gold_meta = _train_or_load(
        ctx, kind="gold", model_name=model_name, seed=seed, x=x_train[split.retain],
        y=y_train[split.retain],
        determinants={"train_subset_sha256": _digest_indices(subset),
                      "forget_sha256": split.digest},
    )
    _check_gold_split(gold_meta, split)
    return gold, gold_meta


def gold_seed(seed: int, j: int) -> int:
    """Seed of the j-th gold model of run seed ``seed`` (j = 0: the seed itself)."""
    return seed if j == 0 else seed * 1000 + j


def _evaluator(ctx: _Context, *, seed: int, model_name: str, subset: torch.Tensor,
               split: ForgetSplit, x_train: torch.Tensor, y_train: torch.Tensor,
               original: torch.nn.Module, gold: torch.nn.Module):
    """``evaluate(model, is_gold=False, extended=True) -> (paper metrics, {"mia_family",
    "distances"})`` (the second dict empty with ``extended=False``).

    Trains (or loads) the ``gold_seeds - 1`` extra gold models first; every model's logits are
    computed once per call.
    """
    data, device = ctx.data, ctx.device
    outputs = lambda m: model_outputs(m, x_train, data.test_x, device,  # noqa: E731
                                      precision=ctx.cfg.precision)
    extra = []
    for j in range(1, ctx.cfg.gold_seeds):
        other, _ = _gold_model(ctx, model_name=model_name, seed=gold_seed(seed, j),
                               subset=subset, split=split, x_train=x_train, y_train=y_train)
        extra.append((other, outputs(other)))
    reference = build_reference(gold=gold, gold_outputs=outputs(gold), split=split,
                                original=original, extra=extra)

    def evaluate(model: torch.nn.Module, *, is_gold: bool = False,
                 extended: bool = True) -> tuple[dict, dict]:
        out = reference.gold_outputs if model is gold else outputs(model)
        metrics = evaluate_model(model, x_train=x_train, y_train=y_train, split=split,
                                 x_test=data.test_x, y_test=data.test_y, device=device,
                                 outputs=out, precision=ctx.cfg.precision)
        if not extended:
            return metrics, {}
        return metrics, extended_metrics(model, out, reference, split=split, y_train=y_train,
                                         y_test=data.test_y, seed=seed, is_gold=is_gold)

    return evaluate


def _state_sha(model: torch.nn.Module) -> str:

    return state_digest(strip_module_prefix(model.state_dict()))


def _check_gold_split(gold_meta: dict[str, Any], split: ForgetSplit) -> None:
    """Refuse a gold model recorded for another split (SplitMismatchError), before evaluation."""

    check_same_split(gold_meta, split, what="gold model")


def _resume_key(base: dict[str, Any], original_sha: str, method: str,
                hyperparameters: dict[str, Any]) -> str:
    """Hash of everything one method's result depends on (see :mod:`deepclean.harness.resume`)."""

    return method_key({
        "base": {k: v for k, v in base.items() if k not in ("gold_metrics", "gold_time_s")},
        "original_sha256": original_sha, "method": method, "hyperparameters": hyperparameters,
        "deepclean_version": __version__,
    })


def _reuse_finished(ctx: _Context, name: str, key: str) -> dict[str, Any] | None:
    """The finished result ``name`` of an earlier run with the same key, else ``None``."""

    record, why = load_finished(
        ctx.out_dir / "results" / f"{name}.json",
        ctx.out_dir / "checkpoints" / f"{name}.safetensors", key,
        audit_path=ctx.out_dir / "audit" / f"{name}.json",
    )
    if record is None and why != "no result yet":
        ctx.log(f"  {name}: recomputing ({why})")
    return record


def _write_audit(ctx: _Context, name: str, audit: dict[str, Any], *, original: torch.nn.Module,
                 unlearned: torch.nn.Module, split: ForgetSplit, metrics: dict[str, float],
                 gold_metrics: dict[str, float], rec: dict[str, Any]) -> None:

    report = audit_record(
        before=original, after=unlearned, forget_indices=split.forget, n_train=split.n,
        method=audit["method"], metrics=metrics, gold_metrics=gold_metrics,
        started_at=audit["started_at"], finished_at=audit["finished_at"],
        duration_s=audit["duration_s"], store_indices=ctx.cfg.store_indices,
        extra={"dataset": rec["dataset"], "model": rec["model"], "scenario": rec["scenario"],
               "seed": rec["seed"], "forget_sha256": split.digest,
               "indices_refer_to": "the training subset (see splits/ for its map to the data set)",
               "checkpoint": f"checkpoints/{name}.safetensors",
               "result": f"results/{name}.json", "device": str(ctx.device),
               "precision": ctx.cfg.precision, "channels_last": ctx.cfg.channels_last,
               **({"fisher_mode": rec["fisher_mode"]} if "fisher_mode" in rec else {}),
               **({"precompute_time_s": rec["precompute_time_s"]}
                  if "precompute_time_s" in rec else {})},
    )
    write_audit(report, ctx.out_dir / "audit", name)


def with_overrides(config: ExperimentConfig, **changes: Any) -> ExperimentConfig:
    """A copy of ``config`` with some fields replaced (``dataclasses.replace``)."""
    return replace(config, **changes)


def parse_seeds(values: Sequence[str | int]) -> tuple[int, ...]:
    """Seeds from CLI strings; raises :class:`ConfigurationError` on a non-integer."""
    try:
        return tuple(int(v) for v in values)
    except ValueError as exc:
        raise ConfigurationError(f"seeds must be integers, got {list(values)}") from exc
