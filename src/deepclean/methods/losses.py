"""Losses shared by the distillation-based unlearning methods (Teacher, SCRUB).

One KL divergence serves every method, so that its reduction is right everywhere: the sum over
classes, averaged over the *batch* (``reduction="batchmean"``), which is the mathematical
KL(p_teacher || p_student) per sample. ``reduction="mean"`` would divide by the number of classes as
well (a known bug of peers' code, GUIDE.md section 5).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["distillation_kl", "teacher_probabilities"]


def distillation_kl(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Mean over the batch of KL(teacher || student) for one batch.

    ``KL = (1/B) * sum_b sum_c p_t[b, c] * (log p_t[b, c] - log softmax(z_s[b] / T)[c])``, computed
    with :func:`torch.nn.functional.kl_div` (``reduction="batchmean"``; ``0 * log 0`` counts as 0).

    Args:
        student_logits: ``(B, C)`` logits of the student (gradients flow through them).
        teacher_probs: ``(B, C)`` target probabilities, already softened by the caller if a
            temperature applies to the teacher (see :func:`teacher_probabilities`).
        temperature: ``T`` dividing the student's logits. No ``T**2`` factor is applied here;
            callers that follow Hinton et al. multiply by it themselves.

    Returns:
        A scalar tensor.
    """
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher probabilities "
            f"{tuple(teacher_probs.shape)} must have the same (batch, classes) shape"
        )
    log_student = nn.functional.log_softmax(student_logits / temperature, dim=1)
    return nn.functional.kl_div(log_student, teacher_probs, reduction="batchmean")


@torch.no_grad()
def teacher_probabilities(
    teacher: nn.Module, x: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Softmax of ``teacher(x) / temperature`` without gradients, for the very batch ``x``.

    Computing the targets from the batch the student sees (never from a precomputed table indexed
    by position) keeps every target paired with its own sample under a shuffled loader. The teacher
    should be in eval mode (the methods put it there), so its BatchNorm buffers do not move.
    """
    return nn.functional.softmax(teacher(x) / temperature, dim=1)
