"""CODEC, the conditional dependence coefficient of Azadkia & Chatterjee (Ann. Statist. 2021), and
FOCI, its forward feature selection: the selection step of L-CODEC (:mod:`deepclean.methods.lcodec`)."""

from __future__ import annotations

import torch

__all__ = ["codec", "foci"]


# --------------------------------------------------------------------------------------------
# CODEC and FOCI
# --------------------------------------------------------------------------------------------


def _ranks(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """R_i = #{j : y_j <= y_i} and L_i = #{j : y_j >= y_i}."""
    r = (y.view(1, -1) <= y.view(-1, 1)).sum(1).to(torch.float64)
    left = (y.view(1, -1) >= y.view(-1, 1)).sum(1).to(torch.float64)
    return r, left


def _nearest(dist: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Index of each row's nearest neighbour (excluding itself) for a batch ``(P, n, n)`` of squared
    distance matrices; ties broken uniformly at random."""
    p, n, _ = dist.shape
    eye = torch.eye(n, dtype=torch.bool, device=dist.device).expand(p, n, n)
    dist = dist.masked_fill(eye, float("inf"))
    best = dist.min(dim=2, keepdim=True).values
    ties = dist == best
    noise = torch.rand(dist.shape, generator=generator, dtype=torch.float64).to(dist.device)
    return torch.where(ties, noise + 1.0, torch.zeros_like(noise)).argmax(dim=2)


def codec(
    y: torch.Tensor,
    z: torch.Tensor,
    x: torch.Tensor | None = None,
    *,
    generator: torch.Generator,
    chunk: int | None = None,
) -> torch.Tensor:
    """CODEC T_n(Y, Z_j | X) of Azadkia & Chatterjee (2021) for every column j of ``z``.

    With R_i = #{j: Y_j <= Y_i}, L_i = #{j: Y_j >= Y_i}, N(i) the nearest neighbour of X_i and M(i)
    the nearest neighbour of (X_i, Z_i) (Euclidean, ties at random)::

        T(Y, Z | X) = sum_i [min(R_i, R_M(i)) - min(R_i, R_N(i))] / sum_i [R_i - min(R_i, R_N(i))]
        T(Y, Z)     = sum_i [n min(R_i, R_M(i)) - L_i^2] / sum_i L_i (n - L_i)     (no X)

    T estimates a coefficient that is 0 iff Y is independent of Z given X and 1 iff Y is a function
    of Z given X. A zero denominator (Y constant, or Y a function of X) gives T = 0.

    Args:
        y: response ``(n,)``.
        z: candidate features ``(n, p)``.
        x: features conditioned on ``(n, s)``, or None.
        generator: source of the random tie-breaking.
        chunk: candidate columns per batched distance computation (default: about 4 M distances
            at once).

    Returns:
        ``(p,)`` float64.
    """
    y = y.to(torch.float64)
    z = z.to(torch.float64)
    n = y.shape[0]
    r, left = _ranks(y)
    if x is not None:
        x = x.to(torch.float64)
        dx = torch.cdist(x, x).pow(2).unsqueeze(0)
        r_n = r[_nearest(dx, generator)[0]]
        denominator = float((r - torch.minimum(r, r_n)).sum())
        base = float(torch.minimum(r, r_n).sum())
    else:
        dx = None
        denominator = float((left * (n - left)).sum())
    out = torch.zeros(z.shape[1], dtype=torch.float64)
    chunk = chunk or max(1, 4_000_000 // (n * n))
    if denominator <= 0:
        return out
    for start in range(0, z.shape[1], chunk):
        zc = z[:, start : start + chunk].T  # (c, n)
        dist = (zc.unsqueeze(2) - zc.unsqueeze(1)).pow(2)  # (c, n, n)
        if dx is not None:
            dist = dist + dx
        r_m = r[_nearest(dist, generator)]  # (c, n)
        mins = torch.minimum(r.unsqueeze(0), r_m).sum(1)
        if x is not None:
            out[start : start + chunk] = (mins - base) / denominator
        else:
            out[start : start + chunk] = (n * mins - (left**2).sum()) / denominator
    return out


def foci(
    y: torch.Tensor,
    features: torch.Tensor,
    *,
    generator: torch.Generator,
    max_features: int,
    sizes: torch.Tensor | None = None,
    budget: int | None = None,
) -> tuple[list[int], list[float]]:
    """FOCI forward selection (Azadkia & Chatterjee 2021) with the paper's early stop.

    The first feature maximises T(Y, Z_j); each next one maximises T(Y, Z_j | chosen), and the
    selection stops when that maximum is <= 0, after ``max_features``, or when no remaining
    feature fits the remaining ``budget`` (``sizes[j]`` counted per feature). Features are
    standardised first (constant ones become 0).

    Returns:
        The chosen column indices in order and their CODEC values.
    """
    f = features.to(torch.float64)
    std = f.std(dim=0, unbiased=False)
    f = (f - f.mean(dim=0)) / torch.where(std > 0, std, torch.ones_like(std))
    p = f.shape[1]
    available = torch.ones(p, dtype=torch.bool)
    remaining = budget
    chosen: list[int] = []
    values: list[float] = []
    while len(chosen) < max_features:
        if sizes is not None and remaining is not None:
            available &= sizes <= remaining
        if not bool(available.any()):
            break
        index = torch.nonzero(available).view(-1)
        cond = f[:, chosen] if chosen else None
        t = codec(y, f[:, index], cond, generator=generator)
        best = int(t.argmax())
        if chosen and float(t[best]) <= 0:
            break
        j = int(index[best])
        chosen.append(j)
        values.append(float(t[best]))
        available[j] = False
        if sizes is not None and remaining is not None:
            remaining -= int(sizes[j])
    return chosen, values
