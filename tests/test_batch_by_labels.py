"""gradleak.batch.by_labels: a small batch's examples found by their labels' structure (no zeros needed), checked
against the truth the test alone knows (the batch's labels and head inputs)."""
import copy

import pytest
import torch

import gradleak
from gradleak.batch.by_labels import can_complete, largest_batch, split_by_labels
from gradleak.batch.split import split_batch
from gradleak.experiments.common import input_options
from gradleak.models import build_model
from victims import batch_gradients, paired


def _labels(kind, size, generator, num_classes):
    """(B, C) smoothed labels (each its own eps), mixup labels of two random classes, or hard labels."""
    rows = []
    for _ in range(size):
        first = torch.randint(num_classes, (), generator=generator)
        shift = torch.randint(1, num_classes, (), generator=generator)
        weight = float(torch.empty(()).uniform_(0.05, 0.95, generator=generator))
        if kind == "mixup":
            rows.append(gradleak.mixup_label(int(first), int((first + shift) % num_classes), weight, num_classes))
        else:
            rows.append(gradleak.smooth_label(int(first), num_classes, 0.3 * weight if kind == "smoothing" else 0.0))
    return torch.stack(rows)


def _batch(model, images, kind, seed, size):
    generator = torch.Generator().manual_seed(seed)
    x = images[torch.randperm(images.shape[0], generator=generator)[:size]]
    targets = _labels(kind, size, generator, model.head.out_features)
    gradients, features = batch_gradients(model, x, targets)
    return gradients, targets, features


def test_how_many_examples_the_structure_pins():
    # C - B - 1 equations, B + 1 unknowns, one to spare
    assert [largest_batch(c) for c in (4, 5, 9, 10, 100)] == [0, 1, 3, 3, 8]
    # with some examples known, each is pinned along its direction (B <= C - 4) and at most 3 of 10 are left
    assert can_complete(4, 2, 10) and can_complete(6, 3, 10) and can_complete(3, 0, 10)
    assert not can_complete(7, 5, 10) and not can_complete(6, 1, 10) and not can_complete(5, 0, 10)
    # one unknown fewer when the examples share the labels' weight (hard labels, one eps, batch mixup)
    assert [largest_batch(c, shared_weight=True) for c in (4, 5, 9, 10, 100)] == [1, 1, 3, 4, 8]
    assert can_complete(4, 0, 10) and can_complete(5, 1, 10)


@pytest.mark.parametrize("kind", ["smoothing", "mixup"])
def test_examples_the_zeros_missed_are_found_by_their_labels(cifar10, resnet18, kind):
    """B = 4 of 10 classes is beyond the labels alone (B <= 3); with two examples' directions known (here the true
    ones, as the zeros give them) and a spurious one among them, all four come back at their scale."""
    gradients, labels, features = _batch(resnet18, cifar10[0], kind, 40, 4)
    weight, bias = resnet18.head.weight.detach(), resnet18.head.bias.detach()
    spurious = torch.nn.functional.normalize(features[0] + features[1], dim=0).double()  # a mixture of two
    known = torch.cat([torch.nn.functional.normalize(features[2:].double(), dim=1), spurious[None]])
    options = dict(precision=torch.finfo(torch.float32).eps, tolerance=1e-3)
    assert split_by_labels(gradients["head.weight"], weight, bias, gradients["head.bias"], 4, **options).features \
        is None
    found = split_by_labels(gradients["head.weight"], weight, bias, gradients["head.bias"], 4, known=known,
                            **options)
    assert found.features is not None
    pairs, cosine = paired(found.features, features)
    relative = torch.linalg.vector_norm(found.features[pairs] - features.double(), dim=1) \
        / torch.linalg.vector_norm(features.double(), dim=1)
    assert cosine > 0.999 and float(relative.max()) < 1e-4
    truth = torch.softmax(features.double() @ weight.double().T + bias.double(), -1) - labels.double()
    assert float((found.errors[pairs] - truth).abs().max()) < 1e-4


@pytest.mark.parametrize("kind, size", [("smoothing", 2), ("mixup", 2), ("smoothing", 3), ("mixup", 3)])
def test_resnet18_batches_split_by_their_labels(cifar10, resnet18, kind, size):
    gradients, labels, features = _batch(resnet18, cifar10[0], kind, size, size)
    split = split_batch(resnet18, gradients, batch_size=size)
    assert split.determined, split.message
    assert split.found_by == "labels" and split.source == "head" and split.draws == 0
    pairs, cosine = paired(split.features, features)
    assert cosine > 0.999
    for n, found in enumerate(pairs.tolist()):
        result = split.examples[found]
        assert result.determined and float((result.label.double() - labels[n].double()).abs().max()) < 1e-3
    # the search alone gives the features at their scale, and the examples' gradient terms
    weight, bias = resnet18.head.weight.detach(), resnet18.head.bias.detach()
    found = split_by_labels(gradients["head.weight"], weight, bias, gradients["head.bias"], size,
                            precision=torch.finfo(torch.float32).eps, tolerance=1e-3)
    pairs, _ = paired(found.features, features)
    relative = torch.linalg.vector_norm(found.features[pairs] - features.double(), dim=1) \
        / torch.linalg.vector_norm(features.double(), dim=1)
    assert float(relative.max()) < 1e-4
    truth = torch.softmax(features.double() @ weight.double().T + bias.double(), -1) - labels.double()
    assert float((found.errors[pairs] - truth).abs().max()) < 1e-4


def test_hard_labels_share_their_weight_and_split_at_four(cifar10, resnet18):
    """B = 4 of 10 classes leaves each example as many equations as unknowns, unless the labels share their weight
    (hard labels: 0): then one is to spare."""
    for seed in (40, 41, 42):
        gradients, labels, features = _batch(resnet18, cifar10[0], "hard", seed, 4)
        split = split_batch(resnet18, gradients, batch_size=4)
        assert split.determined and "labels" in split.found_by, split.message
        pairs, cosine = paired(split.features, features)
        found = torch.stack([split.examples[int(n)].label for n in pairs]).double()
        assert cosine > 0.999 and float((found - labels.double()).abs().max()) < 1e-3


@pytest.mark.parametrize("kind", ["smoothing", "mixup"])
def test_float64_batches_split_by_their_labels_to_float64_rounding(cifar10, resnet18, kind):
    """A float64 gradient's candidates are held to 100 of its own rounding units: each fit is measured directly (the
    inner products that rank the structures cancel below 1e-8), and near-saturated spurious zeros, which fit within
    the rounding too, rank behind the examples (relative to the errors fitted)."""
    model = copy.deepcopy(resnet18).double()
    for seed in (3, 4):
        gradients, labels, features = _batch(model, cifar10[0].double(), kind, seed, 3)
        split = split_batch(model, gradients, batch_size=3)
        assert split.determined, split.message
        pairs, cosine = paired(split.features, features)
        assert cosine > 1 - 1e-12
        found = torch.stack([split.examples[int(n)].label for n in pairs])
        assert found.dtype == torch.float64 and float((found - labels).abs().max()) < 1e-12


def test_gradients_of_two_batches_are_not_split_by_labels(cifar10, resnet18):
    first, _, _ = _batch(resnet18, cifar10[0], "smoothing", 11, 2)
    second, _, _ = _batch(resnet18, cifar10[0], "mixup", 12, 2)
    head = resnet18.head
    # the head's weight gradient of one batch with the bias gradient of another: no set of two rebuilds both
    found = split_by_labels(first["head.weight"], head.weight.detach(), head.bias.detach(), second["head.bias"], 2,
                            precision=torch.finfo(torch.float32).eps, tolerance=1e-3)
    assert found.features is None and found.errors is None and not found.misfit <= 1e-3
    split = split_batch(resnet18, dict(first, **{"head.bias": second["head.bias"]}), batch_size=2)
    assert not split.determined


def test_beyond_what_the_structure_pins_the_message_says_so(cifar10, resnet18):
    gradients, _, _ = _batch(resnet18, cifar10[0], "smoothing", 4, 5)
    split = split_batch(resnet18, gradients, batch_size=5, max_draws=512)
    if not split.examples:
        assert "B <= 3 with 10 classes (4 with hard labels, one smoothing eps or batch mixup)" in split.message
    else:
        assert split.found_by == "zeros"


def test_labels_outside_every_structure_are_never_split_with_confidence(cifar10, resnet18):
    """Three-class soft labels fit no structure the search knows: no set of examples is found by the labels, and
    nothing is reported as determined."""
    weight, bias = resnet18.head.weight.detach(), resnet18.head.bias.detach()
    for seed, size in ((0, 2), (1, 3), (2, 2)):
        generator = torch.Generator().manual_seed(seed)
        x = cifar10[0][torch.randperm(cifar10[0].shape[0], generator=generator)[:size]]
        labels = torch.zeros(size, 10)
        for row in labels:
            weights = torch.rand(3, generator=generator) + 0.2
            row[torch.randperm(10, generator=generator)[:3]] = weights / weights.sum()
        parameters = dict(resnet18.named_parameters())
        loss = gradleak.soft_cross_entropy(resnet18(x), labels)
        gradients = dict(zip(parameters, torch.autograd.grad(loss, list(parameters.values()))))
        found = split_by_labels(gradients["head.weight"], weight, bias, gradients["head.bias"], size,
                                precision=torch.finfo(torch.float32).eps, tolerance=1e-3)
        assert found.features is None
        assert not gradleak.recover_batch(resnet18, gradients, batch_size=size).determined


@pytest.mark.parametrize("kind, size", [("smoothing", 3), ("mixup", 2)])
def test_a_weight_update_of_unknown_learning_rate_is_split_by_labels(cifar10, resnet18, kind, size):
    """The spans of G, and so the examples, do not depend on the gradient's scale: a client's SGD delta (lr not
    told) splits like its gradient, and the scale comes back as -lr."""
    gradients, labels, features = _batch(resnet18, cifar10[0], kind, 20 + size, size)
    update = {name: -0.05 * g for name, g in gradients.items()}
    result = gradleak.recover_batch(resnet18, update, batch_size=size, gradient_scale="unknown")
    assert result.method == "split" and result.determined, result.message
    assert result.gradient_scale == pytest.approx(-0.05, rel=1e-4)
    split = result.extra["split"]
    pairs, cosine = paired(split.features, features)
    assert cosine > 0.999
    for n, found in enumerate(pairs.tolist()):
        assert float((split.examples[found].label.double() - labels[n].double()).abs().max()) < 1e-3
    assert float((result.class_mass - labels.double().sum(0)).abs().max()) < 1e-3


def test_examples_found_are_taken_out_and_the_rest_sought_again(cifar10):
    """B = 8 of 100 classes: one search over the 8-dimensional row space finds some of the examples (measured 4 to
    8 of 8), and the rest are found once those are taken out of G."""
    model = build_model("resnet18", 100, head_bias=True, init="default", seed=5,
                        **input_options("resnet18", channels=3, image_size=32))
    gradients, _, features = _batch(model, cifar10[0], "smoothing", 8, 8)
    found = split_by_labels(gradients["head.weight"], model.head.weight.detach(), model.head.bias.detach(),
                            gradients["head.bias"], 8, precision=torch.finfo(torch.float32).eps, tolerance=1e-3)
    assert found.features is not None
    pairs, cosine = paired(found.features, features)
    relative = torch.linalg.vector_norm(found.features[pairs] - features.double(), dim=1) \
        / torch.linalg.vector_norm(features.double(), dim=1)
    assert cosine > 0.999 and float(relative.max()) < 1e-4


def test_more_known_directions_than_examples_are_chosen_among(cifar10, resnet18):
    """B = 4 of 10 classes, smoothed each with its own eps: the labels alone do not split it. Five directions are
    known (the four true ones, the first twice), each pinned by its label: the set of four is chosen among them,
    not sought again from scratch. The right set rebuilds the gradient, and so does the one with the copy: the
    answer is ambiguous, and refused."""
    gradients, labels, features = _batch(resnet18, cifar10[0], "smoothing", 40, 4)
    weight, bias = resnet18.head.weight.detach(), resnet18.head.bias.detach()
    known = torch.nn.functional.normalize(torch.cat([features, features[:1]]).double(), dim=1)
    options = dict(precision=torch.finfo(torch.float32).eps, tolerance=1e-3)
    assert split_by_labels(gradients["head.weight"], weight, bias, gradients["head.bias"], 4, **options).features \
        is None
    found = split_by_labels(gradients["head.weight"], weight, bias, gradients["head.bias"], 4, known=known,
                            **options)
    assert found.candidates == 5 and found.misfit < 1e-4
    assert found.features is None and found.runner_up < 100 * found.misfit
