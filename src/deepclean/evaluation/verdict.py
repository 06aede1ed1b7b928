"""Did the model forget? A verdict without a gold model.

Nobody who receives a deletion request has the gold model (a model retrained without D_f). What
can be measured (GUIDE.md section 9) is D_f against *held-out samples drawn like D_f*: the gold
model never saw either, so after a successful unlearning the model must treat D_f like those
held-out samples, while its accuracy on held-out samples of the retained classes stays near the
original's.

Three public functions:

- :func:`matched_holdout`: indices of held-out samples matched in label mix to D_f (class
  forgetting: the forgotten class; random forgetting or a deletion request: the same label
  distribution), deterministic from a seed.
- :func:`forgetting_verdict`: a :class:`ForgettingVerdict` with ``forgotten``, ``utility_kept``,
  ``passed``, human ``reasons`` and the numbers.
- :func:`attack_auc`: the per-example attack's ROC AUC with its confidence interval.

How much the original memorised (paper limitation 2) is
:func:`deepclean.evaluation.memorisation.memorisation`.

The per-example attack. Feature: the logit-scaled confidence
``phi = log(p_y / (1 - p_y))`` (:func:`deepclean.evaluation.mia.logit_confidence`; the statistic of LiRA,
Carlini et al., S&P 2022). It is a monotone function of the true-label probability, as the
cross-entropy loss ``-log p_y`` is, so its ROC AUC equals the loss attack's; phi is used because it
is computed exactly from the logits where the loss rounds to 0 in float64. The AUC
(scikit-learn's ``roc_auc_score``) has D_f (or the training set) as positives and held-out samples
as negatives, scored by phi: 0.5 means indistinguishable; above 0.5 D_f is fitted better than
unseen data (remembered); below 0.5 D_f is fitted *worse* than unseen data (over-unlearning, which
itself reveals that something was removed). The verdict is two-sided.

Tolerances (defaults, each can be overridden with a number):

- accuracy gap D_f vs held-out: the 95 % two-sample binomial interval of a difference of two
  accuracies measured on these set sizes, ``1.96 * sqrt(p (1 - p) (1/n_f + 1/n_h))`` with the
  pooled accuracy p Laplace-smoothed (``(k_f + k_h + 1) / (n_f + n_h + 2)``, so a pooled 0 % or
  100 % still has a width), and at least :data:`MIN_ACC_TOLERANCE` points;
- attack AUC: 0.5 +- ``1.96 * sqrt((n_f + n_h + 1) / (12 n_f n_h))``, the 95 % interval of the
  Mann-Whitney AUC when both sets come from one distribution (exactly the gold model's case), and at
  least :data:`MIN_AUC_TOLERANCE`;
- class forgetting adds that D_f's accuracy must be at most ``max(300 / n_f, 1)`` % (the "rule of
  three" 95 % upper bound for 0 successes in n_f trials): a model that never saw a class does not
  predict it, so matching held-out samples of the same class is not enough (the original matches
  them too, by generalisation);
- utility: the drop of accuracy on held-out samples of the retained classes against the original
  model's, at most ``max(1 point, 1.96 * sqrt(b + c) / n)`` in %: the 95 % bound of McNemar's
  paired test on the same n samples, b (c) the samples only the original (only the model) gets
  right. A model retrained from scratch disagrees with the original on a few per cent of samples
  even at equal accuracy; the paired bound scales with that disagreement.

With fewer than :data:`MIN_ATTACK_SAMPLES` samples in D_f or the held-out set the AUC is not
measurable (reported as NaN, ``None`` in :meth:`ForgettingVerdict.to_dict`, and said so in the
reasons); the verdict then uses the mean percentile of D_f's losses among the held-out losses
(ideal 0.5; for one sample its 95 % interval is [0.025, 0.975], the null distribution being
uniform; for n_f >= 2 the normal approximation of the mean of n_f uniforms).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from deepclean.data.datasets import as_tensors, check_loader_options, in_memory
from deepclean.errors import ConfigurationError, DataError
from deepclean.evaluation.metrics import dataset_labels, predict_logits
from deepclean.evaluation.mia import cross_entropy_loss, logit_confidence

__all__ = [
    "MIN_ACC_TOLERANCE",
    "MIN_ATTACK_SAMPLES",
    "MIN_AUC_TOLERANCE",
    "SCENARIOS",
    "ForgettingVerdict",
    "attack_auc",
    "forgetting_verdict",
    "matched_holdout",
]

#: Below this many samples in D_f (or in the held-out set) the attack AUC is reported as not
#: measurable and the verdict uses D_f's loss percentile among held-out losses instead.
MIN_ATTACK_SAMPLES = 10
#: Smallest accuracy tolerance, in points (%): a gap below 1 point is practically none.
MIN_ACC_TOLERANCE = 1.0
#: Smallest attack-AUC tolerance around 0.5: an attack at AUC 0.51 reveals practically nothing.
MIN_AUC_TOLERANCE = 0.01
#: Above this accuracy resolution (``acc_resolution``, points), the sets are too small for the
#: verdict to tell D_f from held-out data unless they differ grossly: a pass is weak evidence.
WEAK_EVIDENCE_POINTS = 10.0
#: Values of ``forgetting_verdict(scenario=...)``.
SCENARIOS = ("auto", "class", "sample")

_Z95 = 1.959963984540054


@dataclass(frozen=True)
class ForgettingVerdict:
    """The outcome of :func:`forgetting_verdict`.

    Attributes:
        forgotten: D_f now looks like held-out data drawn like it: the accuracy gap is within
            tolerance and the attack AUC (or, for tiny sets, the loss percentile) is within
            tolerance of 0.5; under class forgetting also D_f's accuracy is near 0.
        utility_kept: accuracy on held-out samples of the retained classes dropped by at most the
            utility tolerance against the original's (True, with a reason, when not measurable:
            no ``retained_holdout`` or no ``original``).
        passed: ``forgotten and utility_kept``.
        reasons: human sentences with the numbers, one per criterion.
        metrics: the numbers (accuracies and tolerances in %, AUCs in [0, 1], counts as floats);
            NaN where not measurable.
        scenario: ``"class"`` or ``"sample"`` (random forgetting or a deletion request).
    """

    forgotten: bool
    utility_kept: bool
    passed: bool
    reasons: tuple[str, ...]
    metrics: dict[str, float] = field(default_factory=dict)
    scenario: str = "sample"

    @property
    def weak_evidence(self) -> bool:
        """True when only accuracy gaps above :data:`WEAK_EVIDENCE_POINTS` points can be told
        apart (``acc_resolution``, the 95 % two-sample bound on the accuracy gap, above it,
        whatever ``acc_tolerance`` was asked). The bound grows as the sets shrink and as the
        accuracy nears 50 % (it is widest there, and small near 0 or 100 %). When D_f counts as
        forgotten, the summary line says so: the pass then shows only that D_f is not grossly
        better predicted than held-out data."""
        return self.metrics.get("acc_resolution", 0.0) > WEAK_EVIDENCE_POINTS

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: the flags, ``weak_evidence``, reasons, scenario, summary line and
        metrics (NaN as None)."""
        return {
            "forgotten": self.forgotten,
            "utility_kept": self.utility_kept,
            "passed": self.passed,
            "weak_evidence": self.weak_evidence,
            "scenario": self.scenario,
            "summary": self.summary_line(),
            "reasons": list(self.reasons),
            "metrics": {k: (None if isinstance(v, float) and math.isnan(v) else v)
                        for k, v in self.metrics.items()},
        }

    def summary_line(self) -> str:
        """One line for the console, results.md and the audit record: ``"FORGOTTEN: ..."`` when
        passed, ``"NOT FORGOTTEN: ..."`` when D_f was not forgotten, ``"FORGOTTEN, UTILITY LOST:
        ..."`` when D_f was forgotten at the expense of the retained classes."""
        m = self.metrics
        head = ("FORGOTTEN" if self.passed else
                "NOT FORGOTTEN" if not self.forgotten else "FORGOTTEN, UTILITY LOST")
        what = ("held-out samples of the class" if self.scenario == "class" else
                "matched held-out samples")
        parts = [(f"Acc_Df {m['acc_forget']:.1f} % vs {m['acc_holdout']:.1f} % on "
                 f"{int(m['n_holdout'])} {what}")]
        if not math.isnan(m.get("attack_auc", float("nan"))):
            parts.append(f"attack AUC {m['attack_auc']:.3f} (ideal 0.5 +- "
                         f"{m['auc_tolerance']:.3f})")
        else:
            parts.append(f"loss percentile {m['loss_percentile']:.2f} (ideal 0.5; AUC not "
                         f"measurable on {int(m['n_forget'])} D_f and {int(m['n_holdout'])} "
                         "held-out sample(s))")
        if not math.isnan(m.get("acc_retained_holdout", float("nan"))):
            ref = m.get("original_acc_retained_holdout", float("nan"))
            ref_txt = "" if math.isnan(ref) else f" (original {ref:.1f} %)"
            parts.append(f"retained held-out accuracy {m['acc_retained_holdout']:.1f} %{ref_txt}")
        tol = m.get("class_acc_tolerance", float("nan"))
        if (self.scenario == "class" and not self.forgotten and not math.isnan(tol)
                and max(m["acc_forget"], m["acc_holdout"]) > tol):
            parts.append(f"a forgotten class needs accuracy at most {tol:.1f} % on D_f and on "
                         "its held-out samples")
        if self.weak_evidence and self.forgotten:
            parts.append(f"weak evidence: at these sizes ({int(m['n_forget'])} D_f, "
                         f"{int(m['n_holdout'])} held-out) and accuracies only accuracy gaps "
                         f"above {m['acc_resolution']:.1f} points can be told apart")
        return f"{head}: " + "; ".join(parts)


def matched_holdout(holdout_labels: torch.Tensor | Sequence[int],
                    forget_labels: torch.Tensor | Sequence[int], *, seed: int) -> torch.Tensor:
    """Indices into the held-out set of samples matched in label mix to D_f.

    For every class k present in D_f (``c_k`` samples) the held-out set offers ``h_k`` samples.
    The largest matched sample keeps D_f's proportions: with ``s = min_k h_k / c_k``, class k
    contributes ``min(h_k, max(1, round(s * c_k)))`` samples, drawn without replacement by a
    permutation from ``torch.Generator().manual_seed(seed)``; classes absent from D_f contribute
    none. Class forgetting (D_f one class) hence gets every held-out sample of that class; random
    forgetting about D_f's label distribution.

    Args:
        holdout_labels: int labels ``(N_h,)`` of the held-out set.
        forget_labels: int labels ``(N_f,)`` of D_f.
        seed: the seed of the draw (same seed, same indices).

    Returns:
        int64 indices ``(M,)`` into the held-out set, sorted ascending.

    Raises:
        DataError: empty or non-integer labels, or a class of D_f with no held-out sample (the fix:
            a held-out set that holds every class of D_f).
        ConfigurationError: ``seed`` is not an int >= 0.
    """
    _check_seed(seed)
    h = _labels(holdout_labels, "held-out labels")
    f = _labels(forget_labels, "forget labels")
    classes, counts = torch.unique(f, return_counts=True)
    available = {int(k): int((h == k).sum()) for k in classes}
    missing = [k for k, n in available.items() if n == 0]
    if missing:
        raise DataError(
            f"the held-out set has no sample of class(es) {missing}, which D_f holds; expected "
            "held-out samples of every class of D_f. Pass a larger held-out set (e.g. training "
            "images the original model never saw)."
        )
    scale = min(available[int(k)] / int(c) for k, c in zip(classes, counts, strict=True))
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for k, c in zip(classes.tolist(), counts.tolist(), strict=True):
        idx = torch.nonzero(h == k).squeeze(1)
        take = min(available[k], max(1, round(scale * c)))
        chosen.append(idx[torch.randperm(idx.numel(), generator=gen)[:take]])
    return torch.sort(torch.cat(chosen)).values


def attack_auc(member_scores: torch.Tensor | np.ndarray,
               non_member_scores: torch.Tensor | np.ndarray) -> dict[str, float]:
    """ROC AUC of a per-example attack, with its 95 % intervals.

    Args:
        member_scores: ``(N_1,)`` attack scores (higher = "member") of the positives (D_f or the
            training set).
        non_member_scores: ``(N_0,)`` scores of the negatives (held-out samples).

    Returns:
        ``{"auc", "auc_ci_low", "auc_ci_high", "auc_null_halfwidth"}``: the AUC
        (``sklearn.metrics.roc_auc_score``, ties count 1/2), its 95 % interval by Hanley and McNeil
        (Radiology 1982), and the half-width of the 95 % interval of the AUC when both sets come
        from one distribution, ``1.96 * sqrt((N_0 + N_1 + 1) / (12 N_0 N_1))``.

    Raises:
        DataError: an empty set or non-finite scores.
    """
    from sklearn.metrics import roc_auc_score

    pos = np.asarray(torch.as_tensor(member_scores).double().cpu()).reshape(-1)
    neg = np.asarray(torch.as_tensor(non_member_scores).double().cpu()).reshape(-1)
    for label, a in (("member", pos), ("non-member", neg)):
        if a.size == 0:
            raise DataError(f"the attack's {label} set is empty; expected at least one score")
        if not np.isfinite(a).all():
            raise DataError(f"the attack's {label} scores hold NaN or infinity")
    n1, n0 = pos.size, neg.size
    auc = float(roc_auc_score(np.r_[np.ones(n1), np.zeros(n0)], np.r_[pos, neg]))
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n1 - 1) * (q1 - auc * auc) + (n0 - 1) * (q2 - auc * auc)) / (n1 * n0)
    se = math.sqrt(max(var, 0.0))
    return {
        "auc": auc,
        "auc_ci_low": max(0.0, auc - _Z95 * se),
        "auc_ci_high": min(1.0, auc + _Z95 * se),
        "auc_null_halfwidth": _Z95 * math.sqrt((n0 + n1 + 1) / (12.0 * n0 * n1)),
    }


def forgetting_verdict(
    model: nn.Module,
    forget: Dataset,
    holdout: Dataset,
    *,
    original: nn.Module | None = None,
    retained_holdout: Dataset | None = None,
    acc_tolerance: float | None = None,
    auc_tolerance: float | None = None,
    utility_tolerance: float | None = None,
    scenario: str = "auto",
    match: bool = True,
    seed: int = 0,
    device: torch.device | str | None = None,
    batch_size: int = 512,
    num_workers: int = 0,
    pin_memory: bool = False,
    distributed: bool | None = None,
) -> ForgettingVerdict:
    """Whether ``model`` treats D_f like held-out data drawn like it, and kept its utility.

    Args:
        model: the unlearned classifier (logits ``(N, K)``); evaluated in eval mode, not modified.
        forget: D_f, a Dataset of ``(x, y)`` pairs.
        holdout: held-out samples the original model never trained on (never the test half that
            results are reported on). With ``match=True`` (default) it may be a whole pool: the
            samples matched in label mix to D_f are taken by :func:`matched_holdout` (seed
            ``seed``); with ``match=False`` it is used as given.
        original: the model before unlearning; with ``retained_holdout`` it gives the reference
            accuracy for ``utility_kept``, and its Acc_Df and attack AUC are reported for context.
        retained_holdout: held-out samples of the retained classes (class forgetting: of every
            other class; random forgetting: of every class). None: utility not measured.
        acc_tolerance: largest |Acc_Df - Acc_holdout| in points; None: the 95 % two-sample
            binomial interval for these sizes, at least :data:`MIN_ACC_TOLERANCE` (module doc).
        auc_tolerance: largest |AUC - 0.5|; None: the 95 % null interval for these sizes, at least
            :data:`MIN_AUC_TOLERANCE`.
        utility_tolerance: largest drop in points of the retained held-out accuracy against the
            original's; None: ``max(1, 1.96 * sqrt(b + c) / n * 100)`` (McNemar, module doc).
        scenario: ``"class"`` (D_f is whole classes: their accuracy must also be near 0),
            ``"sample"`` (random forgetting or a deletion request), or ``"auto"`` (default):
            ``"class"`` when ``retained_holdout`` is given and holds none of D_f's labels, else
            ``"sample"``.
        match: restrict ``holdout`` to samples matched to D_f's label mix.
        seed: seed of the matched draw.
        device: where to run the model; None: the model's device.
        batch_size: inference batch size (does not change the result).
        num_workers, pin_memory: ``DataLoader`` options for data sets that are not in memory.
        distributed: under ``torch.distributed`` (``None``: automatic when a process group of
            more than one rank is initialised) every rank passes the same whole data sets, computes
            the outputs of its block of each and gets every sample's exactly once (gathered in
            order), so every rank returns the same verdict; ``False``: each rank computes all.

    Data: a ``TensorDataset`` (or a ``Subset`` of one) is sliced in memory; any other map-style
    ``Dataset`` of ``(x, y)`` pairs is streamed through a ``DataLoader``, one batch of
    ``batch_size`` in memory at a time (its labels are read once first, then each model reads
    it once), with the same numbers.

    Returns:
        A :class:`ForgettingVerdict`. ``metrics`` keys (accuracies and tolerances in %, AUCs in
        [0, 1]): ``acc_forget``, ``acc_holdout``, ``acc_gap`` (forget minus held-out),
        ``acc_tolerance``, ``acc_resolution`` (the 95 % two-sample bound on the accuracy gap for
        these sizes, the default ``acc_tolerance``), ``attack_auc``, ``attack_auc_ci_low``,
        ``attack_auc_ci_high``, ``auc_tolerance``, ``loss_percentile``, ``loss_forget``, ``loss_holdout`` (mean
        cross-entropy, nats), ``class_acc_tolerance`` (class scenario), ``acc_retained_holdout``,
        ``original_acc_retained_holdout``, ``utility_drop``, ``utility_tolerance``,
        ``original_acc_forget``, ``original_attack_auc``, ``n_forget``, ``n_holdout``,
        ``n_retained_holdout``.

    Raises:
        DataError: empty sets, labels the model cannot output, or a class of D_f with no held-out
            sample.
        ConfigurationError: an unknown ``scenario``, a tolerance that is not a number > 0, a bad
            ``seed``, ``batch_size`` or loader option; ``distributed=True`` without a process
            group, or under one, ranks that passed data sets of different lengths.
    """
    if scenario not in SCENARIOS:
        raise ConfigurationError(f"scenario must be one of {SCENARIOS}, got {scenario!r}; pass "
                                 "'class' for class forgetting, 'sample' for random samples")
    for key, value in (("acc_tolerance", acc_tolerance), ("auc_tolerance", auc_tolerance),
                       ("utility_tolerance", utility_tolerance)):
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and math.isfinite(value) and value > 0):
            raise ConfigurationError(f"{key} must be a finite number > 0 or None (automatic), "
                                     f"got {value!r}")
    _check_seed(seed)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigurationError(f"batch_size must be an int >= 1, got {batch_size!r}")
    load = dict(batch_size=batch_size, device=device, num_workers=num_workers,
                pin_memory=pin_memory, distributed=distributed)
    check_loader_options(num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=False)
    xf, yf = _inputs_and_labels(forget, load)
    xh, yh = _inputs_and_labels(holdout, load)
    if match:
        idx = matched_holdout(yh, yf, seed=seed)
        xh, yh = (xh[idx] if isinstance(xh, torch.Tensor) else Subset(xh, idx.tolist())), yh[idx]
    xrh = yrh = None
    if retained_holdout is not None:
        xrh, yrh = _inputs_and_labels(retained_holdout, load)
    forget_classes = sorted(set(yf.tolist()))
    if scenario == "auto":
        scenario = ("class" if yrh is not None and not set(yrh.tolist()) & set(forget_classes)
                    else "sample")
    what = ("held-out samples of the forgotten class" + ("es" if len(forget_classes) > 1 else "")
            if scenario == "class" else "matched held-out samples")

    lf, lh = _logits(model, xf, yf, load), _logits(model, xh, yh, load)
    m: dict[str, float] = {"n_forget": float(len(yf)), "n_holdout": float(len(yh))}
    kf = int((lf.argmax(1) == yf).sum())
    kh = int((lh.argmax(1) == yh).sum())
    nf, nh = len(yf), len(yh)
    m["acc_forget"] = 100.0 * kf / nf
    m["acc_holdout"] = 100.0 * kh / nh
    m["acc_gap"] = m["acc_forget"] - m["acc_holdout"]
    p = (kf + kh + 1) / (nf + nh + 2)
    auto_acc_tol = max(MIN_ACC_TOLERANCE, 100.0 * _Z95 * math.sqrt(p * (1 - p) * (1 / nf + 1 / nh)))
    m["acc_resolution"] = auto_acc_tol
    m["acc_tolerance"] = float(acc_tolerance) if acc_tolerance is not None else auto_acc_tol
    m["loss_forget"] = float(cross_entropy_loss(lf, yf).mean())
    m["loss_holdout"] = float(cross_entropy_loss(lh, yh).mean())
    att = _attack(lf, yf, lh, yh, auc_tolerance)
    m.update({k: float(v) for k, v in att.items()})

    reasons: list[str] = []
    acc_ok = abs(m["acc_gap"]) <= m["acc_tolerance"]
    reasons.append(
        f"Acc_Df {m['acc_forget']:.1f} % vs {m['acc_holdout']:.1f} % on {nh} {what}: gap "
        f"{m['acc_gap']:+.1f} points, " + (
            f"within the tolerance of {m['acc_tolerance']:.1f}" if acc_ok else
            f"beyond the tolerance of {m['acc_tolerance']:.1f}: " + (
                "D_f was not forgotten" if m["acc_gap"] > 0 else
                "D_f is now predicted worse than unseen data (over-unlearning)")))
    if att["auc_measurable"]:
        auc_ok = abs(m["attack_auc"] - 0.5) <= m["auc_tolerance"]
        reasons.append(
            f"per-example attack (logit-scaled confidence, D_f vs held-out) AUC "
            f"{m['attack_auc']:.3f} (95 % CI {m['attack_auc_ci_low']:.3f}-"
            f"{m['attack_auc_ci_high']:.3f}), " + (
                f"within 0.5 +- {m['auc_tolerance']:.3f}" if auc_ok else
                f"outside 0.5 +- {m['auc_tolerance']:.3f}: " + (
                    "D_f is still fitted better than unseen data (remembered)"
                    if m["attack_auc"] > 0.5 else
                    "D_f is fitted worse than unseen data (over-unlearning)")))
    else:
        lo, hi = m["loss_percentile_low"], m["loss_percentile_high"]
        auc_ok = lo <= m["loss_percentile"] <= hi
        reasons.append(
            f"attack AUC not measurable with {nf} D_f and {nh} held-out sample(s) (fewer than "
            f"{MIN_ATTACK_SAMPLES}); D_f's loss sits at percentile {m['loss_percentile']:.2f} of "
            f"the held-out losses, " + (
                f"inside the 95 % range {lo:.3f}-{hi:.3f} of unseen data" if auc_ok else
                f"outside the 95 % range {lo:.3f}-{hi:.3f} of unseen data: " + (
                    "D_f was not forgotten" if m["loss_percentile"] < lo else
                    "D_f is fitted worse than unseen data (over-unlearning)")))
    class_ok = True
    if scenario == "class":
        m["class_acc_tolerance"] = max(MIN_ACC_TOLERANCE, 300.0 / nf)
        class_ok = (m["acc_forget"] <= m["class_acc_tolerance"]
                    and m["acc_holdout"] <= m["class_acc_tolerance"])
        reasons.append(
            f"class forgetting: a model that never saw class(es) {forget_classes} does not predict "
            f"them; Acc_Df {m['acc_forget']:.1f} % and {m['acc_holdout']:.1f} % on held-out "
            f"samples of the class, " + (
                f"both at most {m['class_acc_tolerance']:.1f} %" if class_ok else
                f"above {m['class_acc_tolerance']:.1f} %: the class was not forgotten"))
    else:
        m["class_acc_tolerance"] = float("nan")

    if original is not None:
        of = _logits(original, xf, yf, load)
        oh = _logits(original, xh, yh, load)
        m["original_acc_forget"] = 100.0 * float((of.argmax(1) == yf).double().mean())
        m["original_acc_holdout"] = 100.0 * float((oh.argmax(1) == yh).double().mean())
        m["original_attack_auc"] = (_attack(of, yf, oh, yh, None)["attack_auc"]
                                    if att["auc_measurable"] else float("nan"))
    else:
        m.update(original_acc_forget=float("nan"), original_acc_holdout=float("nan"),
                 original_attack_auc=float("nan"))

    m.update(acc_retained_holdout=float("nan"), original_acc_retained_holdout=float("nan"),
             utility_drop=float("nan"), utility_tolerance=float("nan"),
             n_retained_holdout=float(0 if yrh is None else len(yrh)))
    utility_kept = True
    if yrh is None:
        reasons.append("utility not measured: no held-out samples of the retained classes given "
                       "(retained_holdout)")
    else:
        lr = _logits(model, xrh, yrh, load)
        m["acc_retained_holdout"] = 100.0 * float((lr.argmax(1) == yrh).double().mean())
        if original is None:
            reasons.append(f"accuracy on {len(yrh)} held-out samples of the retained classes "
                           f"{m['acc_retained_holdout']:.1f} %; utility not compared: no original "
                           "model given")
        else:
            ol = _logits(original, xrh, yrh, load)
            right_o, right_m = ol.argmax(1) == yrh, lr.argmax(1) == yrh
            ref = 100.0 * float(right_o.double().mean())
            m["original_acc_retained_holdout"] = ref
            m["utility_drop"] = ref - m["acc_retained_holdout"]
            discordant = int((right_o != right_m).sum())
            m["utility_tolerance"] = (
                float(utility_tolerance) if utility_tolerance is not None else
                max(1.0, 100.0 * _Z95 * math.sqrt(discordant) / len(yrh)))
            utility_kept = m["utility_drop"] <= m["utility_tolerance"]
            reasons.append(
                f"accuracy on {len(yrh)} held-out samples of the retained classes "
                f"{m['acc_retained_holdout']:.1f} % vs the original's {ref:.1f} %: " + (
                    f"utility kept (drop {m['utility_drop']:+.1f} points, tolerance "
                    f"{m['utility_tolerance']:.1f})" if utility_kept else
                    f"forgot at the expense of the retained data (drop "
                    f"{m['utility_drop']:+.1f} points, tolerance {m['utility_tolerance']:.1f})"))
    forgotten = bool(acc_ok and auc_ok and class_ok)
    return ForgettingVerdict(forgotten=forgotten, utility_kept=bool(utility_kept),
                             passed=bool(forgotten and utility_kept), reasons=tuple(reasons),
                             metrics=m, scenario=scenario)


# ---------------------------------------------------------------------------------------- helpers


def _check_seed(seed: Any) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigurationError(f"seed must be an int >= 0, got {seed!r}; e.g. seed=0")


def _labels(labels: torch.Tensor | Sequence[int], what: str) -> torch.Tensor:
    t = torch.as_tensor(labels)
    if t.ndim != 1 or t.numel() == 0 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise DataError(f"the {what} must be a non-empty 1-D tensor of integer class labels, got "
                        f"shape {tuple(t.shape)} and dtype {t.dtype}")
    return t.long().cpu()


def _inputs_and_labels(data: Dataset, load: dict[str, Any]
                       ) -> tuple[torch.Tensor | Dataset, torch.Tensor]:
    """``(inputs, labels)``: tensors for data in memory (a ``TensorDataset`` or a ``Subset`` of
    one, or any data set that is not map-style and sized: as_tensors says what is wrong), else
    the ``Dataset`` itself, to stream, with its labels read once."""
    if in_memory(data) or not (hasattr(data, "__len__") and hasattr(data, "__getitem__")) \
            or isinstance(data, (dict, tuple, str, bytes, torch.Tensor)):
        return as_tensors(data)
    labels = dataset_labels(data, batch_size=load["batch_size"], num_workers=load["num_workers"],
                            distributed=load["distributed"])
    return data, labels


def _logits(model: nn.Module, x: torch.Tensor | Dataset, y: torch.Tensor,
            load: dict[str, Any]) -> torch.Tensor:
    logits = predict_logits(model, x, **load)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise DataError(f"expected the model to return logits (N, K >= 2), got "
                        f"{tuple(logits.shape)}")
    if int(y.min()) < 0 or int(y.max()) >= logits.shape[1]:
        raise DataError(f"labels from {int(y.min())} to {int(y.max())} but the model has "
                        f"{logits.shape[1]} outputs; expected labels in [0, {logits.shape[1] - 1}]")
    return logits


def _attack(lf: torch.Tensor, yf: torch.Tensor, lh: torch.Tensor, yh: torch.Tensor,
            auc_tolerance: float | None) -> dict[str, Any]:
    """The per-example attack D_f vs held-out, or the loss percentile for tiny sets."""
    nf, nh = len(yf), len(yh)
    phi_f, phi_h = logit_confidence(lf, yf), logit_confidence(lh, yh)
    # Mean percentile of D_f's loss among held-out losses (mid-rank for ties); loss is decreasing
    # in phi, so a D_f sample with a *higher* phi than a held-out one has a lower loss.
    # Sorted search, not an (N_f, N_h) comparison matrix (6,000 x 20,000 would be 1 GB).
    sorted_h = np.sort(phi_h.numpy())
    left = np.searchsorted(sorted_h, phi_f.numpy(), side="left")
    right = np.searchsorted(sorted_h, phi_f.numpy(), side="right")
    lower = (nh - right) / nh  # held-out samples with a higher phi, i.e. a lower loss
    ties = (right - left) / nh
    pct = float(np.mean(lower + 0.5 * ties))
    if nf == 1:
        # Under the null the one sample's rank among the nh held-out losses is uniform on
        # {0, ..., nh}: reject at most 2.5 % on each side (nothing, for fewer than 39 samples).
        q = math.floor(0.025 * (nh + 1))
        lo, hi = q / nh, (nh - q) / nh
    else:
        # The mean percentile is the Mann-Whitney AUC of D_f against the held-out samples; under
        # the null its variance is (nf + nh + 1) / (12 nf nh): both sizes count.
        half = _Z95 * math.sqrt((nf + nh + 1) / (12.0 * nf * nh))
        lo, hi = max(0.0, 0.5 - half), min(1.0, 0.5 + half)
    out: dict[str, Any] = {"loss_percentile": pct, "loss_percentile_low": lo,
                           "loss_percentile_high": hi}
    if min(nf, nh) >= MIN_ATTACK_SAMPLES:
        a = attack_auc(phi_f, phi_h)
        out.update(attack_auc=a["auc"], attack_auc_ci_low=a["auc_ci_low"],
                   attack_auc_ci_high=a["auc_ci_high"],
                   auc_tolerance=(float(auc_tolerance) if auc_tolerance is not None
                                  else max(MIN_AUC_TOLERANCE, a["auc_null_halfwidth"])),
                   auc_measurable=True)
    else:
        out.update(attack_auc=float("nan"), attack_auc_ci_low=float("nan"),
                   attack_auc_ci_high=float("nan"),
                   auc_tolerance=(float(auc_tolerance) if auc_tolerance is not None
                                  else float("nan")), auc_measurable=False)
    return out
