"""Fisher Forgetting, SSD, Sparse MU and L-CODEC: fast paths against slow references."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import randomise_batchnorm
from torch import nn
from torch.utils.data import TensorDataset

from deepclean import ConfigurationError, build_model, fisher_diagonal, make_method
from deepclean.methods.fisher_forgetting import (
    FisherForgetting,
    true_fisher_diagonal,
    true_fisher_diagonal_reference,
)
from deepclean.methods.lcodec import LCodec, Unit, codec, foci
from deepclean.methods.sparse_mu import l1_strength
from deepclean.methods.ssd import dampening_factors

K = 4


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(120, 1, 8, 8, generator=g)
    y = torch.randint(0, K, (120,), generator=g)
    return TensorDataset(x[:20], y[:20]), TensorDataset(x[20:], y[20:])


@pytest.fixture(scope="module")
def bn_model():
    """A small CNN whose BatchNorm statistics and affine parameters are not the defaults, in
    train mode."""
    model = build_model("small_cnn", in_channels=1, num_classes=K, width=0.25, seed=0)
    randomise_batchnorm(model, torch.Generator().manual_seed(7))
    return model.train()


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- true Fisher


def test_true_fisher_matches_float64_loop(bn_model, data):
    _, retain = data
    sub = TensorDataset(retain.tensors[0][:9], retain.tensors[1][:9])
    before = state(bn_model)
    fast = true_fisher_diagonal(bn_model, sub, batch_size=5, dtype=torch.float64)
    slow = true_fisher_diagonal_reference(bn_model, sub)
    assert fast.keys() == dict(bn_model.named_parameters()).keys()
    for name in slow:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-9, atol=1e-15)
    for key, value in state(bn_model).items():  # parameters and BN buffers untouched
        assert torch.equal(value, before[key]), key
    assert bn_model.training  # mode restored


def test_true_fisher_is_not_the_empirical_fisher(bn_model, data):
    _, retain = data
    sub = TensorDataset(retain.tensors[0][:20], retain.tensors[1][:20])
    true = true_fisher_diagonal(bn_model, sub, dtype=torch.float64)
    empirical = fisher_diagonal(bn_model, sub, dtype=torch.float64)
    diff = max(float((true[n] - empirical[n]).abs().max()) for n in true)
    assert diff > 1e-6


def test_true_fisher_ignores_labels(bn_model, data):
    _, retain = data
    x, y = retain.tensors[0][:20], retain.tensors[1][:20]
    a = true_fisher_diagonal(bn_model, TensorDataset(x, y), dtype=torch.float64)
    b = true_fisher_diagonal(bn_model, TensorDataset(x, (y + 1) % K), dtype=torch.float64)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-12, atol=0)


def test_fisher_noise_scale_forms():
    fisher = torch.tensor([1.0, 1e-4, 0.0], dtype=torch.float64)
    paper = FisherForgetting(alpha=1e-6, form="paper", clamp=1e3, eps=1e-12).noise_std(fisher)
    torch.testing.assert_close(paper[:2], torch.tensor([1e-3, 1e-3 * 10], dtype=torch.float64))
    assert float(paper[2]) == pytest.approx((1e-6 * 1e3) ** 0.5)  # clamped
    code = FisherForgetting(alpha=1e-6, form="code", clamp=1e3, eps=1e-12).noise_std(fisher)
    torch.testing.assert_close(code[:1], torch.tensor([1e-3], dtype=torch.float64))
    assert float(code[1]) == pytest.approx((1e-6 * 1e3) ** 0.5)
    with pytest.raises(ConfigurationError, match="form"):
        FisherForgetting(form="other")
    with pytest.raises(ConfigurationError, match="alpha"):
        FisherForgetting(alpha=0)


def test_fisher_forgetting_noise_only_on_parameters(bn_model, data):
    forget, retain = data
    a = make_method("fisher_forgetting", seed=1).unlearn(bn_model, forget, retain)
    b = make_method("fisher_forgetting", seed=2).unlearn(bn_model, forget, retain)
    for key, buf in bn_model.named_buffers():
        assert torch.equal(dict(a.named_buffers())[key], buf)
    moved = [not torch.equal(p, q) for p, q in zip(a.parameters(), bn_model.parameters())]
    assert all(moved)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ---------------------------------------------------------------- SSD


def test_ssd_dampening_rule():
    imp_f = torch.tensor([0.0, 5.0, 50.0, 3.0, 200.0])
    imp_d = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])
    beta = dampening_factors(imp_f, imp_d, alpha=10.0, lam=1.0)
    # 0/0 not selected; 5 <= 10 not selected; 50 > 10 -> 1/50; imp_d = 0 -> 0; 200 -> 1/200
    torch.testing.assert_close(beta, torch.tensor([1.0, 1.0, 1 / 50, 0.0, 1 / 200]))
    capped = dampening_factors(imp_f, imp_d, alpha=10.0, lam=100.0)
    assert float(capped[2]) == 1.0  # min(100/50, 1)


@pytest.mark.parametrize("reference_set", ["full", "retain"])
def test_ssd_applies_factors_from_fisher(bn_model, data, reference_set):
    forget, retain = data
    method = make_method("ssd", alpha=1.5, reference_set=reference_set, importance="per_sample")
    out = method.unlearn(bn_model, forget, retain)
    imp_f = fisher_diagonal(bn_model, forget)
    imp_r = fisher_diagonal(bn_model, retain)
    n_f, n_r = len(forget), len(retain)
    changed = 0
    for name, p in bn_model.named_parameters():
        imp_d = (n_r * imp_r[name] + n_f * imp_f[name]) / (n_r + n_f) \
            if reference_set == "full" else imp_r[name]
        beta = dampening_factors(imp_f[name], imp_d, alpha=1.5, lam=1.0)
        expected = torch.where(beta != 1, p.detach() * beta, p.detach())
        torch.testing.assert_close(dict(out.named_parameters())[name], expected)
        changed += int((beta != 1).sum())
    assert changed == method.info_["n_dampened"] > 0
    for key, buf in bn_model.named_buffers():
        assert torch.equal(dict(out.named_buffers())[key], buf)


# ---------------------------------------------------------------- Sparse MU


def test_l1_strength_decays_linearly_to_zero():
    values = [l1_strength(5e-4, t, 10) for t in range(10)]
    assert values[0] == 5e-4
    assert values[-1] == pytest.approx(5e-5)
    steps = [a - b for a, b in zip(values, values[1:])]
    assert all(s == pytest.approx(5e-5) for s in steps)


def test_sparse_mu_penalty_shrinks_weights(bn_model, data):
    forget, retain = data
    weak = make_method("sparse_mu", gamma=1e-8, epochs=1, batch_size=25).unlearn(
        bn_model, forget, retain)
    strong = make_method("sparse_mu", gamma=1e-1, epochs=1, batch_size=25).unlearn(
        bn_model, forget, retain)
    norm = lambda m: float(sum(p.detach().abs().sum() for p in m.parameters()))  # noqa: E731
    assert norm(strong) < norm(weak)
    with pytest.raises(ConfigurationError, match="optimizer"):
        make_method("sparse_mu", optimizer="rmsprop")


# ---------------------------------------------------------------- CODEC / FOCI


def test_codec_dependence_and_independence():
    g = torch.Generator().manual_seed(0)
    z = torch.rand(400, 3, generator=g, dtype=torch.float64)
    y = z[:, 0] ** 2
    t = codec(y, z[:, :2], generator=torch.Generator().manual_seed(1))
    assert float(t[0]) > 0.9  # y is a function of z_0
    assert abs(float(t[1])) < 0.15  # and independent of z_1
    # conditional: given z_0, z_1 carries information about y, z_2 none
    y = z[:, 0] + z[:, 1] + 0.1 * torch.rand(400, generator=g, dtype=torch.float64)
    t_cond = codec(y, z[:, 1:], z[:, :1], generator=torch.Generator().manual_seed(1))
    assert float(t_cond[0]) > 0.3
    assert abs(float(t_cond[1])) < 0.15


def test_foci_finds_the_relevant_features():
    g = torch.Generator().manual_seed(12345)
    x = torch.rand(400, 30, generator=g, dtype=torch.float64)
    y = x[:, 7] + x[:, 21] + 0.2 * torch.rand(400, generator=g, dtype=torch.float64)
    chosen, values = foci(y, x, generator=torch.Generator().manual_seed(0), max_features=10)
    assert set(chosen[:2]) == {7, 21}
    assert len(chosen) <= 4 and values[0] > 0
    sizes = torch.full((30,), 5)
    limited, _ = foci(y, x, generator=torch.Generator().manual_seed(0), max_features=10,
                      sizes=sizes, budget=7)
    assert len(limited) == 1


# ---------------------------------------------------------------- L-CODEC


def test_lcodec_curvature_is_the_exact_hessian_of_a_linear_model():
    """For a linear softmax model the Gauss-Newton matrix equals the Hessian of the CE loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 1, 2, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (50,), generator=g)
    units = [Unit("1", 2, 7), Unit("1", 0, 7)]
    method = LCodec(hessian_samples=0, batch_size=16)
    hess, grad_f = method.curvature_and_gradient(model, units, x[:10], y[:10], x[10:], y[10:],
                                                 torch.device("cpu"))
    layer = model[1]

    def loss_of(v, xs, ys, reduction):
        w = layer.weight.detach().clone()
        b = layer.bias.detach().clone()
        w = w.index_put((torch.tensor([2]),), v[:6].view(1, 6))
        w = w.index_put((torch.tensor([0]),), v[7:13].view(1, 6))
        b = torch.stack([v[13], b[1], v[6]])
        logits = xs.flatten(1) @ w.T + b
        return nn.functional.cross_entropy(logits, ys, reduction=reduction)

    v0 = torch.cat([layer.weight[2], layer.bias[2:3], layer.weight[0], layer.bias[0:1]]).detach()
    exact = torch.autograd.functional.hessian(lambda v: loss_of(v, x[10:], y[10:], "mean"), v0)
    torch.testing.assert_close(hess, exact, rtol=1e-10, atol=1e-12)
    exact_grad = torch.autograd.functional.jacobian(lambda v: loss_of(v, x[:10], y[:10], "sum"),
                                                    v0)
    torch.testing.assert_close(grad_f, exact_grad, rtol=1e-10, atol=1e-12)


def test_lcodec_updates_only_the_selected_units(bn_model, data):
    forget, retain = data
    method = make_method("lcodec", n_perturbations=20, selection_samples=8, max_units=3,
                         max_parameters=200, hessian_samples=30, seed=0)
    out = method.unlearn(bn_model, forget, retain)
    info = method.info_
    assert 1 <= len(info["selected"]) <= 3
    assert 0 < info["n_selected_params"] <= 200
    selected: dict[str, set[int]] = {}
    for item in info["selected"]:
        layer, index = item[:-1].split("[")
        selected.setdefault(layer, set()).add(int(index))
    original = dict(bn_model.named_modules())
    for name, module in out.named_modules():
        for key, buf in module.named_buffers(recurse=False):
            assert torch.equal(buf, getattr(original[name], key)), (name, key)
        for key, param in module.named_parameters(recurse=False):
            ref = getattr(original[name], key)
            for row in range(param.shape[0]):
                moved = not torch.equal(param[row], ref[row])
                assert moved == (row in selected.get(name, set())), (name, key, row)
    assert info["step_norm"] > 0


def test_lcodec_rejects_bad_hyperparameters():
    with pytest.raises(ConfigurationError, match="n_perturbations"):
        LCodec(n_perturbations=2)
    with pytest.raises(ConfigurationError, match="damping"):
        LCodec(damping=0)
    with pytest.raises(ConfigurationError, match="noise_std"):
        LCodec(noise_std=-1.0)


def test_lcodec_noise_is_seeded(bn_model, data):
    forget, retain = data
    kw = dict(n_perturbations=10, selection_samples=8, max_units=2, max_parameters=200,
              hessian_samples=20, noise_std=1e-3)
    a = make_method("lcodec", seed=0, **kw).unlearn(copy.deepcopy(bn_model), forget, retain)
    b = make_method("lcodec", seed=0, **kw).unlearn(copy.deepcopy(bn_model), forget, retain)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_lcodec_work_count_and_tuning_space_fit_the_pass_budget():
    """The work count by hand and the search space's cap: 2,000 forget and 18,000 retain samples,
    a scrub batch of 128 is 16 batches of 1000 * 128 + 1024 * 21 + 3 * 128 forward-pass units,
    over 3 * 18,000 per pass."""
    from deepclean.methods.space import SpaceContext

    per_batch = 1000 * 128 + 1024 * 21 + 3 * 128
    assert LCodec.work_in_passes(2000, 18000, 128) == pytest.approx(16 * per_batch / 54000)
    one = (1000 * 128 + 1024 * 21 + 3 * 2000) / 54000
    assert LCodec.work_in_passes(2000, 18000, 0) == pytest.approx(one)  # about 2.88 passes
    space = LCodec.search_space(SpaceContext(max_passes=3, n_forget=2000, n_retain=18000))
    assert space["scrub_batch_size"].values == (0,)
    wide = LCodec.search_space(SpaceContext(max_passes=50, n_forget=2000, n_retain=18000))
    assert wide["scrub_batch_size"].values == (128, 512, 0)  # 2048 >= |D_f| is the same as 0
    for b in wide["scrub_batch_size"].values:
        assert LCodec.work_in_passes(2000, 18000, b) <= 50
