"""gradleak.batch.label_precision: how far a batch's gradient pins each example of a split, checked against the
truth the test alone knows (the batch's labels and head inputs)."""
from dataclasses import replace

import pytest
import torch

import gradleak
from gradleak.batch.joint import CARRIED_MOST
from gradleak.batch.label_precision import split_label_errors
from gradleak.batch.split import split_batch
from gradleak.data import load_samples
from gradleak.experiments.batch import _examples_success, batch_rng, victim_batch, victim_model
from gradleak.head import storage_precision


@pytest.fixture(scope="module")
def lenet_cifar10():
    """The batch experiment's LeNet (PyTorch's init, sigmoid features nearly parallel) and its images."""
    model, side, _ = victim_model("cifar10", "lenet")
    return model, *load_samples("cifar10", size=side)


def _truth_split(model, gradients, truth):
    """Each example recovered alone from its own true gradient ``e_n h_n^T`` (what a perfect split hands on)."""
    weight, bias = model.head.weight.detach(), model.head.bias.detach()
    features, labels = truth["features"], truth["labels"]
    errors = torch.softmax(features @ weight.T + bias, -1) - labels
    return [gradleak.recover_label(torch.outer(e, h), weight, bias=bias, bias_grad=e)
            for e, h in zip(errors, features)]


def _errors(model, gradients, examples, shared_weight=False):
    head, weight_grad = model.head, gradients["head.weight"]
    return split_label_errors(examples, head.weight.detach(), head.bias.detach(), weight_grad, gradients["head.bias"],
                              precision=storage_precision(weight_grad, weight_grad[0]), scale_known=True,
                              shared_weight=shared_weight)


def test_the_truth_of_a_well_conditioned_batch_is_pinned(cifar10, resnet18):
    """ResNet18 (features far from parallel), batches of 3 smoothed and mixed examples: the true split is pinned
    far below the bound, and within its error bar of the truth."""
    images, classes = cifar10
    for label_format in ("smoothing", "mixup-pairs"):
        gradients, truth = victim_batch(resnet18, images, classes, 10, label_format, 3,
                                        batch_rng(2023, label_format, 3, 0))
        examples = _truth_split(resnet18, gradients, truth)
        assert all(result.determined for result in examples)
        errors = _errors(resnet18, gradients, examples)
        assert errors.shape == (3,) and float(errors.max()) < CARRIED_MOST / 10
        off = (torch.stack([r.label for r in examples]).double() - truth["labels"].double()).abs().amax(-1)
        assert bool((off <= 3 * errors + 1e-6).all())


def test_an_answer_off_along_the_batch_is_measured_by_how_far_it_is_off(cifar10, resnet18):
    """The true split of a ResNet18 batch with each example's mixup weight moved by 0.01 (its features kept): the
    batch's equations lead back to the truth, so each label's error is at least about how far it was moved."""
    images, classes = cifar10
    gradients, truth = victim_batch(resnet18, images, classes, 10, "mixup-pairs", 3,
                                    batch_rng(2023, "mixup-pairs", 3, 0))
    examples = _truth_split(resnet18, gradients, truth)
    moved = []
    for result in examples:
        low, high = result.classes
        label = result.label.clone()
        label[low] += 0.01
        label[high] -= 0.01
        moved.append(replace(result, label=label, lam=result.lam - 0.01))
    errors = _errors(resnet18, gradients, moved)
    assert bool((errors > 0.005).all()) and bool((errors < 0.02).all())


def test_nearly_parallel_features_sharing_their_classes_are_not_pinned(lenet_cifar10):
    """LeNet (PyTorch's init), batch mixup of two examples: both share their two classes, and their features are
    nearly parallel. Some such batches the batch's gradient does not pin within the bound even at the truth, and a
    split of those is never determined (on one CPU, sample 14 was split with both labels 0.010 off and reported
    determined before the batch's equations judged it). Every determined split is right."""
    model, images, classes = lenet_cifar10
    unpinned = checked = 0
    for sample in range(20):
        gradients, truth = victim_batch(model, images, classes, 10, "mixup", 2, batch_rng(2023, "mixup", 2, sample))
        loose = float(_errors(model, gradients, _truth_split(model, gradients, truth)).max()) > CARRIED_MOST
        split = split_batch(model, gradients, batch_size=2)
        unpinned += loose
        checked += loose and bool(split.examples)
        assert not (loose and split.determined)
        if split.determined:
            assert _examples_success(split.examples, truth)
    assert unpinned >= 3 and checked >= 1


def test_one_eps_for_the_batch_pins_labels_at_least_as_well(cifar10, resnet18):
    """ResNet18, batches of 8 smoothed labels of 10 classes (as the joint solve reads them): one eps for the whole
    batch is a restriction of one weight per example, so at the truth its errors are no larger, and within the
    bound."""
    images, classes = cifar10
    for sample in range(2):
        gradients, truth = victim_batch(resnet18, images, classes, 10, "smoothing", 8,
                                        batch_rng(2023, "smoothing", 8, sample))
        examples = _truth_split(resnet18, gradients, truth)
        errors = {shared: _errors(resnet18, gradients, examples, shared) for shared in (False, True)}
        assert bool((errors[True] <= errors[False] * (1 + 1e-6)).all())
        assert float(errors[True].max()) < CARRIED_MOST


@pytest.mark.parametrize("scale_known, with_bias", [(True, True), (False, True), (True, False), (False, False)])
def test_the_closed_form_jacobian_matches_autodiff(scale_known, with_bias):
    """The batch's equations' Jacobian in closed form against reverse-mode autodiff of their residual: one-class,
    mixed and smoothed mixed labels, one weight tied across the one-class labels."""
    from gradleak.batch.label_precision import _BatchEquations

    generator = torch.Generator().manual_seed(0)
    num_classes, size = 7, 3
    weight_reduced = torch.randn(num_classes, size, generator=generator, dtype=torch.float64)
    bias = torch.randn(num_classes, generator=generator, dtype=torch.float64)
    base = torch.rand(size, num_classes, generator=generator, dtype=torch.float64)
    directions = torch.randn(size, 2, num_classes, generator=generator, dtype=torch.float64)
    mapping = torch.eye(2 * size, dtype=torch.float64)[:, [0, 2, 3, 4]]
    mapping = torch.cat([mapping[:, [0, 1, 3]].sum(-1, keepdim=True), mapping[:, [2]]], -1)  # tied first weights
    rows = num_classes * size + (num_classes if with_bias else 0)
    observed = torch.randn(rows, generator=generator, dtype=torch.float64)
    equations = _BatchEquations(weight_reduced, bias, base, directions, mapping, observed,
                                torch.linalg.vector_norm(observed), scale_known, with_bias)
    x = torch.randn(size * size + mapping.shape[1] + (not scale_known), generator=generator, dtype=torch.float64)
    residual, jacobian = equations.evaluate(x)
    expected = torch.func.jacrev(lambda value: equations.evaluate(value)[0])(x)
    assert residual.shape == (rows,) and jacobian.shape == expected.shape
    torch.testing.assert_close(jacobian, expected, rtol=1e-12, atol=1e-14)
