"""End to end: the paper's networks on real images (foolbox's bundled CIFAR-10 / ImageNet samples), float32."""
import numpy as np
import pytest
import torch

import gradleak
from gradleak.data import load_samples
from gradleak.labels import mix_inputs, mixup_label, smooth_label
from gradleak.models import build_model


@pytest.fixture(scope="module")
def cifar():
    return load_samples("cifar10")


def _trials(images, labels, num_classes, count, seed):
    """(input, label, format) victims: label smoothing eps ~ U(0, 0.5), mixup lambda ~ U(0, 1), hard."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    for i in range(count):
        kind = ("smoothing", "mixup", "hard")[i % 3]
        a = int(rng.integers(n))
        if kind == "mixup":
            b = int(rng.integers(n))
            while int(labels[b]) == int(labels[a]):
                b = int(rng.integers(n))
            lam = float(rng.uniform())
            yield mix_inputs(images[a], images[b], lam), mixup_label(int(labels[a]), int(labels[b]), lam,
                                                                      num_classes, dtype=torch.float32), kind
        else:
            eps = float(rng.uniform(0, 0.5)) if kind == "smoothing" else 0.0
            yield images[a], smooth_label(int(labels[a]), num_classes, eps, dtype=torch.float32), kind


def _evaluate(model, trials, **options):
    """Score recovery against the truth (the evaluator's side): returns per-trial (success, format right)."""
    outcomes = []
    for x, label, kind in trials:
        grads = gradleak.single_example_gradients(model, x, label)
        with torch.no_grad():
            feature = model.features(x.unsqueeze(0))[0]
        result = gradleak.recover_from_gradients(model, grads, **options)
        error = float((result.label - label).abs().max())
        cosine = float(torch.nn.functional.cosine_similarity(result.feature.double(), feature.double(), dim=0))
        outcomes.append((error < 1e-3 and cosine > 0.999, result.label_format == kind, result))
    return outcomes


def _assert_all(outcomes):
    failures = [o[2] for o in outcomes if not (o[0] and o[1])]
    assert not failures, failures[:2]


@pytest.mark.parametrize("name, kwargs, size", [
    ("lenet", {}, 32),
    ("resnet18", {"stem": "cifar"}, 32),
    ("alexnet", {}, 64),
    ("fcn4", {}, 64),
])
@pytest.mark.parametrize("use_feature_layer", [True, False])
def test_paper_networks_on_cifar10(cifar, name, kwargs, size, use_feature_layer):
    images = cifar[0] if size == 32 else load_samples("cifar10", size=size)[0]
    model = build_model(name, 10, seed=1, **kwargs)
    outcomes = _evaluate(model, _trials(images, cifar[1], 10, 9, seed=2023), use_feature_layer=use_feature_layer)
    _assert_all(outcomes)
    if not use_feature_layer:
        assert {o[2].method for o in outcomes} == {"exact"}


def test_a_one_hot_softmax_is_read_when_told_the_format_and_named_ambiguous_where_a_mixup_gives_its_gradient(cifar):
    """The paper's AlexNet, untrained, has logits near 1e8: its softmax is one-hot on a class ``k``. Then ``p - y``
    and ``p - (y + e_k) / 2`` are proportional, so with the feature doubled the label ``(y + e_k) / 2`` gives the
    same head gradient (checked here apart from gradleak). From the head alone: told the format, every label is
    read, determined (a logit error shared by every class leaves a saturated softmax alone); detecting it, the answer
    is determined exactly where that other label is no label of any format (a mixup of two classes other than
    ``k``). The layer below fixes the feature's scale, and with it every label is determined."""
    images = load_samples("cifar10", size=64)[0]
    model = build_model("alexnet", 10, seed=1)
    ambiguous = 0
    for x, label, kind in _trials(images, cifar[1], 10, 9, seed=2023):
        grads = gradleak.single_example_gradients(model, x, label)
        with torch.no_grad():
            feature = model.features(x.unsqueeze(0))[0].double()
            probabilities = torch.softmax(model(x.unsqueeze(0))[0].double(), -1)
        top = int(probabilities.argmax())
        assert float(probabilities[top]) == 1.0
        other = 0.5 * (label.double() + torch.nn.functional.one_hot(torch.tensor(top), 10).double())
        gradient = torch.outer(probabilities - label.double(), feature)
        same = torch.outer(probabilities - other, 2 * feature)
        assert float((same - gradient).norm()) <= 1e-12 * float(gradient.norm())
        told = gradleak.recover_from_gradients(model, grads, label_format=kind, use_feature_layer=False)
        assert told.determined and float((told.label - label).abs().max()) < 1e-3, told
        detected = gradleak.recover_from_gradients(model, grads, use_feature_layer=False)
        assert float((detected.label - label).abs().max()) < 1e-3
        other_is_a_label = int((other > other.min() + 1e-6).sum()) <= 2
        assert detected.determined == (not other_is_a_label), detected
        ambiguous += other_is_a_label
        with_layer = gradleak.recover_from_gradients(model, grads)
        assert with_layer.determined and float((with_layer.label - label).abs().max()) < 1e-3, with_layer
    assert 0 < ambiguous < 9


def test_head_with_bias_is_closed_form(cifar):
    model = build_model("resnet18", 10, seed=1, head_bias=True)
    outcomes = _evaluate(model, _trials(cifar[0], cifar[1], 10, 6, seed=7))
    _assert_all(outcomes)
    assert {o[2].method for o in outcomes} == {"closed_form"}


def test_resnet50_imagenet_1000_classes():
    images, labels = load_samples("imagenet", size=64)
    model = build_model("resnet50", 1000, seed=3)
    _assert_all(_evaluate(model, _trials(images, labels, 1000, 3, seed=11)))


def _train(model, images, labels, augmentation, steps, seed=0):
    """Fit the samples with label smoothing (eps 0.1) or mixup until the network is confident."""
    torch.manual_seed(seed)
    targets = torch.stack([smooth_label(int(c), 10, 0.1 if augmentation == "smoothing" else 0.0,
                                        dtype=torch.float32) for c in labels])
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        x, y = images, targets
        if augmentation == "mixup":
            perm = torch.randperm(len(images))
            lam = torch.rand(len(images), 1)
            x = (1 - lam.view(-1, 1, 1, 1)) * images + lam.view(-1, 1, 1, 1) * images[perm]
            y = (1 - lam) * targets + lam * targets[perm]
        loss = gradleak.soft_cross_entropy(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


@pytest.mark.parametrize("augmentation", ["smoothing", "mixup"])
def test_confident_trained_lenet(cifar, augmentation):
    """Trained until confident: the head-only landscape goes flat, the layer below still pins the answer."""
    model = _train(build_model("lenet", 10, seed=0, init="default"), *cifar, augmentation, steps=800)
    with torch.no_grad():
        confidence = torch.softmax(model(cifar[0]), -1).max(-1).values
    assert float(confidence.mean()) > 0.85
    outcomes = _evaluate(model, _trials(cifar[0], cifar[1], 10, 30, seed=5))
    _assert_all(outcomes)
    assert {o[2].method for o in outcomes} == {"feature_layer"}


@pytest.mark.parametrize("eps", [0.044, 0.005])
def test_small_smoothing_mass_is_not_taken_for_a_hard_label(eps):
    """1000 classes: eps / C is ~1e-5 per class, below float32's absolute precision near 1 but far above the
    rounding of entries that small; the fit is judged entry by entry, so smoothing is still detected."""
    images, labels = load_samples("imagenet", size=64)
    model = build_model("fcn4", 1000, seed=2023)
    for index in range(2):
        label = smooth_label(int(labels[index]), 1000, eps, dtype=torch.float32)
        result = gradleak.recover_from_gradients(model, gradleak.single_example_gradients(model, images[index],
                                                                                          label))
        assert result.label_format == "smoothing" and result.determined, result
        assert float((result.label - label).abs().max()) < 1e-6
        assert result.eps == pytest.approx(eps, rel=1e-3)
