"""Hard-label baselines: right on hard labels (real images, untrained LeNet), wrong on soft labels by design."""
from __future__ import annotations

import pytest
import torch

import gradleak
from gradleak.baselines import LABEL_BASELINES, baseline_from_gradients, idlg_label, rlg_label, yin_label
from gradleak.data import load_samples
from gradleak.models import build_model



@pytest.fixture(scope="module")
def lenet_and_images():
    images, labels = load_samples("cifar10")
    return build_model("lenet", 10, seed=0), images[:8], labels[:8]


@pytest.mark.parametrize("method", sorted(LABEL_BASELINES))
def test_baselines_recover_hard_labels(lenet_and_images, method):
    model, images, labels = lenet_and_images
    for x, y in zip(images, labels):
        grads = gradleak.single_example_gradients(model, x, gradleak.hard_label(int(y), 10))
        res = baseline_from_gradients(model, grads, method)
        assert res.target == int(y)
        assert torch.equal(res.label, gradleak.hard_label(int(y), 10))
        assert res.method == method


@pytest.mark.parametrize("method", sorted(LABEL_BASELINES))
def test_baselines_fail_on_soft_labels(lenet_and_images, method):
    """A one-hot answer is at least min(eps*(C-1)/C, lam-ish) away from a soft label: never a success."""
    model, images, labels = lenet_and_images
    a, b = int(labels[0]), int(labels[1]) if int(labels[1]) != int(labels[0]) else (int(labels[0]) + 1) % 10
    cases = [(images[0], gradleak.smooth_label(a, 10, 0.3)),
             (gradleak.mix_inputs(images[0], images[2], 0.4), gradleak.mixup_label(a, b, 0.4, 10))]
    for x, label in cases:
        grads = gradleak.single_example_gradients(model, x, label)
        res = baseline_from_gradients(model, grads, method)
        assert res.label.sum() == 1 and res.label.max() == 1          # one-hot by construction
        assert float((res.label - label).abs().max()) > 0.1           # far from the soft truth


def test_idlg_with_bias_uses_bias_gradient():
    torch.manual_seed(0)
    weight_grad = torch.randn(5, 7)
    bias_grad = torch.tensor([0.1, 0.2, -0.6, 0.2, 0.1])
    assert idlg_label(weight_grad, bias_grad=bias_grad).target == 2
    assert idlg_label(weight_grad, bias_grad=bias_grad).rule == "bias_sign"


def test_idlg_handles_features_of_mixed_sign():
    """Row sums lie when h has mixed signs; the inner-product rule (and RLG) do not."""
    p = torch.tensor([0.1, 0.5, 0.2, 0.2], dtype=torch.float64)
    y = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    h = torch.tensor([1.0, -3.0, 0.5], dtype=torch.float64)       # sum(h) < 0 flips every row sum
    grad = torch.outer(p - y, h)
    assert idlg_label(grad).target == 1
    assert rlg_label(grad).target == 1
    assert yin_label(grad).target != 1                            # the row-sum rule assumes h >= 0


def test_baselines_clear_errors():
    with pytest.raises(ValueError, match="all zeros"):
        idlg_label(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="matrix"):
        yin_label(torch.zeros(3))
    with pytest.raises(ValueError, match="unknown label baseline"):
        baseline_from_gradients(build_model("lenet", 10, seed=0), {}, "nope")
