"""The empirical Fisher diagonal (paper eq. 1): the exact per-sample pass, its float64 reference,
and the training-set Fisher computed once per model."""

from deepclean.fisher.diagonal import eval_mode, fisher_diagonal, fisher_diagonal_reference
from deepclean.fisher.rules import (
    LayerRule,
    layer_rule,
    register_layer_rule,
    registered_layer_types,
)
from deepclean.fisher.train_fisher import (
    TrainFisher,
    model_digest,
    precompute_train_fisher,
    sample_digests,
)

__all__ = [
    "LayerRule",
    "TrainFisher",
    "layer_rule",
    "register_layer_rule",
    "registered_layer_types",
    "eval_mode",
    "fisher_diagonal",
    "fisher_diagonal_reference",
    "model_digest",
    "precompute_train_fisher",
    "sample_digests",
]
