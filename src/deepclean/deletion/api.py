"""Unlearn a deletion request from one's own model and data, and verify it without a gold model.

:func:`forget` runs an unlearning method (DeepClean by default) on a model, its training data and
the ids to forget, and returns the unlearned model with a verification record; :func:`verify`
builds that record for any pair of models (before, after).

What the record measures (GUIDE.md section 9). Nobody who receives a deletion request has the
gold model (retrained without D_f). What can be measured is D_f against *held-out samples drawn
like D_f*, matched in label mix by :func:`deepclean.evaluation.verdict.matched_holdout`: the gold model never
saw either, so an unlearned model must treat them alike. Per model (original and unlearned):
accuracy on D_f, on the matched held-out samples and on D_r; the membership-inference family of
:func:`deepclean.evaluation.mia.mia_family` with the matched held-out samples as non-members (LiRA needs
reference models retrained without D_f and is reported as not available); and the forgetting
verdict of :func:`deepclean.evaluation.verdict.forgetting_verdict` (accuracy gap, per-example attack AUC or,
for fewer than 10 samples, the loss percentile; class forgetting: accuracy near 0; utility on
held-out samples of the retained classes against the original's). Without held-out data the
record says what cannot be verified and ``verified`` is False; so does it when the original
model already passes the verdict (nothing measurable was memorised: the check cannot tell an
unlearned model from an unchanged one).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from deepclean.data import as_tensors
from deepclean.errors import ConfigurationError, DataError

__all__ = ["NOT_VERIFIABLE_WITHOUT_HOLDOUT", "default_gamma", "forget", "verify"]

#: What cannot be measured without held-out data (listed in the record and the report).
NOT_VERIFIABLE_WITHOUT_HOLDOUT = (
    ("whether D_f now looks like unseen data: accuracy on D_f against held-out samples drawn "
     "like it"),
    "the per-example attack AUC (D_f vs held-out samples)",
    "the membership-inference family (it needs non-members)",
    "utility: accuracy on held-out samples of the retained classes against the original's",
    "gamma='auto' (DeepClean chooses its threshold on held-out data)",
)
_LIRA_REASON = ("not available: LiRA needs reference models retrained without D_f (gold models), "
                "which a deletion request does not have")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _json_safe(value.item())
    return str(value)


def _data_and_ids(data: Any, forget_ids: Sequence[int | str]) -> tuple[torch.Tensor, torch.Tensor,
                                                                      list[int], Any]:
    """``(x, y, indices, user_data_or_None)``; resolves paths through a :class:`UserData`."""
    from deepclean.deletion.userdata import UserData, resolve_forget_ids

    if isinstance(data, UserData):
        return data.x, data.y, resolve_forget_ids(list(forget_ids), data), data
    x, y = as_tensors(data)
    if isinstance(forget_ids, torch.Tensor):
        forget_ids = forget_ids.flatten().tolist()
    if isinstance(forget_ids, (str, bytes)) or not isinstance(forget_ids, Sequence):
        raise DataError(f"forget_ids must be a sequence of row indices, got "
                        f"{type(forget_ids).__name__}; e.g. [3, 17]")
    proxy = UserData(TensorDataset(x, y), "tensors", "the data", tuple(
        str(k) for k in range(int(y.max()) + 1)))
    return x, y, resolve_forget_ids(list(forget_ids), proxy, source="forget_ids"), None


def _holdout_tensors(holdout: Any) -> tuple[torch.Tensor, torch.Tensor]:
    from deepclean.deletion.userdata import UserData

    if isinstance(holdout, UserData):
        return holdout.x, holdout.y
    return as_tensors(holdout)


#: Largest share of held-out samples that may be identical to training samples (natural duplicates
#: exist in image data sets; more means the held-out data is not held out).
MAX_HOLDOUT_OVERLAP = 0.01


def _sample_keys(x: torch.Tensor) -> list[bytes]:
    """One digest per sample ``x[i]`` of its exact values (identical samples, identical keys)."""
    flat = x.detach().reshape(len(x), -1).contiguous().cpu()
    return [hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest() for row in flat]


def check_holdout_overlap(x: torch.Tensor, forget_index: torch.Tensor,
                          x_holdout: torch.Tensor) -> int:
    """Refuse held-out data that is not held out, before any work: any held-out sample identical
    to a sample of D_f, or more than :data:`MAX_HOLDOUT_OVERLAP` of the held-out samples identical
    to training samples (a copy of the training data under another name).

    Args:
        x: the training inputs ``(N, ...)``; ``forget_index``: D_f's rows ``(N_f,)``;
        x_holdout: the held-out inputs ``(N_h, ...)``.

    Returns:
        The number of held-out samples identical to a training sample (within the allowance).

    Raises:
        DataError: held-out inputs of another shape than the training inputs, held-out samples
            equal to D_f samples, or too many equal to training samples.
    """
    if x_holdout.shape[1:] != x.shape[1:]:
        raise DataError(f"held-out inputs have shape {tuple(x_holdout.shape[1:])} but the data's "
                        f"are {tuple(x.shape[1:])}; preprocess both alike (same image size, "
                        "channels, normalisation)")
    train_keys = _sample_keys(x)
    forget_keys = {train_keys[i] for i in forget_index.tolist()}
    held = _sample_keys(x_holdout)
    in_forget = [i for i, k in enumerate(held) if k in forget_keys]
    if in_forget:
        raise DataError(
            f"the held-out data holds {len(in_forget)} sample(s) identical to samples of D_f "
            f"(held-out rows {in_forget[:5]}); held-out data must be samples the model never "
            "trained on, not the samples to forget")
    all_keys = set(train_keys)
    overlap = sum(k in all_keys for k in held)
    if overlap > MAX_HOLDOUT_OVERLAP * len(held):
        raise DataError(
            f"{overlap} of the {len(held)} held-out samples are identical to training samples "
            f"(more than {MAX_HOLDOUT_OVERLAP:.0%}); held-out data must be samples the model "
            "never trained on, e.g. a separate split, not a copy of the training data")
    return overlap


def _forgotten_classes(y: torch.Tensor, idx: torch.Tensor) -> list[int]:
    """Classes every sample of which is in D_f (class forgetting)."""
    yf = y[idx]
    out = []
    for k in torch.unique(yf).tolist():
        if int((yf == k).sum()) == int((y == k).sum()):
            out.append(int(k))
    return out


def default_gamma(scenario: str, holdout_given: bool) -> float | str:
    """DeepClean's threshold when none is given: ``"auto"`` with held-out data, else the paper's
    value (2.0 for a class, 1.1 for samples; Shi et al., arXiv 2311.10448, section 4)."""
    if holdout_given:
        return "auto"
    return 2.0 if scenario == "class" else 1.1


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Whether two models hold bitwise the same parameters and buffers (same names)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * float((logits.argmax(1) == y).double().mean()) if len(y) else float("nan")


def _place(model: nn.Module, device) -> tuple[nn.Module, torch.device]:
    from deepclean.training import resolve_device
    from deepclean.validation import unwrap_model

    model = unwrap_model(model)
    if device is None:
        first = next(model.parameters(), None)
        return model, first.device if first is not None else torch.device("cpu")
    dev = resolve_device(device)
    return model.to(dev), dev


def verify(
    original: nn.Module,
    unlearned: nn.Module,
    data: Dataset | Any,
    forget_ids: Sequence[int | str],
    holdout: Dataset | Any | None = None,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
    batch_size: int = 512,
    max_retain: int = 5000,
    acc_tolerance: float | None = None,
    auc_tolerance: float | None = None,
    utility_tolerance: float | None = None,
) -> dict[str, Any]:
    """The verification record of an unlearning: does ``unlearned`` treat D_f like unseen data?

    Args:
        original: the model before unlearning (logits ``(N, K)``); evaluated, not changed (with
            ``device`` it is moved there).
        unlearned: the model after unlearning, same architecture.
        data: the training data, a Dataset of ``(x, y)`` pairs or a
            :class:`deepclean.deletion.userdata.UserData`.
        forget_ids: row indices of D_f in ``data`` (or, for a ``UserData`` of a folder, image
            paths relative to it). One sample is valid.
        holdout: samples neither model trained on (a Dataset or ``UserData``), drawn like the
            training data and not the test half results are reported on; ``None``: the record
            lists what cannot be verified and ``verified`` is False.
        seed: seeds the matched held-out draw, the D_r sample and the attacks.
        device: where the forward passes run (``None``: where the models are).
        batch_size: inference batch size (does not change the result).
        max_retain: D_r samples (drawn with ``seed``) the D_r accuracy and the MIA family use.
        acc_tolerance, auc_tolerance, utility_tolerance: override the verdict's automatic
            tolerances (points of accuracy, AUC distance from 0.5, points of utility drop).

    Returns:
        A JSON-ready dict: ``verified`` (bool), ``status`` (``"verified"``, ``"not verified"`` or
        ``"cannot verify"``), ``summary`` (one line), ``scenario`` (``"class"`` or
        ``"sample"``), counts (``n_data``, ``n_forget``, ``n_retain``, ``n_holdout``,
        ``n_matched_holdout``, ``n_retained_holdout``), ``forgotten_classes``, ``models``
        (per ``"original"``/``"unlearned"``: ``acc_forget``, ``acc_retain_sample``,
        ``acc_matched_holdout``, ``attack_auc``, ``loss_percentile``, ``mia_family``; accuracies
        in %), ``verdict`` (:meth:`ForgettingVerdict.to_dict` of the unlearned model),
        ``original_verdict`` (the same for the original: if it already treats D_f like
        held-out data, nothing measurable was memorised, ``notes`` says so, and a passing
        verdict cannot tell the unlearned model from an unchanged one: ``verified`` is False,
        ``status`` ``"cannot verify"`` and the summary starts with ``CANNOT VERIFY``; if
        utility was lost too, ``status`` is ``"not verified"`` and the summary starts with
        ``CANNOT VERIFY, UTILITY LOST``), ``unchanged`` (the unlearned model's
        parameters and buffers are bitwise the original's: then ``verified`` is False whatever
        the verdict, and the summary starts with ``NOT UNLEARNED``), ``cannot_verify`` (list of
        strings) and ``notes``.

    Raises:
        DataError: empty or mismatched data, bad ids (unknown, out of range, duplicate), a
            held-out set whose inputs differ in shape from the data's, that lacks a class of
            D_f, holds samples of D_f, or is largely a copy of the training data.
        ConfigurationError: a bad seed, batch size or tolerance.
    """
    return _verify(original, unlearned, data, forget_ids, holdout, seed=seed, device=device,
                   batch_size=batch_size, max_retain=max_retain, acc_tolerance=acc_tolerance,
                   auc_tolerance=auc_tolerance, utility_tolerance=utility_tolerance)


def _verify(
    original: nn.Module,
    unlearned: nn.Module,
    data: Dataset | Any,
    forget_ids: Sequence[int | str],
    holdout: Dataset | Any | None = None,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
    batch_size: int = 512,
    max_retain: int = 5000,
    acc_tolerance: float | None = None,
    auc_tolerance: float | None = None,
    utility_tolerance: float | None = None,
    overlap: int | None = None,
) -> dict[str, Any]:
    """:func:`verify`; ``overlap`` is :func:`check_holdout_overlap`'s count when the caller has
    already checked this held-out set against these data (:func:`forget` does, before any work),
    else None (checked here)."""
    from deepclean.evaluation.metrics import predict_logits
    from deepclean.evaluation.mia import mia_family
    from deepclean.evaluation.verdict import forgetting_verdict, matched_holdout

    if not isinstance(max_retain, int) or isinstance(max_retain, bool) or max_retain < 2:
        raise ConfigurationError(f"max_retain must be an int >= 2, got {max_retain!r}")
    x, y, ids, _ = _data_and_ids(data, forget_ids)
    idx = torch.as_tensor(sorted(ids), dtype=torch.long)
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[idx] = False
    xf, yf = x[idx], y[idx]
    xr, yr = x[keep], y[keep]
    forgotten_classes = _forgotten_classes(y, idx)
    scenario = "class" if forgotten_classes and set(yf.tolist()) == set(forgotten_classes) \
        else "sample"
    original, dev = _place(original, device)
    unlearned, _ = _place(unlearned, dev if device is not None else None)
    gen = torch.Generator().manual_seed(seed)
    r_sample = torch.randperm(len(yr), generator=gen)[:max_retain].sort().values
    xr_s, yr_s = xr[r_sample], yr[r_sample]

    def logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return predict_logits(model, inputs, batch_size=batch_size, device=device)

    record: dict[str, Any] = {
        "n_data": len(y), "n_forget": len(yf), "n_retain": len(yr),
        "n_retain_sample": len(yr_s), "scenario": scenario,
        "forgotten_classes": forgotten_classes, "seed": seed, "notes": [],
    }
    models: dict[str, dict[str, Any]] = {}
    lf_all, lr_all = {}, {}
    for name, model in (("original", original), ("unlearned", unlearned)):
        lf_all[name], lr_all[name] = logits(model, xf), logits(model, xr_s)
        models[name] = {"acc_forget": _accuracy(lf_all[name], yf),
                        "acc_retain_sample": _accuracy(lr_all[name], yr_s)}
    record["models"] = models
    if holdout is None:
        record.update(
            verified=False, status="cannot verify", verdict=None, original_verdict=None,
            n_holdout=0, n_matched_holdout=0, n_retained_holdout=0,
            cannot_verify=list(NOT_VERIFIABLE_WITHOUT_HOLDOUT),
            summary=("CANNOT VERIFY: no held-out data given; measured only the accuracy on D_f "
                     f"({models['original']['acc_forget']:.1f} % before, "
                     f"{models['unlearned']['acc_forget']:.1f} % after) and on D_r. Pass held-out "
                     "samples the model never trained on to verify."))
        return _json_safe(record)

    xh, yh = _holdout_tensors(holdout)
    if overlap is None:
        overlap = check_holdout_overlap(x, idx, xh)
    if overlap:
        record["notes"].append(
            f"{overlap} held-out sample(s) are identical to training samples (duplicates in the "
            "data); they are kept")
    matched = matched_holdout(yh, yf, seed=seed)
    xm, ym = xh[matched], yh[matched]
    rh = torch.ones(len(yh), dtype=torch.bool)
    for k in forgotten_classes:
        rh &= yh != k
    retained = TensorDataset(xh[rh], yh[rh]) if bool(rh.any()) else None
    common: dict[str, Any] = {
        "retained_holdout": retained, "acc_tolerance": acc_tolerance,
        "auc_tolerance": auc_tolerance, "utility_tolerance": utility_tolerance, "seed": seed,
        "device": device, "batch_size": batch_size}
    forget_ds, holdout_ds = TensorDataset(xf, yf), TensorDataset(xh, yh)
    verdict = forgetting_verdict(unlearned, forget_ds, holdout_ds, original=original, **common)
    original_verdict = forgetting_verdict(original, forget_ds, holdout_ds, original=original,
                                          **common)
    for name, model, v in (("original", original, original_verdict),
                           ("unlearned", unlearned, verdict)):
        lm = logits(model, xm)
        mia = mia_family(lr_all[name], yr_s, lf_all[name], yf, lm, ym, seed=seed)
        if mia.get("lira") is None:
            mia["lira_reason"] = _LIRA_REASON
        models[name].update(
            acc_matched_holdout=_accuracy(lm, ym),
            acc_retained_holdout=v.metrics.get("acc_retained_holdout"),
            attack_auc=v.metrics.get("attack_auc"),
            loss_percentile=v.metrics.get("loss_percentile"),
            mia_family=mia)
    cannot = [_LIRA_REASON.replace("not available", "LiRA")]
    if len(yf) < 2:
        cannot.append("the loss attack (cross-validation needs 2 or more samples of D_f)")
    if retained is None:
        cannot.append("utility: the held-out data holds no sample of a retained class")
    unchanged = _same_weights(original, unlearned)
    if original_verdict.forgotten and verdict.forgotten:
        record["notes"].append(
            "the original model already treats D_f like held-out data (it memorised too little "
            "of D_f for forgetting to be measurable); the verdict cannot tell an unlearned model "
            "from an unchanged one here")
    elif original_verdict.forgotten:
        record["notes"].append(
            "the original model treated D_f like held-out data, and the unlearned model does "
            "not: D_f is now told apart from held-out data (the unlearning left a trace)")
    summary = verdict.summary_line()
    # the verdict passes for the original too: it cannot tell an unlearned model from an
    # unchanged one, so a pass proves nothing (status "cannot verify", never verified)
    indistinct = bool(verdict.passed) and bool(original_verdict.forgotten) and not unchanged
    if unchanged:  # whatever the verdict says, nothing was unlearned
        summary = ("NOT UNLEARNED: the model's weights and buffers are identical to the "
                   "original's; " + summary.split(": ", 1)[-1])
    elif indistinct:
        summary = ("CANNOT VERIFY: the original model already passes this check, so it cannot "
                   "tell an unlearned model from an unchanged one; " + summary.split(": ", 1)[-1])
    elif verdict.forgotten and bool(original_verdict.forgotten):
        # utility lost (a failure); "FORGOTTEN" would claim what the check cannot tell here
        summary = ("CANNOT VERIFY, UTILITY LOST: the original model already passes the "
                   "forgetting check, so it cannot tell an unlearned model from an unchanged one, "
                   "and held-out accuracy on the retained classes dropped; "
                   + summary.split(": ", 1)[-1])
    passed = bool(verdict.passed) and not unchanged and not indistinct
    record.update(
        verified=passed,
        status="verified" if passed else "cannot verify" if indistinct else "not verified",
        unchanged=unchanged, summary=summary, verdict=verdict.to_dict(),
        original_verdict=original_verdict.to_dict(), n_holdout=len(yh),
        n_matched_holdout=len(ym), n_retained_holdout=int(rh.sum()) if retained else 0,
        cannot_verify=cannot)
    return _json_safe(record)


def forget(
    model: nn.Module,
    data: Dataset | Any,
    forget_ids: Sequence[int | str],
    *,
    holdout: Dataset | Any | None = None,
    method: str = "deepclean",
    hyperparameters: Mapping[str, Any] | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
    batch_size: int = 512,
    num_workers: int = 0,
) -> tuple[nn.Module, dict[str, Any]]:
    """Unlearn the samples ``forget_ids`` of ``data`` from ``model`` and verify the result.

    Args:
        model: the trained classifier (logits ``(N, K)``); not modified.
        data: its training data, a Dataset of ``(x, y)`` pairs (float inputs ``(N, ...)``,
            integer labels ``(N,)``) or a :class:`deepclean.deletion.userdata.UserData`.
        forget_ids: row indices of D_f in ``data`` (for a ``UserData`` of a folder also image
            paths relative to it); D_r is every other sample. One sample is valid.
        holdout: samples the model never trained on, drawn like ``data`` (Dataset or
            ``UserData``); used by ``gamma="auto"`` and by :func:`verify`. ``None``: the record
            says what cannot be verified.
        method: a registered method (:func:`deepclean.available_methods`), default DeepClean.
        hyperparameters: the method's hyperparameters. For DeepClean and ZeroWeights an absent
            ``gamma`` becomes ``"auto"`` with a held-out set, else the paper's 1.1 (samples) or
            2.0 (a whole class); ``gamma="auto"`` receives ``holdout``.
        seed: seeds the method and the verification.
        device: where to unlearn and evaluate (``None``: where the model is; ``"auto"``: a GPU
            when there is one).
        progress: show the method's progress bars.
        batch_size: inference batch size of the verification.
        num_workers: ``DataLoader`` worker processes for methods that stream their data (those
            with a ``num_workers`` argument); an execution option that does not change results.

    Returns:
        ``(unlearned_model, record)``: a new model in eval mode, and the :func:`verify` record
        with ``unlearning`` added: ``method``, ``hyperparameters``, ``info`` (JSON values of the
        method's ``info_``, e.g. ``gamma``, ``share_reset``, ``auto_gamma``), ``gamma`` (the
        threshold used, or None), ``gamma_source`` (``"given"``, ``"auto"`` or ``"default"``),
        ``started_at``, ``finished_at`` (UTC ISO), ``duration_s`` and the weight counts of
        :func:`deepclean.harness.audit.count_changed`.

    Raises:
        ConfigurationError: an unknown method or hyperparameter, ``gamma="auto"`` without
            held-out data.
        DataError: bad ids (unknown, out of range, duplicate, every sample), data the model does
            not accept, a held-out set that lacks a class of D_f, holds samples of D_f or is
            largely a copy of the training data (:func:`check_holdout_overlap`); all before any
            unlearning.
    """
    from deepclean.harness.audit import count_changed, utc_now
    from deepclean.methods import make_method, method_class
    from deepclean.validation import unwrap_model

    x, y, ids, _ = _data_and_ids(data, forget_ids)
    base = TensorDataset(x, y)
    idx = sorted(ids)
    idx_set = set(idx)
    forget_set = Subset(base, idx)
    retain_set = Subset(base, [i for i in range(len(y)) if i not in idx_set])
    hp = dict(hyperparameters or {})
    for reserved in ("seed", "device", "progress", "holdout", "num_workers"):
        if reserved in hp:
            raise ConfigurationError(f"{reserved!r} is an argument of forget(), not a "
                                     "hyperparameter; pass it directly")
    cls = method_class(method)
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters)
    gamma_source = None
    if "gamma" in accepted:
        forgotten = _forgotten_classes(y, torch.as_tensor(idx, dtype=torch.long))
        scenario = "class" if forgotten and set(y[idx].tolist()) == set(forgotten) else "sample"
        if "gamma" not in hp:
            hp["gamma"] = default_gamma(scenario, holdout is not None)
            gamma_source = "auto" if hp["gamma"] == "auto" else "default"
        else:
            gamma_source = "auto" if hp["gamma"] == "auto" else "given"
    holdout_ds, overlap = None, None
    if holdout is not None:
        xh, yh = _holdout_tensors(holdout)
        overlap = check_holdout_overlap(x, torch.as_tensor(idx, dtype=torch.long), xh)  # first
        holdout_ds = TensorDataset(xh, yh)
    extra: dict[str, Any] = {"seed": seed, "progress": progress}
    if device is not None:
        extra["device"] = device
    if "num_workers" in accepted:
        extra["num_workers"] = num_workers
    if "holdout" in accepted and hp.get("gamma") == "auto":
        extra["holdout"] = holdout_ds
    unlearner = make_method(method, **hp, **extra)
    started, t0 = utc_now(), time.perf_counter()
    unlearned = unlearner.unlearn(model, forget_set, retain_set)
    duration = time.perf_counter() - t0
    finished = utc_now()
    work = unwrap_model(model)
    changes = count_changed(work, unlearned)
    record = _verify(work, unlearned, base, idx, holdout_ds, overlap=overlap, seed=seed,
                     device=device, batch_size=batch_size)
    info = _json_safe(dict(unlearner.info_))
    if changes["weights_changed"] == 0:
        reset = (f" (no weight's Fisher ratio I_Df / I_Dr exceeds gamma {info.get('gamma')}: "
                 "D_f's gradients are all but zero, as for samples fitted to a loss near 0; a "
                 "smaller gamma resets more)" if isinstance(info, dict) and info.get("n_reset") == 0
                 else "")
        record["notes"].append(f"{unlearner.name} changed no weight; the model is unchanged{reset}")
    record["unlearning"] = _json_safe({
        "method": unlearner.name, "summary": cls.summary, "reference": cls.reference,
        "hyperparameters": unlearner.hyperparameters(), "info": info,
        "gamma": info.get("gamma") if isinstance(info, dict) else None,
        "gamma_source": gamma_source, "started_at": started, "finished_at": finished,
        "duration_s": duration, **changes,
    })
    return unlearned, record
