"""Problems a new user hit, pinned: each must fail fast with a clear message, or work."""

import gzip
import os
import stat
import struct

import numpy as np
import pytest

from deepclean import ConfigurationError, DataNotFoundError, DeepClean, FineTune, load_dataset
from deepclean.checkpoint import atomic_write_text
from deepclean.cli import main


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "-1"], "seeds must be integers >= 0"),
    (["--hp", "ssd.alpha=1"], "not among the methods run"),
    (["--hp", "deepclean.batch_size=2.5"], "batch_size must be an integer >= 1"),
    (["--gamma", "0"], "command line: --gamma-random (or --gamma)"),
    (["--unlearn-lr", "-1"], "command line: --unlearn-lr"),
    (["--train-size", "999999"], "exceeds the 60000 training samples"),
])
def test_cli_refuses_before_training(argv, message, capsys, tmp_path):
    if argv[0] == "--train-size" and not os.path.isdir("/usr/share/datasets/fashion-mnist"):
        pytest.skip("dataset-fashion-mnist not installed")
    code = main(["run", *argv, "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_library_refuses_negative_seeds_and_fractional_batch_sizes():
    with pytest.raises(ConfigurationError, match="seed must be an int >= 0"):
        DeepClean(seed=-1)
    with pytest.raises(ConfigurationError, match="batch_size must be an integer >= 1"):
        FineTune(batch_size=2.5)


def _idx_folder(folder, images_bytes=None):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        img = struct.pack(">IIII", 0x803, n, 28, 28) + rng.integers(0, 255, (n, 28, 28), dtype=np.uint8).tobytes()
        lab = struct.pack(">II", 0x801, n) + rng.integers(0, 10, n, dtype=np.uint8).tobytes()
        if prefix == "train" and images_bytes is not None:
            img = images_bytes
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(img)
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(lab)
    return folder


def test_a_bad_data_folder_gives_a_clear_error_and_never_poisons_another(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPCLEAN_CACHE", str(tmp_path / "cache"))
    bad = _idx_folder(tmp_path / "bad", images_bytes=b"junk!")
    good = _idx_folder(tmp_path / "good")
    with pytest.raises(DataNotFoundError, match="could not be read"):
        load_dataset("fashion-mnist", data_dir=bad)
    data = load_dataset("fashion-mnist", data_dir=good)  # a different folder: its own cache entry
    assert data.train_x.shape == (20, 1, 28, 28)
    (tmp_path / "notgz").mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (tmp_path / "notgz" / f"{name}.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataNotFoundError, match="not a readable gzip file"):
        load_dataset("fashion-mnist", data_dir=tmp_path / "notgz")


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "r.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
