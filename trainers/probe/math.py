"""The probe's math as pure functions.

A LoRA update of one module over some steps is ``dW = s (B1 A1 - B0 A0)``, with ``A`` [r, d_in]
and ``B`` [d_out, r]. It is the rank-2r product ``P Q`` with ``P = [B1, B0]`` [d_out, 2r] and
``Q = [A1; -A0]`` [2r, d_in], so Frobenius inner products of updates never form a d_out x d_in
matrix: ``<P1 Q1, P2 Q2> = sum((P1^T P2) * (Q1 Q2^T))``. Everything is computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LowRankUpdate:
    """``dW = P @ Q`` of one module (never materialised)."""

    P: torch.Tensor   # [d_out, k]
    Q: torch.Tensor   # [k, d_in]


def lora_update(A0: torch.Tensor, B0: torch.Tensor, A1: torch.Tensor, B1: torch.Tensor,
                scaling: float) -> LowRankUpdate:
    """``s (B1 A1 - B0 A0)`` as a rank-2r product (shapes in the module docstring)."""
    P = torch.cat([B1.double(), B0.double()], dim=1) * scaling
    Q = torch.cat([A1.double(), -A0.double()], dim=0)
    return LowRankUpdate(P, Q)


def frobenius_inner(x: LowRankUpdate, y: LowRankUpdate) -> float:
    """``<Px Qx, Py Qy>_F = sum((Px^T Py) * (Qx Qy^T))``."""
    return float(((x.P.T @ y.P) * (x.Q @ y.Q.T)).sum())


def rounding_bound(update: LowRankUpdate) -> float:
    """How far ``frobenius_inner(update, update)`` can be from the true ``||P Q||_F^2`` by
    float64 rounding alone: ``(d_out + d_in + k^2) eps ||P||_F^2 ||Q||_F^2``.

    The product cancels exactly for an unchanged module (``P = [B, B]``, ``Q = [A; -A]``) but
    its computed value is a sum of rounded terms of size up to ``||P||^2 ||Q||^2``, whose sign
    depends on the BLAS's summation order (one host gave +1.8e-15). Each entry of ``P^T P``
    and ``Q Q^T`` is a dot product of length d_out or d_in, the final sum has k^2 terms: the
    standard error bound of those sums, summed by Cauchy-Schwarz, is this. For random factors
    it calls an update zero below a few 1e-6 of the factors' scale, far under one training step."""
    k, (d_out, d_in) = update.P.shape[1], (update.P.shape[0], update.Q.shape[1])
    scale = float(update.P.square().sum()) * float(update.Q.square().sum())
    return (d_out + d_in + k * k) * torch.finfo(torch.float64).eps * scale


def is_zero_update(update: LowRankUpdate, squared_norm: float) -> bool:
    """True when ``||P Q||^2`` (computed as ``squared_norm``) is zero up to rounding."""
    return squared_norm <= rounding_bound(update)


@dataclass(frozen=True)
class UpdateComparison:
    """How the GRIT update relates to the control update of the same module.

    ``cosine``: direction (None when either update is zero); ``norm_ratio``: ||GRIT|| / ||control||;
    ``relative_difference``: ||GRIT - control|| / ||control|| (0: the same update);
    ``direction_change``: || GRIT/||GRIT|| - control/||control|| || = sqrt(2 - 2 cosine), blind to
    a pure rescaling (all that Adam leaves of a scalar preconditioner)."""

    cosine: float | None
    norm_ratio: float | None
    relative_difference: float | None

    @property
    def direction_change(self) -> float | None:
        return None if self.cosine is None else math.sqrt(max(0.0, 2.0 - 2.0 * self.cosine))


def compare_updates(grit: LowRankUpdate, control: LowRankUpdate) -> UpdateComparison:
    gg, cc, gc = frobenius_inner(grit, grit), frobenius_inner(control, control), frobenius_inner(grit, control)
    # ||g - c||^2 = ||g||^2 - 2<g,c> + ||c||^2 can round to a tiny negative for equal updates.
    difference = math.sqrt(max(gg - 2 * gc + cc, 0.0))
    # Zero is decided against the factors' rounding scale, never by the sign of a residual.
    grit_zero = is_zero_update(grit, gg)
    if is_zero_update(control, cc):
        return UpdateComparison(None, None, None if grit_zero else math.inf)
    if grit_zero:
        return UpdateComparison(None, 0.0, 1.0)
    cosine = max(-1.0, min(1.0, gc / math.sqrt(gg * cc)))
    return UpdateComparison(cosine, math.sqrt(gg / cc), difference / math.sqrt(cc))


def compare_vectors(changed: torch.Tensor, reference: torch.Tensor) -> UpdateComparison:
    """The same comparison for two plain tensors (e.g. consumed vs raw gradient)."""
    x, y = changed.flatten().double(), reference.flatten().double()
    xx, yy = float(x @ x), float(y @ y)
    if yy <= 0:
        return UpdateComparison(None, None, None if xx <= 0 else math.inf)
    cosine = None if xx <= 0 else max(-1.0, min(1.0, float(x @ y) / math.sqrt(xx * yy)))
    return UpdateComparison(cosine, math.sqrt(xx / yy), float((x - y).norm()) / math.sqrt(yy))


@dataclass(frozen=True)
class CurveComparison:
    """Two loss curves over their common steps: Pearson correlation and max |difference|."""

    steps: int
    correlation: float | None
    max_abs_difference: float


def compare_curves(first: Sequence[float], second: Sequence[float]) -> CurveComparison:
    n = min(len(first), len(second))
    if n == 0:
        raise ValueError("no common steps to compare")
    x = torch.tensor(first[:n], dtype=torch.float64)
    y = torch.tensor(second[:n], dtype=torch.float64)
    dx, dy = x - x.mean(), y - y.mean()
    denominator = float(dx.norm() * dy.norm())
    correlation = None if n < 2 or _is_flat(x, dx) or _is_flat(y, dy) else float(dx @ dy) / denominator
    return CurveComparison(n, correlation, float((x - y).abs().max()))


def _is_flat(curve: torch.Tensor, centred: torch.Tensor) -> bool:
    """A constant curve: its mean is not exact in floating point, so ``curve - mean`` holds
    rounding residuals (up to n eps |curve|), which a correlation would turn into +-1."""
    return (float(centred.norm())
            <= len(curve) * torch.finfo(torch.float64).eps * float(curve.abs().max()) * math.sqrt(len(curve)))


def median(values: Sequence[float]) -> float | None:
    ordered = sorted(v for v in values if v is not None and not math.isnan(v))
    if not ordered:
        return None
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])
