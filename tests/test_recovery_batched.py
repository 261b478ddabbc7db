"""``recover_labels``: N gradients of one head at once give exactly what N calls of ``recover_label`` give."""
import math
import re

import pytest
import torch
from torch import nn

import gradleak
from gradleak.data import load_samples
from gradleak.head import head_gradients
from gradleak.labels import mix_inputs, mixup_label, smooth_label
from gradleak.models import build_model
from gradleak.recovery.batched import recover_labels

#: Fields every batched result must share with the single call's, exactly.
EXACT = ("label_format", "classes", "determined", "method", "evaluations", "converged", "label_valid", "message")
#: Floating fields, equal to rounding (the implementation gives the same bits; the contract is 1e-6 on labels).
CLOSE = ("eps", "lam", "scale", "margin", "residual", "tol", "gradient_scale", "rank_one_ratio", "row_sum_error")


def _assert_same(batched, single):
    for name in EXACT:
        assert getattr(batched, name) == getattr(single, name), name
    for name in CLOSE:
        a, b = getattr(batched, name), getattr(single, name)
        assert (a is None) == (b is None), name
        if a is not None and not (math.isnan(a) and math.isnan(b)):
            assert a == pytest.approx(b, rel=1e-9, abs=1e-12), name
    assert batched.residuals.keys() == single.residuals.keys()
    assert batched.residuals == pytest.approx(single.residuals, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(batched.label, single.label, rtol=0, atol=1e-6)
    torch.testing.assert_close(batched.feature, single.feature, rtol=1e-6, atol=1e-6)


def _compare(weight_grads, weight, bias_grads=None, **options):
    """recover_labels against one recover_label call per example; returns the batched results."""
    results = recover_labels(weight_grads, weight, bias_grads=bias_grads, **options)
    assert len(results) == len(weight_grads)
    for i, batched in enumerate(results):
        single = gradleak.recover_label(weight_grads[i], weight,
                                        bias_grad=None if bias_grads is None else bias_grads[i], **options)
        _assert_same(batched, single)
    return results


@pytest.fixture(scope="module")
def resnet_heads():
    """Head gradients of ResNet18 (CIFAR-10, bias-free head) for real images: smoothing, mixup and hard labels."""
    model = build_model("resnet18", 10, seed=0)
    images, classes = load_samples("cifar10")
    g = torch.Generator().manual_seed(0)
    grads, kinds = [], []
    for i in range(9):
        a, b = i % len(images), (3 * i + 5) % len(images)
        kind = ("smoothing", "mixup", "hard")[i % 3]
        if kind == "mixup":
            lam = float(torch.rand(1, generator=g))
            other = int(classes[b]) if int(classes[b]) != int(classes[a]) else (int(classes[a]) + 1) % 10
            x, y = mix_inputs(images[a], images[b], lam), mixup_label(int(classes[a]), other, lam, 10,
                                                                     dtype=torch.float32)
        else:
            eps = 0.5 * float(torch.rand(1, generator=g)) if kind == "smoothing" else 0.0
            x, y = images[a], smooth_label(int(classes[a]), 10, eps, dtype=torch.float32)
        parts = head_gradients(model, gradleak.single_example_gradients(model, x, y))
        grads.append(parts["weight_grad"])
        kinds.append(kind)
    return torch.stack(grads), parts["weight"].detach(), kinds


@pytest.mark.parametrize("label_format", ["smoothing", "mixup", "auto", "hard"])
def test_resnet18_heads_match_single_calls(resnet_heads, label_format):
    grads, weight, kinds = resnet_heads
    results = _compare(grads, weight, label_format=label_format)
    if label_format == "auto":  # the formats are read right, and determined
        assert all(r.determined for r in results)
        assert [f if f != "hard" or k != "smoothing" else k for f, k in zip(results.label_formats, kinds)] == kinds


def test_batched_tensors_are_the_results(resnet_heads):
    grads, weight, _ = resnet_heads
    results = recover_labels(grads, weight, label_format="auto")
    torch.testing.assert_close(results.labels, torch.stack([r.label for r in results]), rtol=0, atol=0)
    torch.testing.assert_close(results.features, torch.stack([r.feature for r in results]), rtol=0, atol=0)
    assert results.determined.tolist() == [r.determined for r in results]
    assert results.labels.dtype == grads.dtype and results.features.shape == (len(grads), weight.shape[1])
    assert [r.label_format for r in results[2:5]] == list(results.label_formats[2:5])
    assert results[-1].classes == results[len(results) - 1].classes
    with pytest.raises(IndexError):
        results[len(results)]


def test_float64_and_feature_sign(resnet_heads):
    grads, weight, _ = resnet_heads
    _compare(grads.double(), weight.double(), label_format="auto")
    _compare(grads[:4], weight, label_format="smoothing", feature_sign="any")


def test_undetermined_rows_match_single_calls(resnet_heads):
    """Smoothed labels read as mixup (one class holds all the weight) and scaled gradients passed as plain ones:
    undetermined, with the same best guess and the same message (the scale the gradient looks scaled by)."""
    grads, weight, kinds = resnet_heads
    smoothing = [i for i, k in enumerate(kinds) if k != "mixup"]
    results = _compare(grads[smoothing], weight, label_format="mixup")
    assert not any(r.determined for r in results)
    scaled = _compare(-0.05 * grads[:3], weight)
    assert not any(r.determined for r in scaled)
    hinted = [re.search(r"looks like a gradient scaled by (\S+) ", r.message) for r in scaled]
    assert all(hint and float(hint.group(1)) == pytest.approx(-0.05, rel=1e-3) for hint in hinted)
    unknown = _compare(-0.05 * grads[:3], weight, gradient_scale="unknown")
    assert all(r.determined and r.gradient_scale == pytest.approx(-0.05, rel=1e-3) for r in unknown)


def test_mixed_batches_give_each_example_its_own_answer(resnet_heads):
    """An example's answer does not depend on what else is in the batch (determined or not, either sign)."""
    grads, weight, _ = resnet_heads
    mixed = torch.cat([grads[:3], -0.05 * grads[3:5], -grads[5:7]])  # -G: features of the other sign
    _compare(mixed, weight, label_format="auto")
    _compare(mixed, weight, label_format="auto", feature_sign="any")


def _mlp_heads(count, seed=0):
    """Gradients of a biased 12-class head (an MLP) for smoothing and mixup labels, float64."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 12)).double()
    g = torch.Generator().manual_seed(seed)
    weight_grads, bias_grads = [], []
    for i in range(count):
        x = torch.randn(20, generator=g, dtype=torch.float64)
        y = smooth_label(i % 12, 12, 0.1 * (i % 4)) if i % 2 else mixup_label(i % 12, (i + 5) % 12, 0.3, 12)
        grads = gradleak.single_example_gradients(model, x, y)
        weight_grads.append(grads["2.weight"])
        bias_grads.append(grads["2.bias"])
    return torch.stack(weight_grads), torch.stack(bias_grads), model[2]


def test_head_with_bias(resnet_heads):
    weight_grads, bias_grads, head = _mlp_heads(6)
    weight, bias = head.weight.detach(), head.bias.detach()
    closed = _compare(weight_grads, weight, bias=bias, bias_grads=bias_grads, label_format="auto")
    assert all(r.method == "closed_form" and r.determined for r in closed)
    _compare(weight_grads, weight, bias=bias, label_format="auto")  # the bias gradients not given: searched


def test_paper_search_runs_example_by_example():
    weight_grads, _, head = _mlp_heads(2)
    results = _compare(weight_grads, head.weight.detach(), bias=head.bias.detach(), label_format="mixup",
                       method="lbfgs")
    assert all(r.method == "lbfgs" for r in results)


@pytest.mark.parametrize("change, match", [
    (lambda g, w: (g[0], w), r"\(N, C, d\)"),
    (lambda g, w: (g[:0], w), "no example"),
    (lambda g, w: (g, w[:, :5]), "weight has shape"),
    (lambda g, w: (torch.cat([g[:2], torch.zeros_like(g[:1])]), w), r"all zeros \(examples \[2\]\)"),
    (lambda g, w: (torch.stack([g[0], g[1], g[0] + g[2]]), w), r"not rank one \(examples \[2\]\)"),
])
def test_bad_inputs_are_named(resnet_heads, change, match):
    grads, weight, _ = resnet_heads
    with pytest.raises(ValueError, match=match):
        recover_labels(*change(grads[:3], weight))


def test_bad_bias_gradients():
    weight_grads, bias_grads, head = _mlp_heads(2)
    with pytest.raises(ValueError, match=r"bias_grads must have shape \(2, 12\)"):
        recover_labels(weight_grads, head.weight.detach(), bias=head.bias.detach(), bias_grads=bias_grads[0])
    with pytest.raises(ValueError, match="without bias"):
        recover_labels(weight_grads, head.weight.detach(), bias_grads=bias_grads)
    with pytest.raises(ValueError, match="label_format must be one of"):
        recover_labels(weight_grads, head.weight.detach(), label_format="soft")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("label_format", ["auto", "smoothing"])
def test_cuda_gives_the_cpu_answers(resnet_heads, label_format):
    """The same code on the GPU: every example determined alike, labels and features equal to rounding (the
    GPU's products round differently); single calls on the GPU give its batched answers to 1e-6 (the contract:
    cuBLAS need not give each example the same bits whatever the batch)."""
    grads, weight, _ = resnet_heads
    on_cpu = recover_labels(grads, weight, label_format=label_format)
    on_gpu = recover_labels(grads.cuda(), weight.cuda(), label_format=label_format)
    assert on_gpu.labels.device.type == "cuda"
    assert on_gpu.determined.tolist() == on_cpu.determined.tolist()
    assert on_gpu.label_formats == on_cpu.label_formats
    torch.testing.assert_close(on_gpu.labels.cpu(), on_cpu.labels, rtol=0, atol=1e-5)
    torch.testing.assert_close(on_gpu.features.cpu(), on_cpu.features, rtol=1e-4, atol=1e-5)
    for i in range(3):
        single = gradleak.recover_label(grads[i].cuda(), weight.cuda(), label_format=label_format)
        assert single.determined == bool(on_gpu.determined[i])
        torch.testing.assert_close(single.label, on_gpu.labels[i], rtol=0, atol=1e-6)


def test_results_are_normal_tensors_for_autograd(resnet_heads):
    """The recovery runs in inference mode; what it hands out can still enter an autograd graph (a recovered
    label as the target of a loss, as gradient matching uses it)."""
    grads, weight, _ = resnet_heads
    results = recover_labels(grads[:2], weight, label_format="auto")
    single = gradleak.recover_label(grads[0], weight, label_format="auto")
    for value in (results.labels, results.features, results.determined, results.gradient_scales, single.label,
                  single.feature):
        assert not value.is_inference()
    logits = torch.zeros(2, weight.shape[0], requires_grad=True)
    gradleak.soft_cross_entropy(logits * results.features[:, :1], results.labels).backward()
    assert logits.grad is not None and bool(logits.grad.isfinite().all())
