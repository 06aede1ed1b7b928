"""Evaluation under torch.distributed (2 ranks, gloo on the CPU): each rank computes the outputs
of its own block of the N = 101 samples (no padding, 50 and 51), the per-sample rows are gathered
in data-set order, and every rank gets the one-process outputs and metrics."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fisher"))  # the Fisher case
import _ddp_eval_worker as worker  # noqa: E402
import _ddp_fisher_script as case  # noqa: E402

from deepclean.distributed import all_gather_rows, shard_indices  # noqa: E402
from deepclean.evaluation import predict_logits, sample_outputs  # noqa: E402

TOL = 1e-12  # float64 model: the blocks' batches differ from one process's only by rounding


@pytest.fixture(scope="module")
def spawned(tmp_path_factory, run_ranks) -> list[dict]:
    return run_ranks(worker.worker, tmp_path_factory.mktemp("spawned_evaluation"))


@pytest.fixture(scope="module")
def one_process() -> dict:
    model = case.build_model()
    x, y = case.build_tensors()
    return {"logits": predict_logits(model, x, batch_size=16), "labels": y,
            "one_sample": predict_logits(model, x[:1], batch_size=16),
            "metrics": worker.metrics(model, case.Streamed(), case.Streamed(40),
                                      Subset(case.Streamed(), range(3, 60)))}


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("key", ["streamed", "memory", "workers", "alone", "after_errors"])
def test_every_rank_gets_every_sample_once_in_order(spawned, one_process, key) -> None:
    for result in spawned:
        out = result[key]
        assert torch.equal(out.labels, one_process["labels"])  # each sample once, in order
        _close(out.logits, one_process["logits"])
    assert torch.equal(spawned[0][key].logits, spawned[1][key].logits)  # the ranks agree


def test_tensor_inputs_are_gathered_too(spawned, one_process) -> None:
    for result in spawned:
        _close(result["tensor"], one_process["logits"])


def test_each_rank_computes_only_its_own_block(spawned) -> None:
    blocks = [shard_indices(case.N, rank=r, world_size=2) for r in range(2)]
    assert [len(b) for b in blocks] == [50, 51]
    for result, block in zip(spawned, blocks, strict=True):
        assert result["computed_streamed"] == result["computed_tensor"] == len(block)
        assert result["streamed_reads"] == list(block)  # a streamed set: only its block is read
    reads = spawned[0]["streamed_reads"] + spawned[1]["streamed_reads"]
    assert reads == list(range(case.N))  # every sample read exactly once over the ranks


def test_a_rank_without_samples_gets_the_outputs(spawned, one_process) -> None:
    for result in spawned:
        _close(result["one_sample"].logits, one_process["one_sample"])
        assert result["one_sample"].labels.tolist() == one_process["labels"][:1].tolist()


def test_the_metrics_are_the_one_process_metrics(spawned, one_process) -> None:
    want = one_process["metrics"]
    for result in spawned:
        got = result["metrics"]
        for key in ("evaluate", "memorisation"):
            for name, value in want[key].items():
                assert got[key][name] == pytest.approx(value, abs=1e-9), (key, name)
        assert got["accuracy"] == want["accuracy"]
        for name, value in want["verdict"].items():
            assert (math.isnan(value) and math.isnan(got["verdict"][name])) or \
                got["verdict"][name] == pytest.approx(value, abs=1e-9), name
        _close(got["holdout_part"], want["holdout_part"])


def test_a_failure_on_one_rank_raises_on_every_rank(spawned) -> None:
    own, other = spawned[1]["bad_label_on_rank_1"], spawned[0]["bad_label_on_rank_1"]
    assert own[0] == "DataError" and "rank 1 of 2" not in own[1]  # the rank that read it
    assert other[0] == "DataError" and "rank 1 of 2" in other[1]  # the rank that waited
    for result in spawned:
        name, message = result["different_lengths"]
        assert name == "ConfigurationError" and "[101, 100]" in message


def test_outside_a_process_group_the_rows_are_returned() -> None:
    rows = torch.arange(6.0).view(3, 2)
    assert all_gather_rows(rows, what="rows") is rows
    assert all_gather_rows(None, what="rows").numel() == 0
    with pytest.raises(ValueError, match="boom"):
        all_gather_rows(rows, error=ValueError("boom"), what="rows")
    out = sample_outputs(case.build_model(), TensorDataset(*case.build_tensors()),
                         distributed=False)
    assert out.logits.shape == (case.N, 5)
