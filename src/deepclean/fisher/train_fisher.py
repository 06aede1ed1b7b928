"""The Fisher diagonal of a model on its whole training set, computed once per model.

DeepClean needs I_Dr, the Fisher diagonal on the retain set (Shi et al., arXiv 2311.10448, eq. 1).
Because the empirical Fisher is a mean of per-sample terms and the training set D is the disjoint
union of D_f and D_r, for any forget request::

    |D_r| * I_Dr = |D| * I_D - |D_f| * I_Df

so with I_D computed once, right after training (or in the background after each unlearning),
a request only needs the Fisher pass over the small forget set: the pass over D_r (about 90 % of
DeepClean's Fisher cost) leaves the request's critical path. The result is the same diagonal up to
rounding (the subtraction runs in float64 and is clamped at 0); it is not an approximation.

:class:`TrainFisher` refuses to be used for anything but the model it was computed on (SHA-256 of
its parameters and buffers) and a split of exactly the samples it was computed on (the multiset
of per-sample SHA-256 digests of ``(x, y)``, so neither the order nor the split matters).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from deepclean.checkpoint import load_checkpoint, save_tensors, state_digest, strip_module_prefix
from deepclean.data.datasets import as_tensors, stream_batches
from deepclean.errors import CheckpointError, ConfigurationError, SplitMismatchError
from deepclean.fisher.diagonal import fisher_diagonal
from deepclean.training import synchronize
from deepclean.validation import check_trainable, unwrap_model

__all__ = ["TrainFisher", "model_digest", "precompute_train_fisher", "sample_digests"]


def _digest_list(x: torch.Tensor, y: torch.Tensor) -> list[bytes]:
    xs = x.detach().cpu().contiguous()
    head = f"{xs.dtype}|{tuple(xs.shape[1:])}|".encode()
    flat = xs.reshape(xs.shape[0], -1).view(torch.uint8).numpy() if xs.numel() else None
    rows = []
    for i, label in enumerate(y.detach().cpu().to(torch.int64).tolist()):
        h = hashlib.sha256(head)
        if flat is not None:
            h.update(flat[i].tobytes())
        h.update(f"|{label}".encode())
        rows.append(h.digest())
    return rows


def sample_digests(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SHA-256 of every sample's input bytes, dtype, shape and label, as ``(N, 32)`` uint8 rows
    sorted lexicographically (a canonical form of the multiset of samples).

    Args:
        x: inputs ``(N, ...)``.
        y: integer labels ``(N,)``.
    """
    rows = sorted(_digest_list(x, y))
    if not rows:
        return torch.zeros(0, 32, dtype=torch.uint8)
    return torch.frombuffer(bytearray(b"".join(rows)), dtype=torch.uint8).view(-1, 32)


def model_digest(model: nn.Module) -> str:
    """SHA-256 of the model's state dict (parameters and buffers; no ``module.`` prefix)."""

    return state_digest(strip_module_prefix(unwrap_model(model).state_dict()))


@dataclass
class TrainFisher:
    """I_D, the empirical Fisher diagonal of one model on its whole training set D.

    Attributes:
        fisher: ``{parameter name: (param shape) float64 tensor}``, the mean over D of the
            squared per-sample gradients of ``log p(y | x)``.
        n_samples: |D|.
        model_sha256: SHA-256 of the model's state dict when I_D was computed.
        digests: ``(|D|, 32)`` uint8, sorted per-sample digests (:func:`sample_digests`).
        time_s: seconds the computation took (wall clock; 0 when unknown).
    """

    fisher: dict[str, torch.Tensor]
    n_samples: int
    model_sha256: str
    digests: torch.Tensor = field(repr=False)
    time_s: float = 0.0

    def __repr__(self) -> str:  # short: it appears in a method's hyperparameters
        return f"TrainFisher(n_samples={self.n_samples}, model_sha256={self.model_sha256[:12]})"

    def check(
        self, model: nn.Module, xf: torch.Tensor, yf: torch.Tensor, xr: torch.Tensor,
        yr: torch.Tensor,
    ) -> None:
        """Check that ``model`` is the model I_D was computed on and that D_f and D_r together
        are exactly its samples (in any order).

        Raises:
            ConfigurationError: the model's weights or buffers differ from those of I_D's model.
            SplitMismatchError: D_f and D_r together are not exactly the samples of D.
        """
        self._check_model(model)
        self._check_digests(_digest_list(xf, yf) + _digest_list(xr, yr), int(xf.shape[0]),
                            int(xr.shape[0]))

    def check_data(self, model: nn.Module, forget: Dataset, retain: Dataset, *,
                   batch_size: int = 256, num_workers: int = 0) -> None:
        """:meth:`check` on data sets read batch by batch through a ``DataLoader`` (only the
        32-byte digest of each sample is kept).

        Raises:
            ConfigurationError, SplitMismatchError: as :meth:`check`.
            DataError: a data set that cannot be read as ``(x, y)`` pairs.
        """
        self._check_model(model)
        digests: list[bytes] = []
        for ds in (forget, retain):
            for xb, yb in stream_batches(ds, batch_size=batch_size, num_workers=num_workers):
                digests += _digest_list(xb, yb)
        self._check_digests(digests, len(forget), len(retain))  # type: ignore[arg-type]

    def _check_model(self, model: nn.Module) -> None:
        digest = model_digest(model)
        if digest != self.model_sha256:
            raise ConfigurationError(
                f"this training-set Fisher was computed on the model with state SHA-256 "
                f"{self.model_sha256[:12]}..., but the model being unlearned has "
                f"{digest[:12]}...; compute it again for this model (precompute_train_fisher)"
            )

    def _check_digests(self, digests: list[bytes], n_f: int, n_r: int) -> None:
        both = sorted(digests)
        if b"".join(both) != self.digests.contiguous().numpy().tobytes():
            known = Counter(bytes(row) for row in self.digests.numpy())
            unknown = sum((Counter(both) - known).values())
            missing = sum((known - Counter(both)).values())
            raise SplitMismatchError(
                f"D_f ({n_f} samples) and D_r ({n_r} samples) together are not the "
                f"{self.n_samples} training samples this Fisher was computed on: {unknown} of "
                f"theirs (input or label) are not among them and {missing} of them are missing; "
                "compute it on exactly D_f + D_r, or run DeepClean without a precomputed Fisher"
            )

    def retain_fisher(
        self,
        model: nn.Module,
        fisher_forget: dict[str, torch.Tensor],
        xf: torch.Tensor,
        yf: torch.Tensor,
        xr: torch.Tensor,
        yr: torch.Tensor,
        *,
        check: bool = True,
    ) -> dict[str, torch.Tensor]:
        """I_Dr = (|D| I_D - |D_f| I_Df) / |D_r|, computed in float64 and clamped at 0.

        Args:
            model: the model I_Df was computed on; must be the one I_D was computed on.
            fisher_forget: I_Df (:func:`deepclean.fisher.diagonal.fisher_diagonal` on D_f), same keys.
            xf, yf: D_f. xr, yr: D_r (inputs ``(N, ...)``, integer labels ``(N,)``).
            check: run :meth:`check` first (skip only when it already passed for these inputs).

        Returns:
            ``{name: tensor}`` with the keys, shapes and dtypes of ``fisher_forget``.

        Raises:
            ConfigurationError: see :meth:`check`; or the keys of ``fisher_forget`` differ from
                I_D's.
            SplitMismatchError: see :meth:`check`.
        """
        if check:
            self.check(model, xf, yf, xr, yr)
        if set(fisher_forget) != set(self.fisher):
            raise ConfigurationError(
                f"the forget-set Fisher has parameters {sorted(fisher_forget)[:3]}... but the "
                f"training-set Fisher {sorted(self.fisher)[:3]}...; both must come from one model"
            )
        return self.retain_fisher_from(fisher_forget, n_forget=int(xf.shape[0]),
                                       n_retain=int(xr.shape[0]))

    def retain_fisher_from(self, fisher_forget: dict[str, torch.Tensor], *, n_forget: int,
                           n_retain: int) -> dict[str, torch.Tensor]:
        """:meth:`retain_fisher` from the sizes of D_f and D_r, without any check of the samples
        (call :meth:`check` or :meth:`check_data` first).

        Raises:
            ConfigurationError: the keys of ``fisher_forget`` differ from I_D's.
        """
        if set(fisher_forget) != set(self.fisher):
            raise ConfigurationError(
                f"the forget-set Fisher has parameters {sorted(fisher_forget)[:3]}... but the "
                f"training-set Fisher {sorted(self.fisher)[:3]}...; both must come from one model"
            )
        n_f, n_r = int(n_forget), int(n_retain)
        out = {}
        for name, forget in fisher_forget.items():
            total = self.fisher[name].to(torch.float64) * self.n_samples
            total = total.to(forget.device) - forget.to(torch.float64) * n_f
            out[name] = (total / n_r).clamp_min_(0).to(forget.dtype)
        return out

    def save(self, path: str | Path, metadata: dict | None = None) -> Path:
        """Write to one safetensors file atomically (with a hash of every tensor)."""

        tensors = {f"fisher/{k}": v for k, v in self.fisher.items()} | {"digests": self.digests}
        meta = dict(metadata or {}) | {"kind": "train_fisher", "n_samples": self.n_samples,
                                       "model_sha256": self.model_sha256, "time_s": self.time_s}
        return save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> tuple[TrainFisher, dict]:
        """Read a file written by :meth:`save`; returns ``(TrainFisher, metadata)``.

        Raises:
            CheckpointError: missing, truncated or altered file, or not a training-set Fisher.
        """

        state, meta = load_checkpoint(path)
        if meta.get("kind") != "train_fisher" or "digests" not in state:
            raise CheckpointError(f"{path} is not a training-set Fisher written by TrainFisher")
        fisher = {k[len("fisher/"):]: v for k, v in state.items() if k.startswith("fisher/")}
        tf = cls(fisher=fisher, n_samples=int(meta["n_samples"]),
                 model_sha256=str(meta["model_sha256"]), digests=state["digests"],
                 time_s=float(meta.get("time_s", 0.0)))
        if tf.digests.shape != (tf.n_samples, 32):
            raise CheckpointError(f"{path}: {tf.digests.shape[0]} sample digests for "
                                  f"{tf.n_samples} samples")
        return tf, meta


def precompute_train_fisher(
    model: nn.Module,
    data: Dataset,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> TrainFisher:
    """Compute I_D on the whole training set D once (:func:`deepclean.fisher.diagonal.fisher_diagonal`).

    Pass the result to ``DeepClean(train_fisher=...)`` (or ``ZeroWeights``): each unlearning
    request then runs the Fisher pass over D_f only and takes I_Dr from
    :meth:`TrainFisher.retain_fisher`.

    Args:
        model: the trained model, not modified.
        data: D, a ``Dataset`` of ``(x, y)`` pairs.
        batch_size, device: as for :func:`deepclean.fisher.diagonal.fisher_diagonal`.

    Returns:
        A :class:`TrainFisher` with float64 diagonals and ``time_s`` in seconds.

    Raises:
        ConfigurationError: ``model`` is not a module with trainable parameters.
        DataError: ``data`` is not a data set of ``(x, y)`` pairs; and the other errors of
            :func:`deepclean.fisher.diagonal.fisher_diagonal`.
    """

    check_trainable(model)
    x, y = as_tensors(data)
    first = next(model.parameters(), None)
    dev = torch.device(device) if device is not None else (
        first.device if first is not None else torch.device("cpu"))
    synchronize(dev)
    start = time.perf_counter()
    fisher = fisher_diagonal(model, data, batch_size=batch_size, device=device)
    synchronize(dev)
    seconds = time.perf_counter() - start
    return TrainFisher(
        fisher={k: v.to(torch.float64) for k, v in fisher.items()},
        n_samples=int(x.shape[0]),
        model_sha256=model_digest(model),
        digests=sample_digests(x, y),
        time_s=seconds,
    )
