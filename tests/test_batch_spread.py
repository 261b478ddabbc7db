"""The class means fitted to second order in the examples' spread (gradleak.batch.spread), on synthetic batches whose
truth is known: every class's examples about its mean, spread along the batch's mean logits or not at all."""
import pytest
import torch

from gradleak.batch.api import AMBIGUITY_RATIO
from gradleak.batch.spread import SPREAD_UNKNOWNS, fit_spread, spread_identified, spread_unknowns

NUM_CLASSES, DIM = 10, 64


def synthetic_batch(counts, eps, spread, seed, scale=1.0):
    """A batch's head gradients (``G W^T``, ``dL/db``, scaled by ``scale``), its head and its truth: each class's
    examples at ``h = mu_k + a_n h_bar`` with ``a_n`` of variance ``spread`` (zero mean within each class), so that
    their logits spread about the class mean exactly along the batch's mean logits ``W h_bar``."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(NUM_CLASSES, DIM, generator=generator, dtype=torch.float64) / DIM ** 0.5
    bias = 0.1 * torch.randn(NUM_CLASSES, generator=generator, dtype=torch.float64)
    classes = torch.repeat_interleave(torch.arange(NUM_CLASSES), counts)
    size = len(classes)
    class_features = torch.rand(NUM_CLASSES, DIM, generator=generator, dtype=torch.float64)
    mean_feature = (counts.double() @ class_features) / size
    offsets = torch.randn(size, generator=generator, dtype=torch.float64)
    for k in classes.unique():  # zero mean and variance ``spread`` within each class (none for a class of one)
        part = offsets[classes == k]
        part = part - part.mean()
        offsets[classes == k] = part * (spread / part.square().mean().clamp_min(1e-300)).sqrt()
    features = class_features[classes] + offsets[:, None] * mean_feature
    labels = (1 - eps) * torch.eye(NUM_CLASSES, dtype=torch.float64)[classes] + eps / NUM_CLASSES
    errors = torch.softmax(features @ weight.T + bias, -1) - labels
    weight_grad = scale * errors.T @ features / size
    bias_grad = scale * errors.mean(0)
    class_logits = class_features @ weight.T
    return dict(logits_grad=weight_grad @ weight.T, bias_grad=bias_grad, bias=bias, class_logits=class_logits,
                counts=counts, batch_size=size)


COUNTS = torch.tensor([3, 2, 4, 0, 1, 2, 3, 0, 1, 4])


def fit_args(batch, eps=0.0):
    """:func:`fit_spread`'s positional arguments for ``batch``, from its true class means and ``eps``."""
    return (batch["logits_grad"], batch["bias_grad"], batch["bias"], batch["class_logits"], batch["counts"], eps,
            batch["batch_size"])


def test_with_every_example_at_its_class_mean_the_fit_is_exact():
    batch = synthetic_batch(COUNTS, eps=0.13, spread=0.0, seed=0)
    start = batch["class_logits"] + 0.05 * torch.randn(NUM_CLASSES, NUM_CLASSES, dtype=torch.float64,
                                                       generator=torch.Generator().manual_seed(1))
    fit = fit_spread(batch["logits_grad"], batch["bias_grad"], batch["bias"], start, COUNTS, 0.1,
                     batch["batch_size"])
    assert abs(fit.eps - 0.13) < 1e-9
    assert abs(fit.spread) < 1e-9
    assert fit.misfit < 1e-10 < fit.start_misfit


@pytest.mark.parametrize("spread", [0.01, 0.05])
def test_a_spread_along_the_mean_logits_is_measured_and_eps_kept(spread):
    batch = synthetic_batch(COUNTS, eps=0.2, spread=spread, seed=2)
    fit = fit_spread(batch["logits_grad"], batch["bias_grad"], batch["bias"], batch["class_logits"], COUNTS, 0.2,
                     batch["batch_size"])
    # the model is exact to second order in the spread; what is left (higher orders) stays a small part of it
    assert abs(fit.eps - 0.2) < spread / 100
    assert fit.spread == pytest.approx(spread, rel=0.15)
    assert fit.misfit < fit.start_misfit / 100


def test_an_unknown_scale_is_fitted_with_the_rest():
    batch = synthetic_batch(COUNTS, eps=0.07, spread=0.0, seed=3, scale=-0.02)
    fit = fit_spread(batch["logits_grad"], batch["bias_grad"], batch["bias"], batch["class_logits"], COUNTS, 0.05,
                     batch["batch_size"], inverse_scale=-40.0)
    assert fit.inverse_scale == pytest.approx(-50.0, rel=1e-9)
    assert abs(fit.eps - 0.07) < 1e-9


@pytest.mark.parametrize("eps", [0.0, 0.01, 0.2])
def test_held_at_eps_0_the_fit_misses_smoothed_labels_only(eps):
    """Eight classes held: the fit's unknowns are pinned. With eps held at 0 it meets a hard batch as closely as
    with eps free (the spread's higher orders are what both leave), and misses a smoothed one by far more."""
    batch = synthetic_batch(COUNTS, eps=eps, spread=0.01, seed=4)
    start = fit_args(batch)
    free, hard = fit_spread(*start), fit_spread(*start, hard=True)
    assert spread_identified(COUNTS, scale_known=True)
    assert abs(free.eps - eps) < 1e-4
    assert (hard.misfit > AMBIGUITY_RATIO * free.misfit) == (eps > 0)


def test_a_rival_stops_once_it_comes_close_enough():
    """A rival fit need only show that it comes within ``enough``: it stops there, no lower than the fit run to the
    end, and a hard batch's rival at eps = 0 gets there before it has settled."""
    batch = synthetic_batch(COUNTS, eps=0.0, spread=0.01, seed=4)
    start = fit_args(batch)
    free, settled = fit_spread(*start), fit_spread(*start, hard=True)
    stopped = fit_spread(*start, hard=True, enough=AMBIGUITY_RATIO * free.misfit)
    assert settled.misfit < stopped.misfit <= AMBIGUITY_RATIO * free.misfit < stopped.start_misfit


def test_with_every_class_held_eps_is_not_identified():
    """Every class held: ``C^2 + 2`` unknowns against ``C^2 - 1`` independent equations. Smoothed labels are met to
    rounding with eps held at 0 as well, so the fit cannot tell the formats apart there."""
    counts = COUNTS.clamp_min(1)
    batch = synthetic_batch(counts, eps=0.2, spread=0.0, seed=4)
    start = fit_args(batch)
    assert not spread_identified(counts, scale_known=True)
    assert fit_spread(*start, hard=True).misfit < 1e-12


def test_the_misfit_is_relative_to_the_gradients_at_the_scale_fitted():
    """The same batch observed at two scales: the fits, relative to the gradients at the scale each finds, miss by
    the same amount, so a misfit means the same whatever the update's scale (a spread leaves one to compare)."""
    fits = []
    for scale in (-0.02, -2.0):
        batch = synthetic_batch(COUNTS, eps=0.07, spread=0.02, seed=3, scale=scale)
        fits.append(fit_spread(batch["logits_grad"], batch["bias_grad"], batch["bias"], batch["class_logits"],
                               COUNTS, 0.05, batch["batch_size"], inverse_scale=0.8 / scale))
    assert fits[0].misfit > 1e-8
    assert fits[0].misfit == pytest.approx(fits[1].misfit, rel=1e-6)
    assert fits[0].start_misfit == pytest.approx(fits[1].start_misfit, rel=1e-6)


def test_the_unknowns_counted_bound_the_fit():
    assert spread_unknowns(COUNTS, scale_known=True) == 8 * NUM_CLASSES + 2
    assert spread_unknowns(COUNTS, scale_known=False) == 8 * NUM_CLASSES + 3
    assert spread_unknowns(torch.ones(100, dtype=torch.long), scale_known=True) > SPREAD_UNKNOWNS
