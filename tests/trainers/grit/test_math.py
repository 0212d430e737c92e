"""GRIT math on small matrices."""

from __future__ import annotations

import pytest
import torch

from trainers.grit import math as gm


def test_damped_inverse_escalates_until_cholesky_succeeds():
    singular = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    inverse, used = gm.damped_inverse(singular, 1e-3, [1, 3, 10])
    assert used == 1e-3
    assert torch.allclose(inverse @ (singular + used * torch.eye(2)), torch.eye(2), atol=1e-4)
    indefinite = torch.tensor([[1.0, 0.0], [0.0, -0.002]])
    _, used = gm.damped_inverse(indefinite, 1e-3, [1, 3, 10])
    assert used == 3e-3  # lambda and 1e-3 fail (eigenvalue -0.001 and -0.002 + 1e-3 <= 0)
    assert gm.damped_inverse(torch.tensor([[-1.0]]), 1e-3, [1, 3]) is None


def test_masked_outer_sum_skips_padding_rows():
    rows = torch.randn(2, 3, 4)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    kept = rows[mask.bool()]
    assert torch.allclose(gm.masked_outer_sum(rows, mask), kept.T @ kept, atol=1e-6)
    flat = rows.reshape(-1, 4)
    assert torch.allclose(gm.masked_outer_sum(rows, None), flat.T @ flat, atol=1e-6)


def test_batched_inverse_matches_one_by_one_and_flags_failures():
    torch.manual_seed(0)
    sigmas = torch.stack([m @ m.T for m in torch.randn(5, 3, 3)] + [torch.zeros(3, 3), -torch.eye(3)])
    dampings = torch.tensor([1e-3] * 5 + [0.0, 1e-3])
    inverses, used = gm.damped_inverse_batched(sigmas, dampings, [1, 3, 10])
    for i in range(5):
        single, single_damping = gm.damped_inverse(sigmas[i], 1e-3, [1, 3, 10])
        assert torch.allclose(inverses[i], single, rtol=1e-4) and used[i] == single_damping
    assert used[5] == 0 and used[6] == 0  # zero damping (all-zero factor) and never positive definite


def test_preconditioning_sides_and_shapes():
    grad_B, grad_A = torch.randn(5, 3), torch.randn(3, 4)
    inverse = torch.linalg.inv(torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 3.0]]))
    assert torch.allclose(gm.precondition_B(grad_B, inverse), grad_B @ inverse)
    assert torch.allclose(gm.precondition_A(grad_A, inverse), inverse @ grad_A)


@pytest.mark.parametrize("d, r", [(5, 3), (16, 4), (576, 16)])
def test_one_module_is_preconditioned_bit_for_bit_as_in_a_batch(d: int, r: int):
    """The per-module step (the reference) and the batched step agree bit for bit on any CPU: on
    AVX-512 hosts a plain [16, 4] @ [4, 4] takes another kernel than the batched product."""
    torch.manual_seed(0)
    grads_B, grads_A, inverses = torch.randn(6, d, r), torch.randn(6, r, d), torch.randn(6, r, r)
    batched_B = gm.precondition_batched(grads_B, inverses, "B")
    batched_A = gm.precondition_batched(grads_A, inverses, "A")
    for i in range(6):
        assert torch.equal(gm.precondition_B(grads_B[i], inverses[i]), batched_B[i])
        assert torch.equal(gm.precondition_A(grads_A[i], inverses[i]), batched_A[i])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, cols", [(4, 16), (16, 576), (576, 16), (16, 1536), (1536, 16), (4096, 16)])
def test_a_stack_s_norms_are_each_matrix_s_own_norm_bit_for_bit(rows: int, cols: int, dtype: torch.dtype):
    """The clip on the stacks (``BatchedEngine.precondition_and_clip``) is torch's clip bit for bit
    only if each matrix's norm taken from the stack is the one torch's clip takes of that matrix
    alone (its list norm, in the gradient's dtype): at SmolLM2's and Llama-3-8B's LoRA shapes."""
    torch.manual_seed(0)
    stack = (torch.randn(6, rows, cols) * torch.rand(6, 1, 1)).to(dtype)
    norms = gm.stacked_norms(stack)
    assert norms.dtype == dtype
    assert torch.equal(norms, torch.stack(torch._foreach_norm(list(stack.unbind(0)))))
    assert torch.equal(norms, torch.stack([torch.linalg.vector_norm(m) for m in stack]))


def test_the_clip_coefficient_is_min_of_bound_over_norm_and_one():
    assert float(gm.clip_coefficient(torch.tensor(4.0), 1.0)) == pytest.approx(1.0 / (4.0 + 1e-6))
    assert float(gm.clip_coefficient(torch.tensor(0.5), 1.0)) == 1.0


def test_diagonal_and_block_diagonal_inverses():
    sigma = torch.tensor([[4.0, 1.0, 0.0, 0.5], [1.0, 3.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.3], [0.5, 0.0, 0.3, 1.0]])
    assert torch.allclose(gm.diagonal_inverse(sigma, 0.0), torch.diag(1 / torch.diagonal(sigma)))
    blocks = gm.block_diagonal_inverse(sigma, 1e-6, 2, [1])
    assert torch.allclose(blocks[:2, :2], torch.linalg.inv(sigma[:2, :2]), atol=1e-4)
    assert torch.all(blocks[:2, 2:] == 0) and torch.all(blocks[2:, :2] == 0)


def test_scalar_distance_and_condition_number():
    assert gm.distance_from_scalar(3 * torch.eye(4)) == 0.0
    assert gm.distance_from_scalar(torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0]))) > 0.3
    assert abs(gm.condition_number(torch.diag(torch.tensor([1.0, 10.0]))) - 10) < 1e-5


def test_rank_by_energy_and_budget_schedules():
    eigenvalues = torch.tensor([10.0, 5.0, 1.0, 0.1, 0.0])
    assert gm.rank_by_energy(eigenvalues, 0.9, 1, 5) == 2
    assert gm.rank_by_energy(eigenvalues, 0.999, 1, 5) == 4
    assert gm.rank_by_energy(eigenvalues, 0.5, 3, 5) == 3  # clamped to min_rank
    assert [gm.budget_at("linear", s, 10, 2, 8) for s in (0, 5, 10)] == [2, 5, 8]
    assert gm.budget_at("cosine", 5, 10, 2, 8) == 5 and gm.budget_at("cosine", 1, 10, 2, 8) < 3


def test_reprojection_with_full_basis_is_identity_and_truncation_is_exact():
    torch.manual_seed(0)
    A, B = torch.randn(4, 6), torch.randn(5, 4)
    sigma = torch.randn(4, 4)
    sigma = sigma @ sigma.T
    _, full = gm.top_eigenvectors(sigma, 4)
    assert torch.allclose(gm.reproject_A(A, full), A, atol=1e-5)
    assert torch.allclose(gm.reproject_B(B, full), B, atol=1e-5)
    _, basis = gm.top_eigenvectors(sigma, 2)
    A_projected = gm.reproject_A(A, basis)
    A_small, B_small = gm.truncate_factors(A_projected, B, basis)
    assert A_small.shape == (2, 6) and B_small.shape == (5, 2)
    assert torch.allclose(B_small @ A_small, B @ A_projected, atol=1e-5)


def test_graft_keeps_the_direction_and_takes_the_norm():
    direction, raw = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 10.0]])
    grafted = gm.graft(direction, raw)
    assert torch.allclose(grafted, torch.tensor([[6.0, 8.0]]))
    assert torch.equal(gm.graft(torch.zeros(1, 2), raw), torch.zeros(1, 2))


def test_batched_grafting_scales_each_matrix_by_its_norm_ratio_and_keeps_zero_matrices_as_they_are():
    """Bit for bit ``direction * (raw norm / direction norm)`` per matrix, and a zero matrix
    (negative zeros included) unchanged: the scale is chosen on the norms, so a 0/0 never reaches
    a gradient."""
    torch.manual_seed(0)
    directions, raw = torch.randn(4, 5, 3), torch.randn(4, 5, 3)
    directions[2] = -0.0
    grafted = gm.graft_batched(directions, raw)
    for g in (0, 1, 3):
        assert torch.equal(grafted[g], directions[g] * (raw[g].norm() / directions[g].norm()))
        assert torch.equal(gm.graft(directions[g], raw[g]), grafted[g])
    assert torch.equal(grafted[2], directions[2]) and torch.signbit(grafted[2]).all()


def test_batched_escalation_keeps_each_matrix_first_level_that_factorises_without_host_reads():
    """Every level is factorised at once and each matrix keeps its first success: bit for bit
    the one-by-one escalation, a non-finite factor is refused, and nothing is read on the host nor
    copied from it (the escalation's scales were a tensor made from a list: one copy to the GPU,
    which waited for it)."""
    from profiling.operations import operation_counts

    torch.manual_seed(1)
    spd = torch.stack([m @ m.T for m in torch.randn(3, 4, 4)])
    # -2.5 d I + d I fails at level 1, -2.5 d I + 3 d I succeeds at level 3: damping 3d
    needs_three = -2.5e-3 * torch.eye(4)
    sigmas = torch.cat([spd, needs_three[None], torch.full((1, 4, 4), float("nan"))])
    dampings = torch.full((5,), 1e-3)
    escalation = [1.0, 3.0, 10.0]
    inverses, used = gm.damped_inverse_batched(sigmas, dampings, escalation)
    for i in range(4):
        single, single_damping = gm.damped_inverse(sigmas[i], 1e-3, escalation)
        assert torch.equal(inverses[i], single) and float(used[i]) == pytest.approx(single_damping)
    assert float(used[3]) == pytest.approx(3e-3) and used[4] == 0 and torch.equal(inverses[4], torch.zeros(4, 4))
    counts = operation_counts(lambda s: gm.damped_inverse_batched(s, dampings, escalation), sigmas)
    assert counts.host_reads == 0 and counts.host_copies == 0 and counts.operations < 50
    # batched: ten times the matrices, the same operations
    more = dampings.repeat(10)
    many = operation_counts(lambda s: gm.damped_inverse_batched(s, more, escalation), sigmas.repeat(10, 1, 1))
    assert many == counts
