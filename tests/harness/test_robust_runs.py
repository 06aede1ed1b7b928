"""What real users do: bad values caught before any work, concurrent runs on one --out, cache
folders that cannot be written."""

import json
import subprocess
import sys
import textwrap

import pytest

from deepclean.cli import main
from deepclean.errors import BusyError, ConfigurationError
from deepclean.methods import make_method

DIGITS = ["--dataset", "digits", "--train-size", "all", "--model", "small_cnn", "--epochs", "1",
          "--no-progress", "--threads", "1"]


@pytest.mark.parametrize("argv, message", [
    (["--hp", "deepclean.device=tpu"], "unknown device 'tpu'"),
    (["--gamma", "2", "--gamma-class", "3"], "cannot be combined with --gamma-random or"),
    (["--methods", "deepclean,deepclean"], "--methods lists ['deepclean'] more than once"),
    (["--scenarios", "random,random"], "--scenarios lists ['random'] more than once"),
    (["--seeds", "0", "0"], "--seeds lists [0] more than once"),
])
def test_bad_values_fail_before_any_work(argv, message, tmp_path, capsys):
    base = ["run", *DIGITS, "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")]
    assert main(base + argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_forget_indices_with_another_scenario_is_refused(tmp_path, capsys):
    idx = tmp_path / "idx.txt"
    idx.write_text("1\n2\n")
    argv = ["run", *DIGITS, "--forget-indices", str(idx), "--scenarios", "random",
            "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")]
    assert main(argv) == 2
    assert "add 'indices' to --scenarios" in capsys.readouterr().err


def test_an_unknown_device_is_refused_by_the_constructor():
    with pytest.raises(ConfigurationError, match="unknown device 'tpu'"):
        make_method("deepclean", device="tpu")


HOLD = textwrap.dedent("""
    import sys, time
    from deepclean.harness.locking import exclusive_lock
    with exclusive_lock(sys.argv[1], purpose="deepclean run"):
        print("locked", flush=True)
        time.sleep(60)
""")


def test_a_second_run_on_a_busy_out_folder_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        argv = ["run", *DIGITS, "--out", str(out), "--cache-dir", str(tmp_path / "c")]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"process {proc.pid} (deepclean run" in err and "another folder" in err
        assert not (tmp_path / "c").exists() and not (out / "config.json").exists()
    finally:
        proc.kill()
        proc.wait()
    assert issubclass(BusyError, Exception)


def test_an_unwritable_cache_folder_fails_before_training(tmp_path, capsys, monkeypatch):
    import tempfile

    real = tempfile.mkstemp

    def refuse(*args, **kwargs):
        if "deepclean-write-test" in str(kwargs.get("prefix", "")):
            raise PermissionError(13, "Permission denied")
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    argv = ["run", *DIGITS, "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot write into" in err and "--cache-dir" in err
    assert not list((tmp_path / "c").glob("*.safetensors"))


def test_a_full_disk_while_saving_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    import deepclean.checkpoint as ck

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_file", full)
    argv = ["run", *DIGITS, "--methods", "finetune", "--scenarios", "class",
            "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "No space left on device" in err and ".safetensors" in err
    assert "Traceback" not in err
    assert json.loads((tmp_path / "out" / "config.json").read_text())  # written before training
