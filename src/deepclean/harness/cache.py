"""The run context and the model cache: data, device and folders; original and gold models and
the training-set Fisher, trained once and reused under a key of everything that determines them
(locked per entry, so concurrent runs train each model once).

Under ``torch.distributed`` (``torchrun ... deepclean run``) rank 0 alone owns the cache: it takes
the entry's lock and reads the entry. A cached model is sent to the other ranks
(:func:`deepclean.distributed.broadcast_from_main`), which wait for it; a model that is not cached
is trained by all ranks together (:func:`deepclean.training.train_model` as
DistributedDataParallel, each rank on its shard of every batch; every rank ends with the same
weights, checked by a digest all-reduce) and rank 0 saves it. The other ranks never read or write
the cache folder, so it need not be shared between machines. The training-set Fisher is computed
by every rank together (each sums its shard), and rank 0 decides whether the cached one is reused
and saves a new one."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from deepclean._digest import indices_digest, json_digest
from deepclean.checkpoint import (
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
    state_digest,
    strip_module_prefix,
)
from deepclean.data.datasets import ImageData, load_dataset
from deepclean.data.models import build_model
from deepclean.data.splits import ForgetSplit, make_split
from deepclean.distributed import (
    agree_on_errors,
    broadcast_from_main,
    is_main_process,
    world_size,
)
from deepclean.errors import CheckpointError
from deepclean.fisher.train_fisher import TrainFisher, model_digest, precompute_train_fisher
from deepclean.harness.config import (
    TEST_HALVES_SEED,
    ExperimentConfig,
    _precision_determinants,
    _subsample,
    default_cache_dir,
    fisher_methods,
)
from deepclean.harness.locking import exclusive_lock
from deepclean.harness.tuning import test_halves
from deepclean.precision import (
    check_precision,
    to_memory_format,
)
from deepclean.training import resolve_device, synchronize, train_model
from deepclean.validation import check_same_split


def _key(payload: dict[str, Any]) -> str:
    """The cache key of a model: the first 20 hex digits of its determinants' digest."""
    return json_digest(payload)[:20]


def _digest_indices(index: torch.Tensor) -> str:
    return indices_digest(index, sort=False)


@dataclass
class _Context:
    cfg: ExperimentConfig
    data: ImageData
    device: torch.device
    cache_dir: Path
    out_dir: Path
    log: Callable[[str], None]
    #: the validation half of the *whole* test set (inputs, labels), whatever ``test_half`` is:
    #: held-out data when the original trained on every training image, never reported on with
    #: ``test_half="report"``
    validation: tuple[torch.Tensor, torch.Tensor] | None = None


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

    model = build_model(model_name, in_channels=ctx.data.in_channels,
                        num_classes=ctx.data.num_classes, width=cfg.width, seed=seed)
    if world_size() == 1:
        # a second process that needs the same model waits here and then reuses it
        with exclusive_lock(path, purpose=f"training the {kind} model", wait=True):
            meta = _cached_model(ctx, model, kind=kind, key=key, path=path)
            if meta is None:
                meta = _train(ctx, model, kind=kind, seed=seed, x=x, y=y, payload=payload, key=key)
                save_checkpoint(path, model, meta)
        return model.eval(), meta
    # Several ranks: rank 0 holds the entry's lock and reads it; a cached model goes to the
    # others, a missing one is trained by every rank together and saved by rank 0.
    with ExitStack() as held:
        cached, error = None, None
        if is_main_process():
            try:
                held.enter_context(exclusive_lock(path, purpose=f"training the {kind} model",
                                                  wait=True))
                meta = _cached_model(ctx, model, kind=kind, key=key, path=path)
                if meta is not None:
                    cached = ({k: v.detach().cpu() for k, v in
                               strip_module_prefix(model.state_dict()).items()}, meta)
            except Exception as exc:  # every rank raises below instead of waiting for ever
                error = exc
        # patient: rank 0 may wait for the lock while another run trains the same model
        cached = broadcast_from_main(cached, error=error,
                                     what=f"reading the {kind} model's cache entry (rank 0)",
                                     patient=True)
        if cached is not None:
            if not is_main_process():
                model.load_state_dict(cached[0], strict=True)
                model = to_memory_format(model.to(ctx.device), cfg.channels_last)
            return model.eval(), cached[1]
        meta = _train(ctx, model, kind=kind, seed=seed, x=x, y=y, payload=payload, key=key)
        error = None
        if is_main_process():
            try:
                save_checkpoint(path, model, meta)
            except Exception as exc:
                error = exc
        agree_on_errors(error, what=f"saving the {kind} model (rank 0)")
    return model.eval(), meta


def _cached_model(ctx: _Context, model: torch.nn.Module, *, kind: str, key: str,
                  path: Path) -> dict[str, Any] | None:
    """Load the cache entry at ``path`` into ``model`` (moved to the device) and return its
    metadata when its key is ``key``; else None (logged), ``model`` untouched (a state that fits
    only in part is loaded into a copy first, so the model to train keeps its initial weights,
    the same on every rank)."""
    if path.is_file():
        try:
            state, meta = load_checkpoint(path)
            if not meta.get("state_sha256"):
                raise CheckpointError(f"{path} records no tensor hash")
            if meta.get("key") == key:
                copy.deepcopy(model).load_state_dict(strip_module_prefix(state), strict=True)
                model.load_state_dict(strip_module_prefix(state), strict=True)
                ctx.log(f"  {kind} model: reused {path}")
                to_memory_format(model.to(ctx.device), ctx.cfg.channels_last)
                return meta
            ctx.log(f"  {kind} model: cache entry {path} has another key; retraining")
        except (CheckpointError, RuntimeError) as exc:
            ctx.log(f"  {kind} model: cache entry unusable ({exc}); retraining")
    return None


def _train(ctx: _Context, model: torch.nn.Module, *, kind: str, seed: int, x: torch.Tensor,
           y: torch.Tensor, payload: dict[str, Any], key: str) -> dict[str, Any]:
    """Train ``model`` in place (under a process group: every rank together, as DDP) and return
    the metadata of its cache entry."""
    cfg = ctx.cfg
    world = world_size()
    ranks = f", data-parallel over {world} ranks" if world > 1 else ""
    ctx.log(f"  {kind} model: training on {x.shape[0]} samples ({cfg.train.epochs} epochs"
            f"{ranks})")
    synchronize(ctx.device)
    start = time.perf_counter()
    train_model(model, x, y, cfg.train, seed=seed, device=ctx.device, desc=f"train {kind}",
                progress=cfg.progress, precision=cfg.precision, channels_last=cfg.channels_last)
    synchronize(ctx.device)
    seconds = time.perf_counter() - start
    return {"key": key, "determinants": payload, "train_time_s": seconds}


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _make_context(config: ExperimentConfig, log: Callable[[str], None]) -> _Context:
    """Validate ``config``, pick the device, load the data set, create the output folder."""
    config.validate()
    device = resolve_device(config.device)
    check_precision(config.precision, device)
    if config.download and world_size() > 1:  # rank 0 downloads, then the others read it
        data, error = None, None
        if is_main_process():
            try:
                data = load_dataset(config.dataset, data_dir=config.data_dir, download=True)
            except Exception as exc:
                error = exc
        agree_on_errors(error, what="loading the data set (rank 0)")
        if not is_main_process():
            data = load_dataset(config.dataset, data_dir=config.data_dir, download=True)
    else:
        data = load_dataset(config.dataset, data_dir=config.data_dir, download=config.download)
    val, report = test_halves(int(data.test_x.shape[0]), seed=TEST_HALVES_SEED)
    validation = (data.test_x[val], data.test_y[val])  # before the test set is cut to a half
    if config.test_half == "report":
        data = replace(data, test_x=data.test_x[report], test_y=data.test_y[report])
    out_dir = Path(config.out_dir)
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    if is_main_process():  # under torch.distributed only rank 0 writes files
        out_dir.mkdir(parents=True, exist_ok=True)
    return _Context(config, data, device, cache_dir, out_dir, log, validation)


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
    cached, error = None, None
    if is_main_process():  # rank 0 decides whether the cached I_D is reused, and sends it
        try:
            cached = _cached_train_fisher(ctx, path, digest, int(x_train.shape[0]))
        except Exception as exc:
            error = exc
    cached = broadcast_from_main(cached, error=error, what="reading the training-set Fisher")
    if cached is not None:
        return cached
    batch = cfg.hyperparameters.get("deepclean", {}).get("fisher_batch_size", 256)
    # a collective under torch.distributed: every rank sums its shard of the training set
    tf = precompute_train_fisher(original, TensorDataset(x_train, y_train), batch_size=batch,
                                 device=ctx.device)
    if is_main_process():
        tf.save(path, {"key": original_meta["key"]})
    ctx.log(f"  training-set Fisher I_D on {tf.n_samples} samples: {tf.time_s:.1f} s "
            "(once per original model)")
    return tf


def _cached_train_fisher(ctx: _Context, path: Path, digest: str, n: int) -> Any:
    """The cached training-set Fisher at ``path`` when it belongs to the model of ``digest`` and
    ``n`` samples (on the CPU), else None (logged)."""
    if path.is_file():
        try:
            tf, _ = TrainFisher.load(path)
            if tf.model_sha256 == digest and tf.n_samples == n:
                ctx.log(f"  training-set Fisher I_D: reused {path} (computed in {tf.time_s:.1f} s)")
                return tf
            ctx.log(f"  training-set Fisher: cache entry {path} belongs to another model; "
                    "recomputing")
        except CheckpointError as exc:
            reason = str(exc).split(";")[0]  # without the advice to delete: it is rebuilt now
            ctx.log(f"  training-set Fisher: cache entry unusable ({reason}); recomputing it")
    return None


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
    if is_main_process():  # every rank draws the same split (same seed); rank 0 writes it
        _write_json(ctx.out_dir / "splits" / f"{cfg.dataset}_{scenario}_seed{seed}.json",
                    manifest)
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


def _state_sha(model: torch.nn.Module) -> str:

    return state_digest(strip_module_prefix(model.state_dict()))


def _check_gold_split(gold_meta: dict[str, Any], split: ForgetSplit) -> None:
    """Refuse a gold model recorded for another split (SplitMismatchError), before evaluation."""

    check_same_split(gold_meta, split, what="gold model")
