"""train_model under DistributedDataParallel (2 ranks, gloo on the CPU): both ranks end with
bitwise the same weights, and without BatchNorm the result is the one-process run's (each global
batch split over the ranks, augmentation drawn for the whole batch), also with a batch size that
the ranks do not divide, an empty block and a data set read through a DataLoader."""

from __future__ import annotations

import _ddp_training_worker as case
import pytest
import torch

from deepclean import ConfigurationError, TrainConfig, train_model
from deepclean.data.datasets import ShuffledBatches


@pytest.fixture(scope="module")
def spawned(tmp_path_factory, run_ranks) -> list[dict]:
    return run_ranks(case.worker, tmp_path_factory.mktemp("spawned_training"))


@pytest.mark.parametrize("name", list(case.CASES))
def test_every_rank_ends_with_the_same_weights(spawned, name) -> None:
    before = case.initial(name)[0].state_dict()
    for key, value in spawned[0][name].items():  # parameters and buffers, bitwise
        assert torch.equal(value, spawned[1][name][key]), (name, key)
        assert torch.isfinite(value.double()).all(), (name, key)
    assert any(not torch.equal(v, before[k]) for k, v in spawned[0][name].items()), name


@pytest.mark.parametrize(("name", "rtol"), [("plain", 1e-10), ("float32", 1e-5),
                                            ("odd_batch", 1e-10), ("augmented", 1e-10),
                                            ("streamed", 1e-10)])
def test_without_batchnorm_ddp_is_the_one_process_run(spawned, name, rtol) -> None:
    alone = case.train(name, distributed=False)
    for key, want in alone.state_dict().items():
        got = spawned[0][name][key]
        scale = want.abs().max().clamp_min(1e-300)
        assert ((got - want).abs().max() / scale).item() <= rtol, (name, key)


def test_batchnorm_statistics_are_per_rank_then_averaged(spawned) -> None:
    alone = case.train("batchnorm", distributed=False).state_dict()
    got = spawned[0]["batchnorm"]
    assert int(got["1.num_batches_tracked"]) == int(alone["1.num_batches_tracked"]) == 2 * 5
    # per-rank normalisation statistics: close to the one-process run, not equal to it
    assert not torch.equal(got["4.weight"], alone["4.weight"])
    assert torch.allclose(got["1.running_mean"], alone["1.running_mean"], atol=0.2)


def test_ranks_that_disagree_all_raise(spawned) -> None:
    for result in spawned:
        name, message = result["different_seeds"]
        assert name == "ConfigurationError" and "seed" in message, message
        name, message = result["bad_config_on_rank_1"]
        assert name == "ConfigurationError", message
    assert "rank 1 of 2" in spawned[0]["bad_config_on_rank_1"][1]


# -- one process ---------------------------------------------------------------------------------


def test_distributed_true_needs_a_process_group() -> None:
    model, x, y = case.build_case(8, False)
    with pytest.raises(ConfigurationError, match="init_process_group"):
        train_model(model, x, y, TrainConfig(epochs=1), seed=0, distributed=True)


def test_shuffled_batches_of_a_rank_are_its_blocks_of_the_shared_batches() -> None:
    _, x, y = case.build_case(15, False)
    data = case.Streamed(x, y)
    whole = ShuffledBatches(data, batch_size=7, generator=torch.Generator().manual_seed(0))
    ranks = [ShuffledBatches(data, batch_size=7, generator=torch.Generator().manual_seed(0),
                             rank=r, world_size=2) for r in range(2)]
    for _ in range(2):
        parts = [list(r.epoch()) for r in ranks]
        for i, (xb, yb) in enumerate(whole.epoch()):
            assert torch.equal(torch.cat([p[i][0] for p in parts]), xb)
            assert torch.equal(torch.cat([p[i][1] for p in parts]), yb)
        assert [len(p[2][1]) for p in parts] == [0, 1]  # the batch of 1: rank 0's block empty
        assert parts[0][2][0].shape == (0, 1, 6, 6)
    with pytest.raises(ConfigurationError, match="rank"):
        ShuffledBatches(data, batch_size=7, generator=torch.Generator(), rank=2, world_size=2)
