"""The class means fitted to second order in the examples' spread (gradleak.batch.spread), on synthetic batches whose
truth is known: every class's examples about its mean, spread along the batch's mean logits or not at all."""
import pytest
import torch

from gradleak.batch.spread import SPREAD_UNKNOWNS, fit_spread, spread_unknowns

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


def test_the_unknowns_counted_bound_the_fit():
    assert spread_unknowns(COUNTS, scale_known=True) == 8 * NUM_CLASSES + 2
    assert spread_unknowns(COUNTS, scale_known=False) == 8 * NUM_CLASSES + 3
    assert spread_unknowns(torch.ones(100, dtype=torch.long), scale_known=True) > SPREAD_UNKNOWNS
