"""The example's own model: a plain PyTorch CNN for 1x28x28 images and 10 classes.

``deepclean forget --model examples/fashion_model.py:make_model`` builds it by calling
:func:`make_model` with no arguments.
"""

from torch import nn


def make_model() -> nn.Module:
    """Two 3x3 convolutions with max-pooling and a two-layer classifier: inputs ``(B, 1, 28, 28)``
    in [0, 1], logits ``(B, 10)``; about 0.2 M parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    )
