"""The diagonal of the empirical Fisher information (Shi et al., arXiv 2311.10448, eq. 1).

For a data set D and every trainable weight w_i::

    I_D(w)_i = (1 / |D|) * sum_{(x, y) in D} (d/dw_i log p(y | x, w))^2

with the *true* label y and the *per-sample* gradient squared before averaging (not the square of
a mini-batch mean gradient, which depends on the batch size).

Fast exact path. Per batch, one batched forward pass records each parameterised layer call's
input and the autograd edge of its output. One backward pass then runs to those outputs only: it
forms neither weight gradients nor the gradient of the model input. As soon as the gradient with
respect to a layer's output arrives (a tensor hook, during the backward pass), the sum over the
batch of the squared per-sample weight gradients of that layer is formed in closed form and the
layer's input and output gradient are released, so memory peaks no higher than in a plain
backward pass plus one layer's workspace:

- ``nn.Linear`` on ``(B, in)`` inputs: ``sum_n (g_n x_n^T)^2 = (g^2)^T (x^2)``, one matmul;
  on ``(B, ..., in)`` inputs the per-sample gradients by a batched matmul.
- ``nn.Conv2d``, by one of three exact contractions chosen from the output-map size
  ``L = H_out * W_out`` and the weight's size (:func:`_conv_path`): for ``L >= 128`` or a small
  weight (at most 262,144 entries) the per-sample weight gradients of 16 samples at a time are
  the weight gradient of one grouped convolution whose groups are the samples (the backend's own
  convolution-backward kernel), squared and summed; for a larger weight and ``L <= 4`` the
  identity ``sum_n (G_n U_n^T)^2 = sum_n sum_{l <= l'} c_ll' (g_l g_l') (u_l u_l')^T`` turns
  the sum of squares into large matmuls over (sample, position pair), with the kernel taps
  grouped by the positions at which they read the input rather than zero padding (clamped at 0
  against rounding); otherwise each sample's gradient ``G_n @ unfold(x_n)^T`` is formed in one reused
  buffer and squared into the total in place (``addcmul_``), so it stays in the cache and no
  large block is allocated per batch. 1x1 convolutions skip the unfold.
- ``nn.BatchNorm*`` in eval mode: ``sum_{spatial} g * x_hat`` and ``sum_{spatial} g`` per
  channel, as dot products over the positions.
- Any other module that owns parameters goes through a generic exact path: per-sample
  vector-Jacobian products of that module with ``torch.func``, announced once per module type by
  a warning that names it. Nothing is approximated.
- A parameter used by more than one module call (shared weights) accumulates its per-sample
  gradient over the calls first and is squared after the backward pass.

BatchNorm and dropout run in eval mode meanwhile (per-sample gradients under train-mode BatchNorm
are ill-defined, and its running statistics would change); the model's modes, parameters and
buffers are exactly as before afterwards. Scaling: the loss is the *sum* over the batch of
``log p(y | x)``, so each captured output gradient row is one sample's gradient; the totals are
divided by ``|D|`` once at the end.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.nn.utils import parametrize
from torch.utils.data import Dataset, Subset

from deepclean._torch import eval_mode
from deepclean.data.datasets import as_tensors, in_memory, stream_batches
from deepclean.distributed import (
    all_gather_ints,
    all_reduce_sum_,
    error_code,
    raise_if_any_rank_failed,
    shard_indices,
    use_distributed,
)
from deepclean.errors import ConfigurationError, DataError
from deepclean.fisher.rules import (
    _check_model,
    _has_closed_form,
    _own_tensors,
    _per_sample,
    _squared_sums,
    _warn_generic,
)
from deepclean.validation import (
    check_forward,
    check_inputs,
    check_trainable,
    check_unique,
    unwrap_model,
)

__all__ = ["fisher_diagonal", "fisher_diagonal_reference", "eval_mode"]



# --------------------------------------------------------------------------------------------


class _Call:
    """One call of a parameterised module in the current batch."""

    __slots__ = ("module", "x", "edge", "own", "shared", "hook")

    def __init__(self, module: nn.Module, x: torch.Tensor, edge, own: dict, shared: bool) -> None:
        self.module, self.x, self.edge, self.own, self.shared = module, x, edge, own, shared
        self.hook = None


class _FisherPass:
    """Forward hooks (registered once) that record each parameterised module call; tensor hooks
    on the outputs that turn each output gradient into squared-gradient sums as it arrives."""

    def __init__(self, model: nn.Module, names: dict[nn.Parameter, str], totals: dict) -> None:
        self.names, self.totals = names, totals
        self.own: dict[nn.Module, dict[str, nn.Parameter]] = {}
        self.calls: list[_Call] = []
        self.deferred: list[tuple[_Call, torch.Tensor, torch.Tensor]] = []
        self.per_sample: dict[nn.Parameter, torch.Tensor] = {}
        self.uses: dict[nn.Parameter, int] = {}
        self.handles = []
        self.recording = False  # only the model's own forward pass is recorded
        inside = {id(m) for module in model.modules() if parametrize.is_parametrized(module)
                  for m in module.parametrizations.modules()}
        for module in model.modules():
            if id(module) in inside:
                continue  # a parametrization: its tensors belong to the parametrised layer
            own = {k: p for k, p in _own_tensors(module, "parameters").items() if p in names}
            if own:
                self.own[module] = own
                self.handles.append(module.register_forward_hook(self._forward_hook))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not self.recording:
            return
        if not isinstance(output, torch.Tensor) or len(inputs) != 1:
            raise ConfigurationError(
                f"{type(module).__name__}: expected one tensor input and one tensor output for a "
                f"module that owns parameters, got {len(inputs)} inputs and "
                f"{type(output).__name__}. Wrap the layer so it takes and returns one tensor."
            )
        if not output.requires_grad:
            return
        own = self.own[module]
        for p in own.values():
            self.uses[p] = self.uses.get(p, 0) + 1
        call = _Call(module, inputs[0].detach(), get_gradient_edge(output), own, False)
        self.calls.append(call)
        # Registered before any in-place change of ``output`` (e.g. ReLU(inplace=True)): the
        # hook receives the gradient with respect to the value the layer produced.
        call.hook = output.register_hook(lambda grad, call=call: self._backward_hook(call, grad))

    def _add(self, call: _Call, sums: dict) -> None:
        for local, value in sums.items():
            p = call.own.get(local)
            if p is not None:
                self.totals[self.names[p]] += value

    def _backward_hook(self, call: _Call, grad: torch.Tensor) -> None:
        g = grad.detach()
        if g.dtype != call.x.dtype and call.x.is_floating_point():
            g = g.to(call.x.dtype)
        if not _has_closed_form(call.module):
            self.deferred.append((call, call.x, g))  # torch.func runs after the backward pass
        elif call.shared:
            self._add_per_sample(call, _per_sample(call.module, call.x, g))
        else:
            self._add(call, _squared_sums(call.module, call.x, g))
        call.x = None  # release the input as soon as it is used

    def _add_per_sample(self, call: _Call, per_sample: dict) -> None:
        unshared = {}
        for local, value in per_sample.items():
            p = call.own.get(local)
            if p is None:
                continue
            if self.uses[p] > 1:
                self.per_sample[p] = value if p not in self.per_sample else self.per_sample[p] + value
            else:
                unshared[local] = value.square_().sum(0)
        self._add(call, unshared)

    def _targets(self, root: torch.Tensor) -> list:
        """The recorded output edges that no other recorded output lies below in the graph.

        Differentiating to these alone executes every node between the loss and each recorded
        output (so every tensor hook fires), while the engine captures as few gradients as
        possible and computes no weight gradients.
        """
        recorded = {}
        for call in self.calls:
            recorded.setdefault(call.edge.node, []).append(call)
        # reach[node]: a recorded node is reachable from node's inputs (strictly below node).
        below: dict = {}
        stack = [(root.grad_fn, False)]
        while stack:
            node, done = stack.pop()
            if node is None or (not done and node in below):
                continue
            children = [c for c, _ in node.next_functions if c is not None]
            if done:
                below[node] = any(below.get(c) or c in recorded for c in children)
                continue
            below[node] = False  # placeholder against revisits while expanding
            stack.append((node, True))
            stack.extend((c, False) for c in children if c not in below)
        targets = []
        for node, calls in recorded.items():
            if node in below and not below[node]:
                targets.extend(c.edge for c in calls)
        return targets

    def run(self, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> None:
        self.calls, self.deferred, self.per_sample, self.uses = [], [], {}, {}
        try:
            self.recording = True
            try:
                logits = model(xb)
            finally:
                self.recording = False
            if logits.ndim != 2:
                raise DataError(f"expected logits of shape (B, K), got {tuple(logits.shape)}")
            if int(yb.min()) < 0 or int(yb.max()) >= logits.shape[1]:
                raise DataError(
                    f"labels must lie in [0, {logits.shape[1]}) for a model with "
                    f"{logits.shape[1]} outputs; got labels from {int(yb.min())} to "
                    f"{int(yb.max())}"
                )
            if not self.calls:
                return
            for call in self.calls:
                call.shared = any(self.uses[p] > 1 for p in call.own.values())
                if not _has_closed_form(call.module):
                    _warn_generic(call.module)
            log_p = torch.log_softmax(logits, dim=1).gather(1, yb.view(-1, 1)).sum()
            targets = self._targets(log_p)
            del logits
            if targets:
                torch.autograd.grad(log_p, targets, allow_unused=True)
            for call, x, g in self.deferred:
                self._add_per_sample(call, _per_sample(call.module, x, g))
            for p, value in self.per_sample.items():
                self.totals[self.names[p]] += value.square_().sum(0)
        finally:
            # The autograd node holds the hook, the hook holds the call and the call holds the
            # node (its gradient edge): a cycle through C++ that Python's collector cannot see.
            # Break it, or every batch's graph and saved inputs would stay alive.
            for call in self.calls:
                if call.hook is not None:
                    call.hook.remove()
                call.hook, call.edge, call.x = None, None, None
            self.calls, self.deferred, self.per_sample = [], [], {}



def fisher_diagonal(
    model: nn.Module,
    data: Dataset,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    num_workers: int = 0,
    distributed: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal of the empirical Fisher information of ``model`` on ``data`` (paper eq. 1).

    Args:
        model: a classifier returning logits ``(B, K)``. It may be in train or eval mode; BatchNorm
            and dropout run in eval mode during the computation and every module's mode is
            restored afterwards. Parameters and buffers are not changed.
        data: a ``Dataset`` of ``(x, y)`` pairs, ``y`` an integer class label (the true label).
        batch_size: samples per forward pass. The result does not depend on it (up to rounding).
        device: where to compute; default the device of the model's first parameter.
        dtype: compute in this floating dtype (e.g. ``torch.float64`` for tests); default the
            model's dtype.
        num_workers: ``DataLoader`` workers for a streamed data set (below).
        distributed: split the samples over the ranks of the initialised ``torch.distributed``
            process group (below). ``None`` (default): when a process group is initialised and
            has more than one rank; ``True``: always (requires an initialised group); ``False``:
            never, every rank computes the whole Fisher alone.

    Data in memory (a ``TensorDataset`` or a ``Subset`` of one) is sliced directly; any other
    ``Dataset`` is streamed through a ``DataLoader`` in its own order, one batch in memory at a
    time (:func:`deepclean.data.datasets.stream_batches`), with the same result.

    Returns:
        ``{name: tensor}`` for every parameter with ``requires_grad`` in ``named_parameters()``,
        each of that parameter's shape, dtype ``dtype`` (or the model's), on the CPU: the mean over
        samples of the squared gradient of ``log p(y | x)``. Units: (log-likelihood / weight)^2.

    A DataParallel / DistributedDataParallel model is unwrapped first: the keys carry no
    ``module.`` prefix.

    Several processes (``torchrun``): every rank calls this with the same model and the same
    *full* data set. Every rank validates the whole data set first (an in-memory set entirely, a
    streamed one as far as its type, length and first sample), then computes the sum of squared
    per-sample gradients over its own contiguous block of the samples only
    (:func:`deepclean.distributed.shard_indices`, no padding: each sample counts exactly once);
    one all-reduce adds the per-parameter sums and another the sample counts (on the CPU for
    gloo, on the device for NCCL), and the sums are divided by the global count. Every rank
    returns the same global Fisher, equal to the one-process result up to rounding. If any rank
    fails (bad data in its block, say), every rank raises an error of the same class instead of
    waiting for the others.

    Precision: the computation runs with ``torch.autocast`` disabled on ``device``, so a call
    inside an active autocast context (``deepclean run --precision bf16``, or
    :func:`deepclean.precision.autocast`) gives the same full-precision result as one outside it.
    A model in ``torch.channels_last`` memory format gives the same result as a contiguous one.

    Raises:
        DataError: the data set is empty, its inputs are not finite floats or do not fit the model,
            or its labels are not integers in range for the model's output.
        ConfigurationError: ``batch_size < 1``, no trainable parameter, a BatchNorm without
            running statistics, or a
            parameterised module that does not take and return a single tensor; ``distributed``
            is not a bool or None, or True without an initialised process group; under a process
            group, ranks that passed data sets of different lengths or models of different sizes.
    """

    sharded = use_distributed(distributed)
    if not sharded:
        totals, n, _ = _fisher_sums(model, data, batch_size=batch_size, device=device,
                                    dtype=dtype, num_workers=num_workers, sharded=False)
    else:
        totals, n = _sums_over_ranks(model, data, batch_size=batch_size, device=device,
                                     dtype=dtype, num_workers=num_workers)
    return {name: (t / n).cpu() for name, t in totals.items()}


def _sums_over_ranks(model, data, **kwargs) -> tuple[dict[str, torch.Tensor], int]:
    """This rank's sums over its shard, added over all ranks; and the global sample count.

    Every rank reaches the same collectives whatever fails locally: first the error codes,
    sample counts, data-set lengths and parameter counts of all ranks (one small all-reduce),
    then, only if all agree, the per-parameter sums as one flat buffer (one all-reduce).
    """
    error, totals, n, n_data = None, {}, 0, -1
    try:
        totals, n, n_data = _fisher_sums(model, data, sharded=True, **kwargs)
    except Exception as exc:  # every rank must learn of it, or the others would wait forever
        error = exc
    numel = sum(t.numel() for t in totals.values())
    table = all_gather_ints([error_code(error), n, n_data, numel])
    raise_if_any_rank_failed(table[:, 0].tolist(), error, what="fisher_diagonal")
    lengths, sizes = table[:, 2].tolist(), table[:, 3].tolist()
    if len(set(lengths)) > 1 or len(set(sizes)) > 1:
        raise ConfigurationError(
            f"under torch.distributed every rank must pass the same model and the same full data "
            f"set (fisher_diagonal shards it itself); the ranks passed data sets of "
            f"{lengths} samples and models of {sizes} trainable weights. Pass the whole data set "
            "on every rank, or distributed=False to compute the full Fisher on each rank alone"
        )
    flat = all_reduce_sum_(torch.cat([t.reshape(-1) for t in totals.values()]))
    offset = 0
    for t in totals.values():
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return totals, int(table[:, 1].sum())


def _fisher_sums(
    model: nn.Module,
    data: Dataset,
    *,
    batch_size: int,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    num_workers: int,
    sharded: bool,
) -> tuple[dict[str, torch.Tensor], int, int]:
    """The sums over samples of squared per-sample gradients (on ``device``), the number of
    samples summed and the length of the whole data set; with ``sharded``, the whole data set
    is validated but only this rank's shard is summed."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigurationError(f"batch_size must be an int >= 1, got {batch_size!r}")
    check_trainable(model)
    model = unwrap_model(model)  # keys without "module."; no hooks on DataParallel replicas
    _check_model(model)
    check_unique(data, "data set")
    if in_memory(data):
        x_all, y_all = as_tensors(data)
        check_inputs(x_all, y_all, "data set")
        check_forward(model, x_all, "data set")
        n_data = int(x_all.shape[0])
        if sharded:
            own = shard_indices(n_data)
            x_all, y_all = x_all[own.start:own.stop], y_all[own.start:own.stop]
        batches = ((x_all[i:i + batch_size], y_all[i:i + batch_size])
                   for i in range(0, x_all.shape[0], batch_size))
    else:
        n_data = -1
        batches = None
        if sharded:
            # The whole set's type, length and first sample, on every rank; then this rank's block.
            probe = _checked_stream(model, data, 1, 0)
            next(probe)
            probe.close()
            n_data = len(data)  # type: ignore[arg-type]
            data = Subset(data, shard_indices(n_data))
            if len(data) == 0:
                batches = iter(())  # more ranks than samples: this one sums nothing
        if batches is None:
            batches = _checked_stream(model, data, batch_size, num_workers)
    first = next(model.parameters(), None)
    if first is None:
        raise ConfigurationError("the model has no parameters; nothing to compute")
    device = torch.device(device) if device is not None else first.device
    work_dtype = dtype or first.dtype
    original_dtype = first.dtype
    names = {p: n for n, p in model.named_parameters() if p.requires_grad}
    totals = {n: torch.zeros_like(p, dtype=work_dtype, device=device) for p, n in names.items()}
    work_model = model
    if work_dtype != original_dtype or device != first.device:
        # Work on a converted copy so that the caller's tensors are never touched.
        work_model = copy.deepcopy(model).to(device=device, dtype=work_dtype)
        names = {p: n for n, p in work_model.named_parameters() if p.requires_grad}

    fisher_pass = _FisherPass(work_model, names, totals)
    try:
        # Autocast off (whatever the caller has active): the Fisher is always exact, in the
        # working dtype, never in bfloat16.
        with (eval_mode(work_model), torch.enable_grad(),
              torch.autocast(device_type=device.type, enabled=False)):
            n = 0
            for xb, yb in batches:
                xb, yb = xb.to(device), yb.to(device)
                if xb.is_floating_point():
                    xb = xb.to(work_dtype)
                fisher_pass.run(work_model, xb, yb)
                n += xb.shape[0]
    finally:
        fisher_pass.remove()
    return totals, n, n_data


def _checked_stream(model: nn.Module, data: Dataset, batch_size: int, num_workers: int):
    """Batches of a streamed data set, each checked as the in-memory path checks the whole set
    (finite float inputs, integer labels; the first batch through the model)."""
    for i, (xb, yb) in enumerate(stream_batches(data, batch_size=batch_size,
                                                num_workers=num_workers)):
        check_inputs(xb, yb, "data set")
        if i == 0:
            check_forward(model, xb, "data set")
        yield xb, yb


def fisher_diagonal_reference(
    model: nn.Module, data: Dataset, *, dtype: torch.dtype = torch.float64
) -> dict[str, torch.Tensor]:
    """Slow, obviously-correct reference: one single-sample backward pass per sample.

    Computes eq. 1 literally in ``dtype`` (default float64) on a copy of the model in eval mode.
    Used by the tests to check :func:`fisher_diagonal`; same return convention.
    """
    x_all, y_all = as_tensors(data)
    ref = copy.deepcopy(model).to(dtype=dtype).eval()
    params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    totals = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(x_all.shape[0]):
        xi = x_all[i : i + 1].to(dtype) if x_all.is_floating_point() else x_all[i : i + 1]
        log_p = torch.log_softmax(ref(xi), dim=1)[0, int(y_all[i])]
        grads = torch.autograd.grad(log_p, list(params.values()), allow_unused=True)
        for (n, _), g in zip(params.items(), grads, strict=True):
            if g is not None:
                totals[n] += g**2
    return {n: (t / x_all.shape[0]).detach() for n, t in totals.items()}
