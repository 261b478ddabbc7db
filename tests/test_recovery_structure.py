"""Label structures as residuals: the deletion diagnostics that choose free entries with an unknown scale, and the
grid's residuals."""
import itertools
import math

import pytest
import torch

from gradleak.head import HeadBatch, factor_head, factor_heads
from gradleak.recovery.exact import log_grid
from gradleak.recovery.structure import (STRUCTURES, _deletion_scores, gauss_newton, grid_residuals, mask_of,
                                         readings, residuals)
from victims import head_with_logits


def _refit_rss(p: torch.Tensor, c: torch.Tensor, rows: list, offset_free: bool) -> float:
    """Residual sum of squares of the least-squares fit of ``c`` by ``alpha p`` (``+ beta``) over ``rows``; the
    columns are normalised, so that a saturated softmax's tiny entries are fitted, not cut off as rank-deficient."""
    columns = [p[rows]] + ([torch.ones(len(rows), dtype=p.dtype)] if offset_free else [])
    design = torch.stack([column / column.norm() for column in columns], -1)
    solution = torch.linalg.lstsq(design, c[rows].unsqueeze(-1), driver="gelsd").solution
    return float((design @ solution - c[rows].unsqueeze(-1)).square().sum())


@pytest.mark.parametrize("logit_scale", [0.3, 3.0, 40.0])  # 40: the softmax is 1 to within 1e-16 on one class
@pytest.mark.parametrize("offset_free", [False, True])
def test_each_score_is_the_drop_in_residual_when_the_entry_is_refitted_without(logit_scale, offset_free):
    """The scores equal ``RSS - RSS_{-j}`` computed by refitting without each entry (an independent least squares).
    Where the softmax is saturated the dominant entry's leverage is 1 to within rounding, which the deletion
    identity turned into a score 7 times the whole residual."""
    for seed in range(6):
        generator = torch.Generator().manual_seed(seed)
        classes = 10
        p = torch.softmax(torch.randn(classes, generator=generator, dtype=torch.float64) * logit_scale, -1)
        label = torch.full((classes,), 0.01, dtype=torch.float64)
        label[seed % classes], label[(seed + 3) % classes] = 0.55, 0.37
        c = 0.8 * (p - label) + 1e-4 * torch.randn(classes, generator=generator, dtype=torch.float64)
        weight = torch.ones(classes, dtype=torch.float64)
        weight[(seed + 5) % classes] = 0.0  # an entry already left out
        scores = _deletion_scores(p, c, weight, torch.tensor(offset_free))
        rows = [i for i in range(classes) if weight[i] > 0]
        full = _refit_rss(p, c, rows, offset_free)
        for j in range(classes):
            if j not in rows:
                assert float(scores[j]) == -1.0
                continue
            expected = full - _refit_rss(p, c, [i for i in rows if i != j], offset_free)
            assert float(scores[j]) == pytest.approx(expected, rel=1e-6, abs=1e-9 * full), (seed, j)


def test_the_grid_residual_is_right_where_the_free_classes_hold_nearly_all_of_c():
    """The grid's mixup residual ``||e_S|| / ||c_S||`` (``e = t p - c``, ``S`` all but the label's largest entry and
    the largest other ``|e_j|``), against the same computed with the free entries masked out, here. Beside a
    softmax saturated to 1e-13 and below, the two free classes hold all of ``c`` but 1e-26 of its square: taken
    from sums, ``||c_S||^2`` cancelled to rounding and buried the true basin under residuals of 1e141."""
    weight, h = head_with_logits([-147.0, -30.0, -168.0, 0.0])
    label = torch.tensor([0.21, 0.0, 0.0, 0.79], dtype=torch.float64)
    problem = HeadBatch.of(factor_head(torch.outer(torch.softmax(weight @ h, -1) - label, h), weight))
    t, _ = log_grid(problem, 32, 8.0, torch.tensor([0]), 2)
    curve = grid_residuals(problem, t, (STRUCTURES["mixup"],))[0, 0]
    error = t[0].unsqueeze(-1) * torch.softmax(problem.logits(t[0]), -1) - problem.c
    top = torch.where(t[0] > 0, error.argmax(-1), error.argmin(-1))
    free = torch.zeros_like(error, dtype=torch.bool).scatter_(-1, top.unsqueeze(-1), True)
    second = error.abs().masked_fill(free, -1.0).argmax(-1)
    free.scatter_(-1, second.unsqueeze(-1), True)
    c_left = problem.c[0].expand_as(error).masked_fill(free, 0.0)
    expected = error.masked_fill(free, 0.0).norm(dim=-1) / c_left.norm(dim=-1)
    torch.testing.assert_close(curve, expected, rtol=1e-6, atol=1e-12)
    true_t = float(h @ problem.v[0]) / float(problem.sigma[0])
    assert abs(math.log10(float(t[0, curve.argmin()]) / true_t)) < 2 / 32  # the true basin is the grid's lowest


def test_residuals_with_held_free_entries_are_the_masked_centred_fit_of_those_entries():
    """``residuals(..., free=...)`` against the same computed here: ``||P (t p - c)|| / ||P c||`` with ``P`` zeroing
    the held free entries and centring the rest (a known scale: ``alpha = t``). At the true ``t`` the true pair
    fits exactly and another pair does not."""
    weight, h = head_with_logits([2.0, -1.0, 0.5, 1.5, -0.3, 0.0])
    label = torch.tensor([0.6, 0.02, 0.02, 0.32, 0.02, 0.02], dtype=torch.float64)
    problem = HeadBatch.of(factor_head(torch.outer(torch.softmax(weight @ h, -1) - label, h), weight))
    true_t = float(h @ problem.v[0]) / float(problem.sigma[0])
    t = torch.tensor([[true_t, 0.8 * true_t, 1.3 * true_t]], dtype=torch.float64)
    for pair in ((0, 3), (0, 1)):
        free = torch.tensor(pair).expand(1, 3, 2)
        got = residuals(problem, t, torch.full((3,), 2), torch.ones(3, dtype=torch.bool), free=free)[0]
        rest = [j for j in range(6) if j not in pair]
        error = (t[0].unsqueeze(-1) * torch.softmax(problem.logits(t)[0], -1) - problem.c[0])[:, rest]
        c = problem.c[0, rest]
        expected = (error - error.mean(-1, keepdim=True)).norm(dim=-1) / (c - c.mean()).norm()
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-15)
        assert (float(got[0]) < 1e-12) == (pair == (0, 3))


def test_with_few_classes_and_an_unknown_scale_every_choice_of_free_entries_is_a_reading():
    """4 classes: each candidate is read under all 6 pairs of a two-class structure and all 4 single classes of a
    one-class one (padded to 6 with candidates that are not live); with a known scale the label needs no choice."""
    weight, h = head_with_logits([1.0, -0.5, 0.2, 0.0])
    gradient = torch.outer(torch.softmax(weight @ h, -1) - torch.tensor([0.7, 0.1, 0.1, 0.1], dtype=torch.float64), h)
    structures = [STRUCTURES["smoothing"], STRUCTURES["mixup_smoothing"]]
    problem = HeadBatch.of(factor_head(gradient, weight, scale_known=False))
    t, which, free, live = readings(problem, structures, torch.tensor([[1.0, 1.0]], dtype=torch.float64),
                                    torch.tensor([0, 1]))
    assert t.shape == (1, 12) and which.tolist() == [0] * 6 + [1] * 6
    singles = {tuple(f) for f, real in zip(free[0, :6].tolist(), live[0, :6].tolist()) if real}
    assert singles == {(j, j) for j in range(4)} and live[0, :6].sum() == 4
    assert {tuple(sorted(f)) for f in free[0, 6:].tolist()} == set(itertools.combinations(range(4), 2))
    assert bool(live[0, 6:].all())
    known = HeadBatch.of(factor_head(gradient, weight))
    assert readings(known, structures, torch.ones(1, 2, dtype=torch.float64), torch.tensor([0, 1]))[2] is None


@pytest.mark.parametrize("scale_known", [True, False])
def test_gauss_newton_refines_each_example_as_if_alone_and_leaves_padding(scale_known):
    """Three examples of one head, 4 candidate ``t`` each, some of them padding (not ``live``): each example's real
    candidates come out as they do when that example is refined alone with only them, the padding keeps its ``t``,
    and candidates started near the truth reach it (the true pair of free classes held)."""
    weight, _ = head_with_logits([2.0, -1.0, 0.5, 1.5, -0.3, 0.0])
    features = [torch.linspace(0.2, 1.5, 16, dtype=torch.float64) * scale for scale in (1.0, 0.6, 1.7)]
    label = torch.tensor([0.6, 0.02, 0.02, 0.32, 0.02, 0.02], dtype=torch.float64)
    gradients = torch.stack([torch.outer(torch.softmax(weight @ h, -1) - label, h) for h in features])
    problem = factor_heads(gradients, weight, scale_known=scale_known)
    truth = torch.stack([h @ problem.v[i] / problem.sigma[i] for i, h in enumerate(features)])
    start = truth.unsqueeze(-1) * torch.tensor([1.03, 0.96, 1.2, 0.5], dtype=torch.float64)
    live = torch.tensor([[True, True, True, True], [True, False, True, False], [False, False, True, False]])
    mask = mask_of(torch.tensor([0, 3]).expand(3, 4, 2), 6)
    offset_free = torch.ones(4, dtype=torch.bool)
    refined = gauss_newton(problem, start, mask, offset_free, steps=6, live=live)
    assert torch.equal(refined[~live], start[~live])
    for i in range(3):
        alone = gauss_newton(problem.select(torch.tensor([i])), start[i, live[i]].unsqueeze(0),
                             mask[i, live[i]].unsqueeze(0), offset_free[live[i]], steps=6)
        assert torch.equal(refined[i, live[i]], alone[0])
    near = live & (start / truth.unsqueeze(-1) - 1).abs().lt(0.05)
    torch.testing.assert_close(refined[near], truth.unsqueeze(-1).expand_as(start)[near], rtol=1e-10, atol=0)
