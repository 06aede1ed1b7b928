"""Resuming ``deepclean run`` after an interruption, without ever mixing configurations.

- :func:`check_out_dir`: before any work, refuse an output folder that is a file, or that holds the
  results of a different configuration (its ``config.json`` differs in a field that changes
  results); the same configuration resumes. The list of methods may grow: each method's result is
  keyed on its own hyperparameters.
- :func:`method_key`: a hash of everything that determines one method's result (data, model,
  recipe, split, the original model's weights, the method and its hyperparameters, versions).
- :func:`load_finished`: a finished result is reused only if its JSON file parses, records the same
  key, and its checkpoint loads with a matching tensor hash; anything else is recomputed.

Files are written checkpoint first, then the audit record, then the result JSON (each atomically),
so a result JSON on disk means its checkpoint and audit record are complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deepclean._digest import json_digest
from deepclean.checkpoint import load_checkpoint
from deepclean.errors import CheckpointError, ConfigurationError

__all__ = ["check_out_dir", "method_key", "load_finished", "IGNORED_CONFIG_FIELDS",
           "check_cache_dir", "remove_stale_temporaries"]

# Fields of the configuration that do not change any result: where files are, progress bars,
# DataLoader workers, and the list of methods (each method's result carries its own key).
IGNORED_CONFIG_FIELDS = frozenset(
    {"out_dir", "cache_dir", "data_dir", "download", "progress", "device", "methods",
     "store_indices", "num_workers"}
)
# Fields added to the configuration after results were first written, with their defaults: a
# config.json without one of them was written with its default and is the same configuration.
NEW_FIELD_DEFAULTS = {"precision": "fp32", "channels_last": False, "precompute_fisher": False}
_OWN_ENTRIES = ("results", "checkpoints", "splits", "audit", "results.md", "results.csv")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _comparable(config_record: Mapping[str, Any]) -> dict[str, Any]:
    record = NEW_FIELD_DEFAULTS | _jsonable(dict(config_record))
    return {k: v for k, v in record.items() if k not in IGNORED_CONFIG_FIELDS}


def check_out_dir(out_dir: str | Path, config_record: Mapping[str, Any]) -> bool:
    """Check that results of ``config_record`` may be written into ``out_dir``.

    Args:
        out_dir: the output folder.
        config_record: what will be written as ``config.json`` (``ExperimentConfig.to_dict()``
            plus ``device_used``).

    Returns:
        ``True`` when the folder holds an earlier run of the same configuration (resume).

    Raises:
        ConfigurationError: the path is a file; its ``config.json`` is unreadable or differs in a
            field that changes results; or it holds result files without a ``config.json``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigurationError(
            f"the output folder {out_dir} is a file; expected a folder (new, or one of an earlier "
            "run with the same configuration). Pass another --out."
        )
    config_path = out_dir / "config.json"
    if config_path.is_file():
        try:
            old = json.loads(config_path.read_text())
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (ValueError, OSError) as exc:
            raise ConfigurationError(
                f"{config_path} cannot be read ({exc}), so it is unknown which configuration "
                f"the results in {out_dir} belong to. Pass another --out, or delete {out_dir}."
            ) from exc
        a, b = _comparable(old), _comparable(config_record)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            detail = "; ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in diff[:4])
            raise ConfigurationError(
                f"the output folder {out_dir} holds results of a different configuration "
                f"(differs in {', '.join(diff)}: {detail}); refusing to mix or overwrite them. "
                "Pass another --out, or delete that folder; the same configuration resumes."
            )
        return True
    if out_dir.is_dir():
        ours = [name for name in _OWN_ENTRIES if (out_dir / name).exists()]
        if ours:
            raise ConfigurationError(
                f"the output folder {out_dir} holds {', '.join(ours)} but no config.json, so "
                "their configuration is unknown; refusing to mix or overwrite them. Pass another "
                "--out, or delete those entries."
            )
    return False


def check_cache_dir(cache_dir: str | Path) -> None:
    """Raise :class:`ConfigurationError` when the cache path exists and is not a folder."""
    cache_dir = Path(cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise ConfigurationError(
            f"the cache folder {cache_dir} is a file; expected a folder. Pass another --cache-dir."
        )
    check_writable(cache_dir, "--cache-dir")


def check_writable(folder: str | Path, flag: str) -> None:
    """Write (then delete) a small file in ``folder``, or, while it does not exist yet, in its
    nearest existing parent (where it will be created; nothing is created here), so that a folder
    that cannot be written fails before any training rather than after it.

    Raises:
        ConfigurationError: the folder cannot be created or written; names it, the reason and
            the flag to change.
    """
    import tempfile

    folder = Path(folder)
    target = folder.absolute()
    while not target.exists() and target != target.parent:
        target = target.parent
    try:
        if not target.is_dir():
            raise NotADirectoryError(20, f"{target} is not a folder")
        fd, probe = tempfile.mkstemp(dir=target, prefix=".deepclean-write-test.", suffix=".tmp")
        try:
            os.write(fd, b"0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            Path(probe).unlink(missing_ok=True)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot write into {folder} ({exc.strerror or exc}); pass a writable folder with "
            f"{flag} (or free space on its disk)"
        ) from exc


def method_key(payload: Mapping[str, Any]) -> str:
    """SHA-256 of a JSON payload (method hyperparameters are JSON values only, so equal
    hyperparameters give equal keys across processes)."""
    return json_digest(_jsonable(dict(payload)))


def load_finished(
    result_path: Path, checkpoint_path: Path, key: str, audit_path: Path | None = None
) -> tuple[dict[str, Any] | None, str]:
    """A finished result that may be reused, or ``None`` and the reason.

    Reused only if the result JSON parses and records ``key`` as its ``resume_key``, the checkpoint
    loads (tensor hash checked) and its hash equals the result's ``state_sha256``, and the audit
    record exists when ``audit_path`` is given.
    """

    if not result_path.is_file():
        return None, "no result yet"
    try:
        record = json.loads(result_path.read_text())
    except (ValueError, OSError) as exc:
        return None, f"result file unreadable ({exc})"
    if not isinstance(record, dict) or record.get("resume_key") != key:
        return None, "result of other hyperparameters or data"
    try:
        _, meta = load_checkpoint(checkpoint_path)
    except CheckpointError as exc:
        return None, f"checkpoint unusable ({exc})"
    if meta.get("state_sha256") is None or meta.get("state_sha256") != record.get("state_sha256"):
        return None, "checkpoint does not match the result"
    if audit_path is not None and not audit_path.is_file():
        return None, "audit record missing"
    return record, "finished earlier with the same configuration"


def remove_stale_temporaries(out_dir: str | Path) -> int:
    """Delete the hidden ``.<name>.<random>.tmp`` files that an atomic write killed half-way left
    in ``out_dir`` and its own sub-folders (never anything else); returns how many."""
    out_dir = Path(out_dir)
    removed = 0
    for folder in [out_dir, *(out_dir / name for name in _OWN_ENTRIES)]:
        if not folder.is_dir():
            continue
        for path in folder.glob(".*.tmp"):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed += 1
    return removed
