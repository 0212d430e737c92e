"""The probe's math against dense computations on small matrices."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.probe.math import (
    compare_curves,
    compare_updates,
    compare_vectors,
    frobenius_inner,
    is_zero_update,
    lora_update,
    rounding_bound,
)


def _factors(seed: int, r: int = 3, d_in: int = 5, d_out: int = 4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(r, d_in, generator=g, dtype=torch.float64),
            torch.randn(d_out, r, generator=g, dtype=torch.float64))


def test_low_rank_inner_product_equals_the_dense_one():
    (A0, B0), (A1, B1), (A2, B2) = _factors(0), _factors(1), _factors(2)
    x, y = lora_update(A0, B0, A1, B1, 2.0), lora_update(A0, B0, A2, B2, 0.5)
    dense_x = 2.0 * (B1 @ A1 - B0 @ A0)
    dense_y = 0.5 * (B2 @ A2 - B0 @ A0)
    assert frobenius_inner(x, y) == pytest.approx(float((dense_x.double() * dense_y.double()).sum()), rel=1e-10)


def test_compare_updates_matches_dense_cosine_norm_and_difference():
    (A0, B0), (A1, B1), (A2, B2) = _factors(3), _factors(4), _factors(5)
    x, y = lora_update(A0, B0, A1, B1, 1.0), lora_update(A0, B0, A2, B2, 1.0)
    dx, dy = (B1 @ A1 - B0 @ A0).double(), (B2 @ A2 - B0 @ A0).double()
    c = compare_updates(x, y)
    assert c.cosine == pytest.approx(float((dx * dy).sum() / (dx.norm() * dy.norm())), rel=1e-10)
    assert c.norm_ratio == pytest.approx(float(dx.norm() / dy.norm()), rel=1e-10)
    assert c.relative_difference == pytest.approx(float((dx - dy).norm() / dy.norm()), rel=1e-8)


def test_identical_and_rescaled_updates():
    (A0, B0), (A1, B1) = _factors(6), _factors(7)
    same = compare_updates(lora_update(A0, B0, A1, B1, 1.0), lora_update(A0, B0, A1, B1, 1.0))
    assert (same.relative_difference == pytest.approx(0.0, abs=1e-7)
            and same.direction_change == pytest.approx(0, abs=1e-6))
    # A rescaled update (what Adam leaves of a scalar preconditioner) keeps its direction.
    scaled = compare_updates(lora_update(A0 * 0, B0 * 0, A1, 3 * B1, 1.0), lora_update(A0 * 0, B0 * 0, A1, B1, 1.0))
    assert scaled.norm_ratio == pytest.approx(3.0) and scaled.relative_difference == pytest.approx(2.0)
    assert scaled.direction_change == pytest.approx(0.0, abs=1e-6)


def test_zero_control_update_has_no_cosine():
    A, B = _factors(8)
    none = compare_updates(lora_update(A, B, A, B, 1.0), lora_update(A, B, A, B, 1.0))
    assert none.cosine is None and none.relative_difference is None
    assert compare_vectors(torch.ones(3), torch.zeros(3)).relative_difference == math.inf


def _reparametrised(seed: int, scale: float, r: int = 16, d_in: int = 96, d_out: int = 64):
    """An unchanged module in other factors: ``B1 A1 = (B0 M)(M^-1 A0) = B0 A0`` up to rounding."""
    g = torch.Generator().manual_seed(seed)
    A0 = scale * torch.randn(r, d_in, generator=g, dtype=torch.float64)
    B0 = scale * torch.randn(d_out, r, generator=g, dtype=torch.float64)
    M = torch.randn(r, r, generator=g, dtype=torch.float64)
    return lora_update(A0, B0, torch.linalg.solve(M, A0), B0 @ M, 2.0)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_a_zero_update_is_zero_whatever_the_sign_of_its_rounding_residual(scale):
    """The computed ||P Q||^2 of a product that cancels is a rounding residual of either sign
    (its sign depends on the BLAS's summation order): half of these seeds give a positive one,
    which a ``cc <= 0`` test took for a real update and compared by cosine."""
    signs = set()
    for seed in range(12):
        zero = _reparametrised(seed, scale)
        signs.add(frobenius_inner(zero, zero) > 0)
        real = lora_update(torch.zeros_like(zero.Q[:16]), torch.zeros_like(zero.P[:, :16]),
                           zero.Q[:16], zero.P[:, :16], 1.0)
        verdict = compare_updates(real, zero)
        assert verdict.cosine is None and verdict.relative_difference == math.inf, seed
        assert compare_updates(zero, real).cosine is None
        assert compare_updates(zero, zero).relative_difference is None
    assert signs == {True, False}  # the case exists on this host: the test bites


def test_real_updates_are_far_above_the_rounding_bound():
    """The zero test cannot swallow a real update: a change of relative size 1e-4 (one Adam
    step at lr 1e-6 on weights of size 1e-2) is a hundred times above the rounding bound."""
    A0, B0 = _factors(9, r=16, d_in=96, d_out=64)
    small = lora_update(A0, B0, A0, B0 * (1 + 1e-4), 1.0)
    assert not is_zero_update(small, frobenius_inner(small, small))
    assert frobenius_inner(small, small) > 100 * rounding_bound(small)
    zero_grit = compare_updates(lora_update(A0, B0, A0, B0, 1.0), small)
    assert zero_grit.cosine is None and zero_grit.norm_ratio == 0.0 and zero_grit.relative_difference == 1.0


def test_flat_curves_have_no_correlation():
    # mean([0.1] * 7) is not exactly 0.1: the centred curve is rounding noise, not a shape.
    flat = compare_curves([0.1] * 7, [3.0, 2.0, 1.5, 1.2, 1.0, 0.9, 0.8])
    assert flat.correlation is None and flat.steps == 7


def test_compare_curves():
    same = compare_curves([3.0, 2.0, 1.5, 1.0], [3.0, 2.0, 1.5, 1.0, 0.9])
    assert same.steps == 4 and same.correlation == pytest.approx(1.0) and same.max_abs_difference == 0
    different = compare_curves([3.0, 2.0, 1.0], [3.0, 2.5, 2.9])
    assert different.max_abs_difference == pytest.approx(1.9) and different.correlation < 0.5
    with pytest.raises(ValueError):
        compare_curves([], [1.0])


def test_the_per_step_median_leaves_a_step_without_values_empty_and_says_nothing():
    import warnings

    import numpy as np

    from trainers.probe.plot import median_per_step

    values = np.array([[np.nan, 1.0, 0.5], [np.nan, 0.0, np.nan], [np.nan, 0.5, 0.7]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # numpy's "All-NaN slice" would raise
        medians = median_per_step(values)
    assert np.isnan(medians[0]) and medians[1:].tolist() == [0.5, 0.6]
