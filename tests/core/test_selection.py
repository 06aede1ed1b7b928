import pytest
import torch

from deepclean import ConfigurationError, MaskError, mask_summary, select_weights
from deepclean.selection import check_mask


def test_issue_example_with_zero_denominators():
    masks = select_weights({"w": torch.tensor([1.0, 0.0, 0.0, 2.0])},
                           {"w": torch.tensor([0.0, 0.0, 1.0, 1.0])}, 1.0)
    # 1/0 -> selected (+inf > 1); 0/0 -> not selected; 0/1 -> no; 2/1 = 2 > 1 -> yes
    assert masks["w"].tolist() == [True, False, False, True]
    assert masks["w"].dtype == torch.bool


def test_threshold_is_strict_and_scales_with_gamma():
    i_f = {"w": torch.tensor([1.1, 1.2, 2.0, 3.0])}
    i_r = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    assert select_weights(i_f, i_r, 2.0)["w"].tolist() == [False, False, False, True]
    assert select_weights(i_f, i_r, 1.15)["w"].tolist() == [False, True, True, True]


def test_gamma_one_selects_about_half_for_exchangeable_fishers():
    g = torch.Generator().manual_seed(0)
    i_f = {"w": torch.rand(100_000, generator=g)}
    i_r = {"w": torch.rand(100_000, generator=g)}
    share = select_weights(i_f, i_r, 1.0)["w"].float().mean().item()
    assert share == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("gamma", [0, -1, float("nan"), float("inf"), "2"])
def test_bad_gamma_raises(gamma):
    with pytest.raises(ConfigurationError, match="gamma"):
        select_weights({"w": torch.ones(1)}, {"w": torch.ones(1)}, gamma)


def test_mismatched_keys_or_shapes_raise():
    with pytest.raises(MaskError, match="same parameter names"):
        select_weights({"a": torch.ones(1)}, {"b": torch.ones(1)}, 1.0)
    with pytest.raises(MaskError, match="shape"):
        select_weights({"a": torch.ones(2)}, {"a": torch.ones(3)}, 1.0)
    with pytest.raises(MaskError, match="NaN or negative"):
        select_weights({"a": torch.tensor([float("nan")])}, {"a": torch.ones(1)}, 1.0)


def test_mask_summary_counts():
    assert mask_summary({"a": torch.tensor([True, False]), "b": torch.ones(3, dtype=torch.bool)}) == (4, 5)


def test_check_mask_names_the_module_prefix():
    model = torch.nn.Linear(2, 2)
    mask = {f"module.{k}": torch.ones_like(p, dtype=torch.bool) for k, p in model.named_parameters()}
    with pytest.raises(MaskError, match="module."):
        check_mask(model, mask)
