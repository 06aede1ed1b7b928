"""The Fisher diagonal under torch.distributed (gloo on the CPU): every rank sums its own shard of
the samples, the sums and counts are all-reduced, and every rank gets the one-process Fisher."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import _ddp_fisher_script as case
import pytest
import torch
from torch.utils.data import TensorDataset

from deepclean import (
    ConfigurationError,
    DataError,
    MaskError,
    fisher_diagonal,
    fisher_diagonal_reference,
)
from deepclean.distributed import (
    all_gather_ints,
    all_reduce_sum_,
    barrier,
    error_code,
    is_distributed,
    is_main_process,
    raise_if_any_rank_failed,
    rank,
    shard_indices,
    world_size,
)

SCRIPT = Path(__file__).with_name("_ddp_fisher_script.py")
SRC = Path(__file__).resolve().parents[2] / "src"
RTOL = 1e-10


def _max_rel(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b)


# -- shard_indices ---------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "world"), [(101, 2), (3, 4), (0, 3), (10, 1), (100, 7), (7, 7)])
def test_shards_cover_every_index_exactly_once(n: int, world: int) -> None:
    shards = [shard_indices(n, rank=r, world_size=world) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(n)) and len(flat) == n  # union = range(n), disjoint
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_shards_of_101_over_2_and_3_over_4() -> None:
    assert list(shard_indices(101, rank=0, world_size=2)) == list(range(0, 50))
    assert list(shard_indices(101, rank=1, world_size=2)) == list(range(50, 101))
    sizes = [len(shard_indices(3, rank=r, world_size=4)) for r in range(4)]
    assert sorted(sizes) == [0, 1, 1, 1]  # one rank owns nothing


@pytest.mark.parametrize("kwargs", [
    {"n": -1, "rank": 0, "world_size": 2}, {"n": 5, "rank": 2, "world_size": 2},
    {"n": 5, "rank": -1, "world_size": 2}, {"n": 5, "rank": 0, "world_size": 0},
    {"n": 5.0, "rank": 0, "world_size": 2}, {"n": 5, "rank": True, "world_size": 2},
])
def test_bad_shard_arguments_are_configuration_errors(kwargs: dict) -> None:
    n = kwargs.pop("n")
    with pytest.raises(ConfigurationError, match="must be an int"):
        shard_indices(n, **kwargs)


def test_outside_a_process_group_everything_is_one_process() -> None:
    assert not is_distributed()
    assert (rank(), world_size(), is_main_process()) == (0, 1, True)
    assert shard_indices(5) == range(5)
    t = torch.arange(4.0)
    assert all_reduce_sum_(t) is t and torch.equal(t, torch.arange(4.0))
    assert all_gather_ints([3, 4]).tolist() == [[3, 4]]
    barrier()


def test_every_rank_raises_the_class_of_the_failed_rank() -> None:
    own = DataError("bad sample")
    codes = [0, error_code(own), 0]
    assert error_code(None) == 0 and codes[1] > 0
    raise_if_any_rank_failed([0, 0, 0], None, what="f")  # nobody failed: nothing happens
    with pytest.raises(DataError, match="bad sample"):  # the failed rank: its own error
        raise_if_any_rank_failed(codes, own, what="f")
    with pytest.raises(DataError, match="f failed on rank 1 of 3"):  # the others: same class
        raise_if_any_rank_failed(codes, None, what="f")
    with pytest.raises(MaskError, match="ranks 0, 2 of 3"):
        raise_if_any_rank_failed([error_code(MaskError("m")), 0, 1], None, what="f")
    # a class the other ranks cannot name: they raise its nearest listed base (here Exception)
    code = error_code(ZeroDivisionError())
    with pytest.raises(ZeroDivisionError):
        raise_if_any_rank_failed([0, code], ZeroDivisionError(), what="f")
    with pytest.raises(Exception, match="f failed on rank 1 of 2") as info:
        raise_if_any_rank_failed([0, code], None, what="f")
    assert type(info.value) is Exception


def test_distributed_true_needs_a_process_group() -> None:
    model = case.build_model()
    x, y = case.build_tensors(4)
    with pytest.raises(ConfigurationError, match="init_process_group"):
        fisher_diagonal(model, TensorDataset(x, y), distributed=True)
    with pytest.raises(ConfigurationError, match="True, False or None"):
        fisher_diagonal(model, TensorDataset(x, y), distributed=1)


# -- two processes, torch.multiprocessing ----------------------------------------------------


@pytest.fixture(scope="module")
def spawned(tmp_path_factory, run_ranks) -> list[dict]:
    return run_ranks(case.spawn_worker, tmp_path_factory.mktemp("spawned"))


@pytest.fixture(scope="module")
def one_process() -> dict:
    model = case.build_model()
    x, y = case.build_tensors()
    out = case.one_process_results(model)
    out["one_sample"] = fisher_diagonal(model, TensorDataset(x[:1], y[:1]), distributed=False)
    return out


def test_the_one_process_fisher_is_the_reference() -> None:
    model = case.build_model()
    x, y = case.build_tensors()
    got = fisher_diagonal(model, TensorDataset(x, y), batch_size=16)
    assert _max_rel(got, fisher_diagonal_reference(model, TensorDataset(x, y))) <= RTOL


@pytest.mark.parametrize("key", ["memory", "streamed", "streamed_workers", "explicit", "alone",
                                 "forget", "retain", "after_errors"])
def test_every_rank_gets_the_one_process_fisher(spawned, one_process, key: str) -> None:
    want = one_process["retain" if key == "retain" else "forget" if key == "forget" else "memory"]
    for r, result in enumerate(spawned):
        got = result[key]
        assert {k: (v.shape, v.dtype) for k, v in got.items()} == \
            {k: (v.shape, v.dtype) for k, v in want.items()}
        assert _max_rel(got, want) <= RTOL, (key, r)
    for k in want:  # and the ranks agree exactly
        assert torch.equal(spawned[0][key][k], spawned[1][key][k])


def test_each_rank_sums_only_its_own_block(spawned) -> None:
    for r, result in enumerate(spawned):
        block = shard_indices(case.N, rank=r, world_size=2)
        assert result["summed_memory"] == result["summed_streamed"] == len(block)
        # the first sample of the whole set is read once to validate it, then the block in order
        assert result["streamed_reads"] == [0, *block]


def test_a_rank_without_samples_still_gets_the_fisher(spawned, one_process) -> None:
    for result in spawned:
        assert _max_rel(result["one_sample"], one_process["one_sample"]) <= RTOL
        assert _max_rel(result["one_sample_streamed"], one_process["one_sample"]) <= RTOL


def test_the_deepclean_selection_is_identical_on_every_rank(spawned, one_process) -> None:
    from deepclean import select_weights

    want = select_weights(one_process["forget"], one_process["retain"], 1.1)
    assert 0 < sum(int(m.sum()) for m in want.values()) < sum(m.numel() for m in want.values())
    for result in spawned:
        for mask in (result["mask"], result["deepclean_mask"]):
            assert set(mask) == set(want)
            for k in want:
                assert torch.equal(mask[k], want[k]), k
        assert _max_rel(result["train_fisher"],
                        {k: v.to(torch.float64) for k, v in one_process["memory"].items()}) <= RTOL


def test_a_failure_on_one_rank_raises_on_every_rank(spawned) -> None:
    own, other = spawned[1]["nan_on_rank_1"], spawned[0]["nan_on_rank_1"]
    assert own[0] == "DataError" and "NaN or infinite" in own[1]  # the rank that read it
    assert other[0] == "DataError" and "rank 1 of 2" in other[1]  # the rank that waited
    for result in spawned:  # an in-memory set is checked whole on every rank
        name, message = result["nan_in_memory"]
        assert name == "DataError" and "NaN or infinite" in message
    for result in spawned:
        name, message = result["different_lengths"]
        assert name == "ConfigurationError" and "[101, 100]" in message
        name, message = result["bad_batch_size"]
        assert name == "ConfigurationError" and "batch_size" in message


# -- torchrun --------------------------------------------------------------------------------


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    # several processes on the CPU (gloo): on a machine with fewer GPUs than processes, the
    # example would otherwise put each rank on the GPU of its LOCAL_RANK
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _torchrun(*flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *flags]


def _launch(commands: list[list[str]], *, cwd: Path | None = None,
            timeout: float = 300.0) -> list[subprocess.CompletedProcess]:
    """Run the commands concurrently, each in its own session; on timeout kill each whole
    session (torchrun and the workers it started) and fail."""
    procs = [subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for cmd in commands]
    deadline = time.monotonic() + timeout
    try:
        logs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun did not finish within {timeout:.0f} s")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [subprocess.CompletedProcess(c, p.returncode, log, "")
            for c, p, log in zip(commands, procs, logs, strict=True)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_saved(path: Path, one_process: dict) -> None:
    result = torch.load(path, weights_only=False)
    assert result["world_size"] == 2
    for key in ("memory", "streamed"):
        assert _max_rel(result[key], one_process["memory"]) <= RTOL, key


def test_torchrun_two_processes_on_one_node(tmp_path, one_process) -> None:
    out = tmp_path / "fisher.pt"
    (done,) = _launch([_torchrun("--nproc_per_node=2", "--standalone", str(SCRIPT), str(out))])
    assert done.returncode == 0, done.stdout[-3000:]
    _check_saved(out, one_process)


def test_torchrun_two_nodes_on_localhost(tmp_path, one_process) -> None:
    out = tmp_path / "fisher.pt"
    port = _free_port()
    nodes = _launch([
        _torchrun("--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
                  "--master_addr", "127.0.0.1", "--master_port", str(port), str(SCRIPT), str(out))
        for node in (0, 1)
    ])
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(n.stdout[-3000:] for n in nodes)
    _check_saved(out, one_process)


def test_the_example_of_docs_scale_gives_the_one_process_selection(tmp_path) -> None:
    text = (SRC.parent / "docs" / "scale.md").read_text()
    script = tmp_path / "unlearn.py"
    script.write_text(re.findall(r"```python\n(.*?)```", text, flags=re.S)[0])
    results = []
    for name, cmd in [("one", [sys.executable, str(script)]),
                      ("two", _torchrun("--standalone", "--nproc_per_node=2", str(script)))]:
        (tmp_path / name).mkdir()
        (done,) = _launch([cmd], cwd=tmp_path / name)
        assert done.returncode == 0, done.stdout[-3000:]
        assert "weights selected" in done.stdout
        results.append(torch.load(tmp_path / name / "selection.pt", weights_only=False))
    one, two = results
    for key in ("fisher_forget", "fisher_retain"):  # float32, summed in another order
        assert _max_rel(two[key], one[key]) <= 1e-5, key
    differ = sum(int((two["mask"][k] != one["mask"][k]).sum()) for k in one["mask"])
    assert differ <= 5  # only weights whose ratio lies within rounding of gamma may flip
    for result in results:
        assert all(torch.equal(result["method_mask"][k], m) for k, m in result["mask"].items())
        original = _example_model()
        for name, p in original.named_parameters():  # unselected weights untouched
            keep = ~result["method_mask"][name]
            assert torch.equal(result["unlearned"][name][keep], p.detach()[keep]), name


def _example_model():
    from deepclean import build_model

    return build_model("resnet18", in_channels=1, num_classes=10, width=0.125, seed=0)
