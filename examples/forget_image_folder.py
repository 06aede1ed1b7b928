"""Prepare the worked example of docs/forget.md: an image folder, a model trained on it, requests.

    python examples/forget_image_folder.py WORKDIR [--n-train 1000] [--n-holdout 2000]
                                           [--epochs 40] [--seed 0] [--fashion-dir DIR]

writes into WORKDIR:

- ``train/<class>/<index>.png``: ``n_train`` Fashion-MNIST training images as PNG files in
  torchvision's ImageFolder layout (``index`` is the image's row in the official training file);
- ``holdout/<class>/<index>.png``: ``n_holdout`` further training images the model never sees;
- ``model.pt``: the state dict of ``examples/fashion_model.py:make_model`` trained on ``train/``
  with plain PyTorch (SGD, cross-entropy, ``epochs`` passes);
- ``forget_20.txt`` and ``forget_1.txt``: deletion requests, image paths relative to ``train/``.

Everything is drawn from ``seed``. Only numpy, Pillow, torch and torchvision are used: the model
is trained the way a practitioner would, without DeepClean.
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_model import make_model

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
           "bag", "ankle-boot")


def read_idx(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The 60,000 Fashion-MNIST training images ``(N, 28, 28)`` uint8 and labels ``(N,)``."""
    def read(stem: str, offset: int) -> np.ndarray:
        gz, plain = folder / f"{stem}.gz", folder / stem
        if gz.is_file():
            with gzip.open(gz) as f:
                raw = f.read()
        else:
            raw = plain.read_bytes()
        return np.frombuffer(raw, dtype=np.uint8, offset=offset)

    images = read("train-images-idx3-ubyte", 16).reshape(-1, 28, 28)
    labels = read("train-labels-idx1-ubyte", 8)
    return images, labels


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> list[str]:
    """Write ``images[rows]`` as ``root/<class>/<row>.png``; returns the relative paths."""
    paths = []
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
    for r in rows:
        rel = f"{CLASSES[labels[r]]}/{r:05d}.png"
        Image.fromarray(images[r], mode="L").save(root / rel)
        paths.append(rel)
    return paths


def train(folder: Path, epochs: int, seed: int) -> nn.Module:
    """Train ``make_model()`` on an ImageFolder of grayscale PNGs with plain PyTorch."""
    torch.manual_seed(seed)
    tf = transforms.Compose([transforms.Grayscale(1), transforms.ToTensor()])
    data = datasets.ImageFolder(str(folder), transform=tf)
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(epochs):
        model.train()
        total, correct, loss_sum = 0, 0, 0.0
        for x, y in loader:
            opt.zero_grad()
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
            loss.backward()
            opt.step()
            total += len(y)
            correct += int((out.argmax(1) == y).sum())
            loss_sum += loss.item() * len(y)
        print(f"epoch {epoch + 1}/{epochs}: loss {loss_sum / total:.4f}, "
              f"train accuracy {100 * correct / total:.2f} %")
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-holdout", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fashion-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                        help="folder with the Fashion-MNIST IDX files (.gz or plain)")
    args = parser.parse_args(argv)

    images, labels = read_idx(args.fashion_dir)
    order = np.random.default_rng(args.seed).permutation(len(labels))
    train_rows = np.sort(order[: args.n_train])
    holdout_rows = np.sort(order[args.n_train: args.n_train + args.n_holdout])
    train_paths = write_folder(args.workdir / "train", images, labels, train_rows)
    write_folder(args.workdir / "holdout", images, labels, holdout_rows)
    print(f"wrote {len(train_rows)} training and {len(holdout_rows)} held-out PNGs under "
          f"{args.workdir}/")

    model = train(args.workdir / "train", args.epochs, args.seed)
    torch.save(model.state_dict(), args.workdir / "model.pt")

    pick = np.random.default_rng(args.seed + 1).permutation(len(train_paths))
    (args.workdir / "forget_20.txt").write_text(
        "\n".join(train_paths[i] for i in sorted(pick[:20])) + "\n")
    (args.workdir / "forget_1.txt").write_text(train_paths[pick[20]] + "\n")
    print(f"saved {args.workdir}/model.pt, forget_20.txt and forget_1.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
