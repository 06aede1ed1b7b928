"""fisher_diagonal streams any map-style Dataset through a DataLoader, batch by batch, with the
same result as the in-memory path."""

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

import deepclean.fisher.diagonal as diagonal
from deepclean import build_model, fisher_diagonal
from deepclean.errors import DataError


class OnTheFly(Dataset):
    """Samples generated when read (as an image folder would load files): nothing in memory."""

    def __init__(self, n, seed=0):
        self.n, self.seed = n, seed
        self.reads = 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        g = torch.Generator().manual_seed(self.seed * 100_003 + i)
        return torch.randn(1, 12, 12, generator=g), int(torch.randint(0, 10, (1,), generator=g))


def _materialised(ds):
    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return TensorDataset(torch.stack(xs), torch.tensor(ys))


def test_a_streamed_data_set_gives_the_in_memory_result_without_materialising(monkeypatch):
    model = build_model("small_cnn", in_channels=1, num_classes=10, width=0.25, seed=0)
    streamed = OnTheFly(101)
    reference = fisher_diagonal(model, _materialised(streamed), batch_size=32,
                                dtype=torch.float64)
    monkeypatch.setattr(diagonal, "as_tensors", lambda *a, **k: pytest.fail("materialised"))
    streamed.reads = 0
    got = fisher_diagonal(model, streamed, batch_size=32, dtype=torch.float64)
    assert streamed.reads == 101  # every sample read once, in batches
    for k in reference:
        torch.testing.assert_close(got[k], reference[k], rtol=1e-12, atol=1e-15)


def test_bad_streamed_items_are_data_errors():
    model = build_model("small_cnn", in_channels=1, num_classes=10, width=0.25, seed=0)

    class NaNs(OnTheFly):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return x * float("nan"), y

    with pytest.raises(DataError, match="NaN or infinite"):
        fisher_diagonal(model, NaNs(8), batch_size=4)

    class FloatLabels(OnTheFly):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return x, float(y)

    with pytest.raises(DataError, match="integer class labels"):
        fisher_diagonal(model, FloatLabels(8), batch_size=4)
    with pytest.raises(DataError, match="empty"):
        fisher_diagonal(model, OnTheFly(0), batch_size=4)


def test_nothing_of_a_pass_stays_alive_after_it():
    """A hook -> call -> autograd node -> hook cycle through C++ once kept every batch's graph
    and saved inputs alive (memory grew with the data set); each pass must leave nothing."""
    import gc

    model = build_model("small_cnn", in_channels=1, num_classes=10, width=0.25, seed=0)
    data = OnTheFly(64)
    for _ in range(3):
        fisher_diagonal(model, data, batch_size=16)
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, diagonal._FisherPass)]
    assert not [o for o in gc.get_objects() if isinstance(o, diagonal._Call)]


def test_a_streamed_pass_leaves_the_global_random_state_alone():
    """The DataLoader has its own generator: the caller's next random draws (dropout masks,
    initialisations) are the same after a streamed pass as after an in-memory one."""
    model = build_model("small_cnn", in_channels=1, num_classes=10, width=0.25, seed=0)
    torch.manual_seed(123)
    fisher_diagonal(model, _materialised(OnTheFly(20)), batch_size=8)
    after_memory = torch.rand(4)
    torch.manual_seed(123)
    fisher_diagonal(model, OnTheFly(20), batch_size=8)
    assert torch.equal(torch.rand(4), after_memory)
