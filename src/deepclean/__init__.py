"""DeepClean: machine unlearning of PyTorch classifiers.

Reference implementation of Shi et al., "DeepClean: Machine Unlearning on the Cheap by Resetting
Privacy Sensitive Weights using the Fisher Diagonal" (arXiv 2311.10448), with the baselines it is
compared with and an evaluation harness (gold model, accuracies, membership inference, time).
"""

from deepclean import _compat

_compat.install()

from deepclean._version import __version__
from deepclean.data.datasets import ImageData, available_datasets, load_dataset
from deepclean.data.models import available_models, build_model, resnet18, small_cnn, vgg16_bn
from deepclean.data.splits import ForgetSplit, class_split, index_split, make_split, random_split
from deepclean.deletion.api import forget, verify
from deepclean.errors import (
    CheckpointError,
    ConfigurationError,
    DataError,
    DataNotFoundError,
    DeepCleanError,
    MaskError,
    SplitMismatchError,
)
from deepclean.evaluation.distances import (
    activation_distance,
    js_divergence,
    kl_divergence,
    weight_distance,
)
from deepclean.evaluation.memorisation import memorisation
from deepclean.evaluation.metrics import (
    accuracy,
    entropy,
    entropy_mia,
    membership_attack,
    predict_proba,
)
from deepclean.evaluation.mia import (
    lira_mia,
    logit_confidence,
    loss_lr_mia,
    mia_efficacy,
    mia_family,
)
from deepclean.evaluation.summaries import avg_gap, relative_time_efficiency, tug_of_war
from deepclean.evaluation.verdict import ForgettingVerdict, forgetting_verdict, matched_holdout
from deepclean.fisher.diagonal import fisher_diagonal, fisher_diagonal_reference
from deepclean.fisher.train_fisher import TrainFisher, precompute_train_fisher
from deepclean.harness.audit import audit_record, evaluate_for_audit, format_audit, write_audit
from deepclean.masking import masked_finetune
from deepclean.methods import (
    SCRUB,
    SSD,
    BadTeacher,
    DeepClean,
    FineTune,
    FisherForgetting,
    LCodec,
    NegGrad,
    RandomLabel,
    Retrain,
    SalUn,
    SparseMU,
    Unlearner,
    ZeroWeights,
    available_methods,
    make_method,
    register_method,
    reset_weights,
    true_fisher_diagonal,
)
from deepclean.reproducibility import deterministic, preserve_global_rng, set_deterministic
from deepclean.selection import mask_summary, select_weights
from deepclean.training import TrainConfig, train_model
from deepclean.validation import check_same_split, unwrap_model

__all__ = [
    "__version__",
    # the method
    "fisher_diagonal",
    "fisher_diagonal_reference",
    "TrainFisher",
    "precompute_train_fisher",
    "select_weights",
    "mask_summary",
    "reset_weights",
    "masked_finetune",
    # unlearning methods
    "Unlearner",
    "DeepClean",
    "ZeroWeights",
    "FineTune",
    "Retrain",
    "NegGrad",
    "RandomLabel",
    "BadTeacher",
    "SCRUB",
    "SalUn",
    "FisherForgetting",
    "SparseMU",
    "LCodec",
    "SSD",
    "true_fisher_diagonal",
    "available_methods",
    "make_method",
    "register_method",
    # models and data
    "resnet18",
    "vgg16_bn",
    "small_cnn",
    "build_model",
    "available_models",
    "ImageData",
    "load_dataset",
    "available_datasets",
    "ForgetSplit",
    "random_split",
    "class_split",
    "index_split",
    "make_split",
    "TrainConfig",
    "train_model",
    # evaluation
    "predict_proba",
    "accuracy",
    "entropy",
    "entropy_mia",
    "membership_attack",
    "mia_family",
    "mia_efficacy",
    "loss_lr_mia",
    "lira_mia",
    "logit_confidence",
    "js_divergence",
    "kl_divergence",
    "activation_distance",
    "weight_distance",
    "avg_gap",
    "tug_of_war",
    "relative_time_efficiency",
    # forgetting without a gold model
    "ForgettingVerdict",
    "forgetting_verdict",
    "matched_holdout",
    "memorisation",
    # a user's own model and data: a deletion request
    "forget",
    "verify",
    # trust: reproducibility, audit, checks
    "set_deterministic",
    "deterministic",
    "preserve_global_rng",
    "audit_record",
    "evaluate_for_audit",
    "format_audit",
    "write_audit",
    "check_same_split",
    "unwrap_model",
    # errors
    "DeepCleanError",
    "ConfigurationError",
    "DataError",
    "DataNotFoundError",
    "MaskError",
    "CheckpointError",
    "SplitMismatchError",
]
