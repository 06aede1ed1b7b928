"""``gamma="auto"``: DeepClean's threshold chosen from held-out data, without a gold model.

The paper picks gamma by hand (Shi et al., arXiv 2311.10448, section 6, limitation 1: 1.1 for
random samples, 2.0 for a class), and the right value changes with seed, model and data (issue 11:
on digits, class forgetting at gamma 2.0 resets 0.83 % of the weights and keeps Acc_Df at 98 %
where gold has 0 %). Here gamma is chosen so that **D_f becomes indistinguishable from held-out
samples drawn like D_f** while **accuracy on held-out samples of the retained classes stays within
a tolerance of the original's**, judged by :func:`deepclean.evaluation.verdict.forgetting_verdict`.

The search (:func:`search_gamma`, driven by :func:`auto_gamma`):

1. **Candidates by reset share, from the Fisher pair already computed** (never recomputed):
   the ratio ``r = I_Df / I_Dr`` over every weight (zero-denominator rule of
   :mod:`deepclean.selection`) is sorted once; the grid :data:`DEFAULT_SHARES` of reset shares
   (0.25 % to 32 %, doubling) maps to thresholds ``gamma_s`` with ``share(r > gamma_s) <= s``
   (:func:`gammas_for_shares`).
2. **Bisection on "forgotten"** over the grid: resetting more weights forgets more, so the
   smallest share at which D_f looks like held-out data is found with ``ceil(log2(9)) = 3``
   evaluations for 8 shares (``max_candidates``, default 3).
3. **Each candidate**: a copy of the model, reset at ``gamma_s``, fine-tuned like DeepClean (same
   mask rule, Adam, cosine, lr, batch size, BatchNorm policy) for a *short* run of
   ``steps_per_candidate`` steps on a fixed random subset of D_r, then scored on small slices:
   at most ``eval_size`` samples of D_f, of held-out samples matched to D_f's label mix
   (:func:`deepclean.evaluation.verdict.matched_holdout`) and of held-out samples of the retained classes.
4. **Choice** (:func:`choose_candidate`): among candidates that are forgotten *and* keep utility,
   the smallest reset share (the largest gamma: the least change to the model); if none passes,
   the one with the smallest total excess ``forget_excess + utility_excess`` (each excess is a
   distance divided by its tolerance; <= 1 passes). The total, like the Avg. Gap the field
   reports, lets a small loss on one side buy a larger gain on the other; the worst excess
   (``max``) took larger resets on random forgetting, measured in ``docs/autogamma.md``.
5. If the original model already looks forgotten on the slices (e.g. it memorised too little for
   random forgetting to mean anything, :func:`deepclean.evaluation.memorisation.memorisation`), no candidate is
   tried: the smallest share of the grid is taken.

**Cost.** A fixed-gamma DeepClean run costs the Fisher passes F plus ``S = epochs *
ceil(|D_r| / batch_size)`` fine-tune steps. The candidates together get at most
``floor(budget * S)`` steps (``budget`` default 0.4), split evenly, so the auto run costs at most
``F + (1 + budget) S`` steps plus evaluation forward passes over at most ``4 * eval_size`` samples
per candidate (model and original on the retained slice, model on the two others) and
``2 * eval_size`` for the original at the start; with the defaults that is below 1.5 times the
fixed run whenever ``eval_size`` forward passes cost less than a fine-tune step's share. The
counts are recorded in ``info_`` (``search_steps``, ``full_steps``, ``step_ratio``,
``eval_samples``). ``ZeroWeights`` (no fine-tune) scores the reset models directly: 0 search
steps.

**Data.** Only D_f, D_r and the held-out set given are read. :func:`auto_gamma_data` takes D_f and
D_r as data sets: when one is not in memory it is never read whole. Its labels are read once
(one pass through a ``DataLoader`` that keeps only the labels), the D_f slice the candidates are
scored on (at most ``eval_size`` samples) is read into memory by indexing the data set, and the
short fine-tunes stream their subset of D_r (a ``Subset``, read afresh each epoch); the held-out
set, small by design, is read whole. The held-out set must be samples the
original never trained on and not the test half that results are reported on (GUIDE.md section 9);
:func:`check_holdout_disjoint` refuses a held-out ``Subset`` that shares samples with D_f or D_r.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from deepclean.data.datasets import as_tensors, in_memory, stream_batches
from deepclean.errors import ConfigurationError, DataError
from deepclean.evaluation.memorisation import memorisation
from deepclean.evaluation.verdict import ForgettingVerdict, forgetting_verdict, matched_holdout
from deepclean.masking import masked_finetune
from deepclean.selection import mask_summary, select_weights

__all__ = [
    "DEFAULT_SHARES",
    "AutoGammaResult",
    "HeldoutScorer",
    "auto_gamma_data",
    "auto_gamma",
    "check_holdout_disjoint",
    "choose_candidate",
    "gammas_for_shares",
    "no_holdout_error",
    "ratio_vector",
    "search_gamma",
    "verdict_excess",
]

#: Reset shares (fractions of all trainable weights) the search brackets gamma with.
DEFAULT_SHARES: tuple[float, ...] = (0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32)

Evaluate = Callable[[float], dict[str, Any]]


@dataclass
class AutoGammaResult:
    """The outcome of the search.

    Attributes:
        gamma: the chosen threshold (> 0).
        candidates: one JSON-safe dict per candidate tried, in the order tried: ``gamma``,
            ``target_share``, ``share_reset`` (fractions), ``forget_excess``, ``utility_excess``,
            ``forgotten``, ``utility_kept``, the verdict's numbers and ``steps``.
        chosen: index into ``candidates`` of the choice, or None when none was tried.
        rule: one sentence: why this gamma.
        extra: further JSON-safe facts (cost counts, slices, memorisation).
    """

    gamma: float
    candidates: list[dict[str, Any]]
    chosen: int | None
    rule: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_info(self) -> dict[str, Any]:
        """JSON-safe dict for ``info_``."""
        return {"gamma": self.gamma, "chosen_index": self.chosen, "rule": self.rule,
                "candidates": self.candidates, **self.extra}


def no_holdout_error() -> ConfigurationError:
    """The error for ``gamma="auto"`` without held-out data (it names the fix)."""
    return ConfigurationError(
        "gamma='auto' chooses the threshold on held-out data and none was given; expected "
        "DeepClean(gamma='auto', holdout=TensorDataset(x, y)) with samples the original model "
        "never trained on (not the test half you report on), or a number such as gamma=1.1 "
        "(paper: random samples) or gamma=2.0 (paper: a class)"
    )


def ratio_vector(fisher_forget: dict[str, torch.Tensor],
                 fisher_retain: dict[str, torch.Tensor]) -> torch.Tensor:
    """The Fisher ratio ``I_Df / I_Dr`` of every weight, flattened (float64, CPU), in the order of
    ``fisher_forget``'s keys; ``+inf`` where ``I_f > 0 = I_r`` (selected at every gamma) and 0
    where ``I_f = I_r = 0`` (never selected), as :func:`deepclean.selection.select_weights` rules.

    Raises:
        MaskError: the two dictionaries do not match (checked by ``select_weights``).
    """
    select_weights(fisher_forget, fisher_retain, 1.0)  # validation only: keys, shapes, values
    keys = list(fisher_forget)
    retain = {k.removeprefix("module."): v for k, v in fisher_retain.items()}
    parts = []
    for k in keys:
        f = fisher_forget[k].detach().double().cpu().reshape(-1)
        r = retain[k.removeprefix("module.")].detach().double().cpu().reshape(-1)
        ratio = torch.where(r > 0, f / torch.where(r > 0, r, torch.ones_like(r)),
                            torch.where(f > 0, torch.full_like(f, math.inf), torch.zeros_like(f)))
        parts.append(ratio)
    return torch.cat(parts)


def gammas_for_shares(fisher_forget: dict[str, torch.Tensor],
                      fisher_retain: dict[str, torch.Tensor],
                      shares: Sequence[float] = DEFAULT_SHARES) -> list[float]:
    """A threshold per target reset share: ``gamma_s`` with ``share(r > gamma_s) <= s``.

    ``gamma_s`` is the ``(floor(s N) + 1)``-th largest ratio over the N weights, so the weights
    strictly above it are at most ``floor(s N)``; ties and zero ratios make the actual share
    smaller (it is measured after selection). Where that ratio is infinite (more than ``s N``
    weights serve only D_f) gamma is the largest finite ratio (or 1e300); where it is 0 gamma is
    half the smallest positive ratio (every weight with a positive ratio is selected).

    Args:
        shares: fractions in (0, 1), ascending.

    Returns:
        Finite gammas > 0, one per share (non-increasing).

    Raises:
        ConfigurationError: a share outside (0, 1) or not ascending.
    """
    shares = list(shares)
    if not shares or any(not (isinstance(s, (int, float)) and 0 < s < 1) for s in shares) or \
            shares != sorted(shares):
        raise ConfigurationError(f"shares must be ascending fractions in (0, 1), got {shares}")
    r = ratio_vector(fisher_forget, fisher_retain)
    desc = torch.sort(r, descending=True).values
    n = desc.numel()
    finite_pos = desc[torch.isfinite(desc) & (desc > 0)]
    largest_finite = float(finite_pos[0]) if finite_pos.numel() else 1e300
    smallest_pos = float(finite_pos[-1]) if finite_pos.numel() else 1e-300
    out = []
    for s in shares:
        k = min(math.floor(s * n), n - 1)
        g = float(desc[k])
        if math.isinf(g):
            g = largest_finite
        elif g <= 0:
            g = smallest_pos / 2
        out.append(max(g, 1e-300))
    return out


def verdict_excess(verdict: ForgettingVerdict) -> tuple[float, float]:
    """``(forget_excess, utility_excess)`` of a verdict: each distance divided by its tolerance
    (<= 1 passes), the forget excess the worst of the accuracy gap, the attack AUC's distance to
    0.5 (or the loss percentile's, for tiny sets) and, under class forgetting, the accuracy on the
    class; the utility excess the retained held-out accuracy drop (0 when not measured)."""
    m = verdict.metrics
    parts = [abs(m["acc_gap"]) / m["acc_tolerance"]]
    if not math.isnan(m["attack_auc"]):
        parts.append(abs(m["attack_auc"] - 0.5) / m["auc_tolerance"])
    else:
        half = max(m["loss_percentile_high"] - 0.5, 1e-12)
        parts.append(abs(m["loss_percentile"] - 0.5) / half)
    if verdict.scenario == "class":
        parts.append(max(m["acc_forget"], m["acc_holdout"]) / m["class_acc_tolerance"])
    drop = m.get("utility_drop", float("nan"))
    tol = m.get("utility_tolerance", float("nan"))
    utility = 0.0 if math.isnan(drop) or math.isnan(tol) else max(drop, 0.0) / tol
    return float(max(parts)), float(utility)


def choose_candidate(candidates: Sequence[dict[str, Any]]) -> tuple[int, str]:
    """The selection rule: ``(index, reason)``.

    Among candidates with ``forget_excess <= 1`` and ``utility_excess <= 1``, the one with the
    smallest ``share_reset`` (ties: larger gamma); if none passes, the smallest total excess
    ``forget_excess + utility_excess`` (ties: smaller share).

    Raises:
        ConfigurationError: no candidate.
    """
    if not candidates:
        raise ConfigurationError("choose_candidate needs at least one candidate")
    passing = [i for i, c in enumerate(candidates)
               if c["forget_excess"] <= 1.0 and c["utility_excess"] <= 1.0]
    if passing:
        i = min(passing, key=lambda j: (candidates[j]["share_reset"], -candidates[j]["gamma"]))
        return i, ("the smallest reset share at which D_f looks like held-out data and held-out "
                   "accuracy on the retained classes is kept")
    i = min(range(len(candidates)),
            key=lambda j: (candidates[j]["forget_excess"] + candidates[j]["utility_excess"],
                           candidates[j]["share_reset"]))
    return i, ("no candidate both forgot and kept utility; the best compromise (smallest total "
               "excess over the tolerances)")


def search_gamma(
    fisher_forget: dict[str, torch.Tensor],
    fisher_retain: dict[str, torch.Tensor],
    evaluate: Evaluate,
    *,
    shares: Sequence[float] = DEFAULT_SHARES,
    max_candidates: int = 3,
) -> AutoGammaResult:
    """Bisection over the reset-share grid on "forgotten", then :func:`choose_candidate`.

    Args:
        fisher_forget, fisher_retain: the Fisher pair DeepClean already computed (not recomputed).
        evaluate: ``gamma -> dict`` with at least ``forget_excess``, ``utility_excess`` (floats)
            and ``share_reset`` (the share actually reset); any further JSON-safe entries are
            kept. Called at most ``max_candidates`` times, never twice for one gamma.
        shares: the ascending grid of target reset shares.
        max_candidates: the most candidates evaluated (>= 1).

    Returns:
        An :class:`AutoGammaResult`; each candidate dict also has ``gamma`` and ``target_share``.

    Raises:
        ConfigurationError: ``max_candidates < 1`` or a bad grid.
    """
    if not isinstance(max_candidates, int) or isinstance(max_candidates, bool) or \
            max_candidates < 1:
        raise ConfigurationError(f"max_candidates must be an int >= 1, got {max_candidates!r}")
    gammas = gammas_for_shares(fisher_forget, fisher_retain, shares)
    lo, hi = -1, len(gammas)
    tried: list[dict[str, Any]] = []
    seen: dict[float, dict[str, Any]] = {}
    while len(tried) < max_candidates and hi - lo > 1:
        mid = (lo + hi) // 2
        g = gammas[mid]
        if g in seen:  # the same threshold as a neighbour (ties): same outcome
            rec = seen[g]
        else:
            rec = dict(evaluate(g))
            rec.update(gamma=g, target_share=float(shares[mid]))
            rec["forgotten"] = bool(rec["forget_excess"] <= 1.0)
            rec["utility_kept"] = bool(rec["utility_excess"] <= 1.0)
            tried.append(rec)
            seen[g] = rec
        if rec["forget_excess"] <= 1.0:
            hi = mid
        else:
            lo = mid
    index, rule = choose_candidate(tried)
    return AutoGammaResult(gamma=float(tried[index]["gamma"]), candidates=tried, chosen=index,
                           rule=rule)


class HeldoutScorer:
    """Scores a candidate model on small slices, prepared once.

    Slices (each at most ``eval_size``, drawn with ``torch.Generator().manual_seed(seed)``): D_f;
    held-out samples matched to D_f's label mix; held-out samples of the retained classes (labels
    present in D_r), disjoint from the matched slice where the held-out set allows. The scenario
    is ``"class"`` when D_f's labels do not occur in D_r, else ``"sample"``.

    Raises:
        DataError: the held-out set is empty, has labels the model cannot output, or lacks a
            class of D_f.
    """

    def __init__(self, holdout: Dataset, xf: torch.Tensor | Dataset, yf: torch.Tensor,
                 yr: torch.Tensor, original: nn.Module, *, eval_size: int, seed: int,
                 device: torch.device | str | None) -> None:
        xh, yh = as_tensors(holdout)
        gen = torch.Generator().manual_seed(seed)
        forget_classes = set(yf.tolist())
        retain_classes = set(yr.tolist())
        self.scenario = "sample" if forget_classes & retain_classes else "class"
        fi = torch.randperm(len(yf), generator=gen)[:eval_size]
        if isinstance(xf, torch.Tensor):
            xfs, yfs = xf[fi], yf[fi]
        else:  # a data set not in memory: only the slice is read
            xfs, yfs = as_tensors(Subset(xf, fi.tolist()))
        if xh.shape[1:] != xfs.shape[1:]:
            raise DataError(f"held-out samples have shape {tuple(xh.shape[1:])} but D_f samples "
                            f"{tuple(xfs.shape[1:])}; expected the same input shape")
        mi = matched_holdout(yh, yf, seed=seed)
        mi = mi[torch.randperm(len(mi), generator=gen)[:eval_size]]
        rest = torch.ones(len(yh), dtype=torch.bool)
        rest[mi] = False
        in_retained = torch.tensor([int(v) in retain_classes for v in yh.tolist()])
        pool = torch.nonzero(rest & in_retained).squeeze(1)
        if pool.numel() == 0:
            pool = torch.nonzero(in_retained).squeeze(1)
        ri = pool[torch.randperm(len(pool), generator=gen)[:eval_size]]
        self.forget = TensorDataset(xfs, yfs)
        self.matched = TensorDataset(xh[mi], yh[mi])
        self.retained = TensorDataset(xh[ri], yh[ri]) if ri.numel() else None
        self.original = original
        self.device = device
        self.seed = seed
        self.sizes = {"forget": len(fi), "matched_holdout": len(mi), "retained_holdout": len(ri),
                      "holdout": len(yh)}
        self.eval_samples = 0

    def verdict(self, model: nn.Module, *, with_original: bool = True) -> ForgettingVerdict:
        """The verdict of ``model`` on the slices (``match=False``: the slices are matched)."""
        n = self.sizes["forget"] + self.sizes["matched_holdout"] + self.sizes["retained_holdout"]
        self.eval_samples += n + (self.sizes["retained_holdout"] if with_original else 0)
        return forgetting_verdict(
            model, self.forget, self.matched,
            original=self.original if with_original else None,
            retained_holdout=self.retained if with_original else None,
            scenario=self.scenario, match=False, seed=self.seed, device=self.device)

    def __call__(self, model: nn.Module) -> dict[str, Any]:
        v = self.verdict(model)
        fe, ue = verdict_excess(v)
        m = v.metrics
        keep = ("acc_forget", "acc_holdout", "acc_gap", "attack_auc", "loss_percentile",
                "acc_retained_holdout", "original_acc_retained_holdout", "utility_drop")
        return {"forget_excess": fe, "utility_excess": ue,
                **{k: (None if math.isnan(m[k]) else float(m[k])) for k in keep}}


def auto_gamma(
    model: nn.Module,
    fisher_forget: dict[str, torch.Tensor],
    fisher_retain: dict[str, torch.Tensor],
    xf: torch.Tensor, yf: torch.Tensor, xr: torch.Tensor, yr: torch.Tensor,
    *,
    holdout: Dataset | None,
    epochs: int,
    lr: float,
    batch_size: int,
    bn_stats: str,
    seed: int,
    device: torch.device | str,
    budget: float = 0.4,
    max_candidates: int = 3,
    eval_size: int = 256,
    shares: Sequence[float] = DEFAULT_SHARES,
    scorer: Callable[[nn.Module], dict[str, Any]] | None = None,
    loader_options: dict[str, Any] | None = None,
) -> AutoGammaResult:
    """Choose DeepClean's gamma on held-out data (module docstring: search, cost, data).

    Args:
        model: the original model (its private copy inside DeepClean); never modified: every
            candidate works on a deep copy.
        fisher_forget, fisher_retain: the Fisher pair already computed.
        xf, yf: D_f inputs ``(N_f, ...)`` and labels ``(N_f,)``; xr, yr: D_r likewise. ``xf`` and
            ``xr`` may instead be the data sets themselves (with their labels as ``yf``, ``yr``):
            see :func:`auto_gamma_data`.
        holdout: held-out ``(x, y)`` samples the original never trained on.
        epochs, lr, batch_size, bn_stats: DeepClean's fine-tune settings (the short runs use the
            same lr, batch size and BatchNorm policy); ``epochs = 0`` (ZeroWeights) scores the
            reset models without a fine-tune.
        seed: seeds the D_r subset, the slices and the short fine-tunes' shuffling.
        budget: share of the full fine-tune's steps all candidates may use together (0 to 0.5).
        max_candidates: candidates evaluated at most (>= 1).
        eval_size: largest slice of D_f / matched held-out / retained held-out per evaluation.
        shares: the grid of target reset shares.
        scorer: replaces :class:`HeldoutScorer` (tests); ``model -> dict`` with
            ``forget_excess`` and ``utility_excess``.
        loader_options: ``DataLoader`` options (``num_workers``, ``pin_memory``,
            ``persistent_workers``) of the short fine-tunes when ``xr`` is a data set.

    Returns:
        An :class:`AutoGammaResult` whose ``extra`` holds ``scenario``, ``slices``,
        ``memorisation`` (of the original on the D_f and matched slices), ``steps_per_candidate``,
        ``search_steps``, ``full_steps``, ``step_ratio`` (search / full), ``eval_samples``.

    Raises:
        ConfigurationError: no held-out data (:func:`no_holdout_error`), ``budget`` outside
            [0, 0.5], ``max_candidates`` < 1 or ``eval_size`` < 1.
        DataError: a held-out set that does not fit (see :class:`HeldoutScorer`).
    """
    if holdout is None and scorer is None:
        raise no_holdout_error()
    if not (isinstance(budget, (int, float)) and not isinstance(budget, bool)
            and 0 <= budget <= 0.5):
        raise ConfigurationError(f"auto_budget must be a number in [0, 0.5] (a share of the "
                                 f"fine-tune's steps), got {budget!r}")
    if not isinstance(eval_size, int) or isinstance(eval_size, bool) or eval_size < 1:
        raise ConfigurationError(f"auto_eval_size must be an int >= 1, got {eval_size!r}")
    n_r = int(yr.shape[0])
    steps_per_epoch = math.ceil(n_r / batch_size)
    full_steps = epochs * steps_per_epoch
    steps = math.floor(budget * full_steps) // max(int(max_candidates), 1)
    sub_epochs, sub_n = _short_run(steps, n_r, batch_size)
    steps = sub_epochs * math.ceil(sub_n / batch_size) if sub_n else 0
    sub = torch.randperm(n_r, generator=torch.Generator().manual_seed(seed + 17))[:sub_n]
    if isinstance(xr, torch.Tensor):
        xs, ys, options = xr[sub], yr[sub], {}
    else:  # streamed: the subset is read afresh in every epoch of each short fine-tune
        xs, ys, options = Subset(xr, sub.tolist()), None, dict(loader_options or {})

    extra: dict[str, Any] = {"full_steps": full_steps, "steps_per_candidate": steps,
                             "budget": float(budget), "max_candidates": int(max_candidates)}
    if scorer is None:
        held = HeldoutScorer(holdout, xf, yf, yr, model, eval_size=eval_size, seed=seed,
                             device=device)
        scorer = held
        extra.update(scenario=held.scenario, slices=held.sizes)
        base = held.verdict(model, with_original=False)
        mem = memorisation(model, held.forget, held.matched, device=device, seed=seed)
        extra["memorisation"] = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                                 for k, v in mem.items()}
        extra["original_verdict"] = base.summary_line()
        if base.forgotten or (held.scenario == "sample" and mem["too_small_for_random_forgetting"]):
            g = gammas_for_shares(fisher_forget, fisher_retain, shares)[0]
            extra.update(search_steps=0, step_ratio=0.0, eval_samples=held.eval_samples)
            return AutoGammaResult(
                gamma=g, candidates=[], chosen=None, extra=extra,
                rule=("the original already treats D_f like held-out data (memorisation too "
                      "small or nothing to forget): the smallest reset share of the grid"))

    def evaluate(gamma: float) -> dict[str, Any]:
        work = copy.deepcopy(model)
        mask = select_weights(fisher_forget, fisher_retain, gamma)
        params = dict(work.named_parameters())
        with torch.no_grad():
            for name, m in mask.items():
                params[name].masked_fill_(m.to(params[name].device), 0.0)
        selected, total = mask_summary(mask)
        if steps:
            masked_finetune(work, mask, xs, ys, epochs=sub_epochs, lr=lr, batch_size=batch_size,
                            generator=torch.Generator().manual_seed(seed * 1_000_003 + 29),
                            device=device, bn_stats=bn_stats, progress=False, **options)
        work.eval()
        rec = dict(scorer(work))
        rec.update(share_reset=selected / total, n_reset=selected, steps=steps)
        return rec

    result = search_gamma(fisher_forget, fisher_retain, evaluate, shares=shares,
                          max_candidates=max_candidates)
    search_steps = steps * len(result.candidates)
    extra.update(search_steps=search_steps,
                 step_ratio=(search_steps / full_steps) if full_steps else 0.0,
                 eval_samples=getattr(scorer, "eval_samples", None))
    result.extra = extra
    return result


def auto_gamma_data(
    model: nn.Module,
    fisher_forget: dict[str, torch.Tensor],
    fisher_retain: dict[str, torch.Tensor],
    forget: Dataset,
    retain: Dataset,
    *,
    loader_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> AutoGammaResult:
    """:func:`auto_gamma` on D_f and D_r given as data sets (keywords as there).

    Both in memory (``TensorDataset`` or ``Subset`` of one): exactly :func:`auto_gamma` on their
    tensors. Otherwise neither is read whole: their labels are read once through a
    ``DataLoader`` (only the labels kept), the scored D_f slice (at most ``eval_size`` samples)
    by indexing, and the short fine-tunes stream their subset of D_r with ``loader_options``.
    """
    if in_memory(forget) and in_memory(retain):
        return auto_gamma(model, fisher_forget, fisher_retain, *as_tensors(forget),
                          *as_tensors(retain), **kwargs)
    options = dict(loader_options or {})
    yf = _labels(forget, options.get("num_workers", 0))
    yr = _labels(retain, options.get("num_workers", 0))
    return auto_gamma(model, fisher_forget, fisher_retain, forget, yf, retain, yr,
                      loader_options=options, **kwargs)


def _labels(ds: Dataset, num_workers: int) -> torch.Tensor:
    """The labels of a data set: sliced when in memory, else read in one streamed pass."""
    if in_memory(ds):
        return as_tensors(ds)[1]
    return torch.cat([y for _, y in stream_batches(ds, batch_size=256,
                                                   num_workers=num_workers)])


def _short_run(steps: int, n: int, batch_size: int) -> tuple[int, int]:
    """``(epochs, subset size)`` for at most ``steps`` steps: one pass over ``steps * batch_size``
    samples of D_r, or whole passes over D_r when that is more than D_r."""
    if steps <= 0:
        return 0, 0
    if steps * batch_size <= n:
        return 1, steps * batch_size
    per_epoch = math.ceil(n / batch_size)
    return max(1, steps // per_epoch), n


def check_holdout_disjoint(holdout: Dataset, forget: Dataset, retain: Dataset) -> None:
    """Raise if the held-out set is D_f or D_r itself, or a ``Subset`` view of the same data set
    sharing samples with them (held-out data must be unseen by the original).

    Raises:
        DataError: the overlap (which set, how many, the first indices).
    """
    for label, other in (("D_f", forget), ("D_r", retain)):
        if holdout is other:
            raise DataError(f"the held-out set is the same object as {label}; expected samples "
                            "the original model never trained on")
        a, b = _root(holdout), _root(other)
        if a is None or b is None or a[0] is not b[0]:
            continue
        shared = sorted(set(a[1]) & set(b[1]))
        if shared:
            raise DataError(
                f"the held-out set shares {len(shared)} samples with {label} (indices "
                f"{shared[:5]}); expected samples the original model never trained on, e.g. "
                "training images outside the original's training subset")


def _root(ds: Dataset) -> tuple[Dataset, list[int]] | None:
    if not isinstance(ds, Subset):
        return None
    indices = [int(i) for i in ds.indices]
    base = ds.dataset
    while isinstance(base, Subset):
        indices = [int(base.indices[i]) for i in indices]
        base = base.dataset
    return base, indices
