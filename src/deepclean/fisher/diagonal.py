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
import warnings

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.nn.utils import parametrize
from torch.utils.data import Dataset

from deepclean._torch import eval_mode
from deepclean.data.datasets import as_tensors, iterate_batches
from deepclean.errors import ConfigurationError, DataError
from deepclean.validation import (
    check_forward,
    check_inputs,
    check_trainable,
    check_unique,
    unwrap_model,
)

__all__ = ["fisher_diagonal", "fisher_diagonal_reference", "eval_mode"]

_WARNED: set[str] = set()
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# Tuning of the Conv2d closed form (measured on a 2-core CPU, see benchmarks/bench_fisher.py).
# Output maps with at least this many positions, and weights with at most this many entries,
# use the grouped convolution-backward kernel.
CONV_GROUPED_MIN_POSITIONS = 128
CONV_GROUPED_MAX_WEIGHT = 262_144
# Samples per grouped convolution-backward call.
CONV_GROUPED_CHUNK = 16
# Output maps with at most this many positions use the position-pair matmul.
CONV_PAIRS_MAX_POSITIONS = 4
# Samples unfolded at once by the per-sample path.
CONV_UNFOLD_CHUNK = 16
# Entries of the per-sample path's buffer of per-sample gradients (about 1 MiB in float32).
CONV_SAMPLE_BUFFER = 262_144
# Largest intermediate block (in elements) formed at once by the matmul paths.
CONV_BLOCK_ELEMENTS = 8_000_000


def _check_model(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, _BATCHNORMS) and not module.track_running_stats:
            raise ConfigurationError(
                f"module {name!r} is a BatchNorm without running statistics "
                "(track_running_stats=False): in eval mode it normalises with batch statistics, so "
                "per-sample gradients are not defined. Rebuild it with track_running_stats=True."
            )


# --------------------------------------------------------------------------------------------
# Closed forms. ``x`` is the layer input of the batch, ``g`` the gradient of the summed
# log-likelihood with respect to the layer output (row n = sample n's gradient).


def _linear_per_sample(module: nn.Linear, x: torch.Tensor, g: torch.Tensor) -> dict:
    b = x.shape[0]
    x3, g3 = x.reshape(b, -1, x.shape[-1]), g.reshape(b, -1, g.shape[-1])
    out = {"weight": torch.bmm(g3.transpose(1, 2), x3)}  # (B, out, in)
    if module.bias is not None:
        out["bias"] = g3.sum(1)
    return out


def _linear_sq(module: nn.Linear, x: torch.Tensor, g: torch.Tensor) -> dict:
    if x.ndim == 2:
        g2 = g * g
        out = {"weight": g2.T @ (x * x)}
        if module.bias is not None:
            out["bias"] = g2.sum(0)
        return out
    return {k: v.square_().sum(0) for k, v in _linear_per_sample(module, x, g).items()}


def _conv_padded(module: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    if module.padding_mode != "zeros":
        pad = nn.functional.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        return pad, (0, 0)
    if isinstance(module.padding, str):  # "same" / "valid"
        if module.padding == "valid":
            return x, (0, 0)
        pad = nn.functional.pad(x, module._reversed_padding_repeated_twice)
        return pad, (0, 0)
    return x, tuple(module.padding)


def _conv_columns(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``(B, C_in * kh * kw, L)`` columns of the (padded) input, without an unfold for 1x1."""
    x, padding = _conv_padded(module, x)
    if module.kernel_size == (1, 1) and padding == (0, 0):
        sh, sw = module.stride
        if (sh, sw) != (1, 1):
            x = x[:, :, ::sh, ::sw]
        return x.reshape(x.shape[0], x.shape[1], -1)
    return nn.functional.unfold(
        x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride
    )


def _conv_per_sample_unfold(module: nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients ``(B, *weight.shape)`` via unfold and a batched matmul."""
    b, groups = x.shape[0], module.groups
    cols = _conv_columns(module, x)  # (B, C_in*k*k, L)
    length = cols.shape[-1]
    cols = cols.reshape(b * groups, cols.shape[1] // groups, length)
    g3 = g.reshape(b * groups, g.shape[1] // groups, length)
    return torch.bmm(g3, cols.transpose(1, 2)).reshape(b, *module.weight.shape)


def _conv_per_sample_grouped(module: nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients ``(B, *weight.shape)``: the weight gradient of one convolution
    in which each sample is its own group of channels."""
    x, padding = _conv_padded(module, x)
    b, c_in = x.shape[:2]
    c_out, groups = g.shape[1], module.groups
    weight_shape = (b * c_out, c_in // groups, *module.kernel_size)
    # Only the weight's shape matters for the weight gradient; zeros make any misuse visible.
    dummy = torch.zeros(weight_shape, dtype=x.dtype, device=x.device)
    grad = torch.ops.aten.convolution_backward(
        g.reshape(1, b * c_out, *g.shape[2:]),
        x.reshape(1, b * c_in, *x.shape[2:]),
        dummy,
        None,
        list(module.stride),
        list(padding),
        list(module.dilation),
        False,
        [0, 0],
        b * groups,
        [False, True, False],
    )[1]
    return grad.view(b, *module.weight.shape)


def _conv2d_per_sample(module: nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> dict:
    """Per-sample gradients of a Conv2d, ``(B, *param.shape)``."""
    out = {"weight": _conv_per_sample_unfold(module, x, g)}
    if module.bias is not None:
        out["bias"] = g.sum((2, 3))
    return out


def _pair_products(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``t[..., rows] * t[..., cols]`` for the index pairs ``rows <= cols`` of the last axis."""
    return t[..., rows] * t[..., cols]


def _conv_path(length: int, weight_numel: int) -> str:
    """The Conv2d contraction for an output map of ``length`` positions and a weight of
    ``weight_numel`` entries: ``"grouped"``, ``"pairs"`` or ``"per_sample"`` (all exact; chosen by
    shape alone, so the same model always takes the same path and rounds the same way)."""
    if length >= CONV_GROUPED_MIN_POSITIONS or weight_numel <= CONV_GROUPED_MAX_WEIGHT:
        return "grouped"
    if length <= CONV_PAIRS_MAX_POSITIONS:
        return "pairs"
    return "per_sample"


def _conv_pairs_sq(module: nn.Conv2d, x: torch.Tensor, g4: torch.Tensor,
                   flat: torch.Tensor) -> None:
    """Add ``sum_n (per-sample weight gradient)^2`` of a Conv2d with a small output map to
    ``flat`` ``(groups, c_out/groups, c_in/groups * kh * kw)`` by the position-pair identity

        sum_n (G_n U_n^T)^2 = sum_n sum_{l <= l'} c_ll' (g_l * g_l') (u_l * u_l')^T,

    ``c = 1`` on the diagonal and 2 off it: one large matmul over (sample, pair). Kernel taps
    that read zero padding at some positions only need the pairs of the positions where they read
    the input, so taps are grouped by that set of positions (for a 3x3 kernel on a 2x2 map:
    corners 1 pair, edges 3, the centre 10, instead of 10 for all nine). The inputs each tap reads
    are gathered straight from the padded input (no unfold).
    """
    b = x.shape[0]
    groups, c_out, c_in = flat.shape
    kh, kw = module.kernel_size
    taps = kh * kw
    xp, (ph, pw) = _conv_padded(module, x)  # padded already unless the padding is zeros
    read = xp.shape[2:]  # what the convolution reads besides zero padding
    xp = nn.functional.pad(xp, (pw, pw, ph, ph))  # zero padding made explicit
    hp, wp = xp.shape[2:]
    geometry = {"kernel_size": module.kernel_size, "dilation": module.dilation,
                "stride": module.stride}
    where = torch.arange(hp * wp, dtype=torch.float64, device=x.device).view(1, 1, hp, wp)
    index = nn.functional.unfold(where, **geometry)[0].long()  # (taps, L) into the padded map
    inside = nn.functional.pad(torch.ones((1, 1, *read), dtype=torch.float64,
                                          device=x.device), (pw, pw, ph, ph))
    valid = nn.functional.unfold(inside, **geometry)[0] != 0  # tap t reads the input at l
    by_positions: dict[tuple[int, ...], list[int]] = {}
    for t in range(taps):
        positions = tuple(torch.nonzero(valid[t]).flatten().tolist())
        if positions:  # a tap that only ever reads padding has a zero gradient
            by_positions.setdefault(positions, []).append(t)
    xflat = xp.reshape(b, groups, c_in // taps, hp * wp)
    flat4 = flat.view(groups, c_out, c_in // taps, taps)
    for positions, tap_list in by_positions.items():
        m = len(positions)
        pos = torch.tensor(positions, device=x.device)
        tap_idx = torch.tensor(tap_list, device=x.device)
        gather = index[tap_idx][:, pos].T.reshape(-1)  # (m * |T|,) position-major
        rows, cols_idx = torch.triu_indices(m, m, device=x.device)
        factor = torch.where(rows == cols_idx, 1.0, 2.0).to(g4.dtype).view(1, 1, -1, 1)
        width = (c_in // taps) * len(tap_list)
        n_pairs = rows.numel()
        chunk = max(1, CONV_BLOCK_ELEMENTS // ((c_out + width) * n_pairs * groups))
        for s in range(0, b, chunk):
            e = min(b, s + chunk)
            gs = g4[s:e].index_select(3, pos).permute(1, 0, 3, 2)  # (groups, n, m, c_out)
            us = xflat[s:e].index_select(3, gather)
            us = us.view(e - s, groups, c_in // taps, m, len(tap_list))
            us = us.permute(1, 0, 3, 2, 4).reshape(groups, e - s, m, width)
            gg = gs.index_select(2, rows) * (gs.index_select(2, cols_idx) * factor)
            uu = us.index_select(2, rows) * us.index_select(2, cols_idx)  # (groups, n, P, width)
            part = torch.bmm(gg.reshape(groups, -1, c_out).transpose(1, 2),
                             uu.reshape(groups, -1, width))
            flat4.index_add_(3, tap_idx, part.view(groups, c_out, c_in // taps, len(tap_list)))


def _conv2d_sq(module: nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> dict:
    """``sum_n (per-sample weight gradient)^2`` of a Conv2d, by one of three exact contractions
    chosen from the output-map size ``L`` and the weight's size (see the module docstring)."""
    b, groups = x.shape[0], module.groups
    weight = module.weight
    length = g.shape[2] * g.shape[3]
    total = torch.zeros(weight.shape, dtype=g.dtype, device=g.device)
    path = _conv_path(length, weight.numel())
    if path == "grouped":
        chunk = CONV_GROUPED_CHUNK
        for s in range(0, b, chunk):
            part = _conv_per_sample_grouped(module, x[s : s + chunk], g[s : s + chunk])
            total += part.square_().sum(0)
    else:
        flat = total.view(groups, weight.shape[0] // groups, -1)
        c_out, c_in = flat.shape[1], flat.shape[2]
        g4 = g.reshape(b, groups, c_out, length)
        if path == "pairs":
            _conv_pairs_sq(module, x, g4, flat)
            total.clamp_min_(0)  # rounding in the expanded square must not go below zero
        else:
            # Per-sample gradients into one reused buffer (one sample per matmul, or as many as
            # fit in it for small weights), squared and added in place: they stay in the cache
            # and no large block is allocated; the input is unfolded 16 samples at a time.
            per = max(1, min(CONV_UNFOLD_CHUNK, CONV_SAMPLE_BUFFER // weight.numel()))
            buf = torch.empty((per * groups, c_out, c_in), dtype=g.dtype, device=g.device)
            for s in range(0, b, CONV_UNFOLD_CHUNK):
                e = min(b, s + CONV_UNFOLD_CHUNK)
                cols = _conv_columns(module, x[s:e]).reshape(-1, c_in, length)  # (n*groups, .)
                g3 = g4[s:e].reshape(-1, c_out, length)
                for t in range(0, e - s, per):
                    k = min(per, e - s - t)
                    out = buf[: k * groups]
                    torch.bmm(g3[t * groups : (t + k) * groups],
                              cols[t * groups : (t + k) * groups].transpose(1, 2), out=out)
                    if k == 1:
                        flat.addcmul_(out, out)
                    else:
                        flat += out.view(k, groups, c_out, c_in).square_().sum(0)
    out = {"weight": total}
    if module.bias is not None:
        out["bias"] = g.sum((2, 3)).square_().sum(0)
    return out


def _batchnorm_per_sample(
    module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, g: torch.Tensor
) -> dict:
    b, c = x.shape[:2]
    shape = (1, c) + (1,) * (x.ndim - 2)
    out = {}
    if module.weight is not None:
        centred = (x - module.running_mean.view(shape)).reshape(b, c, -1)
        dot = torch.linalg.vecdot(centred, g.reshape(b, c, -1))  # (B, C)
        out["weight"] = dot * torch.rsqrt(module.running_var + module.eps)
    if module.bias is not None:
        out["bias"] = g.reshape(b, c, -1).sum(2)
    return out


def _own_tensors(module: nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """The parameters (``kind="parameters"``) or buffers a module owns, counting those of its
    parametrizations (``torch.nn.utils.parametrize``: ``parametrizations.weight.original0`` and
    the like) as its own: they only act through the module's computed ``weight``."""
    named = getattr(module, f"named_{kind}")
    out = dict(named(recurse=False))
    if parametrize.is_parametrized(module):
        out.update(getattr(module.parametrizations, f"named_{kind}")(prefix="parametrizations"))
    return out


def _generic_per_sample(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict:
    """Exact per-sample parameter gradients of any per-sample-independent module via torch.func
    (for a parametrised layer: with respect to its parametrization's original tensors)."""
    from torch.func import functional_call, vjp, vmap

    params = {k: p.detach() for k, p in _own_tensors(module, "parameters").items()}
    buffers = dict(_own_tensors(module, "buffers"))

    def one(x1: torch.Tensor, g1: torch.Tensor) -> dict[str, torch.Tensor]:
        def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(module, (p, buffers), (x1.unsqueeze(0),))

        _, pullback = vjp(f, params)
        return pullback(g1.unsqueeze(0))[0]

    return vmap(one)(x, g)


def _has_closed_form(module: nn.Module) -> bool:
    if parametrize.is_parametrized(module):
        return False  # its weight is a function of other tensors: the generic exact path
    return isinstance(module, (nn.Conv2d, nn.Linear) + _BATCHNORMS)


def _per_sample(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict:
    if not _has_closed_form(module):
        return _generic_per_sample(module, x, g)
    if isinstance(module, nn.Conv2d):
        return _conv2d_per_sample(module, x, g)
    if isinstance(module, _BATCHNORMS):
        return _batchnorm_per_sample(module, x, g)
    if isinstance(module, nn.Linear):
        return _linear_per_sample(module, x, g)
    return _generic_per_sample(module, x, g)


def _squared_sums(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict:
    if isinstance(module, nn.Linear):
        return _linear_sq(module, x, g)
    if isinstance(module, nn.Conv2d):
        return _conv2d_sq(module, x, g)
    return {k: v.square_().sum(0) for k, v in _per_sample(module, x, g).items()}


def _warn_generic(module: nn.Module) -> None:
    name = type(module).__name__
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(
            f"fisher_diagonal: no closed form for {name}; its parameters use the generic exact "
            "path (per-sample vector-Jacobian products with torch.func), which is slower.",
            stacklevel=4,
        )


# --------------------------------------------------------------------------------------------


class _Call:
    """One call of a parameterised module in the current batch."""

    __slots__ = ("module", "x", "edge", "own", "shared")

    def __init__(self, module: nn.Module, x: torch.Tensor, edge, own: dict, shared: bool) -> None:
        self.module, self.x, self.edge, self.own, self.shared = module, x, edge, own, shared


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
        output.register_hook(lambda grad, call=call: self._backward_hook(call, grad))

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
            self.calls, self.deferred, self.per_sample = [], [], {}



def fisher_diagonal(
    model: nn.Module,
    data: Dataset,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
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

    Returns:
        ``{name: tensor}`` for every parameter with ``requires_grad`` in ``named_parameters()``,
        each of that parameter's shape, dtype ``dtype`` (or the model's), on the CPU: the mean over
        samples of the squared gradient of ``log p(y | x)``. Units: (log-likelihood / weight)^2.

    A DataParallel / DistributedDataParallel model is unwrapped first: the keys carry no
    ``module.`` prefix.

    Precision: the computation runs with ``torch.autocast`` disabled on ``device``, so a call
    inside an active autocast context (``deepclean run --precision bf16``, or
    :func:`deepclean.precision.autocast`) gives the same full-precision result as one outside it.
    A model in ``torch.channels_last`` memory format gives the same result as a contiguous one.

    Raises:
        DataError: the data set is empty, its inputs are not finite floats or do not fit the model,
            or its labels are not integers in range for the model's output.
        ConfigurationError: ``batch_size < 1``, no trainable parameter, a BatchNorm without
            running statistics, or a
            parameterised module that does not take and return a single tensor.
    """

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigurationError(f"batch_size must be an int >= 1, got {batch_size!r}")
    check_trainable(model)
    model = unwrap_model(model)  # keys without "module."; no hooks on DataParallel replicas
    _check_model(model)
    check_unique(data, "data set")
    x_all, y_all = as_tensors(data)
    check_inputs(x_all, y_all, "data set")
    check_forward(model, x_all, "data set")
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
            for _, xb, yb in iterate_batches(x_all, y_all, batch_size=batch_size, device=device):
                if xb.is_floating_point():
                    xb = xb.to(work_dtype)
                fisher_pass.run(work_model, xb, yb)
    finally:
        fisher_pass.remove()
    n = x_all.shape[0]
    return {name: (t / n).cpu() for name, t in totals.items()}


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
