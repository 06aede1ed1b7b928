import pytest
import torch

from deepclean import DataError, class_split, index_split, make_split, random_split


def test_random_split_is_disjoint_covering_and_reproducible():
    a = random_split(1000, 0.1, seed=3)
    b = random_split(1000, 0.1, seed=3)
    c = random_split(1000, 0.1, seed=4)
    assert a.forget.numel() == 100 and a.retain.numel() == 900
    assert torch.equal(a.forget, b.forget) and a.digest == b.digest
    assert not torch.equal(a.forget, c.forget)
    both = torch.cat([a.forget, a.retain]).sort().values
    assert torch.equal(both, torch.arange(1000))
    assert not set(a.forget.tolist()) & set(a.retain.tolist())


def test_random_split_leaves_global_rng_alone():
    state = torch.get_rng_state()
    random_split(100, 0.2, seed=0)
    assert torch.equal(state, torch.get_rng_state())


def test_class_split_takes_every_sample_of_the_class():
    labels = torch.tensor([0, 1, 2, 0, 1, 0, 2])
    s = class_split(labels, [0])
    assert s.forget.tolist() == [0, 3, 5]
    assert (labels[s.retain] != 0).all()
    assert s.retain.numel() + s.forget.numel() == labels.numel()


def test_index_split_and_its_errors():
    s = index_split(10, [7, 2])
    assert s.forget.tolist() == [2, 7] and 2 not in s.retain.tolist()
    with pytest.raises(DataError, match=r"lie in \[0, 10\)"):
        index_split(10, [10])
    with pytest.raises(DataError, match="more than once"):
        index_split(10, [1, 1])
    with pytest.raises(DataError, match="no index"):
        index_split(10, [])


def test_split_errors_are_clear():
    with pytest.raises(DataError, match="fraction"):
        random_split(10, 1.5, seed=0)
    with pytest.raises(DataError, match="no training sample"):
        class_split(torch.tensor([1, 2]), [0])
    with pytest.raises(DataError, match="D_r empty"):
        class_split(torch.tensor([0, 0]), [0])
    with pytest.raises(DataError, match="unknown scenario"):
        make_split("everything", torch.tensor([0, 1]))


def test_manifest_can_hide_indices():
    s = random_split(50, 0.2, seed=1)
    assert "forget_indices" not in s.manifest(store_indices=False)
    assert s.manifest()["forget_indices"] == s.forget.tolist()
