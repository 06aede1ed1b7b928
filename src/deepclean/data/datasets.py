"""Data sets as in-memory tensors, loaded through torchvision (or scikit-learn for ``digits``).

Every data set is returned as an :class:`ImageData`: normalised float32 images of shape
``(N, C, H, W)`` and int64 labels of shape ``(N,)`` for the training and the test split. Training
and evaluation then read batches straight from these tensors (no per-sample Python transforms).

Where the files come from:

- ``fashion-mnist``: ``data_dir`` if given, else the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``). The gzip IDX files are unpacked once into a cache
  folder in torchvision's layout and read with :class:`torchvision.datasets.FashionMNIST`.
- ``mnist``, ``cifar10``, ``cifar100``: torchvision's layout under ``data_dir``; ``download=True``
  lets torchvision fetch them on a machine with internet.
- ``digits``: scikit-learn's 1,797 8x8 digits, split 1,497 train / 300 test with a fixed seed.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, Subset, TensorDataset

from deepclean.distributed import shard_indices
from deepclean.errors import ConfigurationError, DataError, DataNotFoundError

__all__ = [
    "ImageData",
    "load_dataset",
    "available_datasets",
    "as_tensors",
    "iterate_batches",
    "random_crop_flip",
    "in_memory",
    "dataset_size",
    "tensors_or_dataset",
    "stream_batches",
    "ShuffledBatches",
    "check_loader_options",
    "DEBIAN_FASHION_MNIST",
]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# Per-channel mean and standard deviation of the training images, in [0, 1] pixel units.
_NORMALISATION = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "digits": ((0.3038,), (0.3794,)),
}


@dataclass(frozen=True)
class ImageData:
    """A labelled image data set held in memory.

    Attributes:
        name: data set name, e.g. ``"fashion-mnist"``.
        train_x: float32 images ``(N_train, C, H, W)``, normalised per channel.
        train_y: int64 labels ``(N_train,)`` in ``[0, num_classes)``.
        test_x: float32 images ``(N_test, C, H, W)``.
        test_y: int64 labels ``(N_test,)``.
        num_classes: number of classes.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    def train_dataset(self) -> TensorDataset:
        return TensorDataset(self.train_x, self.train_y)

    def test_dataset(self) -> TensorDataset:
        return TensorDataset(self.test_x, self.test_y)


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset` and ``deepclean run --dataset``."""
    return sorted(_NORMALISATION)


def _normalise(images_uint8: torch.Tensor, name: str, scale: float = 255.0) -> torch.Tensor:
    mean, std = _NORMALISATION[name]
    x = images_uint8.float() / scale
    if x.ndim == 3:
        x = x.unsqueeze(1)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return ((x - m) / s).contiguous()


def _cache_root() -> Path:
    return Path(os.environ.get("DEEPCLEAN_CACHE", Path.home() / ".cache" / "deepclean"))


def _prepare_idx_folder(source: Path, target_root: Path, class_name: str) -> Path:
    """Unpack ``*-ubyte.gz`` files from ``source`` into ``target_root/<class_name>/raw``."""
    raw = target_root / class_name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for stem in _IDX_FILES:
        if (raw / stem).is_file():
            continue
        gz = source / f"{stem}.gz"
        plain = source / stem
        tmp = raw / f".{stem}.partial"
        if gz.is_file():
            try:
                with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:  # unpack, then rename
                    shutil.copyfileobj(src, dst)
            except (OSError, EOFError) as exc:
                tmp.unlink(missing_ok=True)
                raise DataNotFoundError(
                    f"{gz} is not a readable gzip file ({exc}); replace it with the file of the "
                    "official release"
                ) from exc
        elif plain.is_file():
            shutil.copyfile(plain, tmp)
        else:
            raise DataNotFoundError(f"missing {gz} (or {plain})")
        os.replace(tmp, raw / stem)
    return target_root


def _unpack_dir(name: str, source: Path) -> Path:
    """Cache folder for the unpacked files of ``source``: keyed by the folder's absolute path and
    the size and modification time of each file, so another or a changed folder never reuses it."""
    import hashlib

    h = hashlib.sha256(str(source.resolve()).encode())
    for stem in _IDX_FILES:
        for f in (source / f"{stem}.gz", source / stem):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return _cache_root() / "datasets" / name / h.hexdigest()[:16]


def _has_idx(folder: Path) -> bool:
    return all((folder / f"{s}.gz").is_file() or (folder / s).is_file() for s in _IDX_FILES)


def _load_idx_dataset(name: str, data_dir: Path | None, download: bool) -> ImageData:
    from torchvision import datasets

    cls = datasets.FashionMNIST if name == "fashion-mnist" else datasets.MNIST
    candidates: list[Path] = []
    if data_dir is not None:
        candidates.append(Path(data_dir))
    elif name == "fashion-mnist":
        candidates.append(DEBIAN_FASHION_MNIST)
    root: Path | None = None
    for folder in candidates:
        if (folder / cls.__name__ / "raw").is_dir() and _has_idx(folder / cls.__name__ / "raw"):
            root = _prepare_idx_folder(folder / cls.__name__ / "raw", folder, cls.__name__)
            break
        if _has_idx(folder):
            root = _prepare_idx_folder(folder, _unpack_dir(name, folder), cls.__name__)
            break
    if root is None and download and data_dir is not None:
        root = Path(data_dir)
    if root is None:
        where = ", ".join(str(c) for c in candidates) or "(no folder given)"
        hint = (
            "install the Debian package (sudo apt-get install dataset-fashion-mnist) or "
            if name == "fashion-mnist"
            else ""
        )
        raise DataNotFoundError(
            f"{name}: the IDX files ({', '.join(_IDX_FILES)}, optionally .gz) were not found in "
            f"{where}. To fix: {hint}pass --data-dir FOLDER holding them, or run with --download "
            "on a machine with internet access."
        )
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except (OSError, RuntimeError, AssertionError, ValueError) as exc:
        raise DataNotFoundError(
            f"{name}: the files in {root} could not be read or downloaded ({exc or type(exc).__name__})"
            ". To fix: pass --data-dir FOLDER with the four IDX files (optionally .gz) of the "
            "official release; without internet, --download cannot fetch them"
        ) from exc
    return ImageData(
        name=name,
        train_x=_normalise(train.data, name),
        train_y=train.targets.long().clone(),
        test_x=_normalise(test.data, name),
        test_y=test.targets.long().clone(),
        num_classes=10,
    )


def _load_cifar(name: str, data_dir: Path | None, download: bool) -> ImageData:
    from torchvision import datasets

    base = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100

    class cls(base):  # type: ignore[misc, valid-type]
        # torchvision checks MD5 sums of the official files; accept any complete copy in the same
        # format (re-packed data, test files). Downloads are still verified by the archive's MD5.
        train_list = [[f, None] for f, _ in base.train_list]
        test_list = [[f, None] for f, _ in base.test_list]
        meta = {**base.meta, "md5": None}

    if data_dir is None:
        raise DataNotFoundError(
            f"{name}: no data folder given. To fix: pass --data-dir FOLDER holding torchvision's "
            f"'{cls.base_folder}' folder, or add --download on a machine with internet access."
        )
    try:
        train = cls(str(data_dir), train=True, download=download)
        test = cls(str(data_dir), train=False, download=download)
    except (OSError, RuntimeError, ValueError) as exc:  # not found, corrupt, download failed
        raise DataNotFoundError(
            f"{name}: {exc} (looked in {data_dir}/{cls.base_folder}). To fix: put torchvision's "
            "CIFAR python batches there, or add --download on a machine with internet access."
        ) from exc
    to_tensor = lambda d: torch.from_numpy(np.ascontiguousarray(d.data)).permute(0, 3, 1, 2)  # noqa: E731
    return ImageData(
        name=name,
        train_x=_normalise(to_tensor(train), name),
        train_y=torch.tensor(train.targets, dtype=torch.long),
        test_x=_normalise(to_tensor(test), name),
        test_y=torch.tensor(test.targets, dtype=torch.long),
        num_classes=len(train.classes),
    )


def _load_digits() -> ImageData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32))
    labels = torch.from_numpy(digits.target.astype(np.int64))
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=300, random_state=0, stratify=digits.target
    )
    idx_train, idx_test = np.sort(idx_train), np.sort(idx_test)
    x = _normalise(images, "digits", scale=16.0)
    return ImageData(
        name="digits",
        train_x=x[idx_train].contiguous(),
        train_y=labels[idx_train].clone(),
        test_x=x[idx_test].contiguous(),
        test_y=labels[idx_test].clone(),
        num_classes=10,
    )


def load_dataset(
    name: str, *, data_dir: str | Path | None = None, download: bool = False
) -> ImageData:
    """Load a data set into memory.

    Args:
        name: one of :func:`available_datasets`.
        data_dir: folder with the files (see the module docstring); ``None`` uses the default
            location where one exists (the Debian package for Fashion-MNIST).
        download: let torchvision download missing files (needs internet).

    Returns:
        An :class:`ImageData` with normalised float32 images.

    Raises:
        DataError: unknown data set name.
        DataNotFoundError: the files are not there; the message says how to get them.
    """
    if name not in _NORMALISATION:
        raise DataError(f"unknown data set {name!r}; expected one of {available_datasets()}")
    folder = Path(data_dir) if data_dir is not None else None
    if folder is not None and not folder.exists() and not download:
        raise DataNotFoundError(
            f"data folder {folder} does not exist. To fix: pass an existing --data-dir, or add "
            "--download on a machine with internet access."
        )
    if name in ("fashion-mnist", "mnist"):
        return _load_idx_dataset(name, folder, download)
    if name in ("cifar10", "cifar100"):
        return _load_cifar(name, folder, download)
    return _load_digits()


def as_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialise a data set of ``(x, y)`` pairs as two tensors ``(N, ...)`` and ``(N,)`` int64.

    ``TensorDataset`` and ``Subset`` of one are indexed directly (no copy per sample); any other
    data set is read once through a ``DataLoader``.

    Raises:
        DataError: the data set is empty or its items are not ``(x, y)`` pairs with integer labels.
    """
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        x, y = dataset.tensors
    elif (
        isinstance(dataset, Subset)
        and isinstance(dataset.dataset, TensorDataset)
        and len(dataset.dataset.tensors) == 2
    ):
        index = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        x, y = (t[index] for t in dataset.dataset.tensors)
    else:
        if isinstance(dataset, (dict, str, bytes, torch.Tensor)) or not hasattr(dataset, "__len__") \
                or not hasattr(dataset, "__getitem__"):
            raise DataError(
                f"expected a torch Dataset of (x, y) pairs, got {type(dataset).__name__}; wrap "
                "tensors as torch.utils.data.TensorDataset(x, y)"
            )
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise DataError("the data set is empty; expected at least one (x, y) sample")
        xs, ys = [], []
        try:
            loader = list(torch.utils.data.DataLoader(dataset, batch_size=512, shuffle=False))
        except (KeyError, IndexError, TypeError, RuntimeError) as exc:
            raise DataError(
                f"could not read (x, y) pairs from the {type(dataset).__name__} given ({exc}); "
                "expected a torch Dataset whose items are (x, y) pairs, e.g. "
                "torch.utils.data.TensorDataset(x, y)"
            ) from exc
        for item in loader:
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise DataError(
                    f"expected each sample to be an (x, y) pair, got {type(item).__name__} "
                    f"of length {len(item) if hasattr(item, '__len__') else '?'}"
                )
            xs.append(torch.as_tensor(item[0]))
            ys.append(torch.as_tensor(item[1]))
        x, y = torch.cat(xs), torch.cat(ys)
    if x.shape[0] == 0:
        raise DataError("the data set is empty; expected at least one (x, y) sample")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(
            f"expected labels of shape (N,) = ({x.shape[0]},), got {tuple(y.shape)}; labels must be "
            "class indices, not one-hot vectors"
        )
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise DataError(f"expected integer class labels, got dtype {y.dtype}")
    return x, y.long()


def tensors_or_dataset(x: torch.Tensor | Dataset, y: torch.Tensor | None
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None, Dataset | None]:
    """The two forms training functions take: tensors ``x`` ``(N, ...)`` and ``y`` ``(N,)``, or
    one ``Dataset`` of ``(x, y)`` pairs with ``y=None``.

    Returns:
        ``(x, y, None)`` for tensors or a data set already in memory (a ``TensorDataset``, or a
        ``Subset`` of one), ``(None, None, dataset)`` for a data set to stream.

    Raises:
        ConfigurationError: tensors without tensor labels, or a data set with labels too.
    """
    if isinstance(x, torch.Tensor):
        if not isinstance(y, torch.Tensor):
            raise ConfigurationError(
                f"inputs x arrived as a tensor but labels y as {type(y).__name__}; pass "
                "both as tensors, or one Dataset of (x, y) pairs with y=None")
        return x, y, None
    if y is not None:
        raise ConfigurationError(
            f"x is a {type(x).__name__}, not a tensor, and labels y were given too; pass "
            "tensors (x, y), or one Dataset of (x, y) pairs with y=None")
    if in_memory(x):
        return (*as_tensors(x), None)
    return None, None, x


def dataset_size(dataset: Dataset, what: str = "the data set") -> int:
    """``len(dataset)``, or a ``DataError`` naming ``what`` when it has no length.

    Raises:
        DataError: ``dataset`` is not a sized Dataset (e.g. an iterable or a generator).
    """
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError as exc:
        raise DataError(
            f"{what} must be a sized torch Dataset of (x, y) pairs, got "
            f"{type(dataset).__name__}; wrap tensors in torch.utils.data.TensorDataset(x, y)"
        ) from exc


def in_memory(dataset: Dataset) -> bool:
    """Whether ``dataset`` is a ``TensorDataset`` of ``(x, y)`` or a ``Subset`` of one: data
    already in memory, sliced without a copy per sample."""
    if isinstance(dataset, Subset):
        dataset = dataset.dataset
    return isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2


def stream_batches(
    dataset: Dataset, *, batch_size: int, num_workers: int = 0, pin_memory: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` batches of any map-style data set of ``(x, y)`` pairs, read through a
    ``DataLoader`` in the data set's own order (no shuffling), so memory holds one batch at a
    time and every sample is read (and transformed) afresh. Labels come back as int64.
    ``num_workers`` and ``pin_memory`` are passed to the ``DataLoader``, which has its own
    generator: reading leaves torch's global random state as it was.

    Raises:
        DataError: the data set is empty or not a data set, an item is not an ``(x, y)`` pair, or
            its labels are not integer class indices.
    """
    if isinstance(dataset, (dict, tuple, str, bytes, torch.Tensor)) \
            or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise DataError(
            f"expected a torch Dataset of (x, y) pairs, got {type(dataset).__name__}; wrap "
            "tensors as torch.utils.data.TensorDataset(x, y)"
        )
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DataError("the data set is empty; expected at least one (x, y) sample")
    # Its own generator: a DataLoader without one draws its workers' base seed from torch's
    # global generator, which would shift the caller's later random draws (dropout masks).
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, pin_memory=pin_memory,
                                         generator=torch.Generator().manual_seed(0))
    try:
        for item in loader:
            yield _pair(item)
    except (KeyError, IndexError, TypeError, RuntimeError) as exc:
        raise DataError(
            f"could not read (x, y) pairs from the {type(dataset).__name__} given ({exc}); "
            "expected a torch Dataset whose items are (x, y) pairs of equal shapes"
        ) from exc


def check_loader_options(*, num_workers: int, pin_memory: bool, persistent_workers: bool) -> None:
    """Raise unless the ``DataLoader`` options are usable: ``num_workers`` an int >= 0,
    ``pin_memory`` and ``persistent_workers`` bools.

    Raises:
        ConfigurationError: the option, the value that arrived and an example of a valid one.
    """
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigurationError(
            f"num_workers must be an integer >= 0 (DataLoader worker processes; 0 reads in the "
            f"main process), got {num_workers!r}; e.g. num_workers=2"
        )
    for key, value in (("pin_memory", pin_memory), ("persistent_workers", persistent_workers)):
        if not isinstance(value, bool):
            raise ConfigurationError(f"{key} must be True or False, got {value!r}")


def _check_dataset(dataset: Dataset) -> int:
    if isinstance(dataset, (dict, tuple, str, bytes, torch.Tensor)) \
            or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise DataError(
            f"expected a torch Dataset of (x, y) pairs, got {type(dataset).__name__}; wrap "
            "tensors as torch.utils.data.TensorDataset(x, y)"
        )
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise DataError("the data set is empty; expected at least one (x, y) sample")
    return n


class _PermutationBatches(Sampler):
    """Batches of indices in the order set for the current epoch (``order``); with several ranks,
    this rank's contiguous block of each batch (:func:`deepclean.distributed.shard_indices`),
    empty blocks left out."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size = n, batch_size
        self.rank, self.world_size = rank, world_size
        self.order: torch.Tensor | None = None

    def blocks(self) -> Iterator[list[int]]:
        """This rank's indices of every batch of the epoch, in order (possibly empty lists)."""
        if self.order is None:
            raise RuntimeError("no epoch order set")
        for start in range(0, self.n, self.batch_size):
            index = self.order[start:start + self.batch_size]
            own = shard_indices(index.numel(), rank=self.rank, world_size=self.world_size)
            yield index[own.start:own.stop].tolist()

    def __iter__(self):
        return (block for block in self.blocks() if block)

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)


class ShuffledBatches:
    """Shuffled ``(x, y)`` batches of any map-style data set, read through a ``DataLoader``
    afresh every epoch (one batch in memory at a time; every sample is read, and transformed by
    the data set, again in each epoch).

    The order of each epoch is ``torch.randperm(len(dataset), generator=generator)``, cut into
    consecutive batches of ``batch_size``: exactly the batches :func:`iterate_batches` draws from
    the same generator on the same data in memory, so a data set that returns the same samples
    gives the same batches, value for value.

    Worker processes (``num_workers > 0``) take their seeds from a generator derived from the
    state ``generator`` has when the loader is built (torch's default worker seeding: ``torch``,
    ``random`` and NumPy in each worker), so a run is reproducible for a given seed. The result
    does not depend on ``num_workers`` when the data set's randomness (if any) is a function of
    the sample's index and the epoch; a data set that draws from the global random generator in
    ``__getitem__`` gets different draws with a different number of workers.

    A data set with a ``set_epoch(epoch)`` method is told each epoch's number (0, 1, ...) before
    that epoch is read, e.g. to seed per-sample augmentation from index and epoch. Persistent
    workers keep the copy of the data set they started with and would not see that call, so
    ``persistent_workers=True`` with such a data set is refused.

    With ``world_size > 1`` (data-parallel training) every rank builds its loader with a
    generator in the same state, so all ranks draw the same permutations, and each batch of
    ``batch_size`` is split into contiguous blocks, one per rank
    (:func:`deepclean.distributed.shard_indices`): this loader reads and yields only block
    ``rank`` of each batch, so the ranks read disjoint shards of every epoch. A block that is
    empty (a batch smaller than ``world_size``) is yielded as a pair of empty tensors, so that
    every rank yields one item per batch and takes every optimisation step.

    Args:
        dataset: map-style ``Dataset`` of ``(x, y)`` pairs with integer labels.
        batch_size: samples per batch (the last batch may be smaller); with several ranks, the
            size of the batch that the ranks share.
        generator: source of each epoch's permutation.
        num_workers: ``DataLoader`` worker processes (0: read in the main process).
        pin_memory: page-locked batches for faster copies to a CUDA device.
        persistent_workers: keep the workers alive between epochs (with ``num_workers > 0``).
        rank: this process's rank, in ``[0, world_size)``.
        world_size: the number of ranks that share each batch (1: the whole batch).

    Raises:
        DataError: not a data set, or an empty one; while reading, an item that is not an
            ``(x, y)`` pair or labels that are not integer class indices.
        ConfigurationError: invalid loader options, or ``persistent_workers`` with a data set
            that has ``set_epoch``; ``rank`` not in ``[0, world_size)``.
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, generator: torch.Generator,
                 num_workers: int = 0, pin_memory: bool = False,
                 persistent_workers: bool = False, rank: int = 0, world_size: int = 1) -> None:
        self.n = _check_dataset(dataset)
        shard_indices(0, rank=rank, world_size=world_size)  # checks rank and world_size
        check_loader_options(num_workers=num_workers, pin_memory=pin_memory,
                             persistent_workers=persistent_workers)
        if not isinstance(generator, torch.Generator):
            raise ConfigurationError(
                f"generator must be a torch.Generator, got {type(generator).__name__}; e.g. "
                "torch.Generator().manual_seed(0)")
        self.set_epoch = getattr(dataset, "set_epoch", None)
        persistent = persistent_workers and num_workers > 0
        if persistent and callable(self.set_epoch):
            raise ConfigurationError(
                f"persistent_workers=True with a data set that has set_epoch "
                f"({type(dataset).__name__}): persistent workers keep the data set they started "
                "with and would not see the new epoch. Pass persistent_workers=False"
            )
        self.dataset, self.generator, self.epochs_read = dataset, generator, 0
        state = generator.get_state().numpy().tobytes()
        import hashlib

        worker_seed = int.from_bytes(hashlib.sha256(state).digest()[:7], "little")
        self.sampler = _PermutationBatches(self.n, batch_size, rank, world_size)
        self._empty: tuple[torch.Tensor, torch.Tensor] | None = None
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=self.sampler, num_workers=num_workers,
            pin_memory=pin_memory, persistent_workers=persistent,
            generator=torch.Generator().manual_seed(worker_seed))

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.sampler)

    def _empty_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._empty is None:
            self._empty = _empty_pair_of(self.dataset)
        return self._empty

    def epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The next epoch's ``(x, y)`` batches (labels int64), drawn and read now."""
        self.sampler.order = torch.randperm(self.n, generator=self.generator)
        if callable(self.set_epoch):
            self.set_epoch(self.epochs_read)
        self.epochs_read += 1
        try:
            if self.sampler.world_size == 1:
                for item in self.loader:
                    yield _pair(item)
                return
            items = iter(self.loader)
            for block in self.sampler.blocks():
                yield _pair(next(items)) if block else self._empty_pair()
        except (KeyError, IndexError, TypeError, RuntimeError) as exc:
            raise DataError(
                f"could not read (x, y) pairs from the {type(self.dataset).__name__} given "
                f"({exc}); expected a torch Dataset whose items are (x, y) pairs of equal shapes"
            ) from exc


def _empty_pair_of(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of no sample shaped like ``dataset``'s (its first sample read once)."""
    x, y = _pair(torch.utils.data.default_collate([dataset[0]]))
    return x[:0], y[:0]


def _pair(item: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """One collated batch as ``(x, y)`` with int64 labels ``(B,)``.

    Raises:
        DataError: the batch is not an ``(x, y)`` pair, or its labels are not class indices.
    """
    if not isinstance(item, (list, tuple)) or len(item) != 2:
        raise DataError(f"expected each sample to be an (x, y) pair, got {type(item).__name__}")
    x, y = torch.as_tensor(item[0]), torch.as_tensor(item[1])
    if y.ndim != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise DataError(
            f"expected integer class labels of shape (B,), got {tuple(y.shape)} {y.dtype}; "
            "labels must be class indices, not one-hot vectors"
        )
    return x, y.long()


def random_crop_flip(
    x: torch.Tensor, *, padding: int, flip: bool, generator: torch.Generator,
    of: int | None = None, start: int = 0,
) -> torch.Tensor:
    """Per-sample random crop (zero padding of ``padding`` pixels) and horizontal flip of a batch.

    Args:
        x: images ``(B, C, H, W)``.
        padding: pixels of padding on each side before cropping back to ``H x W``; 0 disables.
        flip: flip each image horizontally with probability 1/2.
        generator: the CPU generator all randomness comes from.
        of: ``x`` is rows ``start .. start + B - 1`` of a batch of ``of`` samples (default
            ``B``): the draws are made for the whole batch and ``x`` gets its rows' draws, so
            every rank of data-parallel training consumes ``generator`` alike and the ranks'
            blocks are augmented as one process would augment the whole batch.
        start: the first row of ``x`` in that batch.

    Returns:
        Augmented images ``(B, C, H, W)``, same dtype and device.
    """
    b, _, h, w = x.shape
    total = b if of is None else of
    if not 0 <= start <= total - b:
        raise ConfigurationError(
            f"rows {start}..{start + b - 1} are not inside a batch of {total} samples")
    rows_of_x = slice(start, start + b)
    if padding > 0:
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (total,), generator=generator)[rows_of_x]
        dx = torch.randint(0, 2 * padding + 1, (total,), generator=generator)[rows_of_x]
        dy, dx = dy.to(x.device), dx.to(x.device)
        rows = (dy.view(b, 1) + torch.arange(h, device=x.device).view(1, h)).view(b, 1, h, 1)
        cols = (dx.view(b, 1) + torch.arange(w, device=x.device).view(1, w)).view(b, 1, 1, w)
        c = x.shape[1]
        padded = padded.gather(2, rows.expand(b, c, h, padded.shape[3]))
        x = padded.gather(3, cols.expand(b, c, h, w))
    if flip:
        do_flip = (torch.rand(total, generator=generator)[rows_of_x] < 0.5).to(x.device)
        x = torch.where(do_flip.view(b, 1, 1, 1), x.flip(3), x)
    return x


def iterate_rank_blocks(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """Data-parallel batches over in-memory tensors: the shuffled batches of
    :func:`iterate_batches` (the same permutation, drawn from ``generator``, on every rank), of
    which this process takes its contiguous block of each
    (:func:`deepclean.distributed.shard_indices`; possibly empty). Yields
    ``(x_block, y_block, size of the whole batch)``."""
    order = torch.randperm(x.shape[0], generator=generator)
    for start in range(0, x.shape[0], batch_size):
        index = order[start:start + batch_size]
        own = shard_indices(index.numel())
        part = index[own.start:own.stop]
        xb, yb = x[part], y[part]
        if device is not None:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        yield xb, yb, index.numel()


def iterate_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
):
    """Yield ``(index, x_batch, y_batch)`` over in-memory tensors; ``index`` are row numbers.

    With ``shuffle=True`` the order is a permutation drawn from ``generator`` (required).
    """
    n = x.shape[0]
    if shuffle:
        if generator is None:
            raise ValueError("shuffle=True needs an explicit torch.Generator")
        order = torch.randperm(n, generator=generator)
    else:
        order = torch.arange(n)
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size]
        xb, yb = x[index], y[index]
        if device is not None:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        yield index, xb, yb
