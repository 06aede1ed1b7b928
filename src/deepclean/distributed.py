"""torch.distributed helpers: this process's rank, shards without padding, sums across ranks.

Every function works outside a process group too (one process, rank 0 of 1), so library code
calls them unconditionally. Launch several processes with ``torchrun`` and initialise the group
(``torch.distributed.init_process_group``) before calling into DeepClean; see ``docs/scale.md``.

Why no ``DistributedSampler``: it pads the data with repeated samples so that every rank gets the
same count, which is fine for training but wrong for a mean such as the Fisher diagonal or an
accuracy. :func:`shard_indices` gives each sample to exactly one rank, and the ranks add their
sums and counts with :func:`all_reduce_sum_`.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deepclean._digest import state_digest
from deepclean.errors import (
    BusyError,
    CheckpointError,
    ConfigurationError,
    DataError,
    DeepCleanError,
    DivergenceError,
    MaskError,
    SplitMismatchError,
)

__all__ = [
    "is_distributed",
    "rank",
    "world_size",
    "is_main_process",
    "shard_indices",
    "use_distributed",
    "all_reduce_sum_",
    "all_gather_ints",
    "all_gather_rows",
    "error_code",
    "raise_if_any_rank_failed",
    "barrier",
    "agree_on_errors",
    "broadcast_from_main",
    "launched_with_several_processes",
    "torchrun_process_group",
    "wrap_ddp",
    "average_running_stats",
    "check_same_state",
]

# Error classes that every rank can re-raise by number when another rank failed (code = index + 1).
_ERRORS: tuple[type[Exception], ...] = (
    DataError, ConfigurationError, MaskError, SplitMismatchError, CheckpointError, BusyError,
    DivergenceError, DeepCleanError, ValueError, TypeError, RuntimeError, Exception,
)


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default process group, in ``[0, world_size())``; 0 outside
    one."""
    return _own_rank()


def world_size() -> int:
    """The number of processes in the default process group; 1 outside one."""
    return _own_world_size()


def _own_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _own_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Whether this process is rank 0 (the one that writes files and prints); True outside a
    process group."""
    return rank() == 0


def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigurationError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def shard_indices(n: int, *, rank: int | None = None, world_size: int | None = None) -> range:
    """The indices of ``range(n)`` that ``rank`` owns: a contiguous block, without padding.

    Over the ranks ``0 .. world_size - 1`` the blocks are disjoint and their union is
    ``range(n)``: every sample is owned exactly once. Block sizes differ by at most one; when
    ``n < world_size`` some ranks own no sample (an empty range). Rank ``r`` owns
    ``range(r * n // world_size, (r + 1) * n // world_size)``.

    Args:
        n: the number of samples, an int >= 0.
        rank: the rank asking, in ``[0, world_size)``; default this process's (:func:`rank`).
        world_size: the number of ranks, an int >= 1; default this process group's
            (:func:`world_size`).

    Returns:
        A ``range`` of sample indices (ascending, step 1, possibly empty).

    Raises:
        ConfigurationError: ``n`` or ``world_size`` is not a non-negative / positive int, or
            ``rank`` is not an int in ``[0, world_size)``.
    """
    _check_int(n, "n", 0)
    world = _check_int(world_size if world_size is not None else _own_world_size(),
                       "world_size", 1)
    r = rank if rank is not None else _own_rank()
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < world:
        raise ConfigurationError(
            f"rank must be an int in [0, {world}) for world_size={world}, got {r!r}"
        )
    return range(r * n // world, (r + 1) * n // world)


def use_distributed(distributed: bool | None) -> bool:
    """Resolve a function's ``distributed`` argument: whether to split work over the ranks.

    ``None`` (automatic): True when a process group is initialised with more than one rank;
    ``False``: never; ``True``: always (with one rank, the split is the whole).

    Raises:
        ConfigurationError: ``distributed`` is not True, False or None, or it is True while no
            process group is initialised.
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise ConfigurationError(
            f"distributed must be True, False or None (automatic), got {distributed!r}"
        )
    if distributed is None:
        return is_distributed() and _own_world_size() > 1
    if distributed and not is_distributed():
        raise ConfigurationError(
            "distributed=True needs an initialised torch.distributed process group, and none "
            "is; call torch.distributed.init_process_group() first (e.g. under torchrun), or "
            "pass distributed=None to split the work only when one is initialised"
        )
    return distributed


def _collective_device(tensor: torch.Tensor) -> torch.device:
    """Where the default group's backend reduces: NCCL on the current CUDA device, otherwise
    (gloo, MPI) on the CPU; a tensor already on a device the backend serves stays there."""
    backend = str(dist.get_backend()).lower()
    if "nccl" in backend:
        if tensor.is_cuda:
            return tensor.device
        if "gloo" in backend:  # e.g. "cpu:gloo,cuda:nccl"
            return tensor.device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Replace ``tensor`` in place by its sum over all ranks, and return it.

    A collective: every rank must call it with a tensor of the same shape and dtype. Outside a
    process group (or with one process) it does nothing. The reduction runs where the backend
    needs it (gloo: on the CPU; NCCL: on the current CUDA device); a tensor elsewhere is copied
    there and back. Units and dtype are those of ``tensor``.

    Raises:
        ConfigurationError: ``tensor`` is not a ``torch.Tensor``.
    """
    if not isinstance(tensor, torch.Tensor):
        raise ConfigurationError(
            f"all_reduce_sum_ expects a torch.Tensor, got {type(tensor).__name__}"
        )
    if not is_distributed() or _own_world_size() == 1:
        return tensor
    device = _collective_device(tensor)
    if tensor.device == device and tensor.is_contiguous():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    else:
        buffer = tensor.to(device).contiguous()
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        tensor.copy_(buffer)
    return tensor


def all_gather_ints(values: Sequence[int]) -> torch.Tensor:
    """Every rank's ``values``: an int64 CPU tensor of shape ``(world_size(), len(values))``
    whose row ``r`` holds rank ``r``'s.

    A collective (one all-reduce of ``world_size * len(values)`` integers): every rank must call
    it with the same number of values. Outside a process group: shape ``(1, len(values))``.
    """
    values = [int(v) for v in values]
    table = torch.zeros(_own_world_size(), len(values), dtype=torch.int64)
    table[_own_rank()] = torch.tensor(values, dtype=torch.int64)
    return all_reduce_sum_(table)


# dtypes that all_gather_rows can carry (its metadata names them by position)
_ROW_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
               torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)
_ROW_MAX_DIMS = 6


def all_gather_rows(rows: torch.Tensor | None, *, error: BaseException | None = None,
                    total: int | None = None, what: str) -> torch.Tensor:
    """Every rank's ``rows`` concatenated in rank order, on every rank.

    With each rank passing the rows of its block :func:`shard_indices` ``(n)`` (contiguous and
    ascending with the rank), the result holds the rows of ``range(n)`` in order: every sample
    exactly once, no padding left in it. The blocks may differ in size (``n`` not divisible by
    the world size; some ranks may own nothing).

    A collective: every rank must call it, also a rank that failed (passing its ``error``)
    or that owns no rows. One all-reduce of a few integers per rank (counts, shape, dtype, error
    codes), then one ``all_gather`` of the rows, each rank's block padded to the largest for the
    transfer only (on the CPU for gloo, on the current CUDA device for NCCL).

    Args:
        rows: this rank's rows ``(n_r, ...)``; ``None`` (or a tensor of 0 rows) when it owns
            none: it then takes the other ranks' row shape and dtype. Ranks with rows must agree
            on ``rows.shape[1:]`` (at most 6 dimensions) and ``dtype``.
        error: this rank's failure, if any: every rank then raises (this rank its own error,
            the others an error of the same class naming it), none waits for ever.
        total: the number of rows the caller expects in all (``n``); when given, every rank
            checks that the ranks passed the same ``total`` and that the blocks add up to it.
        what: what is gathered, for the error messages.

    Returns:
        ``(sum of n_r, ...)``, on ``rows``' device (the CPU when ``rows`` is None), dtype that of
        the rows. Outside a process group (or with one process): ``rows`` itself (an empty
        float32 tensor for None), ``error`` raised if given.

    Raises:
        ConfigurationError: the ranks' rows differ in trailing shape or dtype, a dtype it cannot
            carry or more than 6 trailing dimensions, or (with ``total``) ranks that expect
            different totals or blocks that do not add up to it; raised on every rank.
    """
    if not is_distributed() or _own_world_size() == 1:
        if error is not None:
            raise error
        out = rows if rows is not None else torch.empty(0)
        if total is not None and out.shape[0] != total:
            raise ConfigurationError(f"{what}: {out.shape[0]} rows, expected {total}")
        return out
    n, code, shape = 0, -1, []
    if error is None and rows is not None and rows.shape[0] > 0:
        if rows.dtype not in _ROW_DTYPES or rows.ndim - 1 > _ROW_MAX_DIMS:
            error = ConfigurationError(
                f"{what}: all_gather_rows carries tensors of dtype {_ROW_DTYPES} with at most "
                f"{_ROW_MAX_DIMS} dimensions after the first, got {rows.dtype} of shape "
                f"{tuple(rows.shape)}")
        else:
            n, code, shape = int(rows.shape[0]), _ROW_DTYPES.index(rows.dtype), list(rows.shape[1:])
    meta = [error_code(error), n, -1 if total is None else int(total), code, len(shape),
            *shape, *[0] * (_ROW_MAX_DIMS - len(shape))]
    table = all_gather_ints(meta)
    raise_if_any_rank_failed(table[:, 0].tolist(), error, what=what)
    counts = table[:, 1].tolist()
    totals = table[:, 2].tolist()
    if total is not None and (len(set(totals)) > 1 or sum(counts) != total):
        raise ConfigurationError(
            f"{what}: under torch.distributed every rank must pass the same whole data set (it "
            f"is split over the ranks here); the ranks passed data sets of {totals} samples and "
            f"computed blocks of {counts} rows. Pass the whole data set on every rank, or "
            "distributed=False to compute everything on each rank alone")
    carrying = [r for r, c in enumerate(counts) if c > 0]
    if not carrying:
        return rows if rows is not None else torch.empty(0)
    first = table[carrying[0], 3:]
    if any(not torch.equal(table[r, 3:], first) for r in carrying):
        described = [(_ROW_DTYPES[int(table[r, 3])], table[r, 5:5 + int(table[r, 4])].tolist())
                     for r in carrying]
        raise ConfigurationError(
            f"{what}: the ranks' rows differ in dtype or shape after the first dimension "
            f"({described}); every rank must pass the same model and data")
    dtype, ndim = _ROW_DTYPES[int(first[0])], int(first[1])
    row_shape = tuple(int(d) for d in first[2:2 + ndim])
    device = _collective_device(rows if rows is not None else torch.empty(0))
    buffer = torch.zeros((max(counts), *row_shape), dtype=dtype, device=device)
    if n:
        buffer[:n] = rows.to(device)
    parts = [torch.empty_like(buffer) for _ in counts]
    dist.all_gather(parts, buffer)
    out = torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])
    return out.to(rows.device if rows is not None else torch.device("cpu"))


def error_code(error: BaseException | None) -> int:
    """A number for ``error`` that other ranks can turn back into its class (0 for None)."""
    if error is None:
        return 0
    for i, cls in enumerate(_ERRORS):
        if type(error) is cls:
            return i + 1
    for i, cls in enumerate(_ERRORS):
        if isinstance(error, cls):
            return i + 1
    return len(_ERRORS)


def raise_if_any_rank_failed(
    codes: Sequence[int], error: BaseException | None, *, what: str
) -> None:
    """Raise on every rank if any rank failed, given every rank's :func:`error_code` (row order).

    Not itself a collective: gather the codes first (e.g. with :func:`all_gather_ints`) so that
    all ranks decide alike and none is left waiting in a later collective. A rank that failed
    raises its own ``error``; the others raise an error of the same class naming the failed ranks.
    """
    failed = [r for r, c in enumerate(codes) if int(c) != 0]
    if not failed:
        return
    if error is not None:
        raise error
    code = int(codes[failed[0]])
    cls = _ERRORS[min(max(code, 1), len(_ERRORS)) - 1]
    raise cls(
        f"{what} failed on rank{'s' if len(failed) > 1 else ''} "
        f"{', '.join(map(str, failed))} of {len(codes)} ({cls.__name__}); that rank raised it with "
        "the full message. Every rank stops here so that none waits forever for the others. Fix "
        "the cause reported there (every rank must pass the same model and data)."
    )


def barrier() -> None:
    """Wait until every rank reaches this call; does nothing outside a process group."""
    if is_distributed() and world_size() > 1:
        dist.barrier()


def agree_on_errors(error: BaseException | None, *, what: str) -> None:
    """Raise on every rank if ``error`` is not None on any rank; a collective (one all-reduce of
    ``world_size()`` integers), so every rank must call it, with its own error or None.

    Use it after work that only some ranks do (e.g. rank 0 checks the output folder): a rank that
    failed raises its own error, the others an error of the same class naming it, and no rank is
    left waiting in a later collective. Outside a process group it raises ``error`` if any.
    """
    codes = all_gather_ints([error_code(error)])[:, 0].tolist()
    raise_if_any_rank_failed(codes, error, what=what)


def broadcast_from_main(value: Any, *, error: BaseException | None = None, what: str,
                        patient: bool = False) -> Any:
    """Rank 0's ``value`` on every rank (pickled, as ``torch.distributed.broadcast_object_list``
    does); a collective that every rank must call (the other ranks' ``value`` is ignored).

    When rank 0 passes an ``error`` (it failed to produce ``value``), every rank raises: rank 0
    its own error, the others an error of the same class naming rank 0. Tensors inside ``value``
    must be on the CPU (a CUDA tensor would arrive on rank 0's GPU). Outside a process group:
    ``value``, or ``error`` raised.

    With ``patient``, the other ranks wait on the CPU group of :func:`torchrun_process_group`
    (timeout ``wait_timeout_s``) rather than the default group, for work that rank 0 does alone
    and that may outlast the default timeout (waiting for the lock of a cache entry that another
    run is training); a rank that dies still ends the wait at once (its connections close). Without such a group: the default.
    """
    if not is_distributed() or _own_world_size() == 1:
        if error is not None:
            raise error
        return value
    main = _own_rank() == 0
    box = [error_code(error), None if error is not None else value] if main else [0, None]
    group = _PATIENT.get("group") if patient else None
    dist.broadcast_object_list(box, src=0, group=group)
    codes = [int(box[0])] + [0] * (_own_world_size() - 1)
    raise_if_any_rank_failed(codes, error if main else None, what=what)
    return box[1]


# BatchNorm buffers stay per rank during DDP training (train mode normalises with each rank's batch
# statistics) and are averaged at the end; the keyword was renamed in recent torch releases.
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """``model`` (already on ``device``) wrapped in ``DistributedDataParallel`` over the default
    process group: rank 0's weights and buffers are copied to every rank once, then every
    backward averages the gradients over the ranks (all-reduces, in buckets, overlapping the
    backward). Buffers (BatchNorm running statistics) are not synchronised at each forward: every
    rank keeps its own, see :func:`average_running_stats`. Drop the wrapper after training: the
    model itself is trained in place and its hooks go with the wrapper."""
    ids = None
    if device.type == "cuda":
        ids = [device.index if device.index is not None else torch.cuda.current_device()]
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, **_NO_BUFFER_SYNC)


def average_running_stats(model: nn.Module) -> None:
    """Replace every BatchNorm's running mean and variance by their mean over the ranks (a
    collective; nothing outside a process group)."""
    world = _own_world_size()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var):
                if buffer is not None:
                    all_reduce_sum_(buffer).div_(world)


def check_same_state(model: nn.Module, *, what: str) -> None:
    """Raise ``RuntimeError`` on every rank unless every rank's ``model`` has bitwise the same
    parameters and buffers; a collective (one all-reduce of ``world_size()`` integers: the
    first 56 bits of each rank's SHA-256 of its state, copied to the CPU once). Nothing outside a
    process group."""
    if not is_distributed() or _own_world_size() == 1:
        return
    digest = int(state_digest(model.state_dict())[:14], 16)
    digests = all_gather_ints([digest])[:, 0].tolist()
    if len(set(digests)) > 1:
        raise RuntimeError(
            f"{what}: the ranks ended with different weights (state digests per rank: "
            f"{[f'{d:014x}' for d in digests]}); every rank must train the same model on the same "
            "data with the same settings and seed"
        )


def _env_int(name: str, default: int | None = None) -> int | None:
    text = os.environ.get(name)
    if text is None or text.strip() == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigurationError(
            f"the environment variable {name} must be an integer (torchrun sets it), got "
            f"{text!r}; start the command with torchrun, or unset {name}"
        ) from None


def launched_with_several_processes() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher that sets the same
    variables) as one of several: the environment variable ``WORLD_SIZE`` is above 1."""
    world = _env_int("WORLD_SIZE", 1)
    return world is not None and world > 1


# The CPU (gloo) group for patient waits, created by torchrun_process_group.
_PATIENT: dict[str, Any] = {}


@contextmanager
def torchrun_process_group(*, timeout_s: float, cuda: bool,
                           wait_timeout_s: float = 7 * 24 * 3600.0) -> Iterator[bool]:
    """Initialise the default process group from torchrun's environment for the body of the
    ``with``, and destroy it afterwards (also on an error).

    Does nothing (yields False) when ``WORLD_SIZE`` is not above 1 or a group is already
    initialised (then its owner destroys it). Otherwise (yields True): with ``cuda``, selects the
    GPU ``LOCAL_RANK`` (``torch.cuda.set_device``) and uses NCCL; else gloo (CPU). Every
    collective then fails after ``timeout_s`` seconds instead of waiting for ever for a rank that
    hangs (a rank that dies closes its connections, and the others fail at once). A second group
    (gloo, timeout ``wait_timeout_s``, default 7 days) serves the waits of
    :func:`broadcast_from_main` with ``patient=True``: the other ranks waiting while rank 0 alone
    waits for a lock (another run training the same cached model), which may take longer than
    ``timeout_s``.

    Raises:
        ConfigurationError: ``timeout_s`` is not a positive number; a torchrun variable is not an
            integer; or ``LOCAL_RANK`` names a GPU this machine does not have.
    """
    for name, value in (("timeout_s", timeout_s), ("wait_timeout_s", wait_timeout_s)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigurationError(f"{name} must be a number of seconds > 0, got {value!r}")
    if not launched_with_several_processes() or is_distributed():
        yield False
        return
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ConfigurationError(
                f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {name} is not set; start the "
                "command with torchrun (which sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and "
                "MASTER_PORT), or unset WORLD_SIZE to run in one process"
            )
    if cuda:
        local = _env_int("LOCAL_RANK", 0)
        count = torch.cuda.device_count()
        if not 0 <= local < count:
            raise ConfigurationError(
                f"LOCAL_RANK is {local} but this machine has {count} visible CUDA GPU(s); start "
                f"at most {count} processes per machine (torchrun --nproc_per_node={count}), or "
                "run on the CPU (--device cpu)"
            )
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    try:
        _PATIENT["group"] = dist.new_group(backend="gloo",
                                           timeout=timedelta(seconds=wait_timeout_s))
        yield True
    finally:
        _PATIENT.clear()
        if is_distributed():
            dist.destroy_process_group()
