"""Evaluation: accuracies and the paper's entropy MIA (metrics), the MIA family (mia), distances
to the gold model (distances), one-number summaries (summaries), and the per-run evaluation that
ties them together (outputs)."""

from deepclean.evaluation.distances import (
    activation_distance,
    distances_to_gold,
    js_divergence,
    kl_divergence,
    output_distances,
    weight_distance,
)
from deepclean.evaluation.evaluate import evaluate, evaluate_model, paper_metrics
from deepclean.evaluation.memorisation import memorisation
from deepclean.evaluation.metrics import (
    accuracy,
    dataset_labels,
    entropy,
    entropy_mia,
    membership_attack,
    predict_logits,
    predict_proba,
    sample_logits,
)
from deepclean.evaluation.mia import (
    DIRECTIONS,
    LiraResult,
    cross_entropy_loss,
    entropy_lr_mia,
    lira_mia,
    logit_confidence,
    loss_lr_mia,
    mia_efficacy,
    mia_family,
    true_label_confidence,
)
from deepclean.evaluation.outputs import (
    GoldReference,
    ModelOutputs,
    SampleOutputs,
    build_reference,
    extended_metrics,
    model_outputs,
    sample_outputs,
)
from deepclean.evaluation.summaries import (
    ACC_METRICS,
    GAP_METRICS,
    avg_gap,
    relative_time_efficiency,
    summary,
    tug_of_war,
)

__all__ = [
    "ACC_METRICS",
    "DIRECTIONS",
    "GAP_METRICS",
    "GoldReference",
    "LiraResult",
    "ModelOutputs",
    "SampleOutputs",
    "accuracy",
    "activation_distance",
    "avg_gap",
    "build_reference",
    "dataset_labels",
    "cross_entropy_loss",
    "distances_to_gold",
    "entropy",
    "entropy_lr_mia",
    "entropy_mia",
    "evaluate",
    "evaluate_model",
    "extended_metrics",
    "js_divergence",
    "kl_divergence",
    "lira_mia",
    "logit_confidence",
    "loss_lr_mia",
    "membership_attack",
    "memorisation",
    "mia_efficacy",
    "mia_family",
    "model_outputs",
    "output_distances",
    "paper_metrics",
    "predict_logits",
    "predict_proba",
    "relative_time_efficiency",
    "sample_logits",
    "sample_outputs",
    "summary",
    "true_label_confidence",
    "tug_of_war",
    "weight_distance",
]
