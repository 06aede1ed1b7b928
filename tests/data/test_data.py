"""Data loading through torchvision's formats, on small synthetic files written in those formats."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from deepclean import DataError, DataNotFoundError, load_dataset
from deepclean.data.datasets import DEBIAN_FASHION_MNIST, as_tensors, random_crop_flip


def _write_idx(folder, prefix, n, rng, gz=True):
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    img = struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes()
    lab = struct.pack(">II", 0x801, n) + labels.tobytes()
    opener = gzip.open if gz else open
    suffix = ".gz" if gz else ""
    with opener(folder / f"{prefix}-images-idx3-ubyte{suffix}", "wb") as f:
        f.write(img)
    with opener(folder / f"{prefix}-labels-idx1-ubyte{suffix}", "wb") as f:
        f.write(lab)
    return images, labels


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_files_load_through_torchvision(tmp_path, monkeypatch, name):
    monkeypatch.setenv("DEEPCLEAN_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    images, labels = _write_idx(tmp_path, "train", 50, rng)
    _write_idx(tmp_path, "t10k", 20, rng)
    data = load_dataset(name, data_dir=tmp_path)
    assert data.train_x.shape == (50, 1, 28, 28) and data.test_x.shape == (20, 1, 28, 28)
    assert data.train_x.dtype == torch.float32
    assert torch.equal(data.train_y, torch.from_numpy(labels.astype(np.int64)))
    # normalisation is an affine map of the raw pixels
    raw = torch.from_numpy(images.astype(np.float32)) / 255
    corr = np.corrcoef(raw.flatten().numpy(), data.train_x.flatten().numpy())[0, 1]
    assert corr == pytest.approx(1.0, abs=1e-6)


def test_cifar_python_batches_load(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [i % 10] * 4}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    (folder / "test_batch").write_bytes(pickle.dumps(
        {"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), "labels": list(range(6))}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    data = load_dataset("cifar10", data_dir=tmp_path)
    assert data.train_x.shape == (20, 3, 32, 32) and data.test_y.tolist() == list(range(6))
    assert data.num_classes == 10 and data.in_channels == 3


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(DataNotFoundError, match="--download"):
        load_dataset("mnist", data_dir=tmp_path)
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_dataset("fashion-mnist", data_dir=tmp_path / "nowhere")
    with pytest.raises(DataNotFoundError, match="--data-dir"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match="unknown data set"):
        load_dataset("imagenet")


def test_digits_ship_with_scikit_learn():
    data = load_dataset("digits")
    assert data.train_x.shape == (1497, 1, 8, 8) and data.test_x.shape[0] == 300


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_from_the_debian_package():
    data = load_dataset("fashion-mnist")
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.train_y).tolist() == [6000] * 10


def test_as_tensors_on_subsets_and_bad_items():
    x, y = torch.randn(10, 2), torch.arange(10)
    xs, ys = as_tensors(Subset(TensorDataset(x, y), [3, 1]))
    assert torch.equal(ys, torch.tensor([3, 1])) and torch.equal(xs, x[[3, 1]])
    with pytest.raises(DataError, match="integer class labels"):
        as_tensors(TensorDataset(x, y.float()))
    with pytest.raises(DataError, match="empty"):
        as_tensors(TensorDataset(x[:0], y[:0]))


def test_random_crop_flip_is_seeded_and_shape_preserving():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    a = random_crop_flip(x, padding=1, flip=True, generator=torch.Generator().manual_seed(0))
    b = random_crop_flip(x, padding=1, flip=True, generator=torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    same = random_crop_flip(x, padding=0, flip=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(same, x)
