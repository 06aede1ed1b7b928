"""Training recipes: the original model, the gold (retrained) model, and their schedules.

The recipe follows the paper's pretraining (Shi et al., arXiv 2311.10448, section 4): SGD with
momentum 0.9, weight decay 5e-4, lr 0.1 and step decays; the default CPU preset uses a cosine
schedule and no augmentation so that a narrow ResNet-18 memorises its training data in minutes.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset

from deepclean.data.datasets import (
    ShuffledBatches,
    check_loader_options,
    dataset_size,
    iterate_batches,
    iterate_rank_blocks,
    random_crop_flip,
    tensors_or_dataset,
)
from deepclean.distributed import (
    all_gather_ints,
    average_running_stats,
    check_same_state,
    error_code,
    is_main_process,
    raise_if_any_rank_failed,
    rank,
    shard_indices,
    use_distributed,
    world_size,
    wrap_ddp,
)
from deepclean.errors import ConfigurationError
from deepclean.precision import autocast, check_precision, to_input_format, to_memory_format
from deepclean.progress import progress_bar
from deepclean.validation import check_positive

__all__ = ["TrainConfig", "train_model", "resolve_device", "synchronize"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of supervised training with SGD.

    Attributes:
        epochs: passes over the training data.
        lr: initial learning rate.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        batch_size: samples per step.
        schedule: ``"cosine"`` (per step, to 0) or ``"multistep"`` (``lr *= lr_factor`` at each
            epoch in ``milestones``).
        milestones: epochs at which ``multistep`` decays the learning rate.
        lr_factor: multiplicative decay of ``multistep`` (paper: 0.1, or 0.2 for CIFAR-100).
        crop_padding: random-crop padding in pixels (0: no crop).
        flip: random horizontal flips.
    """

    epochs: int = 12
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    schedule: str = "cosine"
    milestones: tuple[int, ...] = field(default_factory=tuple)
    lr_factor: float = 0.1
    crop_padding: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        for name, where in (("epochs", " (command line: --epochs)"), ("batch_size", "")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be an integer >= 1, got {value!r}{where}")
        try:
            check_positive(lr=self.lr)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{exc} (command line: --lr); the default run uses 0.05, "
                                     "the paper 0.1") from None
        if self.schedule not in ("cosine", "multistep"):
            raise ConfigurationError(
                f"schedule must be 'cosine' or 'multistep', got {self.schedule!r}"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"``: CUDA if available, else MPS, else CPU.

    Raises:
        ConfigurationError: the requested device is not available on this machine.
    """
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigurationError(
            f"unknown device {device!r}; expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
        ) from exc
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigurationError(
            f"device {device!r} is not supported; expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError(
            "device 'cuda' was requested but torch sees no CUDA GPU; use --device cpu"
        )
    if dev.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ConfigurationError("device 'mps' was requested but is not available; use cpu")
    return dev


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def train_model(
    model: nn.Module,
    x: torch.Tensor | Dataset,
    y: torch.Tensor | TrainConfig | None = None,
    config: TrainConfig | None = None,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    desc: str = "train",
    progress: bool = True,
    precision: str = "fp32",
    channels_last: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    distributed: bool | None = None,
) -> nn.Module:
    """Train ``model`` in place on ``(x, y)`` with cross-entropy and SGD; return it in eval mode.

    ``train_model(model, x, y, config, seed=...)`` trains on tensors;
    ``train_model(model, dataset, config=config, seed=...)`` (or ``(model, dataset, config)``)
    on a ``Dataset`` of ``(x, y)`` pairs. A data set in memory (a ``TensorDataset`` or a
    ``Subset`` of one) is sliced as tensors; any other is read through a ``DataLoader`` afresh in
    every epoch (:class:`deepclean.data.datasets.ShuffledBatches`: each epoch's order is the
    permutation the tensor path draws from the same generator, a data set with ``set_epoch`` is
    told the epoch first, one batch in memory at a time), so the same samples give the same
    model either way.

    Data-parallel training (``distributed``, by default whenever a ``torch.distributed`` process
    group of several ranks is initialised, e.g. under ``torchrun``): every rank calls
    ``train_model`` with the same model, data, recipe and seed (checked before any step; ranks
    that differ raise ``ConfigurationError`` on every rank). The model is wrapped in
    ``DistributedDataParallel``. Every rank draws the same permutation of the data per epoch
    from ``seed`` and cuts it into the same batches of ``config.batch_size`` (the *global*
    batch); each batch is split into contiguous blocks, one per rank
    (:func:`deepclean.distributed.shard_indices`), so the per-rank batch is
    ``batch_size / world_size`` samples, rounded down or up when it does not divide (blocks
    differ by at most one sample; a rank whose block of a short last batch is empty still takes
    the step). Each rank's loss is the sum over its block times ``world_size / B`` (``B`` the
    global batch's size), so DDP's average of the ranks' gradients (one all-reduce per step) is
    exactly the gradient of the mean loss over the global batch: the steps, the learning-rate
    schedule and, without BatchNorm, the weights are those of the one-process run, up to
    rounding. Augmentation draws are made for the whole global batch on every rank and each rank
    applies its rows' draws, so they too are the one-process run's. BatchNorm runs as plain DDP
    does, not as ``SyncBatchNorm``: in train mode each rank normalises its block with the
    block's own statistics (so with BatchNorm the result differs from one process by the noise
    of smaller normalisation batches), the running statistics are kept per rank and averaged
    over the ranks at the end. All ranks end with bitwise the same weights and buffers (checked
    with a digest all-reduce; ``RuntimeError`` otherwise). A data set read through a
    ``DataLoader`` is sharded too: each rank reads only its blocks.

    Args:
        model: the network, any mode; it is moved to ``device``.
        x: inputs ``(N, C, H, W)``, or a ``Dataset`` of ``(x, y)`` pairs (then ``y`` is None).
        y: int64 labels ``(N,)`` for tensor inputs.
        config: the recipe.
        seed: seeds the shuffling and augmentation generator (the model's initial weights are the
            caller's business).
        device: where to train.
        desc: progress-bar label.
        progress: show a tqdm progress bar (rank 0 only under a process group).
        precision: ``"fp32"`` or ``"bf16"`` (forward pass and loss under bfloat16 autocast; the
            weights, gradients and SGD state stay float32), see :mod:`deepclean.precision`.
        channels_last: convert the model's 4-D weights and each input batch to
            ``torch.channels_last`` (the model stays in that format afterwards).
        num_workers: ``DataLoader`` worker processes for a data set not in memory (0: read in
            the main process). The result does not depend on it when the data set's randomness
            is a function of index and epoch.
        pin_memory: page-locked batches before the copy to a CUDA device (ignored elsewhere).
        persistent_workers: keep the ``DataLoader`` workers alive between epochs.
        distributed: ``None`` (default): data-parallel when a process group with more than one
            rank is initialised; ``True``: always (requires an initialised group); ``False``:
            never, every rank trains alone on all of the data.

    Raises:
        ConfigurationError: ``precision`` is not ``"fp32"`` or ``"bf16"``, or ``channels_last`` is
            not a bool; no recipe; tensors without labels or a data set with labels; invalid
            loader options; ``distributed`` not a bool or None, or True without a process
            group; under a process group, ranks whose sample counts, recipes or seeds differ.
        DataError: a data set that is empty or whose items are not ``(x, y)`` pairs with integer
            labels.
        RuntimeError: under a process group, ranks that end with different weights.
    """
    sharded = use_distributed(distributed)
    error = None
    n = 0
    try:
        if isinstance(y, TrainConfig) and config is None:
            y, config = None, y
        if not isinstance(config, TrainConfig):
            raise ConfigurationError(
                f"config must be a TrainConfig, got {type(config).__name__}; e.g. "
                "train_model(model, x, y, TrainConfig(epochs=12), seed=0)")
        check_loader_options(num_workers=num_workers, pin_memory=pin_memory,
                             persistent_workers=persistent_workers)
        xt, yt, data = tensors_or_dataset(x, y)
        if data is None:
            x, y = xt, yt
            n = int(x.shape[0])
        else:
            n = dataset_size(data, "the training data")
        device = torch.device(device)
        check_precision(precision, device)
    except Exception as exc:
        if not sharded:
            raise
        error = exc  # every rank must learn of it before the first collective of the others
    if sharded:
        _check_same_on_every_rank(error, n, config, seed)
    world = world_size() if sharded else 1
    to_memory_format(model.to(device), channels_last).train()
    generator = torch.Generator().manual_seed(seed)
    loader = None
    if not isinstance(x, torch.Tensor):
        loader = ShuffledBatches(x, batch_size=config.batch_size, generator=generator,
                                 num_workers=num_workers,
                                 pin_memory=pin_memory and device.type == "cuda",
                                 persistent_workers=persistent_workers,
                                 rank=rank() if sharded else 0, world_size=world)
    opt = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    steps_per_epoch = math.ceil(n / config.batch_size)
    if config.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.epochs * steps_per_epoch)
    else:
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, [m * steps_per_epoch for m in config.milestones], gamma=config.lr_factor
        )
    # (global batch size, this rank's first row in it) of every step of an epoch
    blocks = [(b, shard_indices(b, rank=rank() if sharded else 0, world_size=world).start)
              for b in (min(config.batch_size, n - s) for s in range(0, n, config.batch_size))]
    net = wrap_ddp(model, device) if sharded else model
    bar = progress_bar(total=config.epochs * steps_per_epoch, desc=desc,
                       enabled=progress and (not sharded or is_main_process()))
    try:
        for _ in range(config.epochs):
            if loader is not None:
                batches = ((xb.to(device, non_blocking=True), yb.to(device, non_blocking=True))
                           for xb, yb in loader.epoch())
            elif sharded:
                batches = ((xb, yb) for xb, yb, _ in iterate_rank_blocks(
                    x, y, batch_size=config.batch_size, generator=generator, device=device))
            else:
                batches = ((xb, yb) for _, xb, yb in iterate_batches(
                    x, y, batch_size=config.batch_size, shuffle=True, generator=generator,
                    device=device))
            for (xb, yb), (size, start) in zip(batches, blocks, strict=True):
                if config.crop_padding or config.flip:
                    xb = random_crop_flip(xb, padding=config.crop_padding, flip=config.flip,
                                          generator=generator, of=size, start=start)
                with autocast(device, precision):
                    logits = net(to_input_format(xb, channels_last))
                    if sharded:  # DDP divides the sum of the ranks' gradients by world
                        loss = nn.functional.cross_entropy(logits, yb, reduction="sum") * (
                            world / size)
                    else:
                        loss = nn.functional.cross_entropy(logits, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
    finally:
        net = None  # the DDP wrapper and its gradient hooks go with it
        bar.close()
    if sharded:
        average_running_stats(model)
        check_same_state(model, what=f"train_model ({desc})")
    return model.eval()


def _check_same_on_every_rank(error: BaseException | None, n: int, config, seed) -> None:
    """A collective: raise on every rank if any rank failed its checks, or if the ranks' sample
    counts, recipes or seeds differ (they would train on different batches, or hang in DDP)."""
    try:
        recipe = int.from_bytes(hashlib.sha256(repr(config.to_dict()).encode()).digest()[:7],
                                "little")
        values = [int(n), recipe, int(seed)]
    except Exception as exc:  # unusable arguments: a failure like any other
        error = error or exc
        values = [-1] * 3
    table = all_gather_ints([error_code(error), *values])
    raise_if_any_rank_failed(table[:, 0].tolist(), error, what="train_model")
    names = ["samples", "recipe (TrainConfig)", "seed"]
    differ = [name for i, name in enumerate(names) if len(set(table[:, i + 1].tolist())) > 1]
    if differ:
        raise ConfigurationError(
            f"under torch.distributed every rank must train on the same data with the same "
            f"recipe and seed; the ranks differ in {', '.join(differ)}. Pass the whole data set, "
            "the same TrainConfig and the same seed on every rank (train_model splits the "
            "batches itself), or distributed=False"
        )
