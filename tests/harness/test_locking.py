"""Inter-process locks: a second holder is refused (or waits), and a crashed holder frees them."""

import subprocess
import sys
import textwrap
import time

import pytest

from deepclean.errors import BusyError
from deepclean.harness.locking import LOCK_NAME, exclusive_lock, lock_holder

HOLD = textwrap.dedent("""
    import sys, time
    from deepclean.harness.locking import exclusive_lock
    with exclusive_lock(sys.argv[1], purpose="holder under test"):
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def _holder(path, seconds):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path):
    proc = _holder(tmp_path, 30)
    try:
        with pytest.raises(BusyError, match=rf"process {proc.pid} \(holder under test"):
            with exclusive_lock(tmp_path, purpose="second"):
                pass
        assert lock_holder(tmp_path / LOCK_NAME)["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()
    # the kernel released the crashed holder's lock: the folder is free again
    with exclusive_lock(tmp_path, purpose="after the crash") as lock:
        assert lock_holder(lock)["purpose"] == "after the crash"


def test_waiting_takes_the_lock_when_the_holder_finishes(tmp_path):
    entry = tmp_path / "model.safetensors"
    proc = _holder(entry, 1.0)
    start = time.monotonic()
    with exclusive_lock(entry, purpose="waiter", wait=True) as lock:
        waited = time.monotonic() - start
        assert lock.name == "model.safetensors.lock"
    proc.wait()
    assert waited > 0.3  # it did wait for the holder


def test_waiting_gives_up_after_the_timeout(tmp_path):
    proc = _holder(tmp_path, 30)
    try:
        with pytest.raises(BusyError, match="in use by"):
            with exclusive_lock(tmp_path, purpose="waiter", wait=True, timeout_s=0.5):
                pass
    finally:
        proc.kill()
        proc.wait()


def test_the_same_process_can_lock_again_after_release(tmp_path):
    for _ in range(3):
        with exclusive_lock(tmp_path, purpose="loop"):
            pass


def test_a_folder_the_lock_created_is_removed_if_nothing_was_written(tmp_path):
    """A refused run (an error inside the lock before any output) leaves no empty folder with a
    lock file; a folder that existed before, or that received output, is kept."""
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        with exclusive_lock(fresh, purpose="test"):
            raise RuntimeError("refused")
    assert not fresh.exists()
    kept = tmp_path / "kept"
    with exclusive_lock(kept, purpose="test"):
        (kept / "results.json").write_text("{}")
    assert sorted(p.name for p in kept.iterdir()) == [LOCK_NAME, "results.json"]
    existing = tmp_path / "existing"
    existing.mkdir()
    with exclusive_lock(existing, purpose="test"):
        pass
    assert existing.is_dir()
