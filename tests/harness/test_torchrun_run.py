"""``deepclean run`` under torchrun (2 processes, gloo on the CPU): rank 0 alone writes the files
of a one-process run, the original and gold models are trained as DDP by both ranks, a second
launch reuses every result, and a rank that dies ends the job with a non-zero exit instead of a
hang."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepclean.checkpoint import load_checkpoint
from deepclean.cli import main
from deepclean.distributed import agree_on_errors, broadcast_from_main, torchrun_process_group
from deepclean.errors import ConfigurationError

SRC = Path(__file__).resolve().parents[2] / "src"
RUN = ["run", "--dataset", "digits", "--train-size", "all", "--model", "small_cnn",
       "--epochs", "1", "--methods", "deepclean,finetune", "--scenarios", "class",
       "--no-progress", "--threads", "1"]
DEEPCLEAN = "results/digits_small_cnn_class_deepclean_seed0.json"
TIMEOUT_S = 120.0


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    # the runs are several processes on the CPU (gloo); with --device auto on a machine with
    # fewer GPUs than processes, each rank would be refused the GPU of its LOCAL_RANK
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _deepclean(*flags: str) -> list[str]:
    return [sys.executable, "-m", "deepclean", *flags]


def _torchrun(*flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *flags]


def _two_processes(*run_flags: str) -> list[str]:
    return _torchrun("--standalone", "--nproc_per_node=2", "-m", "deepclean", *run_flags)


def _start(cmd: list[str]) -> subprocess.Popen:
    """``cmd`` in its own session (so that the test can kill torchrun and its workers)."""
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT_S) -> list[tuple[int, str]]:
    """(exit status, output) of each process; on timeout kill every session and fail."""
    deadline = time.monotonic() + timeout
    try:
        logs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the launch did not finish within {timeout:.0f} s (a hang)")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [(p.returncode, log) for p, log in zip(procs, logs, strict=True)]


def _files(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` (relative path -> modification time in ns), lock files
    aside."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


def _workers(pid: int) -> dict[int, int]:
    """{rank: process id} of the workers that the torchrun process ``pid`` started."""
    children = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            continue
    out = {}
    for child in children:
        try:
            env = dict(item.split("=", 1) for item in
                       Path(f"/proc/{child}/environ").read_text().split("\0") if "=" in item)
        except OSError:
            continue
        if "RANK" in env:
            out[int(env["RANK"])] = child
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One process and two processes (torchrun) of the same command, each with its own cache."""
    tmp = tmp_path_factory.mktemp("torchrun_run")
    one = _start(_deepclean(*RUN, "--out", str(tmp / "one"), "--cache-dir", str(tmp / "c1")))
    two = _start(_two_processes(*RUN, "--out", str(tmp / "two"), "--cache-dir",
                                str(tmp / "c2")))
    (rc_one, log_one), (rc_two, log_two) = _finish([one, two])
    return {"tmp": tmp, "one": (rc_one, log_one), "two": (rc_two, log_two)}


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_two_processes_write_the_files_of_one_process_once(runs) -> None:
    tmp = runs["tmp"]
    for name in ("one", "two"):
        rc, log = runs[name]
        assert rc == 0, f"{name}: {log[-3000:]}"
    log = runs["two"][1]
    # rank 0 alone prints: the summary line and the tables once, the log lines once
    assert log.count("results written to") == 1, log[-3000:]
    assert log.count("unlearning with deepclean") == 1
    assert log.count("### Tables 1-3") == 1
    assert log.count("data-parallel over 2 ranks") == 2  # the original and gold models
    one, two = _files(tmp / "one"), _files(tmp / "two")
    assert set(two) == set(one)
    assert not [f for f in two if f.endswith(".tmp")]
    assert set(_files(tmp / "c2")) == set(_files(tmp / "c1"))
    # The same split; the original and gold models are trained as DDP over the two ranks, with
    # per-rank BatchNorm statistics (docs/scale.md), so their weights differ from one process by
    # a little, and so do the selection and the metrics.
    a = json.loads((tmp / "one" / DEEPCLEAN).read_text())
    b = json.loads((tmp / "two" / DEEPCLEAN).read_text())
    assert b["forget_sha256"] == a["forget_sha256"]
    assert abs(b["share_reset"] - a["share_reset"]) < 0.05
    assert a["world_size"] == 1 and b["world_size"] == 2
    for kind in ("original", "gold"):
        stem = f"results/digits_small_cnn_class_{kind}_seed0.json"
        x, y = (json.loads((tmp / d / stem).read_text()) for d in ("one", "two"))
        assert x["state_sha256"] != y["state_sha256"], kind  # trained as DDP, not one process
        for metric in ("acc_forget", "acc_retain", "acc_test"):
            assert abs(x["metrics"][metric] - y["metrics"][metric]) < 3.0, (kind, metric)
        # the model evaluated is the one rank 0 saved in the cache
        (entry,) = (tmp / "c2").glob(f"{kind}-digits-small_cnn-*.safetensors")
        assert load_checkpoint(entry)[1]["state_sha256"] == y["state_sha256"], kind


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_a_second_launch_reuses_every_result(runs) -> None:
    tmp = runs["tmp"]
    assert runs["two"][0] == 0
    before = _files(tmp / "two")
    ((rc, log),) = _finish([_start(_two_processes(*RUN, "--out", str(tmp / "two"), "--cache-dir",
                                                  str(tmp / "c2")))])
    assert rc == 0, log[-3000:]
    assert "resuming in" in log
    for method in ("deepclean", "finetune"):
        assert f"{method}: reused the finished result" in log, log[-3000:]
    assert "unlearning with" not in log
    after = _files(tmp / "two")
    assert set(after) == set(before)
    methods = [n for n in after if "_deepclean_" in n or "_finetune_" in n]
    assert len(methods) == 8  # result, checkpoint and audit .json/.txt of each method
    for name in methods:  # not written again (original and gold are re-evaluated each run)
        assert after[name] == before[name], name


def _kill_rank_when_started(proc: subprocess.Popen, started: Path, rank: int) -> bool:
    """Kill the worker of ``rank`` with SIGKILL once ``started`` exists; whether it was
    killed (False: the job ended first)."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        workers = _workers(proc.pid)
        if started.exists() and rank in workers:
            os.kill(workers[rank], signal.SIGKILL)
            return True
        time.sleep(0.02)
    return False


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_a_rank_killed_mid_run_ends_the_job_with_an_error(tmp_path) -> None:
    out = tmp_path / "out"
    flags = [*RUN, "--epochs", "5", "--seeds", "0", "1", "--out", str(out),
             "--cache-dir", str(tmp_path / "cache")]
    proc = _start(_two_processes(*flags))
    start = time.monotonic()
    killed = _kill_rank_when_started(proc, out / "config.json", rank=1)
    ((rc, log),) = _finish([proc], timeout=60.0)
    assert killed, f"the job ended before rank 1 could be killed: {log[-2000:]}"
    assert rc != 0, log[-3000:]
    assert time.monotonic() - start < 60.0
    assert "results written to" not in log


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_a_launch_after_a_kill_reuses_what_was_finished(tmp_path) -> None:
    out = tmp_path / "out"
    flags = [*RUN, "--seeds", "0", "1", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    first = out / "results" / "digits_small_cnn_class_deepclean_seed0.json"
    proc = _start(_two_processes(*flags))
    killed = _kill_rank_when_started(proc, first, rank=1)
    ((rc, log),) = _finish([proc], timeout=60.0)
    assert killed and rc != 0, log[-3000:]
    assert not (out / "results" / "digits_small_cnn_class_finetune_seed1.json").exists()
    ((rc, log),) = _finish([_start(_two_processes(*flags))])
    assert rc == 0, log[-3000:]
    assert "resuming in" in log and "deepclean: reused the finished result" in log
    assert log.count("unlearning with deepclean") == 1  # seed 1 only
    for seed in (0, 1):
        for method in ("deepclean", "finetune"):
            name = f"digits_small_cnn_class_{method}_seed{seed}"
            record = json.loads((out / "results" / f"{name}.json").read_text())
            assert record["method"] == method and record["seed"] == seed
            assert (out / "checkpoints" / f"{name}.safetensors").is_file()
            assert (out / "audit" / f"{name}.json").is_file()
    assert not list(out.rglob(".*.tmp"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_the_other_ranks_never_touch_the_output_and_cache_folders(tmp_path, runs) -> None:
    """Two machines (localhost), the second given folders that do not exist: rank 1 neither
    creates, reads nor writes them (it gets everything from rank 0), and rank 0 writes the files
    of the one-process run; so the machines need no shared file system."""
    port = _free_port()
    folders = {0: (tmp_path / "out", tmp_path / "cache"),
               1: (tmp_path / "elsewhere" / "out", tmp_path / "elsewhere" / "cache")}
    nodes = [_start(_torchrun("--nnodes", "2", "--node_rank", str(node), "--nproc_per_node",
                              "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                              "-m", "deepclean", *RUN, "--out", str(folders[node][0]),
                              "--cache-dir", str(folders[node][1])))
             for node in (0, 1)]
    done = _finish(nodes)
    assert [rc for rc, _ in done] == [0, 0], "\n".join(log[-3000:] for _, log in done)
    assert not (tmp_path / "elsewhere").exists()
    assert set(_files(tmp_path / "out")) == set(_files(runs["tmp"] / "one"))
    # two ranks on two machines train as two ranks on one: the same weights, the same selection
    a = json.loads((runs["tmp"] / "two" / DEEPCLEAN).read_text())
    b = json.loads((tmp_path / "out" / DEEPCLEAN).read_text())
    assert b["share_reset"] == a["share_reset"] and b["world_size"] == 2
    for kind in ("original", "gold"):
        stem = f"results/digits_small_cnn_class_{kind}_seed0.json"
        x, y = (json.loads((d / stem).read_text()) for d in (runs["tmp"] / "two", tmp_path / "out"))
        assert x["state_sha256"] == y["state_sha256"], kind


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_two_nodes_a_killed_rank_ends_the_other_node_with_a_clear_message(tmp_path) -> None:
    """Across machines torchrun does not stop the other node's workers: the surviving rank must
    fail by itself (its connections to the dead rank close) and say why."""
    out = tmp_path / "out"
    port = _free_port()
    flags = [*RUN, "--epochs", "5", "--seeds", "0", "1", "--out", str(out),
             "--cache-dir", str(tmp_path / "cache")]
    nodes = [_start(_torchrun("--nnodes", "2", "--node_rank", str(node), "--nproc_per_node",
                              "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                              "-m", "deepclean", *flags)) for node in (0, 1)]
    killed = _kill_rank_when_started(nodes[1], out / "config.json", rank=1)
    (rc0, log0), (rc1, log1) = _finish(nodes, timeout=60.0)
    assert killed, f"the job ended before rank 1 could be killed: {log0[-2000:]}"
    assert rc0 != 0 and rc1 != 0, log0[-3000:]
    assert "deepclean: error (rank 0 of 2)" in log0, log0[-3000:]
    assert "another rank failed or was killed" in log0


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_what_rank_0_alone_checks_fails_on_every_rank(tmp_path) -> None:
    """An output folder that is a file, or one that another run holds: rank 0 finds it, every
    rank reports it and exits with status 2, and nothing is written."""
    from deepclean.harness.locking import exclusive_lock

    a_file = tmp_path / "a_file"
    a_file.write_text("mine\n")
    held = tmp_path / "held"
    held.mkdir()
    with exclusive_lock(held, purpose="another deepclean run"):
        done = _finish([_start(_two_processes(*RUN, "--out", str(out), "--cache-dir",
                                              str(tmp_path / "cache")))
                        for out in (a_file, held)], timeout=60.0)
    for (rc, log), why in zip(done, ("is a file", "is in use by"), strict=True):
        assert rc != 0, log[-3000:]
        assert "deepclean: error (rank 0 of 2): " in log and why in log, log[-3000:]
        assert "deepclean: error (rank 1 of 2): " in log and "failed on rank 0 of 2" in log
    assert a_file.read_text() == "mine\n"
    assert [p.name for p in held.iterdir()] == [".deepclean.lock"]


# -- without launching processes ---------------------------------------------------------------


def test_other_commands_refuse_to_run_under_torchrun(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["tune", "--dataset", "digits", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "only 'deepclean run' runs under torchrun" in err
    assert not (tmp_path / "t").exists()


def test_a_world_size_without_torchrun_variables_is_a_clear_error(monkeypatch, tmp_path,
                                                                   capsys) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert main([*RUN, "--device", "cpu", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "RANK is not set" in err and "torchrun" in err
    assert not (tmp_path / "o").exists()
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert main([*RUN, "--out", str(tmp_path / "o")]) == 2
    assert "WORLD_SIZE must be an integer" in capsys.readouterr().err


def test_bad_timeouts_and_device_are_refused(monkeypatch, tmp_path, capsys) -> None:
    with pytest.raises(ConfigurationError, match="timeout_s"):
        with torchrun_process_group(timeout_s=0, cuda=False):
            pass
    for bad in ("-1", "0", "inf", "nan"):  # refused by the parser, in one process or several
        with pytest.raises(SystemExit) as exc:
            main([*RUN, "--dist-timeout", bad, "--out", str(tmp_path / "o")])
        assert exc.value.code == 2 and "--dist-timeout" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*RUN, "--device", "mps", "--out", str(tmp_path / "o")]) == 2
    assert "not supported under torchrun" in capsys.readouterr().err


def test_the_helpers_work_in_one_process() -> None:
    agree_on_errors(None, what="nothing")
    with pytest.raises(ConfigurationError, match="bad"):
        agree_on_errors(ConfigurationError("bad"), what="something")
    assert broadcast_from_main({"a": 1}, what="a value") == {"a": 1}
    assert broadcast_from_main(None, what="a value", patient=True) is None
    with pytest.raises(ValueError, match="nope"):
        broadcast_from_main(None, error=ValueError("nope"), what="a value")
    with torchrun_process_group(timeout_s=5, cuda=False) as started:  # WORLD_SIZE unset
        assert started is False
