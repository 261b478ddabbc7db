import pytest
import torch
from torch import nn

from gradleak.head import HeadBatch, factor_head, factor_heads, find_head, head_gradients


def _rank_one(C=6, d=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(C, generator=g, dtype=torch.float64)
    delta -= delta.mean()
    h = torch.rand(d, generator=g, dtype=torch.float64)
    return torch.outer(delta, h), torch.randn(C, d, generator=g, dtype=torch.float64), delta, h


def test_factor_reproduces_rank_one_gradient():
    grad, weight, delta, h = _rank_one()
    problem = factor_head(grad, weight)
    torch.testing.assert_close(problem.sigma * torch.outer(problem.c, problem.v), grad)
    assert problem.rank_one_ratio < 1e-7
    assert problem.row_sum_error < 1e-12
    # every candidate scalar reproduces the observed gradient exactly and sums to one (Theorem 1)
    t = torch.tensor([0.7, -3.0, 12.0], dtype=torch.float64) * problem.t_min
    labels, features = problem.label(t), problem.feature(t)
    p = torch.softmax(problem.logits(t), -1)
    for k in range(3):
        torch.testing.assert_close(torch.outer(p[k] - labels[k], features[k]), grad)
    torch.testing.assert_close(labels.sum(-1), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(20))
def test_true_scalar_is_admissible(seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.rand(7, 11, generator=g, dtype=torch.float64) - 0.5
    h = torch.rand(11, generator=g, dtype=torch.float64) * 3
    y = torch.distributions.Dirichlet(torch.ones(7, dtype=torch.float64)).sample()
    problem = factor_head(torch.outer(torch.softmax(weight @ h, -1) - y, h), weight)
    true_t = float(h @ problem.v) / problem.sigma
    assert abs(true_t) >= problem.t_min * (1 - 1e-12)


def test_batch_gradient_is_rejected():
    grad_a, weight, _, _ = _rank_one(seed=1)
    grad_b, _, _, _ = _rank_one(seed=2)
    with pytest.raises(ValueError, match="not rank one"):
        factor_head(grad_a + grad_b, weight)
    assert factor_head(grad_a + grad_b, weight, rank_one_tol=None).rank_one_ratio > 0.01


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(weight_grad=torch.zeros(4, 3), weight=torch.ones(4, 3)), ValueError, "all zeros"),
    (dict(weight_grad=torch.ones(4, 3), weight=torch.ones(4, 2)), ValueError, "shape"),
    (dict(weight_grad=torch.ones(4), weight=torch.ones(4)), ValueError, r"\(C, d\)"),
    (dict(weight_grad=torch.full((4, 3), float("inf")), weight=torch.ones(4, 3)), ValueError, "NaN or infinite"),
    (dict(weight_grad=torch.ones(4, 3, dtype=torch.long), weight=torch.ones(4, 3)), TypeError, "floating"),
    (dict(weight_grad=[[1.0]], weight=torch.ones(1, 1)), TypeError, "torch.Tensor"),
    (dict(weight_grad=torch.ones(1, 3), weight=torch.ones(1, 3)), ValueError, "at least 2 classes"),
    (dict(weight_grad=torch.ones(4, 3), weight=torch.ones(4, 3), bias_grad=torch.ones(4)), ValueError,
     "without bias"),
    (dict(weight_grad=torch.ones(4, 3), weight=torch.ones(4, 3), bias=torch.ones(3), bias_grad=torch.ones(3)),
     ValueError, r"shape \(4,\)"),
])
def test_bad_head_inputs(kwargs, error, match):
    with pytest.raises(error, match=match):
        factor_head(**kwargs)


def test_find_head_and_its_gradients():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))
    name, module = find_head(model)
    assert name == "4" and module is model[4]
    assert find_head(model, "2")[1] is model[2]
    grads = [torch.ones_like(p) for p in model.parameters()]
    parts = head_gradients(model, grads)
    assert parts["weight"] is model[4].weight and parts["bias_grad"].shape == (3,)
    with pytest.raises(TypeError, match="no nn.Linear"):
        find_head(nn.Sequential(nn.Conv2d(1, 2, 3)))
    with pytest.raises(TypeError, match="not an nn.Linear"):
        find_head(model, "0")
    with pytest.raises(ValueError, match="no module named"):
        find_head(model, "nope")
    with pytest.raises(ValueError, match="gradients for a model"):
        head_gradients(model, grads[:2])
    with pytest.raises(ValueError, match="no entry"):
        head_gradients(model, {"0.weight": grads[0]})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_ratios_are_each_rows_rank_one_residual(dtype):
    """``row_ratio`` is ``||G_i - sigma c_i v|| / ||G||`` row by row (computed here apart, in float64) and its norm
    is ``rank_one_ratio``. Added noise reaches every row alike; a network's gradient, whose rows are each rounded
    relative to their own ``p_i - y_i``, leaves each row a residual of a few roundings of that row (a row 1e-12 of
    the largest: 1e-12 of theirs)."""
    generator = torch.Generator().manual_seed(3)
    h = torch.rand(32, generator=generator, dtype=torch.float64)
    errors = torch.tensor([0.6, -0.45, -0.15 + 2e-12, -2e-12], dtype=torch.float64)
    weight = torch.randn(4, 32, generator=generator, dtype=dtype)
    noisy = (torch.outer(errors, h) + 1e-5 * torch.randn(4, 32, generator=generator, dtype=torch.float64)).to(dtype)
    problem = factor_head(noisy, weight)
    g = noisy.double()
    expected = (g - problem.sigma * torch.outer(problem.c, problem.v)).norm(dim=-1) / g.norm()
    torch.testing.assert_close(problem.row_ratio, expected, rtol=1e-3, atol=0.0)
    assert float(problem.row_ratio.norm()) == pytest.approx(problem.rank_one_ratio, rel=1e-12)
    assert float(problem.row_ratio.min()) > 0.3 * float(problem.row_ratio.max())
    rounded = torch.outer(errors, h).to(dtype)
    problem = factor_head(rounded, weight)
    own = rounded.double().norm(dim=-1) / rounded.double().norm()
    assert bool((problem.row_ratio <= 10 * torch.finfo(dtype).eps * own).all()), (problem.row_ratio, own)
    assert float(problem.row_ratio.norm()) == pytest.approx(problem.rank_one_ratio, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_candidates_softmax_is_torchs(dtype):
    """``HeadBatch.softmax`` (written out for speed) against ``torch.softmax`` of the same logits: with and without
    a bias, at scalars from nearly linear to saturated past float64's range on all but one class."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(10, 32, generator=generator, dtype=dtype)
    feature = torch.rand(32, generator=generator, dtype=dtype)
    gradient = torch.outer(torch.softmax(weight @ feature, -1) - torch.eye(10, dtype=dtype)[2], feature)
    bias = torch.randn(10, generator=generator, dtype=dtype)
    for problem in (HeadBatch.of(factor_head(gradient, weight)),
                    HeadBatch.of(factor_head(gradient, weight, bias, gradient.sum(-1) / feature.sum()))):
        t = torch.tensor([[-1e3, -1.0, 1e-3, 0.5, 30.0, 1e4]], dtype=torch.float64)
        expected = torch.softmax(problem.logits(t), -1)
        torch.testing.assert_close(problem.softmax(t), expected, rtol=1e-14, atol=1e-300)


def test_a_selection_without_features_carries_every_other_field_of_its_rows():
    """``select(rows, features=False)``, the batch Gauss-Newton refines candidates on: rows repeated and reordered
    at will, every per-example field but the (C, d) and (d,) ones equal to the full selection's, and those left out
    (None), so that nothing reads a feature it was not given."""
    gradients = torch.stack([_rank_one(seed=seed)[0] for seed in range(3)])
    weight = _rank_one()[1]
    problem = factor_heads(gradients, weight)
    rows = torch.tensor([2, 0, 0, 1, 2])
    full, lean = problem.select(rows), problem.select(rows, features=False)
    assert lean.weight_grad is None and lean.v is None and full.v is not None
    for name in HeadBatch.PER_EXAMPLE:
        if name not in ("weight_grad", "v") and getattr(full, name) is not None:
            assert torch.equal(getattr(lean, name), getattr(full, name)), name
    assert torch.equal(lean.c, problem.c[rows]) and torch.equal(lean.t_lower, problem.t_lower[rows])
