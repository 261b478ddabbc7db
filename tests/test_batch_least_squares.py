"""The batch solves' Levenberg-Marquardt loop (gradleak.batch.least_squares), on a curve whose parameters are known:
``y = a exp(-b t)`` sampled without noise."""
import math

import torch

from gradleak.batch.least_squares import levenberg_marquardt

TIMES = torch.linspace(0.0, 4.0, 25, dtype=torch.float64)
TRUTH = (2.5, 0.7)
SAMPLES = TRUTH[0] * torch.exp(-TRUTH[1] * TIMES)


def residuals(x):
    """(K, 25): the curve at each point ``x = (a, b)`` (K, 2) less the samples."""
    return x[:, :1] * torch.exp(-x[:, 1:] * TIMES) - SAMPLES


def normal_equations(x, r):
    decay = torch.exp(-x[:, 1:] * TIMES)
    jacobian = torch.stack([decay, -x[:, :1] * TIMES * decay], -1)       # (K, 25, 2)
    return jacobian.transpose(-1, -2) @ jacobian, (jacobian.transpose(-1, -2) @ r.unsqueeze(-1))[..., 0]


STARTS = torch.tensor([[1.0, 0.1], [5.0, 2.0], [0.5, 1.5]], dtype=torch.float64)


def test_every_start_reaches_the_curve_on_its_own_path():
    """Three starts at once land on the truth, each as it does alone (its damping and steps are its own)."""
    x, norm = levenberg_marquardt(residuals, normal_equations, STARTS, 200, stalled=1e-30)
    assert torch.allclose(x, torch.tensor(TRUTH, dtype=torch.float64).expand(3, 2), atol=1e-10)
    assert bool((norm < 1e-10).all())
    for start, together in zip(STARTS, x):
        alone, _ = levenberg_marquardt(residuals, normal_equations, start[None], 200, stalled=1e-30)
        assert torch.allclose(alone[0], together, rtol=0, atol=1e-14)


def test_it_stops_when_every_point_is_finished_or_given_up():
    """``finished`` ends the loop once every point passes it (the points as they stand, asked before each step);
    ``give_up`` after ``give_up_after`` steps when no point has come below it."""
    x, norm = levenberg_marquardt(residuals, normal_equations, STARTS, 200, stalled=1e-30,
                                  finished=lambda x, norm: norm < 1e-2)
    assert bool((norm < 1e-2).all()) and float(norm.max()) > 1e-10
    start_norm = torch.linalg.vector_norm(residuals(STARTS), dim=-1)
    x, norm = levenberg_marquardt(residuals, normal_equations, STARTS, 200, stalled=1e-30, give_up=1e-20,
                                  give_up_after=2)
    two, two_norm = levenberg_marquardt(residuals, normal_equations, STARTS, 2, stalled=1e-30)
    assert torch.equal(x, two) and torch.equal(norm, two_norm)
    assert bool((norm <= start_norm).all()) and float(norm.min()) > 1e-6
    x, norm = levenberg_marquardt(residuals, normal_equations, STARTS, 0, stalled=1e-30)
    assert torch.equal(x, STARTS) and torch.allclose(norm, start_norm, rtol=1e-14, atol=0)
    assert math.isfinite(float(norm.max()))
