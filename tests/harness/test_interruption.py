"""Interruption (issue 6): ``deepclean run`` killed with SIGKILL at several points and started
again resumes from what was finished and ends with the same results as an uninterrupted run.

Real Fashion-MNIST images, a small CNN, 600 training samples: the whole test takes well under two
minutes on two cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepclean.checkpoint import load_checkpoint
from deepclean.data.datasets import DEBIAN_FASHION_MNIST

pytestmark = pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist not installed"
)

SRC = str(Path(__file__).resolve().parents[2] / "src")
ARGS = ["--model", "small_cnn", "--width", "0.25", "--train-size", "600", "--epochs", "2",
        "--unlearn-epochs", "1", "--scenarios", "random,class", "--methods", "deepclean,finetune",
        "--device", "cpu", "--threads", "1", "--no-progress"]
# Where to kill: after this log line appears, wait this long (seconds), then SIGKILL.
KILL_POINTS = [
    ("original model: training on", 0.3),  # mid-training of the original model
    ("gold model: training on", 0.0),  # original cached, gold not yet
    ("unlearning with deepclean", 0.0),  # during the first unlearning
    ("unlearning with finetune", 0.0),  # first method finished, second running
    ("scenario class", 0.0),  # first scenario finished
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


def _command(out: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "deepclean.cli", "run", *ARGS, "--out", str(out),
            "--cache-dir", str(cache)]


def _run_to_end(out: Path, cache: Path) -> str:
    proc = subprocess.run(_command(out, cache), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _run_and_kill(out: Path, cache: Path, marker: str, delay: float) -> bool:
    """Start a run, SIGKILL it ``delay`` s after ``marker`` is printed; True if it was killed."""
    proc = subprocess.Popen(_command(out, cache), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if marker in line:
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=60)
                return proc.returncode == -signal.SIGKILL
        return False  # finished before the marker (nothing left to interrupt)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)


def _summary(out: Path) -> dict[str, dict]:
    """Everything that must not depend on interruptions: metrics, gaps, weights, audit hashes."""
    summary = {}
    for path in sorted((out / "results").glob("*.json")):
        rec = json.loads(path.read_text())
        _, meta = load_checkpoint(out / "checkpoints" / f"{path.stem}.safetensors")
        entry = {k: rec.get(k) for k in ("metrics", "gaps", "gold_metrics", "hyperparameters",
                                         "forget_sha256", "n_reset", "state_sha256")}
        entry["checkpoint_sha256"] = meta["state_sha256"]
        audit = out / "audit" / f"{path.stem}.json"
        if audit.exists():
            a = json.loads(audit.read_text())
            entry["audit"] = (a["model"], a["forgotten"], a["evaluation"])
        summary[path.stem] = entry
    return summary


def _files_are_whole(out: Path) -> None:
    for path in out.rglob("*.json"):
        json.loads(path.read_text())  # never half-written
    for path in out.rglob("*.safetensors"):
        load_checkpoint(path)


def test_killed_runs_resume_to_the_same_results(tmp_path):
    reference = tmp_path / "reference"
    _run_to_end(reference / "out", reference / "cache")
    expected = _summary(reference / "out")
    assert len(expected) == 8  # 2 scenarios x (original, gold, deepclean, finetune)

    out, cache = tmp_path / "killed" / "out", tmp_path / "killed" / "cache"
    killed = 0
    for marker, delay in KILL_POINTS:
        killed += _run_and_kill(out, cache, marker, delay)
        if out.exists():
            _files_are_whole(out)
    assert killed >= 4, "the run was not interrupted at the planned points"
    log = _run_to_end(out, cache)
    assert "resuming in" in log
    assert "reused the finished result" in log  # finished methods were not recomputed
    assert log.count("reused") >= 3  # the original and both gold models came from the cache
    assert _summary(out) == expected
    assert (out / "results.md").read_text() .count("| deepclean |") == 2
