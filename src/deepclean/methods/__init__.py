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
from deepclean.methods.fisher_forgetting import (
    FisherForgetting,
    true_fisher_diagonal,
    true_fisher_diagonal_reference,
)
from deepclean.methods.lcodec import LCodec
from deepclean.methods.losses import distillation_kl, teacher_probabilities
from deepclean.methods.neggrad import NegGrad
from deepclean.methods.random_label import RandomLabel, random_wrong_labels
from deepclean.methods.retrain import Retrain, reinitialise
from deepclean.methods.salun import SalUn, saliency_mask
from deepclean.methods.scrub import SCRUB
from deepclean.methods.sparse_mu import SparseMU
from deepclean.methods.ssd import SSD
from deepclean.methods.teacher import BadTeacher, bad_teacher_targets

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
    "FisherForgetting",
    "SparseMU",
    "LCodec",
    "SSD",
    "true_fisher_diagonal",
    "true_fisher_diagonal_reference",
    "reset_weights",
    "reinitialise",
    "NegGrad",
    "RandomLabel",
    "BadTeacher",
    "SCRUB",
    "SalUn",
    "random_wrong_labels",
    "saliency_mask",
    "bad_teacher_targets",
    "distillation_kl",
    "teacher_probabilities",
]
