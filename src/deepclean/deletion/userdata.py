"""A user's own data and deletion request: ``--data`` / ``--holdout`` specs and ``--forget`` files.

Data specs (:func:`load_user_data`):

- a folder in torchvision's ``ImageFolder`` layout (one sub-folder per class, named by the class);
  images are read with :class:`torchvision.datasets.ImageFolder` and converted to float32 tensors
  ``(C, H, W)`` in ``[0, 1]`` (``ToTensor``), optionally converted to one channel
  (``grayscale``), resized to ``image_size`` and normalised per channel (``normalize``). A sample's
  id is its path relative to the folder (``"coat/00017.png"``);
- an ``.npz`` file holding ``x`` (``(N, C, H, W)``, ``(N, H, W)`` or ``(N, H, W, C)``; uint8 is
  scaled to ``[0, 1]``, floats are kept) and ``y`` (``(N,)`` integer labels); ``normalize``
  applies; a sample's id is its row number;
- one of DeepClean's data set names (:func:`deepclean.load_dataset`), optionally with
  ``:train`` (default) or ``:test``; already normalised, so no preprocessing option applies.

A deletion request (:func:`read_forget_request`) is a file of entries, one per line (``#``
comments and blank lines ignored), a JSON list, or a CSV file (the column named ``index``,
``id``, ``path``, ``file`` or ``filename``, else the first column). Each entry is a row index
into the data or, for a folder, an image path relative to it. Or a whole class
(:func:`class_indices`). Unknown paths, out-of-range and duplicate entries are refused, the first
few named. One sample is a valid request.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torch.utils.data import TensorDataset

from deepclean.errors import ConfigurationError, DataError, DataNotFoundError

__all__ = [
    "Preprocessing",
    "UserData",
    "class_indices",
    "forget_digest",
    "load_user_data",
    "parse_normalize",
    "read_forget_request",
    "resolve_forget_ids",
]

_SHOW = 5  # how many offending entries an error message names
_CSV_COLUMNS = ("index", "id", "path", "file", "filename")


@dataclass(frozen=True)
class Preprocessing:
    """How images become tensors.

    Attributes:
        image_size: resize every image to ``image_size x image_size`` pixels (``None``: keep).
        grayscale: convert images to one channel.
        normalize: ``(mean, std)`` per channel in ``[0, 1]`` pixel units (one value each applies
            to every channel); ``None``: no normalisation, tensors stay in ``[0, 1]``.
    """

    image_size: int | None = None
    grayscale: bool = False
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "grayscale": self.grayscale,
                "normalize": None if self.normalize is None else
                {"mean": list(self.normalize[0]), "std": list(self.normalize[1])}}


@dataclass(frozen=True)
class UserData:
    """A labelled data set in memory, with the ids a deletion request may name.

    Attributes:
        dataset: ``TensorDataset(x, y)``: float32 inputs ``(N, ...)`` and int64 labels ``(N,)``.
        kind: ``"folder"``, ``"npz"`` or ``"dataset"``.
        source: the spec it was loaded from.
        classes: class names, index = label.
        ids: one id per sample: the path relative to the folder (``"coat/00017.png"``, POSIX
            separators) for folders, ``None`` otherwise (ids are row numbers).
        preprocessing: the preprocessing applied.
    """

    dataset: TensorDataset
    kind: str
    source: str
    classes: tuple[str, ...]
    ids: tuple[str, ...] | None = None
    preprocessing: Preprocessing = field(default_factory=Preprocessing)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def x(self) -> torch.Tensor:
        return self.dataset.tensors[0]

    @property
    def y(self) -> torch.Tensor:
        return self.dataset.tensors[1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.x.shape[1]) if self.x.ndim == 4 else 1

    def describe(self) -> dict:
        """JSON-ready facts: kind, source, size, input shape, classes, preprocessing."""
        return {"kind": self.kind, "source": self.source, "n": len(self),
                "input_shape": list(self.x.shape[1:]), "classes": list(self.classes),
                "preprocessing": self.preprocessing.to_dict()}


def parse_normalize(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Parse ``--normalize MEAN,STD`` (``"0.5,0.25"``) or per channel (``"m1,m2,m3,s1,s2,s3"``).

    Raises:
        ConfigurationError: not an even count of numbers, or a std that is not > 0.
    """
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as exc:
        raise ConfigurationError(
            f"--normalize expects MEAN,STD numbers in [0, 1] pixel units (e.g. 0.286,0.353, or "
            f"three means then three stds for RGB), got {text!r}") from exc
    if len(values) < 2 or len(values) % 2:
        raise ConfigurationError(
            f"--normalize expects MEAN,STD (2 numbers) or per-channel means then stds (2C "
            f"numbers), got {len(values)} number(s) in {text!r}")
    half = len(values) // 2
    mean, std = tuple(values[:half]), tuple(values[half:])
    if not all(math.isfinite(v) for v in values) or min(std) <= 0:
        raise ConfigurationError(f"--normalize: every std must be a finite number > 0, got {std}")
    return mean, std


def _normalise(x: torch.Tensor, normalize) -> torch.Tensor:
    if normalize is None:
        return x
    mean, std = normalize
    c = x.shape[1] if x.ndim == 4 else 1
    if len(mean) not in (1, c):
        raise ConfigurationError(
            f"--normalize gives {len(mean)} mean(s) but the images have {c} channel(s); pass one "
            f"MEAN,STD pair or {c} means then {c} stds")
    shape = (1, -1, 1, 1) if x.ndim == 4 else (1,)
    m = torch.tensor(mean, dtype=x.dtype).view(shape)
    s = torch.tensor(std, dtype=x.dtype).view(shape)
    return ((x - m) / s).contiguous()


def load_user_data(
    spec: str | Path,
    *,
    preprocessing: Preprocessing | None = None,
    classes: Sequence[str] | None = None,
    data_dir: str | Path | None = None,
    option: str = "--data",
) -> UserData:
    """Load ``--data`` / ``--holdout``: an ImageFolder folder, an ``.npz`` file or a data set name.

    ``option`` names the input in error messages (``"--holdout"`` for held-out data).

    Args:
        spec: the folder, the ``.npz`` path, or ``NAME[:train|:test]`` of
            :func:`deepclean.available_datasets`.
        preprocessing: image options (folders: all; ``.npz``: ``normalize`` only; names: none).
        classes: the class names of the training data, for a held-out folder: its labels are
            mapped by class name so that they agree with the training data even when the
            held-out folder lacks a class (a class the training data does not have is refused).
        data_dir: folder of the built-in data set's files (names only).

    Returns:
        A :class:`UserData` whose ``dataset`` is a ``TensorDataset`` of float32 inputs and int64
        labels.

    Raises:
        DataNotFoundError: the folder or file does not exist.
        DataError: an empty folder or a file without ``x``/``y``, mismatched lengths, non-integer
            labels, images of different sizes (pass ``image_size``), or classes unknown to the
            training data.
        ConfigurationError: a preprocessing option that does not apply to this kind of data.
    """
    prep = preprocessing or Preprocessing()
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        return _load_folder(path, prep, classes)
    if text.endswith(".npz"):
        if not path.is_file():
            raise DataNotFoundError(f"{option} {text}: no such file; expected an .npz holding "
                                    "x, y")
        return _load_npz(path, prep, classes)
    from deepclean.data import available_datasets, load_dataset

    name, _, split = text.partition(":")
    if name in available_datasets():
        if prep.image_size is not None or prep.grayscale or prep.normalize is not None:
            raise ConfigurationError(
                f"{name} is already normalised with its own statistics; --image-size, "
                "--grayscale and --normalize apply only to image folders (and --normalize to "
                ".npz files). Drop them.")
        if split not in ("", "train", "test"):
            raise ConfigurationError(
                f"{text!r}: expected {name}, {name}:train or {name}:test")
        data = load_dataset(name, data_dir=data_dir)
        x, y = ((data.test_x, data.test_y) if split == "test" else (data.train_x, data.train_y))
        names = tuple(str(k) for k in range(data.num_classes))
        _check_classes(names, classes, text)
        return UserData(TensorDataset(x, y), "dataset", text, names, None, prep)
    raise DataNotFoundError(
        f"{option} {text!r} is neither an existing folder (ImageFolder layout: one sub-folder per "
        f"class), an .npz file holding x and y, nor a data set name ({available_datasets()}); "
        "check the path")


def _check_classes(own: Sequence[str], expected: Sequence[str] | None, source: str) -> None:
    if expected is None:
        return
    unknown = [c for c in own if c not in expected]
    if unknown:
        raise DataError(
            f"{source} has class(es) {unknown[:_SHOW]} that the training data does not have "
            f"({list(expected)[:10]}); held-out data must use the training data's classes")


def _load_folder(path: Path, prep: Preprocessing, classes: Sequence[str] | None) -> UserData:
    from torchvision import datasets, transforms

    steps: list = []
    if prep.grayscale:
        steps.append(transforms.Grayscale(num_output_channels=1))
    if prep.image_size is not None:
        steps.append(transforms.Resize((prep.image_size, prep.image_size)))
    steps.append(transforms.ToTensor())
    try:
        folder = datasets.ImageFolder(str(path), transform=transforms.Compose(steps))
    except (FileNotFoundError, RuntimeError) as exc:  # no class folders, or no images in them
        raise DataError(
            f"{path} is not an image folder in ImageFolder layout ({exc}); expected one "
            "sub-folder per class holding .png/.jpg images, e.g. "
            f"{path}/cat/001.png, {path}/dog/002.png") from exc
    names = tuple(folder.classes)
    _check_classes(names, classes, str(path))
    target = list(classes) if classes is not None else list(names)
    remap = torch.tensor([target.index(c) for c in names], dtype=torch.long)
    xs, ys = [], []
    loader = torch.utils.data.DataLoader(folder, batch_size=256, shuffle=False, num_workers=0)
    try:
        for xb, yb in loader:
            xs.append(xb)
            ys.append(yb)
    except RuntimeError as exc:  # torch.stack of differently sized images
        raise DataError(
            f"the images in {path} do not all have the same size and channels ({exc}); pass "
            "--image-size N (and --grayscale for one channel) to make them alike") from exc
    except OSError as exc:  # PIL cannot read a file
        raise DataError(f"an image in {path} cannot be read ({exc}); remove or replace it") from exc
    x = _normalise(torch.cat(xs).float(), prep.normalize)
    y = remap[torch.cat(ys).long()]
    root = path.resolve()
    ids = tuple(PurePosixPath(Path(p).resolve().relative_to(root)).as_posix()
                for p, _ in folder.samples)
    return UserData(TensorDataset(x, y), "folder", str(path), tuple(target), ids, prep)


def _load_npz(path: Path, prep: Preprocessing, classes: Sequence[str] | None) -> UserData:
    if prep.image_size is not None or prep.grayscale:
        raise ConfigurationError(
            "--image-size and --grayscale apply only to image folders; an .npz file is used as "
            "stored (only --normalize applies). Resize the arrays before saving them.")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            if not {"x", "y"} <= keys:
                raise DataError(
                    f"{path} holds arrays {sorted(keys)}; expected 'x' (inputs) and 'y' (labels). "
                    "Save with numpy.savez(path, x=images, y=labels).")
            x_np, y_np = f["x"], f["y"]
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable .npz file ({exc}); write it with "
                        "numpy.savez(path, x=images, y=labels)") from exc
    if y_np.ndim != 1 or not np.issubdtype(y_np.dtype, np.integer):
        raise DataError(f"{path}: y must be integer class labels of shape (N,), got shape "
                        f"{y_np.shape} and dtype {y_np.dtype}")
    if x_np.shape[0] != y_np.shape[0] or x_np.shape[0] == 0:
        raise DataError(f"{path}: x has {x_np.shape[0]} rows and y {y_np.shape[0]}; expected the "
                        "same number, at least one")
    if y_np.min() < 0:
        raise DataError(f"{path}: labels must be >= 0, got {int(y_np.min())}")
    if x_np.dtype == np.uint8:
        x = torch.from_numpy(x_np.astype(np.float32) / 255.0)
    elif np.issubdtype(x_np.dtype, np.floating) or np.issubdtype(x_np.dtype, np.integer):
        x = torch.from_numpy(np.ascontiguousarray(x_np, dtype=np.float32))
    else:
        raise DataError(f"{path}: x must be numbers (uint8 or float), got dtype {x_np.dtype}")
    if x.ndim == 3:  # (N, H, W): one channel
        x = x.unsqueeze(1)
    elif x.ndim == 4 and x.shape[1] not in (1, 3, 4) and x.shape[3] in (1, 3, 4):
        x = x.permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> (N, C, H, W)
    x = _normalise(x, prep.normalize)
    y = torch.from_numpy(y_np.astype(np.int64))
    n_classes = int(y.max()) + 1
    names = tuple(classes) if classes is not None else tuple(str(k) for k in range(n_classes))
    if n_classes > len(names):
        raise DataError(f"{path}: labels go up to {n_classes - 1} but the training data has "
                        f"{len(names)} classes")
    return UserData(TensorDataset(x, y), "npz", str(path), names, None, prep)


# ---------------------------------------------------------------------------- deletion requests


def _entries_from_text(text: str, source: str) -> list[str]:
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            values = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source} starts like a JSON list but is not valid JSON ({exc}); "
                            "expected e.g. [3, 17] or [\"coat/001.png\"]") from exc
        out = []
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, str)):
                raise DataError(f"{source}: JSON entries must be integers or path strings, got "
                                f"{v!r}")
            out.append(str(v))
        return out
    if source.lower().endswith(".csv"):
        rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
        if not rows:
            return []
        header = [c.strip().lower() for c in rows[0]]
        column = next((header.index(c) for c in _CSV_COLUMNS if c in header), None)
        if column is not None:
            rows = rows[1:]
        else:
            column = 0
        out = []
        for i, r in enumerate(rows):
            if column >= len(r):
                raise DataError(f"{source}: row {i + 2} has no column {column + 1}")
            out.append(r[column].strip())
        return out
    # "#" at the start of a line or after a space starts a comment ("a#b.png" stays a name)
    lines = (re.sub(r"(^|\s)#.*$", "", line).strip() for line in text.splitlines())
    return [line for line in lines if line]


def read_forget_request(path: str | Path, data: UserData) -> list[int]:
    """Read a deletion request file and resolve it to row indices of ``data``.

    Args:
        path: a text file (one entry per line), a JSON list, or a ``.csv`` file (see the module
            docstring). Entries are row indices, or image paths relative to the folder.
        data: the training data the request refers to.

    Returns:
        The row indices, in the request's order (length >= 1, no duplicates).

    Raises:
        DataNotFoundError: the file does not exist.
        DataError: unreadable or empty file, unknown paths, out-of-range or duplicate entries,
            or a request for every sample (nothing would be left to retain).
    """
    p = Path(path)
    if not p.is_file():
        raise DataNotFoundError(f"--forget {p}: no such file; expected a file of indices or "
                                "image paths, one per line (or a JSON list, or CSV)")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"--forget {p} cannot be read as text ({exc})") from exc
    entries = _entries_from_text(text, str(p))
    return resolve_forget_ids(entries, data, source=str(p))


def _normalise_path(entry: str, root: Path | None) -> str:
    s = entry.replace("\\", "/")
    if root is not None and Path(s).is_absolute():
        try:
            s = Path(s).resolve().relative_to(root).as_posix()
        except ValueError:
            return s
    while s.startswith("./"):
        s = s[2:]
    return PurePosixPath(s).as_posix()


def _is_int(s: str) -> bool:
    t = s.strip()
    return t.lstrip("+-").isdigit()


def _named(items: Sequence, total: int | None = None) -> str:
    total = len(items) if total is None else total
    shown = ", ".join(repr(i) if isinstance(i, str) else str(i) for i in items[:_SHOW])
    return shown + (f" (and {total - _SHOW} more)" if total > _SHOW else "")


def resolve_forget_ids(entries: Sequence[int | str], data: UserData, *,
                       source: str = "the deletion request") -> list[int]:
    """Resolve request entries (row indices, or image paths for a folder) to row indices.

    Raises:
        DataError: an empty request, unknown paths, out-of-range or duplicate entries, or every
            sample of ``data`` (D_r would be empty). Each names the first few offenders.
    """
    n = len(data)
    if len(entries) == 0:
        raise DataError(f"{source} is empty; expected at least one index or image path")
    lookup = None
    root = Path(data.source).resolve() if data.kind == "folder" else None
    out: list[int] = []
    unknown: list[str] = []
    out_of_range: list[int] = []
    for e in entries:
        if isinstance(e, bool):
            raise DataError(f"{source}: {e!r} is not an index or a path")
        if isinstance(e, (int, np.integer)) or (isinstance(e, str) and _is_int(e)):
            i = int(e)
            if not 0 <= i < n:
                out_of_range.append(i)
            else:
                out.append(i)
            continue
        if data.ids is None:
            unknown.append(str(e))
            continue
        if lookup is None:
            lookup = {sid: i for i, sid in enumerate(data.ids)}
        key = _normalise_path(str(e), root)
        if key in lookup:
            out.append(lookup[key])
        else:
            unknown.append(str(e))
    if unknown:
        hint = ("image paths relative to the folder, e.g. "
                f"{data.ids[0]!r}" if data.ids else
                f"row indices 0 to {n - 1} (this data has no file paths)")
        raise DataError(f"{source}: {len(unknown)} entr{'y' if len(unknown) == 1 else 'ies'} "
                        f"not in {data.source}: {_named(unknown)}; expected {hint}")
    if out_of_range:
        raise DataError(f"{source}: {len(out_of_range)} index(es) out of range: "
                        f"{_named(out_of_range)}; expected indices from 0 to {n - 1} "
                        f"({n} samples in {data.source})")
    seen: set[int] = set()
    dup: list = []
    for i in out:
        if i in seen:
            dup.append(data.ids[i] if data.ids is not None else i)
        seen.add(i)
    if dup:
        raise DataError(f"{source}: {len(dup)} duplicate entr{'y' if len(dup) == 1 else 'ies'}: "
                        f"{_named(dup)}; list each sample once")
    if len(out) >= n:
        raise DataError(f"{source} asks to forget all {n} samples of {data.source}; nothing "
                        "would be left to retain. Forget a part of the data.")
    return out


def class_indices(data: UserData, name: str) -> list[int]:
    """Row indices of every sample of class ``name`` (a folder's class name, or a label number).

    Raises:
        DataError: an unknown class, or a class with no sample, or the only class.
    """
    if name in data.classes:
        label = data.classes.index(name)
    elif _is_int(name) and 0 <= int(name) < data.num_classes:
        label = int(name)
    else:
        raise DataError(f"--forget-class {name!r}: no such class in {data.source}; expected one "
                        f"of {list(data.classes)[:20]}")
    idx = torch.nonzero(data.y == label).squeeze(1).tolist()
    if not idx:
        raise DataError(f"--forget-class {name!r}: {data.source} has no sample of that class")
    if len(idx) == len(data):
        raise DataError(f"--forget-class {name!r} is every sample of {data.source}; nothing would "
                        "be left to retain")
    return idx


def forget_digest(indices: Sequence[int], data: UserData) -> dict[str, str]:
    """SHA-256 fingerprints of a request: of the sorted indices (as
    :func:`deepclean.harness.audit.indices_digest` with ``n`` = the data size), of the sorted ids (paths,
    for folders), and of the forgotten inputs and labels themselves (sorted by index)."""
    from deepclean.harness.audit import indices_digest

    idx = sorted(int(i) for i in indices)
    out = {"indices_sha256": indices_digest(idx, len(data))}
    if data.ids is not None:
        out["paths_sha256"] = hashlib.sha256(
            "\n".join(sorted(data.ids[i] for i in idx)).encode()).hexdigest()
    t = torch.as_tensor(idx, dtype=torch.long)
    h = hashlib.sha256()
    h.update(data.x[t].contiguous().numpy().tobytes())
    h.update(data.y[t].contiguous().numpy().tobytes())
    out["samples_sha256"] = h.hexdigest()
    return out
