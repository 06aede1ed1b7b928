import numpy as np
import pytest
import torch

from deepclean import DataError, accuracy, entropy, entropy_mia, membership_attack


def test_entropy_of_exact_zeros_is_zero_not_nan():
    h = entropy(torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]))
    assert h[0].item() == 0.0
    assert h[1].item() == pytest.approx(np.log(2), abs=1e-12)
    assert not torch.isnan(h).any()


@pytest.mark.parametrize("seed", range(5))
def test_paper_mia_on_pure_noise_is_at_chance(seed):
    # 100 "members" against 1,000 "non-members": a balanced attack calls about half of fresh
    # noise "member" (an unbalanced one would call almost none or almost all).
    rng = np.random.default_rng(seed)
    share = membership_attack(rng.normal(size=100), rng.normal(size=1000), rng.normal(size=5000))
    assert share == pytest.approx(50.0, abs=5.0)


def test_mia_separable_features_give_full_score():
    members = np.linspace(0, 1, 50)
    non_members = np.linspace(5, 6, 500)
    assert membership_attack(members, non_members, np.full(10, 0.5)) == 100.0
    assert membership_attack(members, non_members, np.full(10, 5.5)) == 0.0


def test_entropy_mia_uses_entropy_feature():
    confident = torch.tensor([[0.99, 0.01]]).repeat(100, 1)
    unsure = torch.tensor([[0.6, 0.4]]).repeat(300, 1)
    assert entropy_mia(confident, unsure, confident[:10]) == 100.0
    assert entropy_mia(confident, unsure, unsure[:10]) == 0.0


def test_accuracy_and_errors():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    assert accuracy(probs, torch.tensor([0, 1, 1, 1])) == 75.0
    with pytest.raises(DataError):
        accuracy(probs, torch.tensor([0]))
    with pytest.raises(DataError, match="empty"):
        membership_attack(np.zeros(0), np.ones(3), np.ones(3))
