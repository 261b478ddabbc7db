"""Label structures as residuals: the deletion diagnostics that choose free entries with an unknown scale."""
import pytest
import torch

from gradleak.recovery.structure import _deletion_scores


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
