"""Selection of the weights to reset (Shi et al., arXiv 2311.10448, eq. 2 and section 3).

The ratio ``r_i = I_Df(w)_i / I_Dr(w)_i`` compares how much each weight matters for the forget
set D_f against the retain set D_r; W_f = {w_i : r_i > gamma} is reset and fine-tuned, the rest W_r
is frozen.

Zero-denominator rule (explicit, never an accident of NaN comparisons): the comparison is made
without division as ``I_f > gamma * I_r``. Hence

- ``I_f > 0`` and ``I_r = 0``: the ratio is +inf, **selected** (the weight serves only D_f);
- ``I_f = 0`` and ``I_r = 0``: 0/0, **not selected** (the weight serves neither set);
- ``I_f = 0`` and ``I_r > 0``: ratio 0, not selected.
"""

from __future__ import annotations

import torch

from deepclean.checkpoint import strip_module_prefix
from deepclean.errors import MaskError
from deepclean.validation import check_gamma

__all__ = ["select_weights", "mask_summary", "check_mask"]


def select_weights(
    fisher_forget: dict[str, torch.Tensor],
    fisher_retain: dict[str, torch.Tensor],
    gamma: float,
) -> dict[str, torch.Tensor]:
    """Boolean masks of the weights whose Fisher ratio I_f / I_r exceeds ``gamma`` (paper eq. 2).

    Args:
        fisher_forget: ``{name: I_Df}`` from :func:`deepclean.fisher_diagonal` on D_f.
        fisher_retain: ``{name: I_Dr}`` on D_r, same keys and shapes.
        gamma: threshold, > 0 (paper: 1.1 for random samples, 2.0 for a class).

    Returns:
        ``{name: bool tensor}`` of each parameter's shape; True marks a weight in W_f (to reset).
        Names carry no ``module.`` prefix (it is removed from both inputs when present).

    Raises:
        ConfigurationError: ``gamma`` is not a finite number > 0.
        MaskError: the two dictionaries have different keys or shapes, or hold negative or NaN
            values.
    """

    check_gamma(gamma)
    for label, d in (("forget", fisher_forget), ("retain", fisher_retain)):
        if not isinstance(d, dict) or not all(isinstance(t, torch.Tensor) for t in d.values()):
            raise MaskError(
                f"the {label} Fisher must be a dict {{parameter name: tensor}}, got "
                f"{type(d).__name__}; pass the output of deepclean.fisher_diagonal"
            )
    # A "module." prefix (DataParallel) on one side or both never causes a mismatch.
    fisher_forget = strip_module_prefix(fisher_forget)
    fisher_retain = strip_module_prefix(fisher_retain)
    if set(fisher_forget) != set(fisher_retain):
        only_f = sorted(set(fisher_forget) - set(fisher_retain))
        only_r = sorted(set(fisher_retain) - set(fisher_forget))
        raise MaskError(
            "the forget and retain Fisher diagonals must have the same parameter names; "
            f"only in forget: {only_f[:5]}, only in retain: {only_r[:5]}. Compute both on the "
            "same model."
        )
    masks = {}
    for name, i_f in fisher_forget.items():
        i_r = fisher_retain[name]
        if i_f.shape != i_r.shape:
            raise MaskError(
                f"{name}: forget Fisher has shape {tuple(i_f.shape)}, retain Fisher "
                f"{tuple(i_r.shape)}; expected equal shapes"
            )
        for label, t in (("forget", i_f), ("retain", i_r)):
            if torch.isnan(t).any() or (t < 0).any():
                raise MaskError(
                    f"{name}: the {label} Fisher holds NaN or negative values; a Fisher diagonal "
                    "is a mean of squares and must be >= 0"
                )
        masks[name] = i_f > gamma * i_r
    return masks


def check_mask(model: torch.nn.Module, mask: dict[str, torch.Tensor]) -> None:
    """Check that ``mask`` has exactly the model's trainable parameter names and shapes.

    Raises:
        MaskError: missing or extra keys (a ``module.`` prefix is named as the likely cause), a
            shape mismatch, or a mask that is not boolean.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(mask))
    extra = sorted(set(mask) - set(params))
    if missing or extra:
        hint = ""
        if any(k.startswith("module.") for k in extra) or any(
            k.startswith("module.") for k in missing
        ):
            hint = " A 'module.' prefix (DataParallel) differs between the mask and the model."
        raise MaskError(
            f"the mask's keys do not match the model's parameter names: missing {missing[:5]}, "
            f"unexpected {extra[:5]}.{hint} Build the mask from this model's named_parameters()."
        )
    for name, p in params.items():
        m = mask[name]
        if m.dtype != torch.bool:
            raise MaskError(f"{name}: expected a bool mask, got dtype {m.dtype}")
        if m.shape != p.shape:
            raise MaskError(
                f"{name}: mask shape {tuple(m.shape)} differs from parameter shape {tuple(p.shape)}"
            )


def mask_summary(mask: dict[str, torch.Tensor]) -> tuple[int, int]:
    """``(selected, total)``: the number of weights selected and the number of weights in all."""
    selected = sum(int(m.sum()) for m in mask.values())
    total = sum(m.numel() for m in mask.values())
    return selected, total
