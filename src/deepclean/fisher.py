"""The diagonal of the empirical Fisher information (Shi et al., arXiv 2311.10448, eq. 1).

For a data set D and every trainable weight w_i::

    I_D(w)_i = (1 / |D|) * sum_{(x, y) in D} (d/dw_i log p(y | x, w))^2

with the *true* label y and the *per-sample* gradient squared before averaging (not the square of
a mini-batch mean gradient, which depends on the batch size).

Fast exact path. One batched forward pass records each layer's input; one backward pass to the
layer outputs only (no weight gradients are formed) gives each sample's gradient with respect to
each layer output. Per layer, the squared per-sample weight gradients are then summed in closed
form:

- ``nn.Linear`` on ``(B, in)`` inputs: ``sum_n (g_n x_n^T)^2 = (g^2)^T (x^2)``, one matmul.
- ``nn.Conv2d``: per-sample gradients ``g_n @ unfold(x_n)^T`` by a batched matmul, squared, summed.
- ``nn.BatchNorm*`` in eval mode: ``sum_{spatial} g * x_hat`` and ``sum_{spatial} g`` per channel.
- Any other module that owns parameters (and parameters used by more than one call) goes through
  a generic exact path: per-sample vector-Jacobian products of that module with ``torch.func``,
  announced once by a warning that names the module type. Nothing is approximated.

BatchNorm and dropout run in eval mode meanwhile (per-sample gradients under train-mode BatchNorm
are ill-defined, and its running statistics would change); the model's modes, parameters and
buffers are exactly as before afterwards.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.data import Dataset

from deepclean.data import as_tensors, iterate_batches
from deepclean.errors import ConfigurationError, DataError

__all__ = ["fisher_diagonal", "fisher_diagonal_reference", "eval_mode"]

_WARNED: set[str] = set()
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own ``training`` flag afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, flag in modes.items():
            m.training = flag


def _check_model(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, _BATCHNORMS) and not module.track_running_stats:
            raise ConfigurationError(
                f"module {name!r} is a BatchNorm without running statistics "
                "(track_running_stats=False): in eval mode it normalises with batch statistics, so "
                "per-sample gradients are not defined. Rebuild it with track_running_stats=True."
            )


class _Recorder:
    """Forward hooks that record each parameterised module call's input, and a tensor hook on its
    output that captures the gradient with respect to that output.

    Tensor hooks registered before an in-place change of the output (``ReLU(inplace=True)``)
    receive the gradient of the value before the change, which is the one the layer needs.
    """

    def __init__(self, model: nn.Module, params: dict[nn.Parameter, str]) -> None:
        self.calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor, int]] = []
        self.grads: dict[int, torch.Tensor] = {}
        self.handles = []
        for module in model.modules():
            own = [p for p in module.parameters(recurse=False) if p in params]
            if own:
                self.handles.append(module.register_forward_hook(self._hook))

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not isinstance(output, torch.Tensor) or len(inputs) != 1:
            raise ConfigurationError(
                f"{type(module).__name__}: expected one tensor input and one tensor output for a "
                f"module that owns parameters, got {len(inputs)} inputs and "
                f"{type(output).__name__}. Wrap the layer so it takes and returns one tensor."
            )
        if not output.requires_grad:
            return
        index = len(self.calls)
        self.calls.append((module, inputs[0].detach(), output, output._version))

        def capture(grad: torch.Tensor, index: int = index) -> None:
            self.grads[index] = grad.detach()

        output.register_hook(capture)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _linear_sq(module: nn.Linear, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    if x.ndim == 2:
        out = {"weight": (g * g).T @ (x * x)}
        if module.bias is not None:
            out["bias"] = (g * g).sum(0)
        return out
    b = x.shape[0]
    x3, g3 = x.reshape(b, -1, x.shape[-1]), g.reshape(b, -1, g.shape[-1])
    per_sample = torch.bmm(g3.transpose(1, 2), x3)  # (B, out, in)
    out = {"weight": (per_sample**2).sum(0)}
    if module.bias is not None:
        out["bias"] = (g3.sum(1) ** 2).sum(0)
    return out


def _conv2d_per_sample(
    module: nn.Conv2d, x: torch.Tensor, g: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-sample gradients of a Conv2d, ``(B, *param.shape)``."""
    if module.padding_mode != "zeros":
        x = nn.functional.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    else:
        padding = module.padding
    cols = nn.functional.unfold(
        x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride
    )  # (B, C_in * kh * kw, L)
    b, groups = x.shape[0], module.groups
    g2 = g.reshape(b, groups, g.shape[1] // groups, -1)  # (B, G, out/G, L)
    cols = cols.reshape(b, groups, cols.shape[1] // groups, -1)  # (B, G, in/G*k*k, L)
    grad = torch.einsum("bgol,bgil->bgoi", g2, cols).reshape(b, *module.weight.shape)
    out = {"weight": grad}
    if module.bias is not None:
        out["bias"] = g.sum((2, 3))
    return out


def _conv2d_sq(module: nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    # Bound the (B, out, in*k*k) intermediate to about 64 MB by processing the batch in chunks.
    per_sample_numel = module.weight.numel() + x[0].numel() * module.kernel_size[0]
    chunk = max(1, int(16_000_000 // max(per_sample_numel, 1)))
    sums: dict[str, torch.Tensor] = {}
    for start in range(0, x.shape[0], chunk):
        part = _conv2d_per_sample(module, x[start : start + chunk], g[start : start + chunk])
        for key, value in part.items():
            sq = (value**2).sum(0)
            sums[key] = sq if key not in sums else sums[key] + sq
    return sums


def _batchnorm_per_sample(
    module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, g: torch.Tensor
) -> dict[str, torch.Tensor]:
    shape = (1, -1) + (1,) * (x.ndim - 2)
    x_hat = (x - module.running_mean.view(shape)) * torch.rsqrt(
        module.running_var.view(shape) + module.eps
    )
    dims = tuple(range(2, x.ndim))
    out = {}
    if module.weight is not None:
        out["weight"] = (g * x_hat).sum(dims) if dims else g * x_hat
    if module.bias is not None:
        out["bias"] = g.sum(dims) if dims else g
    return out


def _generic_per_sample(
    module: nn.Module, x: torch.Tensor, g: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Exact per-sample parameter gradients of any per-sample-independent module via torch.func."""
    from torch.func import functional_call, vjp, vmap

    params = {k: p.detach() for k, p in module.named_parameters(recurse=False)}
    buffers = {k: b for k, b in module.named_buffers(recurse=False)}

    def one(x1: torch.Tensor, g1: torch.Tensor) -> dict[str, torch.Tensor]:
        def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(module, (p, buffers), (x1.unsqueeze(0),))

        _, pullback = vjp(f, params)
        return pullback(g1.unsqueeze(0))[0]

    return vmap(one)(x, g)


def _per_sample(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    if isinstance(module, nn.Conv2d):
        return _conv2d_per_sample(module, x, g)
    if isinstance(module, _BATCHNORMS):
        return _batchnorm_per_sample(module, x, g)
    if isinstance(module, nn.Linear):
        b = x.shape[0]
        x3, g3 = x.reshape(b, -1, x.shape[-1]), g.reshape(b, -1, g.shape[-1])
        out = {"weight": torch.bmm(g3.transpose(1, 2), x3)}
        if module.bias is not None:
            out["bias"] = g3.sum(1)
        return out
    name = type(module).__name__
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(
            f"fisher_diagonal: no closed form for {name}; its parameters use the generic exact "
            "path (per-sample vector-Jacobian products with torch.func), which is slower.",
            stacklevel=4,
        )
    return _generic_per_sample(module, x, g)


def _squared_sums(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    if isinstance(module, nn.Linear):
        return _linear_sq(module, x, g)
    if isinstance(module, nn.Conv2d):
        return _conv2d_sq(module, x, g)
    return {k: (v**2).sum(0) for k, v in _per_sample(module, x, g).items()}


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

    Raises:
        DataError: the data set is empty, its inputs are not finite floats or do not fit the model,
            or its labels are not integers in range for the model's output.
        ConfigurationError: ``batch_size < 1``, no trainable parameter, a BatchNorm without
            running statistics, or a
            parameterised module that does not take and return a single tensor.
    """
    from deepclean.validation import check_forward, check_inputs, check_trainable, unwrap_model

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigurationError(f"batch_size must be an int >= 1, got {batch_size!r}")
    check_trainable(model)
    model = unwrap_model(model)  # keys without "module."; no hooks on DataParallel replicas
    _check_model(model)
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

    with eval_mode(work_model), torch.enable_grad():
        for _, xb, yb in iterate_batches(x_all, y_all, batch_size=batch_size, device=device):
            targets: list[torch.Tensor] = []
            if xb.is_floating_point():
                xb = xb.to(work_dtype).requires_grad_(True)
                targets.append(xb)
            recorder = _Recorder(work_model, names)
            try:
                logits = work_model(xb)
            finally:
                recorder.remove()
            if logits.ndim != 2:
                raise DataError(f"expected logits of shape (B, K), got {tuple(logits.shape)}")
            if int(yb.min()) < 0 or int(yb.max()) >= logits.shape[1]:
                raise DataError(
                    f"labels must lie in [0, {logits.shape[1]}) for a model with "
                    f"{logits.shape[1]} outputs; got labels from {int(yb.min())} to {int(yb.max())}"
                )
            if not recorder.calls:
                continue
            log_p = torch.log_softmax(logits, dim=1).gather(1, yb.view(-1, 1)).sum()
            # Differentiate to the layer outputs (and the input) only: no weight gradient is formed.
            targets += [out for _, _, out, version in recorder.calls if out._version == version]
            torch.autograd.grad(log_p, targets, allow_unused=True)
            uses: dict[nn.Parameter, int] = {}
            for module, _, _, _ in recorder.calls:
                for p in module.parameters(recurse=False):
                    if p in names:
                        uses[p] = uses.get(p, 0) + 1
            shared: dict[nn.Parameter, torch.Tensor] = {}
            for index, (module, x_in, _, _) in enumerate(recorder.calls):
                g = recorder.grads.get(index)
                if g is None:  # the output does not influence the loss
                    continue
                own = {k: p for k, p in module.named_parameters(recurse=False) if p in names}
                if all(uses[p] == 1 for p in own.values()):
                    for local, value in _squared_sums(module, x_in, g).items():
                        if local in own:
                            totals[names[own[local]]] += value
                else:
                    for local, value in _per_sample(module, x_in, g).items():
                        if local in own:
                            p = own[local]
                            shared[p] = value if p not in shared else shared[p] + value
            for p, per_sample in shared.items():
                totals[names[p]] += (per_sample**2).sum(0)
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
