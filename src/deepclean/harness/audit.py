"""The audit record of an unlearning: what was forgotten, how, with what effect, when, by what.

A record is a JSON-ready dict (:func:`audit_record`) written as ``<name>.json`` and as readable
text ``<name>.txt`` (:func:`write_audit`), both atomically. It holds

- what was forgotten: the forget indices, or only their SHA-256 and count when asked not to store
  them (``store_indices=False``);
- the method and its hyperparameters;
- SHA-256 hashes of the model's state before and after (:func:`deepclean.checkpoint.state_digest`)
  and the number of weights (parameter entries) that changed, plus the number of buffer entries
  (BatchNorm statistics) that changed;
- the metrics: against the gold model when one is given (the unlearned model's and the gold
  model's accuracies on D_f, D_r and test, their MIA, and the gaps), otherwise against the test
  set as the never-seen reference (accuracy on D_f minus accuracy on test; the MIA share of D_f
  called member, to be compared with the share of test samples called member);
- the start and end times (UTC) and the duration of the unlearning step;
- the versions of DeepClean, torch and Python, and the platform.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepclean._digest import indices_digest
from deepclean._version import __version__
from deepclean.checkpoint import atomic_write_text, state_digest, strip_module_prefix
from deepclean.errors import ConfigurationError
from deepclean.evaluation.evaluate import paper_metrics
from deepclean.evaluation.metrics import accuracy, entropy_mia, predict_proba
from deepclean.validation import unwrap_model

__all__ = [
    "audit_record",
    "write_audit",
    "format_audit",
    "count_changed",
    "evaluate_for_audit",
    "indices_digest",
    "utc_now",
    "AUDIT_VERSION",
]

AUDIT_VERSION = 1


def utc_now() -> str:
    """The current time in UTC, ISO 8601 with seconds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _state(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:

    if isinstance(model_or_state, nn.Module):
        return strip_module_prefix(unwrap_model(model_or_state).state_dict())
    return strip_module_prefix(dict(model_or_state))


def count_changed(
    before: nn.Module | Mapping[str, torch.Tensor],
    after: nn.Module | Mapping[str, torch.Tensor],
) -> dict[str, int]:
    """How many entries differ between two models of the same architecture.

    Returns:
        ``weights_changed`` and ``weights_total`` (parameter entries), ``buffer_entries_changed``
        (floating buffers such as BatchNorm statistics), ``tensors_changed`` (parameter tensors with
        at least one changed entry). Parameters are told from buffers by ``named_parameters`` when
        modules are given; with plain state dicts every floating tensor counts as a weight.

    Raises:
        ConfigurationError: the two have different names or shapes.
    """
    a, b = _state(before), _state(after)
    if set(a) != set(b):
        raise ConfigurationError(
            "the models before and after differ in their tensor names "
            f"({sorted(set(a) ^ set(b))[:5]}); expected the same architecture"
        )
    if isinstance(before, nn.Module):

        params = {n for n, _ in unwrap_model(before).named_parameters()}
    else:
        params = {n for n, t in a.items() if t.is_floating_point()}
    out = {"weights_changed": 0, "weights_total": 0, "buffer_entries_changed": 0,
           "tensors_changed": 0}
    for name in sorted(a):
        x, y = a[name].detach().cpu(), b[name].detach().cpu()
        if x.shape != y.shape:
            raise ConfigurationError(
                f"{name}: shape {tuple(x.shape)} before and {tuple(y.shape)} after; expected the "
                "same architecture"
            )
        if x.is_floating_point():  # NaN != NaN would count as a change; compare bit patterns
            diff = int((x != y).logical_and(~(x.isnan() & y.isnan())).sum())
        else:
            diff = int((x != y).sum())
        if name in params:
            out["weights_total"] += x.numel()
            out["weights_changed"] += diff
            out["tensors_changed"] += int(diff > 0)
        elif x.is_floating_point():
            out["buffer_entries_changed"] += diff
    return out


def _versions() -> dict[str, str]:

    return {
        "deepclean": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def audit_record(
    *,
    before: nn.Module | Mapping[str, torch.Tensor],
    after: nn.Module | Mapping[str, torch.Tensor],
    forget_indices: Sequence[int] | torch.Tensor,
    n_train: int | None = None,
    method: str | Any,
    hyperparameters: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    gold_metrics: Mapping[str, float] | None = None,
    reference_metrics: Mapping[str, float] | None = None,
    started_at: str | None = None,
    finished_at: str | None = None,
    duration_s: float | None = None,
    store_indices: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the audit record of one unlearning (no file is written; see :func:`write_audit`).

    Usable without a gold model: pass ``metrics`` of the unlearned model (``acc_forget``,
    ``acc_test``, optionally ``acc_retain`` and ``mia``) and leave ``gold_metrics`` out; the record
    then compares D_f with the test set, the never-seen reference (``acc_forget - acc_test``, and
    ``reference_metrics`` such as the MIA share of test samples called member, when given).
    :func:`deepclean.harness.audit.evaluate_for_audit` computes those metrics from data.

    Args:
        before: the model (or state dict) that was unlearned.
        after: the unlearned model (or state dict).
        forget_indices: the training-set indices forgotten.
        n_train: the training-set size (makes the hash equal to ``ForgetSplit.digest``).
        method: a method name, or an :class:`deepclean.Unlearner` (its name and hyperparameters
            are read from it).
        hyperparameters: the method's hyperparameters (default: read from ``method``).
        metrics: the unlearned model's metrics (accuracies in %, MIA in %).
        gold_metrics: the gold model's metrics on the same split, if a gold model exists.
        reference_metrics: further never-seen-reference values (used without a gold model).
        started_at, finished_at: UTC ISO times of the unlearning step (default: now).
        duration_s: seconds of the unlearning step.
        store_indices: ``False`` keeps only the SHA-256 and the count of the forget indices.
        extra: more JSON-ready facts to record (e.g. the data set, the seed, file paths).

    Returns:
        The record, a JSON-ready dict.
    """
    if not isinstance(method, str):
        name = getattr(method, "name", type(method).__name__)
        if hyperparameters is None and hasattr(method, "hyperparameters"):
            hyperparameters = method.hyperparameters()
        info = getattr(method, "info_", {}) or {}
    else:
        name, info = method, {}
    idx = torch.as_tensor(forget_indices, dtype=torch.int64).flatten().sort().values
    forgotten: dict[str, Any] = {
        "count": int(idx.numel()),
        "sha256": indices_digest(idx, n_train),
        "sha256_of": "f'{n_train}:' + sorted int64 indices" if n_train is not None
        else "sorted int64 indices",
        "n_train": n_train,
        "indices_stored": bool(store_indices),
    }
    if store_indices:
        forgotten["indices"] = idx.tolist()
    a, b = _state(before), _state(after)
    now = utc_now()
    record: dict[str, Any] = {
        "audit_version": AUDIT_VERSION,
        "forgotten": forgotten,
        "method": {
            "name": name,
            "hyperparameters": dict(hyperparameters or {}),
            "info": {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))},
        },
        "model": {
            "sha256_before": state_digest(a),
            "sha256_after": state_digest(b),
            **count_changed(before, after),
        },
        "times": {
            "started_at": started_at or now,
            "finished_at": finished_at or now,
            "duration_s": duration_s,
        },
        "versions": _versions(),
    }
    evaluation: dict[str, Any] = {"metrics": dict(metrics or {})}
    if gold_metrics is not None:
        evaluation["reference"] = "gold model (retrained from scratch on D_r)"
        evaluation["gold_metrics"] = dict(gold_metrics)
        evaluation["gaps_to_gold"] = {
            f"d_{k}": float(metrics[k]) - float(gold_metrics[k])
            for k in (metrics or {}) if k in gold_metrics
        }
    else:
        evaluation["reference"] = "test set (never seen in training), no gold model"
        m = dict(metrics or {})
        if "acc_forget" in m and "acc_test" in m:
            evaluation["acc_forget_minus_acc_test"] = float(m["acc_forget"]) - float(m["acc_test"])
        if reference_metrics:
            evaluation["reference_metrics"] = dict(reference_metrics)
    record["evaluation"] = evaluation
    if extra:
        record["context"] = dict(extra)
    return record


@torch.no_grad()
def evaluate_for_audit(
    model: nn.Module,
    *,
    x_forget: torch.Tensor,
    y_forget: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    x_retain: torch.Tensor | None = None,
    y_retain: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """Metrics of ``model`` with the test set as the never-seen reference (no gold model needed).

    Returns:
        ``(metrics, reference_metrics)``: ``acc_forget``, ``acc_test`` (and ``acc_retain``,
        ``mia`` when D_r is given: the share of D_f called member by the entropy attack fitted on
        D_r against test); the reference holds ``mia_test_half``: the same attack fitted on D_r
        against one half of the test set and applied to the other half, i.e. the share that a
        never-seen sample is called member (what D_f should score after unlearning).
    """

    p_f = predict_proba(model, x_forget, device=device)
    p_t = predict_proba(model, x_test, device=device)
    metrics = {"acc_forget": accuracy(p_f, y_forget), "acc_test": accuracy(p_t, y_test)}
    reference: dict[str, float] = {}
    if x_retain is not None and y_retain is not None:
        p_r = predict_proba(model, x_retain, device=device)
        metrics = paper_metrics(p_r, y_retain, p_f, y_forget, p_t, y_test)
        half = p_t.shape[0] // 2
        if half >= 1:
            reference["mia_test_half"] = entropy_mia(p_r, p_t[:half], p_t[half:])
    return metrics, reference


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_audit(record: Mapping[str, Any]) -> str:
    """The record as readable text (one fact per line)."""
    f, m, mod, t, v = (record["forgotten"], record["method"], record["model"], record["times"],
                       record["versions"])
    ev = record.get("evaluation", {})
    lines = [
        "DeepClean unlearning audit record",
        "=================================",
        "",
        "What was forgotten",
        f"  samples forgotten:      {f['count']} (of {f.get('n_train')} training samples)",
        f"  SHA-256 of the indices: {f['sha256']}",
    ]
    if f.get("indices_stored"):
        shown = f.get("indices", [])
        more = f" ... ({len(shown) - 50} more in the JSON record)" if len(shown) > 50 else ""
        lines.append(f"  indices:                {shown[:50]}{more}")
    else:
        lines.append("  indices:                not stored (only their hash), as requested")
    lines += ["", "Method", f"  name:                   {m['name']}"]
    for key, value in sorted(m.get("hyperparameters", {}).items()):
        lines.append(f"  {key + ':':24s}{_fmt(value)}")
    for key, value in sorted(m.get("info", {}).items()):
        lines.append(f"  {key + ':':24s}{_fmt(value)}")
    lines += [
        "",
        "Model",
        f"  SHA-256 before:         {mod['sha256_before']}",
        f"  SHA-256 after:          {mod['sha256_after']}",
        f"  weights changed:        {mod['weights_changed']} of {mod['weights_total']}"
        f" (in {mod['tensors_changed']} parameter tensors)",
        f"  buffer entries changed: {mod['buffer_entries_changed']}",
        "",
        "Evaluation",
        f"  reference:              {ev.get('reference')}",
    ]
    for key, value in sorted(ev.get("metrics", {}).items()):
        lines.append(f"  {key + ':':24s}{_fmt(value)}")
    for group in ("gold_metrics", "gaps_to_gold", "reference_metrics"):
        for key, value in sorted(ev.get(group, {}).items()):
            lines.append(f"  {group.split('_')[0]} {key + ':':19s}{_fmt(value)}")
    if "acc_forget_minus_acc_test" in ev:
        lines.append(f"  acc_forget - acc_test:  {_fmt(ev['acc_forget_minus_acc_test'])}")
    if isinstance(ev.get("verdict"), Mapping):
        lines.append(f"  forgetting verdict:     {ev['verdict'].get('summary')}")
    if isinstance(m.get("auto_gamma"), Mapping):
        lines.insert(lines.index("Model") - 1,
                     f"  gamma chosen (auto):    {_fmt(m['auto_gamma'].get('gamma'))} "
                     f"({m['auto_gamma'].get('rule')})")
    lines += [
        "",
        "Times (UTC)",
        f"  started:                {t['started_at']}",
        f"  finished:               {t['finished_at']}",
        f"  unlearning took:        {_fmt(t.get('duration_s'))} s",
        "",
        "Versions",
    ]
    for key, value in v.items():
        lines.append(f"  {key + ':':24s}{value}")
    context = record.get("context", {})
    if context:
        lines += ["", "Context"]
        for key, value in sorted(context.items()):
            lines.append(f"  {key + ':':24s}{_fmt(value)}")
    return "\n".join(lines) + "\n"


def write_audit(record: Mapping[str, Any], folder: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``<folder>/<name>.txt`` then ``<folder>/<name>.json``, each atomically.

    Returns:
        The two paths ``(json_path, text_path)``.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigurationError(f"audit folder {folder} is a file; expected a folder")
    text_path, json_path = folder / f"{name}.txt", folder / f"{name}.json"
    atomic_write_text(text_path, format_audit(record))
    atomic_write_text(json_path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return json_path, text_path

