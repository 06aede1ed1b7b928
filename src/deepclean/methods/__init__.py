"""Unlearning methods. Importing this package registers every method."""

from deepclean.methods.base import (
    Unlearner,
    available_methods,
    make_method,
    method_class,
    register_method,
)
from deepclean.methods.deepclean import DeepClean, ZeroWeights, reset_weights
from deepclean.methods.finetune import FineTune
from deepclean.methods.retrain import Retrain, reinitialise

__all__ = [
    "Unlearner",
    "available_methods",
    "make_method",
    "method_class",
    "register_method",
    "DeepClean",
    "ZeroWeights",
    "FineTune",
    "Retrain",
    "reset_weights",
    "reinitialise",
]
