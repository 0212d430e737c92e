"""GRIT's math as small pure-tensor functions (testable on a 4x3 matrix).

Notation for one LoRA layer with rank r and scaling s (``y = W x + s * B A x``):

- ``A``: [r, d_in], ``B``: [d_out, r], ``u = A x``: [N, r] (rows = tokens),
  ``v = B^T g``: [N, r] with ``g = dL/dy`` per token.
- Gradients: ``dL/dB = s * sum_t g_t u_t^T`` and ``dL/dA = s * sum_t v_t x_t^T``.
- K-FAC for ``dW = s B A`` gives B's rank-side factor ``Sigma_u = E[u u^T]`` and A's rank-side
  factor ``Sigma_v = E[v v^T]`` (for one token the exact Fisher of vec(B) is
  ``(u u^T) kron (g g^T)``), hence ``grad_B <- grad_B (Sigma_u + lambda I)^-1`` and
  ``grad_A <- (Sigma_v + lambda I)^-1 grad_A``. The paper code swaps the sides ("reference").
"""

from __future__ import annotations

import torch


def masked_outer_sum(rows: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """``sum_t w_t z_t z_t^T`` in fp32, with 0/1 row weights (padding rows weigh 0; None: all
    rows count): rows [..., r] -> [r, r].

    Multiplying by the mask instead of indexing with it avoids a data-dependent gather (and a
    device sync) per layer."""
    flat = rows.reshape(-1, rows.shape[-1]).float()
    if weight is None:
        return flat.T @ flat
    return (flat * weight.reshape(-1, 1)).T @ flat


def masked_outer_sum_batched(rows: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """:func:`masked_outer_sum` of G modules' rows at once, all weighted by the same 0/1 row
    weights (one forward's mask): rows [G, ..., r] -> [G, r, r], one batched matmul."""
    flat = rows.reshape(rows.shape[0], -1, rows.shape[-1]).float()
    weighted = flat if weight is None else flat * weight.reshape(1, -1, 1)
    return torch.bmm(weighted.transpose(1, 2), flat)


def ema_update(current: torch.Tensor | None, batch_mean: torch.Tensor, decay: float) -> torch.Tensor:
    """Exponential moving average; the first batch initialises it."""
    return batch_mean.clone() if current is None else decay * current + (1 - decay) * batch_mean


def effective_damping(sigma: torch.Tensor, damping: float, mode: str) -> torch.Tensor:
    """``lambda`` itself (absolute) or ``lambda * tr(Sigma) / r`` (relative to the factor's
    scale), one per matrix of ``sigma`` [..., r, r]: a 0-d tensor for one matrix."""
    if mode == "absolute":
        return torch.full(sigma.shape[:-2], damping, dtype=sigma.dtype, device=sigma.device)
    return damping * torch.diagonal(sigma, dim1=-2, dim2=-1).sum(-1) / sigma.shape[-1]


def inverse_from_cholesky(chol: torch.Tensor) -> torch.Tensor:
    """``(L L^T)^-1 = L^-T L^-1`` from lower factors ``chol`` [..., r, r], by a triangular solve.
    ``torch.cholesky_inverse`` computes the same but its CPU kernel then reads LAPACK's status
    (a host read the step gates count); a triangular solve has no status to read, and on an H200
    GRIT's steps with it make no host synchronisation (docs/gpu.md)."""
    eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device)
    # row-major first: the solve returns column-major factors, whose product takes another kernel
    # batched than alone (one matrix's inverse would depend on its batch by a rounding)
    inverse_factor = torch.linalg.solve_triangular(chol, eye, upper=False).contiguous()
    # and a product of stacks even for one matrix: a lone small product goes to BLAS's gemm, a
    # stack of them (r^3 < 400) to torch's own loop, which rounds otherwise on AVX-512 MKL
    stack = inverse_factor.reshape(-1, *inverse_factor.shape[-2:])
    return torch.bmm(stack.mT, stack).reshape(inverse_factor.shape)


def damped_inverse(
    sigma: torch.Tensor, damping: float, escalation: list[float],
) -> tuple[torch.Tensor, float] | None:
    """``(Sigma + lambda * s * I)^-1`` by Cholesky, for the first s in ``escalation`` that works.

    Returns (inverse, lambda * s) or None when every attempt fails (or lambda is 0).
    """
    if damping <= 0 or not torch.isfinite(sigma).all():
        return None
    eye = torch.eye(sigma.shape[0], dtype=sigma.dtype, device=sigma.device)
    for scale in escalation:
        chol, info = torch.linalg.cholesky_ex(sigma + damping * scale * eye)
        if int(info) == 0:
            return inverse_from_cholesky(chol), damping * scale
    return None


def damped_inverse_batched(
    sigmas: torch.Tensor, dampings: torch.Tensor, escalation: list[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`damped_inverse` for a stack ``[M, r, r]``: every escalation level factorised in one
    batched Cholesky ``[L, M, r, r]``, each matrix keeping its first level that factorises, so
    nothing is read on the host (the levels a sequential escalation would skip cost a few
    extra r x r factorisations, nothing on a step bound by the host). Returns (inverses
    [M, r, r], damping used [M]); a matrix that never factorises, or whose damping is 0, gets
    damping 0 and must be treated as not invertible."""
    eye = torch.eye(sigmas.shape[-1], dtype=sigmas.dtype, device=sigmas.device)
    usable = (dampings > 0) & torch.isfinite(sigmas).flatten(1).all(dim=1)
    # the scales as scalars: a tensor of them would be a copy to the device, which waits
    levels = torch.stack([dampings * scale for scale in escalation])                 # [L, M]
    chol, info = torch.linalg.cholesky_ex(sigmas[None] + levels[..., None, None] * eye)
    factorised = (info == 0) & usable[None]
    first = factorised.to(torch.uint8).argmax(dim=0)        # the first level that factorised (0 if none)
    solved = factorised.any(dim=0)
    matrices = torch.arange(sigmas.shape[0], device=sigmas.device)
    # a matrix that never factorised inverts I instead (its result is discarded): the batched
    # inverse must not meet a singular factor
    chosen = torch.where(solved[:, None, None], chol[first, matrices], eye)
    inverses = torch.where(solved[:, None, None], inverse_from_cholesky(chosen), 0.0).contiguous()
    used = torch.where(solved, levels[first, matrices], 0.0)
    return inverses, used


def diagonal_inverse(sigma: torch.Tensor, damping: float) -> torch.Tensor:
    """``diag(Sigma + lambda I)^-1``: the diagonal Fisher approximation in rank space."""
    return torch.diag(1.0 / (torch.diagonal(sigma) + damping))


def block_diagonal_inverse(
    sigma: torch.Tensor, damping: float, block_size: int, escalation: list[float],
) -> torch.Tensor | None:
    """Inverse of the block-diagonal part of ``Sigma + lambda I`` (blocks of ``block_size``)."""
    r = sigma.shape[0]
    inverse = torch.zeros_like(sigma)
    for start in range(0, r, block_size):
        block = slice(start, min(start + block_size, r))
        solved = damped_inverse(sigma[block, block], damping, escalation)
        if solved is None:
            return None
        inverse[block, block] = solved[0]
    return inverse


def precondition_B(grad_B: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``grad_B (Sigma + lambda I)^-1``: [d_out, r] @ [r, r]."""
    return precondition_batched(grad_B[None], inverse[None], "B")[0]


def precondition_A(grad_A: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``(Sigma + lambda I)^-1 grad_A``: [r, r] @ [r, d_in]."""
    return precondition_batched(grad_A[None], inverse[None], "A")[0]


def graft(direction: torch.Tensor, magnitude_from: torch.Tensor) -> torch.Tensor:
    """``direction`` rescaled to the Frobenius norm of ``magnitude_from`` (0 stays 0). Branchless:
    a test of the norm on the host would wait for the device once per module and side."""
    return direction * graft_scale(direction.norm(), magnitude_from.norm())


def graft_scale(direction_norm: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """What grafting multiplies a direction by: ``magnitude / direction_norm``, and 1 where the
    direction is 0 (which stays 0, sign included, where 0/0 would make it NaN). Chosen on the
    norms, not on the grafted matrices: the same values bit for bit (x * 1 is x), one pass over
    the gradients fewer."""
    return (magnitude / direction_norm).masked_fill_(direction_norm == 0, 1.0)


def precondition_batched(grads: torch.Tensor, inverses: torch.Tensor, side: str) -> torch.Tensor:
    """:func:`precondition_A` / :func:`precondition_B` of G modules at once (one batched matmul):
    A: [G, r, r] @ [G, r, d_in]; B: [G, d_out, r] @ [G, r, r]. The single-module functions are
    this one on a batch of one, not a plain matmul: on some CPUs (AVX-512) the plain product of
    tiny matrices ([16, 4] @ [4, 4]) takes another kernel than the batched one and differs in the
    last bit, while a batched product does not depend on the batch size (tested)."""
    inverses = inverses.to(grads.dtype)
    return torch.bmm(inverses, grads) if side == "A" else torch.bmm(grads, inverses)


def graft_batched(directions: torch.Tensor, magnitudes_from: torch.Tensor) -> torch.Tensor:
    """:func:`graft` of G matrices at once: each ``directions[g]`` rescaled to the Frobenius norm
    of ``magnitudes_from[g]`` (0 stays 0)."""
    dims = tuple(range(1, directions.dim()))
    return directions * graft_scale(torch.linalg.vector_norm(directions, dim=dims, keepdim=True),
                                    torch.linalg.vector_norm(magnitudes_from, dim=dims, keepdim=True))


def stacked_norms(stacked: torch.Tensor) -> torch.Tensor:
    """The Frobenius norm of each matrix of a stack [G, m, n], in one operation: each is what
    ``torch.linalg.vector_norm`` of that matrix alone gives (bit for bit on CPU, tested)."""
    return torch.linalg.vector_norm(stacked, dim=tuple(range(1, stacked.dim())))


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What a clip to ``max_norm`` scales every gradient by, min(max_norm / (norm + 1e-6), 1): the
    formula of torch's ``clip_grad_norm_``, so that a clip done on stacked gradients scales them as
    it would."""
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


def condition_number(matrix: torch.Tensor) -> float:
    eigenvalues = torch.linalg.eigvalsh(0.5 * (matrix + matrix.T)).abs()
    smallest = float(eigenvalues.min())
    return float("inf") if smallest == 0 else float(eigenvalues.max()) / smallest


def distance_from_scalar(matrix: torch.Tensor) -> float:
    """``||P - c I||_F / ||P||_F`` with c = tr(P)/r: 0 for a multiple of I, which Adam cancels."""
    norm = torch.linalg.matrix_norm(matrix)
    if norm == 0:
        return 0.0
    c = torch.trace(matrix) / matrix.shape[0]
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    return float(torch.linalg.matrix_norm(matrix - c * eye) / norm)


def kept_energy(eigenvalues: torch.Tensor, k: int) -> torch.Tensor:
    """The share of the spectrum's energy (sum of eigenvalues, clamped at 0) the top k keep;
    ``eigenvalues`` descending. 1 for an all-zero spectrum (nothing is lost)."""
    positive = eigenvalues.clamp(min=0)
    total = positive.sum()
    return torch.where(total > 0, positive[:k].sum() / total.clamp(min=torch.finfo(total.dtype).tiny),
                       torch.ones_like(total))


def top_eigenvectors(sigma: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues descending [r], the top-k eigenvectors as columns [r, k])."""
    eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (sigma + sigma.T))
    order = torch.argsort(eigenvalues, descending=True)
    return eigenvalues[order], eigenvectors[:, order[:k]]


def joint_budget(vision_ranks: list[int], factor: float, min_k: int) -> int:
    """k = round(factor x the median vision rank), at least ``min_k``: the GRIT-VLM guide's
    multimodal projection budget."""
    ranks = sorted(vision_ranks)
    return max(min_k, round(factor * ranks[len(ranks) // 2])) if ranks else min_k


def rank_by_energy(eigenvalues: torch.Tensor, tau: float, min_rank: int, max_rank: int) -> int:
    """Smallest k whose top eigenvalues hold at least ``tau`` of the energy, clamped."""
    positive = eigenvalues.clamp(min=0)
    total = float(positive.sum())
    if total == 0:
        return max_rank
    cumulative = torch.cumsum(positive, 0) / total
    k = int(torch.searchsorted(cumulative, torch.tensor(tau, dtype=cumulative.dtype, device=cumulative.device))) + 1
    return max(min_rank, min(max_rank, k))


def reproject_A(A: torch.Tensor, basis_u: torch.Tensor) -> torch.Tensor:
    """``V_u V_u^T A``: keep A's rows in the span of the top-k u-directions. [r, d_in]."""
    return basis_u @ (basis_u.T @ A)


def reproject_B(B: torch.Tensor, basis_v: torch.Tensor) -> torch.Tensor:
    """``B V_v V_v^T``: [d_out, r]."""
    return (B @ basis_v) @ basis_v.T


def truncate_factors(A: torch.Tensor, B: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-k factors ``(V^T A, B V)`` with ``B' A' = B V V^T A``: exact when A already lies in
    span(V) (i.e. right after reprojection), so the layer's function does not change."""
    return basis.T @ A, B @ basis


def lora_alpha_for(scaling: float, rank: int, rslora: bool) -> float:
    """The alpha that gives a rank-``rank`` PEFT layer the scaling ``scaling``: PEFT sets
    s = alpha / r (alpha / sqrt(r) with rsLoRA), so alpha = s r (s sqrt(r))."""
    import math

    return scaling * (math.sqrt(rank) if rslora else rank)


def budget_at(schedule: str, step: int, total_steps: int, start: int, end: int) -> int:
    """Projection budget k at ``step`` of ``total_steps`` for the linear or cosine schedule."""
    import math

    progress = min(1.0, max(0.0, step / max(1, total_steps)))
    if schedule == "cosine":
        progress = 0.5 * (1 - math.cos(math.pi * progress))
    return int(round(start + (end - start) * progress))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    denominator = a.norm() * b.norm()
    return 1.0 if denominator == 0 else float(a @ b / denominator)
