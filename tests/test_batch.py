"""recover_batch and the class-mass estimate (gradleak.batch.api, gradleak.batch.mass), against the truth the
test alone knows: the batch's own labels."""
import functools
import itertools
import math

import pytest
import torch

import gradleak
from gradleak.batch.api import AMBIGUITY_RATIO, EPS_TOL, LATTICE_TOL, dominant_counts, numerical_rank
from gradleak.batch.baselines import ilrg
from gradleak.batch.mass import (MASS_STARTS, class_mean_logits, class_prediction_mass, fit_lattice, in_spacings,
                                 lattice_starts, lattice_starts_unknown_scale, mean_feature, prediction_mass)
from gradleak.data import load_samples
from gradleak.models import build_model


@pytest.fixture(scope="module")
def cifar10():
    return load_samples("cifar10", size=32)


def _batch(model, images, classes, eps=0.0, generator=None, mix=None):
    """Gradients of the mean soft cross-entropy of a batch with labels ``classes`` (B,) smoothed by ``eps``."""
    num_classes = model.head.out_features
    targets = torch.nn.functional.one_hot(classes, num_classes).float() * (1 - eps) + eps / num_classes
    if mix is not None:
        targets = mix * targets + (1 - mix) * torch.nn.functional.one_hot(
            (classes + 1 + torch.randint(num_classes - 1, classes.shape, generator=generator)) % num_classes,
            num_classes).float()
    model.zero_grad(set_to_none=True)
    gradleak.soft_cross_entropy(model(images), targets).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}, targets


def _draw(images, size, num_classes, seed):
    """B images (distinct while the 20 bundled ones last: repeated features lower the rank) and random labels."""
    generator = torch.Generator().manual_seed(seed)
    count = images.shape[0]
    index = (torch.randperm(count, generator=generator)[:size] if size <= count
             else torch.randint(count, (size,), generator=generator))
    return images[index], torch.randint(num_classes, (size,), generator=generator), generator


@pytest.mark.parametrize("size", [2, 8, 32, 64])
def test_smoothed_batches_of_an_untrained_lenet(cifar10, size):
    """The issue's bar on an untrained net: counts exact, eps within 1e-3 and class mass within 1e-3 B in at least
    95 % of batches (here every one of 6), and every answer reported as determined is right."""
    images, _ = cifar10
    right = determined = 0
    for seed in range(6):
        model = build_model("lenet", 10, head_bias=True, init="default", seed=seed)
        x, classes, generator = _draw(images, size, 10, seed)
        eps = float(torch.empty(()).uniform_(0.01, 0.3, generator=generator))
        gradients, targets = _batch(model, x, classes, eps)
        result = gradleak.recover_batch(model, gradients, batch_size=size)
        correct = (torch.equal(result.counts, torch.bincount(classes, minlength=10)) and abs(result.eps - eps) < 1e-3
                   and float((result.class_mass - targets.double().sum(0)).abs().max()) <= 1e-3 * size)
        right += correct
        determined += result.determined
        assert correct or not result.determined
    assert right == 6 and determined >= 3


@pytest.mark.parametrize("size", [4, 32])
def test_no_confident_wrong_answer_where_the_estimate_is_rough(cifar10, size):
    """An untrained ResNet18's predictions differ a lot between examples, so the summed predictions are rough:
    whatever is reported as determined must be right (the lattice test; eps also by how far it moves as the
    estimate is refined), the rest is flagged. The class-mass path alone (no split)."""
    images, _ = cifar10
    model = build_model("resnet18", 10, head_bias=True, seed=0)
    for seed in range(8 if size == 4 else 4):
        x, classes, generator = _draw(images, size, 10, seed)
        eps = float(torch.empty(()).uniform_(0.01, 0.3, generator=generator))
        result = gradleak.recover_batch(model, _batch(model, x, classes, eps)[0], batch_size=size, split=False)
        counts_right = torch.equal(result.counts, torch.bincount(classes, minlength=10))
        if result.counts_determined:
            assert counts_right
        if result.determined:
            assert counts_right and abs(result.eps - eps) < 1e-3
        else:
            assert result.message


@pytest.mark.parametrize("seed", range(4))
def test_a_small_eps_is_told_from_hard_labels_by_the_second_order_fit(cifar10, seed):
    """An untrained ResNet18 at B = 32 with eight classes held, so that the second-order fit pins eps: an eps of
    0.015 lies within three of the first estimate's error bars of 0, and read that way 3 of these 4 batches were
    taken for hard labels. Held at eps = 0, the fit misses the smoothed batch AMBIGUITY_RATIO times more than with eps
    free, and the hard batch not: each is read in its own format, with an error bar that covers eps's error."""
    images, _ = cifar10
    model = build_model("resnet18", 10, head_bias=True, seed=0)
    generator = torch.Generator().manual_seed(seed)
    x = torch.cat([images[torch.randperm(images.shape[0], generator=generator)[:16]] for _ in range(2)])
    classes = torch.randint(8, (32,), generator=generator)
    for eps in (0.0, 0.015):
        result = gradleak.recover_batch(model, _batch(model, x, classes, eps)[0], batch_size=32, split=False)
        assert torch.equal(result.counts, torch.bincount(classes, minlength=10))
        assert (result.extra["hard_misfit"] > AMBIGUITY_RATIO * result.extra["spread_misfit"]) == (eps > 0)
        assert result.label_format == ("smoothing" if eps else "hard")
        assert abs(result.eps - eps) <= result.eps_error


def test_counts_that_change_as_the_estimate_is_refined_are_not_pinned():
    """LeNet with the paper's init (large logits that differ between examples) at B = 16: the refinement can swing
    the estimate by whole examples from round to round, and in five of these 80 batches on one machine (hard labels,
    seeds 1, 10 and 19; smoothed, seeds 10 and 39) it ended within the lattice tolerance of a wrong lattice point,
    its counts alternating between two answers. Counts are pinned only when the last refinement gives them back,
    and only when every other start of the refinement ends AMBIGUITY_RATIO times farther from its lattice point
    (in one hard batch, seed 3, the eighth start ended 0.096 lattice spacings from wrong counts, the next 0.16).
    These batches are drawn as the search of bench_batch_counts drew them (random classes, images drawn with
    repeats)."""
    images, _ = load_samples("cifar10", size=32)
    model = build_model("lenet", 10, head_bias=True, init="paper", seed=0)
    unsettled = 0
    for label_format, seed in itertools.product(("hard", "smoothing"), range(40)):
        generator = torch.Generator().manual_seed(seed)
        x = images[torch.randint(images.shape[0], (16,), generator=generator)]
        classes = torch.randint(10, (16,), generator=generator)
        eps = float(torch.empty(()).uniform_(0.01, 0.3, generator=generator)) if label_format == "smoothing" else 0.0
        result = gradleak.recover_batch(model, _batch(model, x, classes, eps)[0], batch_size=16, split=False)
        if result.counts_determined:
            assert torch.equal(result.counts, torch.bincount(classes, minlength=10))
        unsettled += "the counts changed in the last of" in result.message
    assert unsettled >= 2


def test_counts_at_least_those_of_ilrg_on_the_same_gradients(cifar10):
    """Hard labels on an untrained ResNet18 (iLRG's own setting): our counts are exact at least as often."""
    images, _ = cifar10
    model = build_model("resnet18", 10, head_bias=True, seed=1)
    ours = theirs = 0
    for seed in range(6):
        x, classes, _ = _draw(images, 16, 10, 100 + seed)
        gradients = _batch(model, x, classes)[0]
        truth = torch.bincount(classes, minlength=10)
        ours += torch.equal(gradleak.recover_batch(model, gradients, batch_size=16, label_format="hard").counts, truth)
        theirs += torch.equal(ilrg(model, gradients, 16).counts, truth)
    assert ours >= theirs and ours >= 5


def test_one_example_agrees_with_recover_from_gradients(cifar10):
    images, _ = cifar10
    model = build_model("lenet", 10, head_bias=True, init="default", seed=3)
    label = gradleak.smooth_label(4, 10, 0.1).float()
    gradients = gradleak.single_example_gradients(model, images[0], label)
    single = gradleak.recover_from_gradients(model, gradients)
    batch = gradleak.recover_batch(model, gradients)
    assert batch.batch_size == 1 and batch.rank == 1 and batch.method == "single"
    assert torch.equal(batch.examples[0].label, single.label) and torch.equal(batch.examples[0].feature, single.feature)
    assert batch.determined == single.determined and batch.determined
    assert torch.allclose(batch.class_mass, single.label.double())
    assert batch.counts.tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0, 0] and batch.eps == pytest.approx(single.eps)


def test_the_rank_tells_a_small_batch_size_and_only_that(cifar10):
    images, _ = cifar10
    model = build_model("lenet", 10, head_bias=True, init="default", seed=4)
    x, classes, _ = _draw(images, 5, 10, 7)
    result = gradleak.recover_batch(model, _batch(model, x, classes, 0.1)[0])
    assert result.rank == 5 and result.implied_batch_size == 5 and result.batch_size == 5
    assert torch.equal(result.counts, torch.bincount(classes, minlength=10))
    x, classes, _ = _draw(images, 24, 10, 8)
    unknown = gradleak.recover_batch(model, _batch(model, x, classes, 0.1)[0])
    assert unknown.rank == 9 and unknown.implied_batch_size is None and unknown.batch_size is None
    assert not unknown.determined and unknown.counts is None and "pass batch_size" in unknown.message


def test_mixed_pairs_are_not_on_the_lattice(cifar10):
    """Independent mixup pairs: the class mass is reported, counts are not claimed."""
    images, _ = cifar10
    model = build_model("lenet", 10, head_bias=True, init="default", seed=5)
    x, classes, generator = _draw(images, 16, 10, 9)
    lam = torch.rand(16, 1, generator=generator)
    gradients, targets = _batch(model, x, classes, generator=generator, mix=lam)
    auto = gradleak.recover_batch(model, gradients, batch_size=16)
    assert not auto.determined and not auto.counts_determined and "lattice" in auto.message
    told = gradleak.recover_batch(model, gradients, batch_size=16, label_format="mixup")
    assert told.counts is None and told.eps is None and not told.determined
    assert float((told.class_mass - targets.double().sum(0)).abs().max()) <= 1e-3 * 16


def test_hard_labels_read_as_hard(cifar10):
    images, _ = cifar10
    model = build_model("lenet", 10, head_bias=True, init="default", seed=6)
    x, classes, _ = _draw(images, 12, 10, 10)
    result = gradleak.recover_batch(model, _batch(model, x, classes)[0], batch_size=12)
    assert result.determined and result.label_format == "hard" and result.eps == 0.0
    assert torch.equal(result.counts, torch.bincount(classes, minlength=10))


def test_lattice_fit_finds_exact_points_and_says_when_eps_is_free():
    counts = torch.tensor([3, 0, 5, 0, 0, 2, 0, 0, 0, 6])
    mass = 0.88 * counts.double() + 0.12 * 16 / 10
    fit = fit_lattice(mass, 16)
    assert torch.equal(fit.counts, counts) and fit.eps == pytest.approx(0.12, abs=1e-12) and fit.residual < 1e-12
    even = fit_lattice(torch.ones(10, dtype=torch.float64) * 2, 20)
    assert torch.equal(even.counts, torch.full((10,), 2)) and math.isinf(even.eps_error)
    off = fit_lattice(mass + torch.tensor([0.4, -0.4] + [0.0] * 8, dtype=torch.float64), 16)
    assert off.residual > LATTICE_TOL


def test_lattice_starts_are_distinct_counts_nearest_first():
    counts = torch.tensor([3, 0, 5, 0, 0, 2, 0, 0, 0, 6])
    noise = torch.tensor([0.02, -0.01, 0.03, 0.0, -0.02, 0.01, 0.0, -0.03, 0.0, 0.0], dtype=torch.float64)
    mass = 0.88 * counts.double() + 0.12 * 16 / 10 + noise
    assert torch.equal(lattice_starts(mass, 16)[0].counts, counts)
    for rough in (mass, mass + 10 * noise.flip(0)):
        starts = lattice_starts(rough, 16)
        assert 1 < len(starts) <= MASS_STARTS and torch.equal(starts[0].counts, fit_lattice(rough, 16).counts)
        assert len({tuple(start.counts.tolist()) for start in starts}) == len(starts)
        assert all(int(start.counts.sum()) == 16 and bool((start.counts >= 0).all()) for start in starts)
        distances = [in_spacings(start.residual, start.eps) for start in starts]
        assert distances == sorted(distances)


def test_counts_far_from_the_mass_still_sum_to_the_batch():
    """A mass with entries of -3 and +3 at B = 4 (an unknown scale's scan reaches such masses): one round of moving
    the rounding's deficit leaves it off B at every eps (only entries above zero can give an example up), so it
    takes the largest remainders of its nearest non-negative values summing to B, checked here by the optimality
    conditions (every entry kept is its value less one common shift, every entry dropped at most that shift)."""
    from gradleak.batch.mass import _largest_remainders, _onto_simplex

    values = torch.tensor([[-3.0, 3.2, 2.6, 3.4, -1.0, 0.4, -2.0, 2.9, 1.8, -2.5],
                           [0.2, 0.1, 0.3, 0.2, 0.1, 0.3, 0.2, 0.1, 0.3, 0.2]], dtype=torch.float64)
    nearest = _onto_simplex(values, 4)
    assert torch.allclose(nearest.sum(-1), torch.full((2,), 4.0, dtype=torch.float64), atol=1e-12)
    for row, point in zip(values, nearest):
        kept = point > 0
        shift = row[kept] - point[kept]
        assert float(shift.max() - shift.min()) < 1e-12 and bool((row[~kept] <= shift[0] + 1e-12).all())
    counts = _largest_remainders(values, 4)
    assert counts.sum(-1).tolist() == [4, 4] and bool((counts >= 0).all())
    remainders, up = nearest - nearest.floor(), counts > nearest.floor()
    assert bool((counts - nearest.floor()).le(1).all())
    assert all(float(r[u].min()) >= float(r[~u].max()) for r, u in zip(remainders, up))  # the largest ones go up
    fit = fit_lattice(values[0], 4)
    assert torch.equal(fit.counts, counts[0].long()) and fit.residual > 1


def test_an_unknown_scale_never_gives_counts_off_the_batch_size(cifar10):
    """The experiment's LeNet batch of 4 mixup pairs (sample 0) as a weight update at an unknown scale: the scan
    over scales had reached counts summing to 11 for a batch of 4, and the split raised on them. The answer is
    counts that sum to B (or none), flagged: mixup pairs sit on no lattice."""
    from gradleak.experiments.batch import batch_rng, victim_batch, victim_model

    model, side, _ = victim_model("cifar10", "lenet")
    images, classes = load_samples("cifar10", size=side)
    gradients, _ = victim_batch(model, images, classes, 10, "mixup-pairs", 4, batch_rng(2023, "mixup-pairs", 4, 0))
    update = {name: -0.05 * grad for name, grad in gradients.items()}
    result = gradleak.recover_batch(model, update, batch_size=4, gradient_scale="unknown")
    assert result.counts is None or int(result.counts.sum()) == 4
    assert not result.determined
    scanned = lattice_starts_unknown_scale(result.class_mass, update["head.bias"].double(), 4)
    assert all(int(fit.counts.sum()) == 4 and bool((fit.counts >= 0).all()) for fit in scanned)


def test_the_refinement_starts_from_several_lattice_points():
    """The experiment's ResNet18 batch of 64 smoothed labels (sample 3): every example at the batch's mean feature
    puts the class mass about half a lattice spacing from its nearest count vectors, and the nearest is wrong; the
    refinement from it settles on other wrong counts, 0.5 spacings off, while a start further away settles on the
    truth within 0.05. The start that ends nearest to its lattice point answers."""
    from gradleak.experiments.batch import batch_rng, victim_batch, victim_model

    model, side, _ = victim_model("cifar10", "resnet18")
    images, classes = load_samples("cifar10", size=side)
    gradients, truth = victim_batch(model, images, classes, 10, "smoothing", 64, batch_rng(2023, "smoothing", 64, 3))
    weight, bias = model.head.weight.detach().double(), model.head.bias.detach().double()
    weight_grad, bias_grad = gradients["head.weight"].double(), gradients["head.bias"].double()
    first = prediction_mass(weight, bias, mean_feature(weight_grad, bias_grad), 64) - 64 * bias_grad
    assert not torch.equal(fit_lattice(first, 64).counts, truth["counts"])
    result = gradleak.recover_batch(model, gradients, batch_size=64)
    assert torch.equal(result.counts, truth["counts"]) and result.counts_determined, result.message
    assert abs(result.eps - truth["eps"]) < 1e-3


def test_the_lattice_starts_are_refined_together_as_each_alone(cifar10):
    """The refinement runs every lattice start at once; each start's rounds are those it gives refined alone (LeNet
    with the paper's init, whose rough first estimate leaves several starts, batches of 32 smoothed labels)."""
    from gradleak.batch.api import _refine

    images, _ = cifar10
    model = build_model("lenet", 10, head_bias=True, init="paper", seed=4)
    weight, bias = model.head.weight.detach().double(), model.head.bias.detach().double()
    for seed in range(2):
        x, classes, _ = _draw(images, 32, 10, seed)
        gradients = _batch(model, x, classes, 0.15)[0]
        for scale in (1.0, -0.05):  # a gradient, and an SGD step's weight delta of unknown learning rate
            parts = dict(weight=weight, bias=bias, weight_grad=scale * gradients["head.weight"].double(),
                         bias_grad=scale * gradients["head.bias"].double())
            predicted = prediction_mass(weight, bias, mean_feature(parts["weight_grad"], parts["bias_grad"]), 32)
            known = scale == 1.0
            starts = lattice_starts(predicted - 32 * parts["bias_grad"], 32) if known else \
                lattice_starts_unknown_scale(predicted, parts["bias_grad"], 32)
            logits_grad = parts["weight_grad"] @ weight.T
            together = _refine(starts, parts, logits_grad, 32, hard=False, scale_known=known)
            assert len(starts) > 1 and together.counts_seen.shape == (5, len(starts), 10)
            for k, start in enumerate(starts):
                alone = _refine([start], parts, logits_grad, 32, hard=False, scale_known=known)
                assert torch.equal(alone.counts_seen[:, 0], together.counts_seen[:, k])
                close = functools.partial(torch.allclose, rtol=1e-12, atol=1e-12)
                assert close(alone.eps_seen[:, 0], together.eps_seen[:, k])
                assert close(alone.inverse_scale[0], together.inverse_scale[k])
                assert close(alone.prediction[0], together.prediction[k])


def test_mean_feature_of_identical_features():
    """When every example has the same feature, each ratio dL/dW_c / dL/db_c is that feature exactly."""
    generator = torch.Generator().manual_seed(0)
    feature = torch.rand(7, generator=generator, dtype=torch.float64)
    errors = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    errors = errors - errors.mean(-1, keepdim=True)
    assert torch.allclose(mean_feature(errors.T @ feature.expand(5, 7) / 5, errors.sum(0) / 5), feature)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_class_means_are_exact_when_every_example_predicts_alike(eps):
    """A zero head weight gives every example the same prediction, which makes the one approximation behind the
    class means (``sum_n p_nc h_n = (sum_n p_nc) h_bar``) exact. The class means are linear in the gradients, so
    any projection ``A`` of them comes back from ``G A^T`` (and the batch's mean feature from the class that holds
    no example): each class's comes back to rounding (computed here
    from the features themselves), and an empty class gets the batch's mean. With the head's own logits,
    class_prediction_mass sums the predictions class by class."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(12, 7, generator=generator, dtype=torch.float64)
    classes = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3])                       # class 4 holds none
    targets = torch.nn.functional.one_hot(classes, 5).double() * (1 - eps) + eps / 5
    weight = torch.zeros(5, 7, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=generator, dtype=torch.float64).requires_grad_()
    gradleak.soft_cross_entropy(features @ weight.T + bias, targets).backward()
    counts = torch.bincount(classes, minlength=5)[None]
    projection = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    # the empty class's ratio dL/dW_4 / dL/db_4 is the batch's mean feature exactly
    feature_logits = mean_feature(weight.grad @ projection.T, bias.grad, counts == 0)
    assert torch.allclose(feature_logits[0], projection @ features.mean(0), rtol=0, atol=1e-12)
    logits = class_mean_logits(weight.grad @ projection.T, bias.grad, feature_logits, counts,
                               torch.tensor([eps], dtype=torch.float64))
    for c in range(4):
        assert torch.allclose(logits[0, c], projection @ features[classes == c].mean(0), rtol=0, atol=1e-12)
    assert torch.equal(logits[0, 4], feature_logits[0])
    predictions = torch.softmax(features @ weight.detach().T + bias.detach(), -1).sum(0)
    own = class_mean_logits(weight.grad @ weight.detach().T, bias.grad, torch.zeros(1, 5, dtype=torch.float64),
                            counts, torch.tensor([eps], dtype=torch.float64))
    assert torch.allclose(class_prediction_mass(bias.detach(), own, counts)[0], predictions, rtol=0, atol=1e-12)


def test_numerical_rank_counts_examples():
    generator = torch.Generator().manual_seed(1)
    matrix = sum(torch.outer(torch.randn(10, generator=generator), torch.rand(32, generator=generator))
                 for _ in range(3))
    assert numerical_rank(matrix.float()) == 3


def test_bad_input(cifar10):
    images, _ = cifar10
    model = build_model("lenet", 10, head_bias=True, init="default", seed=7)
    x, classes, _ = _draw(images, 6, 10, 11)
    gradients = _batch(model, x, classes, 0.1)[0]
    with pytest.raises(ValueError, match="batch_size=3 but .* has rank"):
        gradleak.recover_batch(model, gradients, batch_size=3)
    with pytest.raises(ValueError, match="label_format"):
        gradleak.recover_batch(model, gradients, label_format="soft")
    with pytest.raises(ValueError, match="positive"):
        gradleak.recover_batch(model, gradients, batch_size=0)
    bad = dict(gradients, **{"head.weight": gradients["head.weight"] * float("nan")})
    with pytest.raises(ValueError, match="NaN"):
        gradleak.recover_batch(model, bad, batch_size=6)
    zero = dict(gradients, **{"head.weight": torch.zeros_like(gradients["head.weight"])})
    with pytest.raises(ValueError, match="all zeros"):
        gradleak.recover_batch(model, zero, batch_size=6)
    no_bias = build_model("lenet", 10, init="default", seed=7)
    with pytest.raises(ValueError, match="no bias"):
        gradleak.recover_batch(no_bias, _batch(no_bias, x, classes, 0.1)[0], batch_size=6)


def test_an_update_of_unknown_learning_rate(cifar10):
    """A client's weight delta ``-lr * g``: counts, eps and the scale ``-lr`` come back together."""
    images, _ = cifar10
    model = build_model("lenet", 10, head_bias=True, init="default", seed=8)
    x, classes, generator = _draw(images, 16, 10, 12)
    gradients = _batch(model, x, classes, 0.15)[0]
    update = {name: -0.05 * g for name, g in gradients.items()}
    result = gradleak.recover_batch(model, update, batch_size=16, gradient_scale="unknown")
    assert result.determined and torch.equal(result.counts, torch.bincount(classes, minlength=10))
    assert result.eps == pytest.approx(0.15, abs=1e-3) and result.gradient_scale == pytest.approx(-0.05, rel=1e-3)
    known = gradleak.recover_batch(model, update, batch_size=16)
    assert not known.determined  # read at the wrong scale, the mass misses the lattice
    with pytest.raises(ValueError, match="no count lattice"):
        gradleak.recover_batch(model, update, batch_size=16, label_format="mixup", gradient_scale="unknown")


def _mlp_batch(size, kind, seed, bias=True):
    """An untrained ReLU MLP on digits: gradients, true labels (B, C) and head inputs (B, d) of a batch whose
    labels share one eps ("smoothing") or mix two classes each ("mixup")."""
    from gradleak.models import fcn

    images, classes = load_samples("digits")
    generator = torch.Generator().manual_seed(seed)
    model = fcn([64, 256, 128, 10], bias=bias, generator=generator)
    index = torch.randperm(images.shape[0], generator=generator)[:size]
    eps = float(torch.empty(()).uniform_(0.05, 0.3, generator=generator))
    lam = torch.rand(size, 1, generator=generator)
    other = (classes[index] + 1 + torch.randint(9, (size,), generator=generator)) % 10
    one_hot = torch.nn.functional.one_hot(classes[index], 10).double()
    targets = (one_hot * (1 - eps) + eps / 10 if kind == "smoothing" else
               lam * one_hot + (1 - lam) * torch.nn.functional.one_hot(other, 10))
    model.zero_grad(set_to_none=True)
    gradleak.soft_cross_entropy(model(images[index]), targets.float()).backward()
    gradients = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return model, gradients, targets.double(), model.features(images[index]).detach().double(), eps


def _match(examples, labels, features):
    """(largest label error, smallest feature cosine) pairing every recovered example with the true one whose
    feature is most parallel to it; asserts the pairing is one to one."""
    found = torch.stack([result.feature.detach().double() for result in examples])
    cosine = torch.nn.functional.normalize(found, dim=1) @ torch.nn.functional.normalize(features, dim=1).T
    pairs = cosine.argmax(dim=1)
    assert sorted(pairs.tolist()) == list(range(labels.shape[0]))
    recovered = torch.stack([result.label.detach().double() for result in examples])
    return float((recovered - labels[pairs]).abs().max()), float(cosine.max(dim=1).values.min())


@pytest.mark.parametrize("kind", ["smoothing", "mixup"])
@pytest.mark.parametrize("bias", [True, False])
def test_a_small_relu_batch_comes_back_example_by_example(kind, bias):
    size = 4
    model, gradients, labels, features, eps = _mlp_batch(size, kind, 31 + bias, bias=bias)
    result = gradleak.recover_batch(model, gradients, batch_size=size)
    assert result.method == "split" and result.determined, result.message
    assert len(result.examples) == size and result.split_message == ""
    label_error, cosine = _match(result.examples, labels, features)
    assert label_error < 1e-3 and cosine > 0.999
    torch.testing.assert_close(result.class_mass, labels.sum(0), rtol=0, atol=1e-3 * size)
    top = labels.topk(2, dim=1).values
    assert bool((top[:, 0] - top[:, 1] > 0.01).all())  # every example has a clear dominant class
    assert torch.equal(result.counts, torch.bincount(labels.argmax(1), minlength=10)) and result.counts_determined
    if kind == "smoothing":
        assert result.label_format == "smoothing" and abs(result.eps - eps) < 1e-3
    else:
        assert result.label_format == "mixup" and result.eps is None


def test_when_the_batch_is_not_split_the_class_mass_says_why(cifar10):
    model, gradients, labels, _, eps = _mlp_batch(4, "smoothing", 5)
    kept = gradleak.recover_batch(model, gradients, batch_size=4, split=False)
    assert kept.method == "class_mass" and kept.examples == [] and "split=False" in kept.split_message
    update = {name: -0.1 * g for name, g in gradients.items()}
    scaled = gradleak.recover_batch(model, update, batch_size=4, gradient_scale="unknown")
    assert scaled.examples == [] and "unknown gradient scale" in scaled.split_message
    images, _ = cifar10
    lenet = build_model("lenet", 10, head_bias=True, init="default", seed=3)
    # sigmoid features have no zeros, and their near-parallel directions mostly leave the joint system no single
    # batch (which ones depends on the CPU's rounding: the batch of seed 3 split on one machine, not on another)
    refused = 0
    for seed in range(3, 9):
        x, classes, _ = _draw(images, 8, 10, seed)
        result = gradleak.recover_batch(lenet, _batch(lenet, x, classes, 0.1)[0], batch_size=8)
        assert torch.equal(result.counts, torch.bincount(classes, minlength=10)) or not result.determined
        if result.method == "class_mass":
            assert result.examples == [] and "solved as one system" in result.split_message
            refused += 1
    assert refused >= 3


def test_an_example_without_a_dominant_class_leaves_the_counts_open():
    labels = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.2, 0.8]], dtype=torch.float64)
    assert dominant_counts(labels).tolist() == [1, 0, 1]
    even = torch.cat([labels, torch.tensor([[0.5 + EPS_TOL / 4, 0.5 - EPS_TOL / 4, 0.0]], dtype=torch.float64)])
    assert dominant_counts(even) is None


def test_eps_is_known_no_better_than_it_moves_as_the_predictions_are_refined(cifar10):
    """The summed-prediction estimate errs along the very direction eps moves the class mass, which the lattice
    residual cannot see; how far eps moves when the estimate is refined (from every example at the mean feature
    of all classes to each class's examples at their own mean, with the mean feature over the empty classes) is a
    floor on its error bar, computed here with the mass module's public functions."""
    images, _ = cifar10
    model = build_model("resnet18", 10, head_bias=True, seed=0)
    weight, bias = model.head.weight.detach().double(), model.head.bias.detach().double()
    moved_any = False
    for seed in range(3):
        x, classes, generator = _draw(images, 4, 10, seed)
        eps = float(torch.empty(()).uniform_(0.01, 0.3, generator=generator))
        gradients = _batch(model, x, classes, eps)[0]
        weight_grad, bias_grad = gradients["head.weight"].double(), gradients["head.bias"].double()
        first = fit_lattice(prediction_mass(weight, bias, mean_feature(weight_grad, bias_grad), 4) - 4 * bias_grad, 4)
        logits_grad = weight_grad @ weight.T
        empty = mean_feature(logits_grad, bias_grad, first.counts == 0)[None]
        logits = class_mean_logits(logits_grad, bias_grad, empty, first.counts[None],
                                   torch.tensor([first.eps], dtype=torch.float64))
        second = fit_lattice(class_prediction_mass(bias, logits, first.counts[None])[0] - 4 * bias_grad, 4)
        result = gradleak.recover_batch(model, gradients, batch_size=4, split=False)
        moved = abs(first.eps - second.eps)
        moved_any |= moved > 0
        assert result.eps_error >= moved * (1 - 1e-9)
        if AMBIGUITY_RATIO * moved > EPS_TOL:
            assert not result.determined and "eps is pinned" in result.message
    assert moved_any
