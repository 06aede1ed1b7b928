"""L-CODEC scrubs D_f batch after batch as the authors' multi_scrub.py does; unused layers."""

import copy

import torch
from torch import nn
from torch.utils.data import TensorDataset

from deepclean import build_model
from deepclean.methods import make_method
from deepclean.methods.lcodec import LCodec


def _sets(n_f=40, n_r=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_f + n_r, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n_f + n_r,), generator=g)
    return TensorDataset(x[:n_f], y[:n_f]), TensorDataset(x[n_f:], y[n_f:])


KW = dict(n_perturbations=12, selection_samples=16, max_units=2, max_parameters=200,
          hessian_samples=32, seed=3)


def test_one_selection_and_step_per_scrub_batch_in_sequence():
    forget, retain = _sets()
    model = build_model("small_cnn", in_channels=1, num_classes=10, width=0.25, seed=0).eval()
    method = LCodec(scrub_batch_size=16, **KW)
    out = method.unlearn(model, forget, retain)
    assert method.info_["n_scrub_steps"] == 3  # 40 samples in batches of 16, 16, 8
    # the same by hand: the second batch's selection sees the model the first step produced
    ref = copy.deepcopy(model)
    xf, yf = forget.tensors
    xr, yr = retain.tensors
    order = torch.randperm(40, generator=method.generator(4))
    gen = method.generator(1)
    for start in (0, 16, 32):
        idx = order[start:start + 16]
        units, _ = method.select(ref, xf[idx], yf[idx], torch.device("cpu"), generator=gen)
        hess, g = method.curvature_and_gradient(ref, units, xf[idx], yf[idx], xr, yr,
                                                torch.device("cpu"))
        step = torch.linalg.solve(hess + method.damping * torch.eye(hess.shape[0],
                                                                    dtype=torch.float64),
                                  g / xr.shape[0])
        LCodec._apply(ref, units, step)
    for a, b in zip(out.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    one = LCodec(scrub_batch_size=0, **KW)
    one.unlearn(model, forget, retain)
    assert one.info_["n_scrub_steps"] == 1


class WithUnusedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.unused = nn.Linear(7, 7)  # registered, never called
        self.head = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def test_a_layer_not_used_in_the_forward_pass_is_skipped():
    torch.manual_seed(0)
    model = WithUnusedLayer().eval()
    forget, retain = _sets(n_f=16)
    method = make_method("lcodec", scrub_batch_size=0, **KW)
    out = method.unlearn(model, forget, retain)
    assert not any(s.startswith("unused") for s in method.info_["selected"])
    assert torch.equal(out.unused.weight, model.unused.weight)
