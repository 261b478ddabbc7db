"""Tests of the paper's searches (gradleak.recovery.paper) on synthetic heads with known answers.

The truth (true ``t``, feature and label) is used by the tests only; the searches never see it.
"""
from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import pytest
import torch

from gradleak.head import HeadProblem, factor_head
from gradleak.labels import mixup_label, smooth_label
from gradleak.recovery.base import SEARCHES
from gradleak.recovery.paper import (
    DEFAULT_COEFFICIENT, lbfgs_search, paper_objective, particle_swarm, pso_intervals, pso_search)

THRESHOLD = 1e-9


def scalars(*values: float) -> torch.Tensor:
    """A float64 ``(K,)`` batch of candidate scalars."""
    return torch.tensor(values, dtype=torch.float64)


@dataclass
class SyntheticHead:
    problem: HeadProblem
    weight: torch.Tensor      # (C, d)
    bias: Optional[torch.Tensor]  # (C,)
    feature: torch.Tensor     # (d,) true h
    label: torch.Tensor       # (C,) true y
    t: float                  # true t = (h . v) / sigma


def make_head(seed: int, label_format: str, num_classes: int = 10, dim: int = 768, features: str = "sigmoid",
              with_bias: bool = False) -> SyntheticHead:
    """An untrained-like head (W ~ U(-0.5, 0.5)) and the float64 gradient of one example with a soft label."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.rand(num_classes, dim, generator=gen, dtype=torch.float64) - 0.5
    bias = torch.rand(num_classes, generator=gen, dtype=torch.float64) - 0.5 if with_bias else None
    raw = torch.randn(dim, generator=gen, dtype=torch.float64)
    feature = torch.sigmoid(raw) if features == "sigmoid" else torch.relu(raw)
    classes = torch.randperm(num_classes, generator=gen)[:2].tolist()
    weight_of_mix = float(torch.rand(1, generator=gen))
    if label_format == "mixup":
        label = mixup_label(classes[0], classes[1], weight_of_mix, num_classes)
    else:
        eps = 0.0 if label_format == "hard" else 0.5 * weight_of_mix
        label = smooth_label(classes[0], num_classes, eps)
    logits = weight @ feature + (0 if bias is None else bias)
    delta = torch.softmax(logits, dim=0) - label
    problem = factor_head(torch.outer(delta, feature), weight, bias, None if bias is None else delta)
    return SyntheticHead(problem, weight, bias, feature, label, float(feature @ problem.v) / problem.sigma)


def reference_loss(head: SyntheticHead, s: float, coefficient: float, dropped: int) -> float:
    """The paper's loss at one scalar, written out entry by entry (numpy, float64)."""
    grad = head.problem.weight_grad.numpy()
    weight = head.weight.numpy()
    row = int(np.argmax(np.abs(grad.sum(axis=1))))
    feature = s * (grad[row] / coefficient)
    logits = weight @ feature + (0 if head.bias is None else head.bias.numpy())
    prob = np.exp(logits - logits.max())
    prob /= prob.sum()
    k = int(np.argmax(feature)) if feature.max() != 0 else int(np.argmin(feature))
    label = [prob[i] - grad[i, k] / feature[k] for i in range(len(prob))]
    kept = sorted(label)[:len(label) - dropped]
    return 1000.0 * float(np.var(kept))


@pytest.fixture
def sko(monkeypatch):
    """scikit-opt's modules. Importing ``sko.tools`` calls ``multiprocessing.set_start_method('fork')``, which
    raises once anything in the test session has fixed the start method; force it for that one import."""
    set_start_method = multiprocessing.set_start_method
    monkeypatch.setattr(multiprocessing, "set_start_method",
                        lambda method, force=False: set_start_method(method, force=True))
    return pytest.importorskip("sko.PSO"), pytest.importorskip("sko.tools")


@pytest.fixture
def global_numpy_rng() -> Iterator[None]:
    """scikit-opt draws from numpy's global RNG: restore it after the test."""
    state = np.random.get_state()
    yield
    np.random.set_state(state)


# --------------------------------------------------------------------------------------------- objective
@pytest.mark.parametrize("label_format,dropped", [("hard", 1), ("smoothing", 1), ("mixup", 2)])
@pytest.mark.parametrize("num_classes,dim,features,with_bias", [
    (10, 768, "sigmoid", False), (4, 32, "relu", True), (1000, 64, "relu", False)])
def test_vectorised_objective_matches_entrywise_reference(label_format, dropped, num_classes, dim, features,
                                                          with_bias):
    head = make_head(3, label_format, num_classes, dim, features, with_bias)
    coefficient = DEFAULT_COEFFICIENT[label_format]
    objective = paper_objective(head.problem, label_format)
    true_s = objective.from_t(head.t)
    # both signs, near and far from the truth; ReLU features make max(h(s)) == 0 for one sign (argmin branch)
    candidates = scalars(-70.0, -5.3, -1.0, -0.31, 0.29, 0.7, 2.5, 13.0, 66.0, 1.5 * true_s, -true_s)
    got = objective.loss(candidates)
    assert got.shape == (len(candidates),) and got.dtype == torch.float64
    want = [reference_loss(head, float(s), coefficient, dropped) for s in candidates]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-8, atol=1e-18)
    assert float(objective.loss(scalars(true_s))) < 1e-20
    assert reference_loss(head, true_s, coefficient, dropped) < 1e-20


def test_objective_candidates_reproduce_the_truth_and_theorem_1():
    head = make_head(0, "mixup", features="relu", with_bias=True)
    objective = paper_objective(head.problem, "mixup", coefficient=3.0)
    s = scalars(objective.from_t(head.t))
    torch.testing.assert_close(objective.features(s)[0], head.feature, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(objective.labels(s)[0], head.label, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head.problem.feature(scalars(objective.to_t(float(s))))[0], head.feature,
                               rtol=1e-10, atol=1e-12)
    sums = objective.labels(torch.linspace(-40, 40, 64)).sum(dim=-1)
    torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-12)


def test_objective_rejects_unsupported_formats_and_too_few_classes():
    problem = make_head(0, "smoothing", num_classes=3, dim=8).problem
    for label_format in ("auto", "soft", "Mixup"):
        with pytest.raises(ValueError, match="only the exact search"):
            paper_objective(problem, label_format)
    with pytest.raises(ValueError, match="cannot identify"):
        paper_objective(problem, "mixup")
    with pytest.raises(ValueError, match="cannot identify"):
        paper_objective(make_head(0, "hard", num_classes=2, dim=8).problem, "hard")
    with pytest.raises(ValueError, match="coefficient"):
        paper_objective(problem, "smoothing", coefficient=0.0)


# ------------------------------------------------------------------------------------------ PSO schedule
def test_pso_intervals_match_the_official_notebook_logs():
    assert pso_intervals(20, 70) == [(0.7, 6.0), (-6.3, -1.0), (5.7, 10.0), (-10.3, -6.0),
                                     (9.7, 30.0), (-30.3, -10.0), (29.7, 50.0), (-50.3, -30.0)]
    assert pso_intervals(50, 70) == [(0.7, 6.0), (-6.3, -1.0), (5.7, 16.0), (-16.3, -6.0),
                                     (15.7, 66.0), (-66.3, -16.0)]
    assert pso_intervals(20, 6) == []
    assert pso_intervals(20, 6.5) == [(0.7, 6.0), (-6.3, -1.0)]
    with pytest.raises(ValueError, match="inter_bound"):
        pso_intervals(0)


# ---------------------------------------------------------------------------- PSO equals scikit-opt's
def test_particle_swarm_trajectory_equals_scikit_opt(global_numpy_rng, sko):
    sko_pso, sko_tools = sko
    objective = paper_objective(make_head(1, "smoothing").problem, "smoothing")

    def swarm_objective(positions: np.ndarray) -> np.ndarray:
        return objective.loss(torch.from_numpy(positions)).numpy()

    def sko_objective(positions: np.ndarray) -> np.ndarray:   # scikit-opt passes (pop, 1)
        return swarm_objective(positions[:, 0])

    sko_tools.set_run_mode(sko_objective, "vectorization")
    ours = particle_swarm(swarm_objective, -6.3, -1.0, population=500, iterations=40,
                          rng=np.random.RandomState(2023))
    np.random.seed(2023)
    theirs = sko_pso.PSO(func=sko_objective, n_dim=1, pop=500, max_iter=40, lb=[-6.3], ub=[-1.0])
    best_x_history = []
    for _ in range(40):
        theirs.run(max_iter=1)
        best_x_history.append(float(np.ravel(theirs.gbest_x)[0]))
    assert ours.best_y_history == [float(np.ravel(y)[0]) for y in theirs.gbest_y_hist]
    assert ours.best_x_history == best_x_history
    assert ours.best_x == best_x_history[-1] and ours.evaluations == 500 * 40


def test_pso_search_follows_scikit_opt_across_intervals(global_numpy_rng, sko):
    sko_pso, sko_tools = sko
    head = make_head(2, "mixup")
    objective = paper_objective(head.problem, "mixup")

    def sko_objective(positions: np.ndarray) -> np.ndarray:
        return objective.loss(torch.from_numpy(positions[:, 0])).numpy()

    sko_tools.set_run_mode(sko_objective, "vectorization")
    # threshold 0 is never met: every interval runs, continuing one RandomState stream
    out = pso_search(head.problem, "mixup", population=40, iterations=6, threshold=0.0, seed=7)
    np.random.seed(7)
    expected = []
    for lower, upper in pso_intervals(50, 70):
        theirs = sko_pso.PSO(func=sko_objective, n_dim=1, pop=40, max_iter=6, lb=[lower], ub=[upper])
        theirs.run()
        expected.append((float(np.ravel(theirs.gbest_x)[0]), float(np.ravel(theirs.gbest_y)[0])))
    assert out.info["interval_results"] == expected
    assert out.info["intervals"] == pso_intervals(50, 70)


# ------------------------------------------------------------------------------------ PSO mechanics
def test_pso_without_convergence_returns_the_best_over_all_intervals():
    head = make_head(4, "smoothing")
    out = pso_search(head.problem, "smoothing", population=30, iterations=5, threshold=0.0)
    losses = [loss for _, loss in out.info["interval_results"]]
    assert not out.converged and out.info["converged_interval"] is None
    assert out.objective == min(losses)
    assert out.info["s"] == out.info["interval_results"][losses.index(min(losses))][0]
    assert out.evaluations == 30 * 5 * len(pso_intervals(20, 70))
    objective = paper_objective(head.problem, "smoothing")
    assert out.t == pytest.approx(objective.to_t(out.info["s"]), rel=1e-15)
    assert float(objective.loss(scalars(out.info["s"]))) == pytest.approx(out.objective, rel=1e-12)


def test_pso_stops_at_the_first_interval_below_threshold():
    head = make_head(0, "smoothing")
    out = pso_search(head.problem, "smoothing", population=50, iterations=10, threshold=1e9, seed=3, progress=True)
    assert out.converged and out.info["intervals"] == [(0.7, 6.0)]
    assert out.info["converged_interval"] == (0.7, 6.0) and out.evaluations == 50 * 10
    with pytest.raises(ValueError, match="no interval"):
        pso_search(head.problem, "smoothing", bound=5.0)


def test_pso_is_reproducible_per_seed():
    problem = make_head(5, "mixup").problem
    first = pso_search(problem, "mixup", population=20, iterations=4, threshold=0.0, seed=1)
    again = pso_search(problem, "mixup", population=20, iterations=4, threshold=0.0, seed=1, device="cpu")
    other = pso_search(problem, "mixup", population=20, iterations=4, threshold=0.0, seed=2)
    assert first.info["interval_results"] == again.info["interval_results"]
    assert first.info["interval_results"] != other.info["interval_results"]


# ---------------------------------------------------------------------------------- L-BFGS mechanics
def test_lbfgs_flips_to_the_negative_phase_and_reports_its_route():
    # the first head whose scalar is negative: phase A (from s = +1) cannot reach it
    head, objective = next((head, objective) for head in (make_head(seed, "smoothing") for seed in range(20))
                           for objective in [paper_objective(head.problem, "smoothing")]
                           if objective.from_t(head.t) < 0)
    out = lbfgs_search(head.problem, "smoothing")
    assert out.converged and out.objective < THRESHOLD
    assert out.info["phase"] == "negative" and out.info["stop"] == "threshold"
    assert out.info["flips"] == 1 and out.info["epochs"] > 1 and out.evaluations > out.info["epochs"]
    assert out.t == pytest.approx(head.t, rel=1e-2)
    assert out.objective == pytest.approx(float(objective.loss(scalars(out.info["s"]))), rel=1e-12)


def test_lbfgs_without_convergence_returns_the_lowest_loss_seen():
    head = make_head(2, "mixup")
    out = lbfgs_search(head.problem, "mixup", threshold=0.0, epochs=8)
    objective = paper_objective(head.problem, "mixup")
    assert not out.converged and out.info["epochs"] <= 8 and out.info["stop"] in ("epochs", "out_of_bound")
    assert out.objective == pytest.approx(float(objective.loss(scalars(out.info["s"]))), rel=1e-12)
    assert out.objective <= min(float(objective.loss(scalars(s))) for s in (1.0, -1.0))
    assert out.t == pytest.approx(objective.to_t(out.info["s"]), rel=1e-15)


def test_lbfgs_skips_on_a_plateau_and_gives_up_out_of_bound():
    # With a tiny lr the loss barely moves, so the plateau rule skips with doubling steps until |s| > bound.
    head = make_head(3, "smoothing")
    out = lbfgs_search(head.problem, "smoothing", lr=1e-12, bound=10.0)
    assert not out.converged and out.info["stop"] == "out_of_bound" and out.info["flips"] == 1
    # 0.5 + 1 + 2 + 4 + 8 > 10 - 1: five skips per phase leave the bound
    assert out.info["skips"] == 10


def test_lbfgs_recovers_the_feature_with_a_bias():
    head = make_head(6, "smoothing", features="relu", with_bias=True)
    out = lbfgs_search(head.problem, "smoothing")
    assert out.converged
    torch.testing.assert_close(head.problem.feature(scalars(out.t))[0], head.feature, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ both searches: faithful
@pytest.mark.parametrize("label_format", ["smoothing", "mixup"])
@pytest.mark.parametrize("method", ["pso", "lbfgs"])
def test_searches_recover_t_on_untrained_like_heads(method, label_format):
    search = SEARCHES[method]
    recovered = 0
    seeds = range(6)
    for seed in seeds:
        head = make_head(10 + seed, label_format)
        out = search(head.problem, label_format)
        if out.converged:
            assert out.objective < THRESHOLD
        recovered += abs(out.t - head.t) < 1e-2 * abs(head.t)
    assert recovered > len(seeds) / 2


@pytest.mark.parametrize("method", ["pso", "lbfgs"])
def test_searches_reject_formats_they_cannot_handle(method):
    problem = make_head(0, "smoothing", num_classes=5, dim=16).problem
    assert SEARCHES[method] is {"pso": pso_search, "lbfgs": lbfgs_search}[method]
    with pytest.raises(ValueError, match="only the exact search"):
        SEARCHES[method](problem, "auto")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_searches_run_on_cuda():
    head = make_head(11, "mixup")
    objective = paper_objective(head.problem, "mixup", device="cuda")
    candidates = scalars(-5.0, -1.5, 2.0, 30.0)
    on_cpu = paper_objective(head.problem, "mixup").loss(candidates)
    torch.testing.assert_close(objective.loss(candidates).cpu(), on_cpu, rtol=1e-10, atol=1e-18)
    for search in (pso_search, lbfgs_search):
        out = search(head.problem, "mixup", device="cuda")
        assert out.t == pytest.approx(head.t, rel=1e-2)
