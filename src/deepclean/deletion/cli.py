"""``deepclean forget`` and ``deepclean verify``: a deletion request on one's own model and data.

    deepclean forget --model SPEC --weights FILE --data SPEC (--forget FILE | --forget-class NAME)
                     [--holdout SPEC] [--method deepclean] [--gamma auto|FLOAT] [--hp NAME=VALUE]
                     [--out DIR] [--device auto|cpu|cuda|mps] [--seed N] [--no-store-indices]
                     [--num-workers N]
    deepclean verify --model SPEC --weights ORIGINAL --unlearned FILE --data SPEC
                     (--forget FILE | --forget-class NAME) --holdout SPEC [--out DIR]

``forget`` writes into ``--out`` (refused if it already holds results): ``unlearned.safetensors``
(the same key names and dtypes as ``--weights``, so it loads with ``strict=True`` wherever the
input did), ``audit.json`` and ``audit.txt``, ``verification.json`` and ``report.html``; every file
is staged in a temporary folder and moved into place only when all are complete. The input
weights file is only read (its SHA-256 is checked before and after).

Exit status: 0 verified (D_f now looks like held-out data and utility was kept), 3 not verified
or not verifiable (``NOT FORGOTTEN``, ``NOT UNLEARNED``, ``CANNOT VERIFY``: no ``--holdout``, or
the original model already treats D_f like held-out data, so the check cannot tell an unlearned
model from an unchanged one), 2 bad input, 1 a file system error.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from deepclean.errors import CheckpointError, ConfigurationError
from deepclean.validation import num_workers_argument, threads_argument

__all__ = [
    "EXIT_NOT_VERIFIED",
    "EXIT_VERIFIED",
    "RESULT_FILES",
    "add_parsers",
    "audit_mismatches",
    "render_report",
    "run_command",
]

RESULT_FILES = ("unlearned.safetensors", "audit.json", "audit.txt", "verification.json",
                "report.html")
EXIT_VERIFIED = 0
EXIT_NOT_VERIFIED = 3


# ------------------------------------------------------------------------------------ arguments


def _gamma(text: str) -> float | str:
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number > 0, got {text!r}") from exc
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number > 0, got {text!r}")
    return value


def _hp(text: str) -> tuple[str, Any]:
    if "=" not in text or not text.split("=", 1)[0].strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. epochs=1), got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _common(p: argparse.ArgumentParser, *, verify: bool) -> None:
    p.add_argument("--model", required=True, metavar="SPEC",
                   help="path/to/file.py:function or package.module:function (called with no "
                   "arguments), torchvision:NAME (outputs: --num-classes, default the classes "
                   "in the data), or resnet18, vgg16_bn, small_cnn (channels from the data, "
                   "classes from the data or --num-classes, --width)")
    p.add_argument("--weights", required=True, metavar="FILE",
                   help="the trained weights: .safetensors, or a .pt/.pth state dict (read with "
                   "torch.load(weights_only=True)); module. / _orig_mod. prefixes are accepted"
                   + ("; the original model's weights" if verify else ""))
    p.add_argument("--data", required=True, metavar="SPEC",
                   help="the training data: an ImageFolder folder, an .npz with x and y, or a "
                   "data set name (fashion-mnist[:train|:test], mnist, cifar10, cifar100, digits)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--forget", metavar="FILE",
                       help="what to forget: row indices into the data or (for a folder) image "
                       "paths relative to it; one per line, a JSON list, or CSV")
    which.add_argument("--forget-class", metavar="NAME",
                       help="forget every sample of this class (folder name or label number)")
    p.add_argument("--holdout", metavar="SPEC", required=verify,
                   help="data the model never trained on, same format and classes as --data "
                   "(not the test set you report on); used by --gamma auto and the verification")
    p.add_argument("--data-dir", help="folder of a built-in data set's files (data set names)")
    p.add_argument("--num-classes", type=_positive_int,
                   help="outputs of a torchvision:NAME, resnet18, vgg16_bn or small_cnn model "
                   "(default: the number of classes in --data); a file/module factory decides "
                   "its own")
    p.add_argument("--width", type=float, default=1.0,
                   help="channel-width multiplier of resnet18, vgg16_bn, small_cnn (default 1.0)")
    p.add_argument("--image-size", type=_positive_int, metavar="N",
                   help="resize folder images to N x N")
    p.add_argument("--grayscale", action="store_true", help="convert folder images to one channel")
    p.add_argument("--normalize", metavar="MEAN,STD",
                   help="per-channel normalisation in [0, 1] units (default: none, tensors in "
                   "[0, 1]); folders and .npz files")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="default auto (a GPU when there is one)")
    p.add_argument("--seed", type=int, default=0, help="seed of the method and the checks "
                   "(default 0)")
    p.add_argument("--batch-size", type=_positive_int, default=512,
                   help="inference batch size of the verification (default 512)")
    p.add_argument("--threads", type=threads_argument,
                   help="torch CPU threads (1 to the CPUs here)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the ``forget`` and ``verify`` subcommands to the ``deepclean`` parser."""
    f = sub.add_parser(
        "forget", help="unlearn a deletion request from your own model and data, and verify it",
        description="Unlearn the samples named by --forget (or a class) from the model, write "
        "the unlearned weights, an audit record and a verification against held-out data. "
        "Exit status: 0 verified, 3 not verified or not verifiable (no --holdout, or the "
        "original model already treats D_f like held-out data: CANNOT VERIFY), 2 bad input.")
    _common(f, verify=False)
    f.add_argument("--method", default="deepclean",
                   help="unlearning method (default deepclean; see 'deepclean methods')")
    f.add_argument("--gamma", type=_gamma, metavar="auto|FLOAT",
                   help="DeepClean's threshold; default auto with --holdout (chosen on held-out "
                   "data), else the paper's 1.1 (samples) or 2.0 (a class)")
    f.add_argument("--hp", type=_hp, action="append", default=[], metavar="NAME=VALUE",
                   help="a hyperparameter of the method (e.g. epochs=1); repeatable")
    f.add_argument("--out", default="deepclean-forget", metavar="DIR",
                   help="output folder (default ./deepclean-forget); refused if it already "
                   "holds results")
    f.add_argument("--no-store-indices", action="store_true",
                   help="record only hashes of what was forgotten, not the indices or paths")
    f.add_argument("--progress", action="store_true", help="show the method's progress bars")
    f.add_argument("--num-workers", type=num_workers_argument, default=0, metavar="N",
                   help="DataLoader worker processes of methods that stream their data; does not "
                   "change results; default 0")

    v = sub.add_parser(
        "verify", help="check that an unlearned model treats the forgotten data like unseen data",
        description="Compare the original and the unlearned model on D_f against held-out "
        "samples drawn like it. Exit status: 0 verified, 3 not verified or not verifiable "
        "(CANNOT VERIFY: the original model already treats D_f like held-out data, so the check "
        "cannot tell an unlearned model from an unchanged one), 2 bad input.")
    _common(v, verify=True)
    v.add_argument("--unlearned", required=True, metavar="FILE",
                   help="the unlearned weights (same formats as --weights)")
    v.add_argument("--out", metavar="DIR",
                   help="also write verification.json and report.html there")
    v.add_argument("--audit", metavar="FILE",
                   help="the audit.json that deepclean forget wrote: also check that it names "
                   "these weights (--weights before, --unlearned after) and this deletion "
                   "request; any mismatch is reported and the model is not verified")


# --------------------------------------------------------------------------------------- inputs


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigurationError(f"--out {out} is a file; expected a folder (new or empty)")
    if out.is_dir():
        present = [f for f in RESULT_FILES if (out / f).exists()]
        if present:
            raise ConfigurationError(
                f"--out {out} already holds results ({', '.join(present)}); choose a new folder "
                "or move them away (they are never overwritten)")
    from deepclean.harness.resume import check_writable

    check_writable(out, "--out")  # a folder that cannot be written fails before any work


def _load_data(args: argparse.Namespace):
    from deepclean.deletion.userdata import (
        Preprocessing,
        class_indices,
        load_user_data,
        parse_normalize,
        read_forget_request,
    )

    prep = Preprocessing(image_size=args.image_size, grayscale=args.grayscale,
                         normalize=parse_normalize(args.normalize) if args.normalize else None)
    data = load_user_data(args.data, preprocessing=prep, data_dir=args.data_dir)
    if args.forget is not None:
        ids = read_forget_request(args.forget, data)
    else:
        ids = class_indices(data, args.forget_class)
    holdout = None
    if args.holdout is not None:
        if Path(args.holdout).resolve() == Path(args.data).resolve() or args.holdout == args.data:
            raise ConfigurationError(
                f"--holdout {args.holdout} is the training data itself; expected samples the "
                "model never trained on")
        holdout = load_user_data(args.holdout, preprocessing=prep, classes=data.classes,
                                 data_dir=args.data_dir, option="--holdout")
    return data, ids, holdout


def _model(args: argparse.Namespace, data, weights: str, option: str = "--weights"):
    from deepclean.data.models import available_models
    from deepclean.deletion.usermodel import build_user_model, load_user_weights

    model = build_user_model(args.model, num_classes=args.num_classes or data.num_classes,
                             in_channels=data.in_channels, width=args.width, seed=args.seed)
    inferred: dict[str, int] = {}  # what the model took from the data (not from options)
    spec = args.model.strip()
    if spec in available_models() or spec.startswith("torchvision:"):
        if args.num_classes is None:
            inferred["num_classes"] = data.num_classes
        if spec in available_models():
            inferred["in_channels"] = data.in_channels
    info = load_user_weights(model, weights, option=option, inferred=inferred,
                             inferred_from=f"--data {args.data}")
    return model, info


def _method_hyperparameters(args: argparse.Namespace) -> dict[str, Any]:
    """``--method``, ``--hp`` and ``--gamma`` checked before any loading: the method's name, the
    hyperparameters' names and values (the method is built once with them, which validates them);
    returns the hyperparameters to pass to :func:`deepclean.deletion.api.forget`.

    Raises:
        ConfigurationError: an unknown method or hyperparameter, an invalid value, gamma given
            twice or to a method without one, ``--gamma auto`` without ``--holdout``.
    """
    import inspect

    from deepclean.methods import make_method, method_class

    cls = method_class(args.method)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}
    hp = dict(args.hp)
    for reserved in ("seed", "device", "progress", "holdout", "num_workers"):
        if reserved in hp:
            raise ConfigurationError(f"--hp {reserved}=... is not a hyperparameter; use "
                                     f"--{reserved.replace('_', '-')} (holdout: --holdout SPEC)")
    if args.gamma is not None:
        if "gamma" in hp:
            raise ConfigurationError("gamma given twice (--gamma and --hp gamma=...); pass one")
        if "gamma" not in accepted:
            raise ConfigurationError(f"--gamma: method {args.method!r} has no threshold gamma "
                                     "(DeepClean and zero_weights have one); leave --gamma out")
        hp["gamma"] = args.gamma
    if hp.get("gamma") == "auto" and args.holdout is None:
        raise ConfigurationError(
            "--gamma auto chooses DeepClean's threshold on held-out data; pass --holdout SPEC "
            "(samples the model never trained on), or a number such as --gamma 1.1")
    probe = {k: v for k, v in hp.items() if not (k == "gamma" and v == "auto")}
    extra: dict[str, Any] = {"seed": args.seed}
    if "num_workers" in accepted:
        extra["num_workers"] = args.num_workers
    try:
        make_method(args.method, **probe, **extra)
    except ConfigurationError as exc:
        raise ConfigurationError(f"--hp: {exc}") from exc
    except (TypeError, ValueError) as exc:  # a value of the wrong type the method did not check
        raise ConfigurationError(f"--hp: {' '.join(str(exc).split())}; "
                                 "check the values (e.g. epochs=1, lr=0.001)") from exc
    return hp


def _check_fits(model, data) -> None:
    """Refuse, before any work, data the model does not accept or labels beyond its outputs."""
    from deepclean.errors import DataError
    from deepclean.validation import check_forward

    outputs = check_forward(model, data.x[:2], "--data")
    if data.num_classes > outputs:
        raise DataError(f"--data has {data.num_classes} classes but the model has {outputs} "
                        f"outputs; pass the data it was trained on (or --num-classes "
                        f"{data.num_classes} for a torchvision model)")


# -------------------------------------------------------------------------------------- outputs


class _Staging:
    """A temporary folder next to ``out``; :meth:`commit` moves the finished files into place."""

    def __init__(self, out: Path) -> None:
        self.out = out
        parent = out.resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))

    def commit(self) -> None:
        if not self.out.exists():
            os.replace(self.path, self.out)
            return
        if self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()
            os.replace(self.path, self.out)
            return
        _check_out(self.out)
        for name in sorted(os.listdir(self.path)):  # every file is complete; move each
            os.replace(self.path / name, self.out / name)
        self.path.rmdir()

    def discard(self) -> None:
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def render_report(verification: dict[str, Any], audit: dict[str, Any] | None = None) -> str:
    """A self-contained HTML page (no scripts, no external files) of a verification record and,
    when given, its audit record."""
    status = verification.get("status", "")
    colour = {"verified": "#1a7f37", "not verified": "#b42318"}.get(status, "#9a6700")
    models = verification.get("models", {})
    rows = [
        ("Accuracy on D_f (%)", "acc_forget", 2),
        ("Accuracy on matched held-out samples (%)", "acc_matched_holdout", 2),
        ("Accuracy on held-out samples of retained classes (%)", "acc_retained_holdout", 2),
        ("Accuracy on a sample of D_r (%)", "acc_retain_sample", 2),
        ("Per-example attack AUC, D_f vs held-out (ideal 0.5)", "attack_auc", 3),
        ("D_f loss percentile among held-out losses (ideal 0.5)", "loss_percentile", 3),
    ]
    mia_rows = [
        ("MIA entropy: % of D_f called member", "entropy_lr"),
        ("MIA-efficacy: % of D_f called non-member", "efficacy"),
        ("Loss attack accuracy, D_f vs held-out (%; about 50 = unseen)", "loss_lr_accuracy"),
    ]
    o, u = models.get("original", {}), models.get("unlearned", {})
    table = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{_fmt(o.get(k), d)}</td>"
        f"<td>{_fmt(u.get(k), d)}</td></tr>" for label, k, d in rows)
    table += "".join(
        f"<tr><td>{html.escape(label)}</td><td>{_fmt((o.get('mia_family') or {}).get(k))}</td>"
        f"<td>{_fmt((u.get('mia_family') or {}).get(k))}</td></tr>" for label, k in mia_rows)
    verdict = verification.get("verdict") or {}
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in verdict.get("reasons", []))
    cannot = "".join(f"<li>{html.escape(c)}</li>" for c in verification.get("cannot_verify", []))
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in verification.get("notes", []))
    counts = (f"{verification.get('n_forget')} sample(s) forgotten of "
              f"{verification.get('n_data')}; {verification.get('n_matched_holdout')} matched "
              f"held-out samples of {verification.get('n_holdout')}; scenario "
              f"{verification.get('scenario')}")
    audit_html = ""
    if audit:
        m, mod, t = audit["method"], audit["model"], audit["times"]
        hp = ", ".join(f"{html.escape(str(k))}={html.escape(str(v))}"
                       for k, v in sorted(m.get("hyperparameters", {}).items()))
        audit_html = (
            "<h2>Audit</h2><table>"
            f"<tr><td>Method</td><td>{html.escape(str(m['name']))}</td></tr>"
            f"<tr><td>Hyperparameters</td><td>{hp}</td></tr>"
            + (f"<tr><td>Gamma used</td><td>{_fmt(m.get('gamma'), 4)} "
               f"({html.escape(str(m.get('gamma_source')))})</td></tr>"
               if m.get("gamma") is not None else "") +
            f"<tr><td>Forgotten (SHA-256 of the sorted indices)</td><td><code>"
            f"{html.escape(audit['forgotten']['sha256'])}</code></td></tr>"
            f"<tr><td>Input weights SHA-256 (file)</td><td><code>"
            f"{html.escape(audit['weights']['input']['file_sha256'])}</code></td></tr>"
            f"<tr><td>Output weights SHA-256 (file)</td><td><code>"
            f"{html.escape(audit['weights']['output']['file_sha256'])}</code></td></tr>"
            f"<tr><td>Weights changed</td><td>{mod['weights_changed']} of "
            f"{mod['weights_total']}</td></tr>"
            f"<tr><td>Unlearning time (s)</td><td>{_fmt(t.get('duration_s'))}</td></tr>"
            f"<tr><td>Started / finished (UTC)</td><td>{html.escape(t['started_at'])} / "
            f"{html.escape(t['finished_at'])}</td></tr></table>")
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<title>DeepClean: forgetting verification</title><style>"
        "body{font-family:sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3rem .6rem}"
        "td:not(:first-child){text-align:right}.status{color:#fff;padding:.5rem 1rem;"
        f"background:{colour};font-weight:bold}}</style></head><body>"
        "<h1>Forgetting verification</h1>"
        f"<p class=\"status\">{html.escape(status.upper())}</p>"
        f"<p>{html.escape(verification.get('summary', ''))}</p>"
        f"<p>{html.escape(counts)}</p>"
        "<h2>D_f against held-out samples drawn like it</h2>"
        f"<table><tr><th>Measure</th><th>Original</th><th>Unlearned</th></tr>{table}</table>"
        + (f"<h2>Verdict</h2><ul>{reasons}</ul>" if reasons else "")
        + (f"<h2>Not verified</h2><ul>{cannot}</ul>" if cannot else "")
        + (f"<h2>Notes</h2><ul>{notes}</ul>" if notes else "")
        + audit_html + "</body></html>\n")


def _audit(args, data, ids, record, weights_in, out_file, store: bool) -> dict[str, Any]:
    from deepclean.deletion.userdata import forget_digest
    from deepclean.harness.audit import AUDIT_VERSION, _versions, indices_digest

    un = record["unlearning"]
    idx = sorted(ids)
    forgotten: dict[str, Any] = {
        "count": len(idx), "sha256": indices_digest(idx, len(data)),
        "sha256_of": "f'{n_train}:' + sorted int64 indices", "n_train": len(data),
        "indices_stored": store, **forget_digest(idx, data),
        "request": ({"file": args.forget} if args.forget else {"class": args.forget_class}),
    }
    if store:
        forgotten["indices"] = idx
        if data.ids is not None:
            forgotten["paths"] = [data.ids[i] for i in idx]
    info = un.get("info") or {}
    v = record
    return {
        "audit_version": AUDIT_VERSION,
        "forgotten": forgotten,
        "method": {"name": un["method"], "hyperparameters": un["hyperparameters"],
                   "info": {k: val for k, val in info.items()
                            if isinstance(val, (int, float, str, bool))},
                   "auto_gamma": info.get("auto_gamma"), "gamma": un.get("gamma"),
                   "gamma_source": un.get("gamma_source"), "reference": un.get("reference")},
        "model": {"spec": args.model, "sha256_before": weights_in.state_sha256,
                  "sha256_after": out_file["state_sha256"],
                  **{k: un[k] for k in ("weights_changed", "weights_total",
                                        "buffer_entries_changed", "tensors_changed")}},
        "weights": {"input": weights_in.describe(), "output": out_file},
        "data": {**data.describe(), "holdout": args.holdout},
        "times": {"started_at": un["started_at"], "finished_at": un["finished_at"],
                  "duration_s": un["duration_s"]},
        "evaluation": {
            "reference": "held-out samples drawn like D_f (matched label mix), no gold model",
            "status": v["status"], "summary": v["summary"],
            "metrics": {k: val for k, val in v["models"]["unlearned"].items()
                        if isinstance(val, (int, float)) and val is not None},
        },
        "versions": _versions(),
        "context": {"seed": args.seed, "device": str(_resolve_device(args.device)),
                    "command": "deepclean forget"},
    }


def _audit_text(audit: dict[str, Any]) -> str:
    from deepclean.harness.audit import format_audit

    text = format_audit(audit)
    f, w = audit["forgotten"], audit["weights"]
    extra = ["", "Deletion request",
             f"  request:                {audit['forgotten']['request']}",
             f"  SHA-256 of the samples: {f['samples_sha256']}"]
    if "paths_sha256" in f:
        extra.append(f"  SHA-256 of the paths:   {f['paths_sha256']}")
    if f.get("paths"):
        shown = f["paths"][:50]
        more = f" ... ({len(f['paths']) - 50} more in the JSON record)" if len(f["paths"]) > 50 \
            else ""
        extra.append(f"  paths:                  {shown}{more}")
    extra += ["", "Weights files",
              f"  input:                  {w['input']['path']}",
              f"  input file SHA-256:     {w['input']['file_sha256']}",
              f"  input unchanged:        {w['input'].get('unchanged')}",
              f"  output:                 {w['output']['path']}",
              f"  output file SHA-256:    {w['output']['file_sha256']}"]
    if audit["method"].get("gamma") is not None:  # methods without a threshold have none
        extra.append(f"  gamma used:             {audit['method']['gamma']} "
                     f"({audit['method'].get('gamma_source')})")
    extra += ["", "Verification", f"  {audit['evaluation']['summary']}"]
    return text + "\n".join(extra) + "\n"


# ------------------------------------------------------------------------------------- commands


def _resolve_device(name: str):
    from deepclean.training import resolve_device

    return resolve_device(None if name == "auto" else name)


def _cmd_forget(args: argparse.Namespace) -> int:
    from deepclean.checkpoint import atomic_write_text, state_digest
    from deepclean.deletion.api import forget
    from deepclean.deletion.usermodel import file_sha256, save_like

    out = Path(args.out)
    hp = _method_hyperparameters(args)  # before any loading
    _check_out(out)
    device = _resolve_device(args.device)
    data, ids, holdout = _load_data(args)
    model, weights_in = _model(args, data, args.weights)
    _check_fits(model, data)
    print(f"deepclean forget: {len(ids)} of {len(data)} samples, method {args.method}, "
          f"device {device}", file=sys.stderr)
    unlearned, record = forget(model, data, ids, holdout=holdout, method=args.method,
                               hyperparameters=hp, seed=args.seed, device=device,
                               progress=args.progress, batch_size=args.batch_size,
                               num_workers=args.num_workers)
    staging = _Staging(out)
    try:
        target = staging.path / "unlearned.safetensors"
        save_like(unlearned, weights_in, target, {"source_weights_sha256": weights_in.sha256,
                                                  "method": args.method})
        from safetensors.torch import load_file

        from deepclean.deletion.usermodel import strip_prefixes

        written = load_file(str(target))
        _, names = strip_prefixes(written)
        out_file = {"path": str(out / "unlearned.safetensors"), "file_sha256": file_sha256(target),
                    "state_sha256": state_digest({k: written[v] for k, v in names.items()}),
                    "key_prefix": weights_in.prefix}
        unchanged = file_sha256(args.weights) == weights_in.sha256
        if not unchanged:
            raise CheckpointError(f"--weights {args.weights} changed while DeepClean ran (its "
                                  "SHA-256 differs from the one read); nothing was written")
        audit = _audit(args, data, ids, record, weights_in, out_file,
                       store=not args.no_store_indices)
        audit["weights"]["input"]["unchanged"] = unchanged
        verification = {k: v for k, v in record.items()}
        atomic_write_text(staging.path / "verification.json",
                          json.dumps(verification, indent=2, sort_keys=True) + "\n")
        atomic_write_text(staging.path / "audit.txt", _audit_text(audit))
        atomic_write_text(staging.path / "audit.json",
                          json.dumps(audit, indent=2, sort_keys=True) + "\n")
        atomic_write_text(staging.path / "report.html", render_report(verification, audit))
        staging.commit()
    finally:
        staging.discard()
    _print_summary(record)
    if record["status"] == "cannot verify" and holdout is None:
        print("not verifiable without --holdout: " + "; ".join(record["cannot_verify"]))
    un = record["unlearning"]
    gamma = un.get("gamma")
    gamma_text = ""  # methods without a threshold have none
    if gamma is not None:
        shown = f"{gamma:.4g}" if isinstance(gamma, (int, float)) else str(gamma)
        gamma_text = f"gamma {shown} ({un.get('gamma_source')}), "
    print(f"{gamma_text}{un['weights_changed']} of {un['weights_total']} weights changed, "
          f"{un['duration_s']:.1f} s")
    print(f"written to {out}/ ({', '.join(RESULT_FILES)})")
    return EXIT_VERIFIED if record["verified"] else EXIT_NOT_VERIFIED


def _print_summary(record: dict[str, Any]) -> None:
    """The verdict line and its notes, as the console shows them."""
    print(record["summary"])
    for note in record.get("notes", []):
        print(f"note: {note}")


def _read_audit(path: str) -> dict[str, Any]:
    """The audit record at ``--audit``, checked to be one (before any loading)."""
    try:
        audit = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigurationError(f"--audit {path}: no such file; expected the audit.json that "
                                 "deepclean forget wrote") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigurationError(f"--audit {path}: not a readable JSON file ({exc}); expected "
                                 "the audit.json that deepclean forget wrote") from None
    fields = {"forgotten.count": int, "forgotten.n_train": int, "forgotten.sha256": str,
              "model.sha256_before": str, "model.sha256_after": str}
    for name, kind in fields.items():
        group, key = name.split(".")
        section = audit.get(group) if isinstance(audit, dict) else None
        value = section.get(key) if isinstance(section, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigurationError(
                f"--audit {path}: not an audit record of deepclean forget ({name} should be "
                f"{'an integer' if kind is int else 'a SHA-256 string'}, found {value!r}); "
                "pass the audit.json that deepclean forget wrote")
    return audit


def audit_mismatches(audit: dict[str, Any], *, data_size: int, forget_ids: list[int],
                     before_sha256: str, after_sha256: str) -> list[str]:
    """What in an audit record of ``deepclean forget`` disagrees with the weights and the
    deletion request being verified: the state SHA-256 before (``--weights``) and after
    (``--unlearned``), the training-set size, and the count and SHA-256 of the forgotten rows
    (:func:`deepclean.harness.audit.indices_digest`). Empty when everything matches."""
    from deepclean.harness.audit import indices_digest

    f, m = audit["forgotten"], audit["model"]
    idx = sorted(forget_ids)
    out = []
    if m["sha256_before"] != before_sha256:
        out.append("--weights is not the model the audit record says was unlearned "
                   f"(state SHA-256 {before_sha256[:12]}..., recorded {m['sha256_before'][:12]}...)")
    if m["sha256_after"] != after_sha256:
        out.append("--unlearned is not the model the audit record says was written "
                   f"(state SHA-256 {after_sha256[:12]}..., recorded {m['sha256_after'][:12]}...)")
    if f["n_train"] != data_size:
        out.append(f"--data holds {data_size} samples; the audit record was made on "
                   f"{f['n_train']}")
    if f["count"] != len(idx) or f["sha256"] != indices_digest(idx, data_size):
        out.append(f"the deletion request ({len(idx)} samples) is not the one the audit record "
                   f"names ({f['count']} samples, SHA-256 {str(f['sha256'])[:12]}...)")
    return out


def _cmd_verify(args: argparse.Namespace) -> int:
    from deepclean.checkpoint import atomic_write_text
    from deepclean.deletion.api import verify

    out = Path(args.out) if args.out else None
    if out is not None:
        _check_out(out)
    audit = _read_audit(args.audit) if args.audit else None
    device = _resolve_device(args.device)
    data, ids, holdout = _load_data(args)
    original, before = _model(args, data, args.weights)
    unlearned, after = _model(args, data, args.unlearned, "--unlearned")
    _check_fits(original, data)
    record = verify(original, unlearned, data, ids, holdout, seed=args.seed, device=device,
                    batch_size=args.batch_size)
    if audit is not None:
        wrong = audit_mismatches(audit, data_size=len(data), forget_ids=list(ids),
                                 before_sha256=before.state_sha256,
                                 after_sha256=after.state_sha256)
        record["audit_check"] = {"audit": str(args.audit), "matches": not wrong,
                                 "mismatches": wrong}
        if wrong:
            record["verified"] = False
            record["status"] = "not verified"
            record["summary"] = "AUDIT MISMATCH: " + "; ".join(wrong) + ". " + record["summary"]
        else:
            record["notes"].append(f"the audit record {args.audit} names these weights and "
                                   "this deletion request")
    if out is not None:
        staging = _Staging(out)
        try:
            atomic_write_text(staging.path / "verification.json",
                              json.dumps(record, indent=2, sort_keys=True) + "\n")
            atomic_write_text(staging.path / "report.html", render_report(record))
            staging.commit()
        finally:
            staging.discard()
    _print_summary(record)
    if out is not None:
        print(f"written to {out}/ (verification.json, report.html)")
    return EXIT_VERIFIED if record["verified"] else EXIT_NOT_VERIFIED


def run_command(args: argparse.Namespace) -> int:
    """Run ``deepclean forget`` or ``deepclean verify``; returns the exit status (0 verified, 3
    not verified or not verifiable). Errors propagate as :class:`deepclean.errors.DeepCleanError` (exit 2 in
    :func:`deepclean.cli.main`)."""
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.command == "forget":
        return _cmd_forget(args)
    return _cmd_verify(args)
