"""masked_finetune under DistributedDataParallel (2 ranks, gloo on the CPU): unselected weights
stay bitwise equal on every rank, every rank ends with the same weights, and with BatchNorm in
eval mode the result is the one-process fine-tune."""

from __future__ import annotations

import _ddp_masking_worker as case
import pytest
import torch
from torch.utils.data import TensorDataset

from deepclean import DeepClean


@pytest.fixture(scope="module")
def spawned(tmp_path_factory, run_ranks) -> list[dict]:
    return run_ranks(case.worker, tmp_path_factory.mktemp("spawned_masking"))


CASES = [("update", "update", 37, 8), ("freeze", "freeze", 37, 8),
         ("empty_block", "freeze", 9, 4), ("empty_block_update", "update", 9, 4)]


@pytest.mark.parametrize(("name", "bn_stats", "n", "batch_size"), CASES)
def test_unselected_weights_stay_bitwise_and_ranks_agree(spawned, name, bn_stats, n,
                                                         batch_size) -> None:
    original, _, _, mask = case.build_case(n)
    before = dict(original.named_parameters())
    moved = 0
    for result in spawned:
        state = result[name]
        assert result[name + "_requires_grad"]
        for key, m in mask.items():
            assert torch.equal(state[key][~m], before[key].detach()[~m]), (name, key)
            moved += int((state[key][m] != before[key].detach()[m]).sum())
    assert moved > 0
    for key in spawned[0][name]:  # parameters and buffers, bitwise the same on both ranks
        assert torch.equal(spawned[0][name][key], spawned[1][name][key]), (name, key)


@pytest.mark.parametrize(("name", "n", "batch_size"), [("freeze", 37, 8), ("empty_block", 9, 4)])
def test_with_batchnorm_frozen_ddp_gives_the_one_process_fine_tune(spawned, name, n,
                                                                   batch_size) -> None:
    model, x, y, mask = case.build_case(n)
    case.finetune(model, mask, x, y, bn_stats="freeze", batch_size=batch_size, distributed=False)
    for key, want in model.state_dict().items():
        got = spawned[0][name][key]
        if want.is_floating_point():
            scale = want.abs().max().clamp_min(1e-300)
            assert ((got - want).abs().max() / scale).item() <= 1e-10, key
        else:
            assert torch.equal(got, want), key


def test_bn_running_statistics_are_updated_and_averaged(spawned) -> None:
    original, _, _, _ = case.build_case()
    for result in spawned:
        assert not torch.equal(result["update"]["1.running_mean"], original[1].running_mean)
        assert int(result["update"]["1.num_batches_tracked"]) == 2 * 5  # 2 epochs x 5 steps
        assert torch.equal(result["freeze"]["1.running_var"], original[1].running_var)


def test_no_ddp_hook_is_left_on_the_model(spawned) -> None:
    for result in spawned:
        assert all(result["grads_after"])


def test_ranks_that_disagree_all_raise(spawned) -> None:
    for result in spawned:
        name, message = result["different_seeds"]
        assert name == "ConfigurationError" and "generator state" in message
        assert result["bad_mask_on_rank_1"][0] == "MaskError"
    assert "rank 1 of 2" in spawned[0]["bad_mask_on_rank_1"][1]


def test_deepclean_under_ddp_ends_with_the_same_model_on_every_rank(spawned) -> None:
    model, x, y, _ = case.build_case(60)
    alone = DeepClean(gamma=1.1, epochs=0, fisher_batch_size=16)
    alone.unlearn(model, TensorDataset(x[:12], y[:12]), TensorDataset(x[12:], y[12:]))
    for result in spawned:  # the same selection as one process
        for key, m in alone.mask_.items():
            assert torch.equal(result["deepclean_mask"][key], m), key
    for key in spawned[0]["deepclean"]:
        assert torch.equal(spawned[0]["deepclean"][key], spawned[1]["deepclean"][key]), key
    before = dict(model.named_parameters())
    for key, m in alone.mask_.items():  # unselected weights untouched
        assert torch.equal(spawned[0]["deepclean"][key][~m], before[key].detach()[~m]), key
