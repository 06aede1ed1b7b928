"""The configuration of ``deepclean run`` (validated once, before any work), its presets, and
what each method receives from it (:func:`_method_kwargs`, from what the method declares)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from deepclean.data.datasets import ImageData
from deepclean.data.models import available_models, build_model, check_width
from deepclean.data.splits import SCENARIOS, make_split
from deepclean.errors import ConfigurationError, DataError
from deepclean.methods import available_methods, make_method, method_class
from deepclean.precision import (
    check_channels_last,
    check_precision,
    to_memory_format,
)
from deepclean.training import TrainConfig
from deepclean.validation import check_gamma, check_index_values, check_positive

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
        gamma_random / gamma_class: DeepClean's threshold per scenario (paper: 1.1 and 2.0), or
            ``"auto"``: chosen by each run on the ``choice`` half of the held-out pool
            (:mod:`deepclean.harness.holdout`, :mod:`deepclean.methods.autogamma`).
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
        num_workers: ``DataLoader`` worker processes of the methods that stream their data
            (those with a ``num_workers`` argument: every method but L-CODEC and the retrained
            gold model), for data sets not in memory. An execution option: it does not change results and is no part
            of any resume or tuning key. Default 0 (``--num-workers``).
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
    gamma_random: float | str = 1.1
    gamma_class: float | str = 2.0
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
    num_workers: int = 0
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
                                                self.models[0], None, holdout=_PLACEHOLDER))
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
        try:
            check_width(self.width)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{exc} (command line: --width; the default run uses "
                                     "0.125)") from None
        check_precision(self.precision)
        check_channels_last(self.channels_last)
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) \
                or self.num_workers < 0:
            raise ConfigurationError(
                f"num_workers must be an integer >= 0, got {self.num_workers!r} (command line: "
                "--num-workers N; 0 reads data in the main process)")

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
    protocol = cfg.tuning_protocol
    for key, have in (("dataset", cfg.dataset), ("width", cfg.width),
                      ("train_size", cfg.train_size)):
        if key in protocol and protocol[key] != have:
            raise ConfigurationError(
                f"the hyperparameter file was tuned with {key} = {protocol[key]!r}, but this run "
                f"has {have!r}; tune for this configuration (deepclean tune with the same options)"
            )
    if "model" in protocol and protocol["model"] not in cfg.models:
        raise ConfigurationError(
            f"the hyperparameter file was tuned for model {protocol['model']!r}, but this run uses "
            f"{list(cfg.models)}; tune for this model"
        )
    tune_seed = cfg.tuning_protocol.get("tune_seed")
    if tune_seed is not None and tune_seed in cfg.seeds:
        raise ConfigurationError(
            f"seed {tune_seed} is the seed the hyperparameters were tuned on; report other seeds "
            f"(--seeds), got {list(cfg.seeds)}"
        )


def hp_source(cfg: ExperimentConfig, name: str, scenario: str) -> str:
    """Where a method's hyperparameters came from: "defaults", "tuned" (``--hp-file``), "user"
    (``--hp``), "tuned+user", or "defaults (not in --hp-file)" when a hyperparameter file was
    given but holds no values of this method for this scenario."""
    tuned = bool(cfg.tuned_hyperparameters.get(scenario, {}).get(name))
    user = bool(cfg.hyperparameters.get(name))
    if not (tuned or user) and cfg.tuned_hyperparameters:
        return NOT_IN_HP_FILE
    return {(False, False): "defaults", (True, False): "tuned", (False, True): "user",
            (True, True): "tuned+user"}[(tuned, user)]


#: :func:`hp_source` of a method run at its defaults although a hyperparameter file was given.
NOT_IN_HP_FILE = "defaults (not in --hp-file)"


def _validate_more(cfg: ExperimentConfig) -> None:
    """Checks of values that need no data: thresholds, fractions, indices, classes."""

    flags = {"gamma_random": "--gamma-random (or --gamma)", "gamma_class": "--gamma-class (or --gamma)"}
    for key, flag in flags.items():
        if getattr(cfg, key) == "auto":
            continue
        try:
            check_gamma(getattr(cfg, key), key)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{exc}, or 'auto' to choose it on held-out data "
                                     f"(command line: {flag})") from exc
    try:
        check_positive(unlearn_lr=cfg.unlearn_lr)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{exc} (command line: --unlearn-lr); the paper uses 1e-3") \
            from None
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


def _method_kwargs(cfg: ExperimentConfig, name: str, scenario: str, seed: int,
                   device: torch.device, model_name: str,
                   data: ImageData | None, train_fisher: Any = None, *,
                   holdout: Any = None) -> dict[str, Any]:
    """Keyword arguments of method ``name`` in this run: what the method declares it takes
    (:class:`deepclean.methods.base.Unlearner` class attributes) from what the harness has, then
    tuned values (``--hp-file``), then the user's ``--hp`` values.

    ``holdout`` is the ``choice`` half of the held-out pool (:mod:`deepclean.harness.holdout`),
    for methods that declare ``harness_args = {..: "holdout"}``; None where there is none."""
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
        "holdout": holdout,
    }
    wanted: dict[str, Any] = {"seed": seed, "device": device, "progress": cfg.progress,
                              "num_workers": cfg.num_workers}
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


#: Stands in for the held-out pool when the configuration is checked before any data is loaded
#: (constructors only store and check their arguments).
_PLACEHOLDER = TensorDataset(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long))


def _subsample(data: ImageData, train_size: int | None, seed: int) -> torch.Tensor:
    n = data.train_x.shape[0]
    if train_size is None or train_size >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(10_000 + seed)
    return torch.randperm(n, generator=g)[:train_size].sort().values


def fisher_methods() -> list[str]:
    """Registered methods that take a precomputed training-set Fisher (``train_fisher``)."""

    return [m for m in available_methods() if method_class(m).accepts_train_fisher]


def with_overrides(config: ExperimentConfig, **changes: Any) -> ExperimentConfig:
    """A copy of ``config`` with some fields replaced (``dataclasses.replace``)."""
    return replace(config, **changes)


def parse_seeds(values: Sequence[str | int]) -> tuple[int, ...]:
    """Seeds from CLI strings; raises :class:`ConfigurationError` on a non-integer."""
    try:
        return tuple(int(v) for v in values)
    except ValueError as exc:
        raise ConfigurationError(f"seeds must be integers, got {list(values)}") from exc
