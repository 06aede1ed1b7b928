"""Per-layer rules of the Fisher pass: for one call of a layer, given its input ``x`` ``(B, ...)``
and the gradient ``g`` of the summed log-likelihood with respect to its output, each sample's
gradient with respect to the layer's own parameters, or directly the sum over the batch of their
squares (the fast path).

Built-in rules: ``nn.Linear`` (closed form), ``nn.Conv2d`` (three exact contractions chosen by
shape: grouped convolution-backward, per-sample unfold, position pairs), eval-mode BatchNorm
(a channel reduction). Any other layer, and any parametrised layer
(``torch.nn.utils.parametrize``), takes the generic exact path (per-sample vector-Jacobian
products with ``torch.func``). :func:`register_layer_rule` adds a rule for a layer type of one's
own, as BackPACK and Opacus do with their registries.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from deepclean.errors import ConfigurationError

__all__ = ["LayerRule", "register_layer_rule", "layer_rule", "registered_layer_types"]

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


PerSample = Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class LayerRule:
    """How the Fisher pass handles one layer type.

    Attributes:
        per_sample: ``(module, x, g) -> {parameter name: (B, *parameter shape)}``, each sample's
            gradient of the summed log-likelihood with respect to the module's own parameters
            (names as in ``module.named_parameters(recurse=False)``); ``x`` is the module's input
            ``(B, ...)`` and ``g`` the gradient with respect to its output, row b for sample b.
            Used when a parameter is shared between calls (its per-sample gradients are summed
            over the calls before squaring).
        squared_sum: optional fast path ``(module, x, g) -> {name: parameter shape}``, the sum
            over the batch of the squared per-sample gradients; default: square and sum
            ``per_sample``.
    """

    per_sample: PerSample
    squared_sum: PerSample | None = None


_RULES: dict[type, LayerRule] = {}


def register_layer_rule(layer_type: type, *, per_sample: PerSample,
                        squared_sum: PerSample | None = None) -> LayerRule:
    """Register how :func:`deepclean.fisher_diagonal` computes per-sample gradients of the
    parameters of ``layer_type`` (and of its subclasses, unless they have a rule of their own).

    The rule must be exact: the tests of a user's rule should compare the Fisher with
    :func:`deepclean.fisher_diagonal_reference` in float64, as ours do.

    Raises:
        ConfigurationError: ``layer_type`` is not an ``nn.Module`` subclass, already has a rule
            (a registry refuses duplicates, so that two rules never silently compete), or
            ``per_sample`` is not callable.
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise ConfigurationError(
            f"register_layer_rule needs an nn.Module subclass, got {layer_type!r}"
        )
    if layer_type in _RULES:
        raise ConfigurationError(
            f"{layer_type.__name__} already has a Fisher layer rule; register each layer type once"
        )
    if not callable(per_sample) or (squared_sum is not None and not callable(squared_sum)):
        raise ConfigurationError("per_sample (and squared_sum, if given) must be callables "
                                 "(module, x, g) -> {parameter name: tensor}")
    rule = LayerRule(per_sample, squared_sum)
    _RULES[layer_type] = rule
    return rule


def registered_layer_types() -> list[type]:
    """The layer types with a rule, in registration order."""
    return list(_RULES)


def layer_rule(module: nn.Module) -> LayerRule | None:
    """The rule of ``module``'s type or of its nearest registered base class; ``None`` for a
    parametrised module (its weight is computed from other tensors) or one without a rule: those
    take the generic exact path."""
    if parametrize.is_parametrized(module):
        return None
    for cls in type(module).__mro__:
        rule = _RULES.get(cls)
        if rule is not None:
            return rule
    return None


def _has_closed_form(module: nn.Module) -> bool:
    return layer_rule(module) is not None


def _per_sample(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict:
    rule = layer_rule(module)
    if rule is None:
        return _generic_per_sample(module, x, g)
    return rule.per_sample(module, x, g)


def _squared_sums(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict:
    rule = layer_rule(module)
    if rule is not None and rule.squared_sum is not None:
        return rule.squared_sum(module, x, g)
    return {k: v.square_().sum(0) for k, v in _per_sample(module, x, g).items()}


register_layer_rule(nn.Linear, per_sample=_linear_per_sample, squared_sum=_linear_sq)
register_layer_rule(nn.Conv2d, per_sample=_conv2d_per_sample, squared_sum=_conv2d_sq)
for _bn in _BATCHNORMS:  # eval mode only: the pass runs BatchNorm with its running statistics
    register_layer_rule(_bn, per_sample=_batchnorm_per_sample)


def _warn_generic(module: nn.Module) -> None:
    name = type(module).__name__
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(
            f"fisher_diagonal: no closed form for {name}; its parameters use the generic exact "
            "path (per-sample vector-Jacobian products with torch.func), which is slower.",
            stacklevel=4,
        )
