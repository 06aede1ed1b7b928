"""Data: built-in data sets (torchvision and local files), forget/retain splits, model builders."""

from deepclean.data.datasets import (
    DEBIAN_FASHION_MNIST,
    ImageData,
    as_tensors,
    available_datasets,
    iterate_batches,
    load_dataset,
    random_crop_flip,
)
from deepclean.data.models import available_models, build_model, resnet18, small_cnn, vgg16_bn
from deepclean.data.splits import (
    SCENARIOS,
    ForgetSplit,
    class_split,
    index_split,
    make_split,
    random_split,
)

__all__ = [
    "DEBIAN_FASHION_MNIST",
    "SCENARIOS",
    "ForgetSplit",
    "ImageData",
    "as_tensors",
    "available_datasets",
    "available_models",
    "build_model",
    "class_split",
    "index_split",
    "iterate_batches",
    "load_dataset",
    "make_split",
    "random_crop_flip",
    "random_split",
    "resnet18",
    "small_cnn",
    "vgg16_bn",
]
