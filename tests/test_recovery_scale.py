"""Unknown gradient scale (``gradient_scale="unknown"``) and the fit test that every path's answer must pass."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import gradleak
from gradleak.labels import mixup_label, smooth_label
from test_recovery_exact import SETTINGS, _check, _victim
from victims import fit_with_smoothing

FORMATS = st.sampled_from(["hard", "smoothing", "mixup"])
SCALES = st.tuples(st.floats(-4.0, 2.0), st.sampled_from([1.0, -1.0])).map(lambda e: e[1] * 10.0 ** e[0])


def _label(fmt, C, seed, value):
    a = seed % C
    if fmt == "mixup":
        return mixup_label(a, (a + 1 + seed % (C - 1)) % C, 0.05 + 0.9 * value, C)
    return smooth_label(a, C, 0.0 if fmt == "hard" else 0.9 * value)


def _scaled(kwargs, s):
    return {k: (v * s if k in ("weight_grad", "bias_grad") and v is not None else v) for k, v in kwargs.items()}


@SETTINGS
@given(C=st.integers(5, 1000), d=st.sampled_from([8, 64, 300]), fmt=FORMATS, value=st.floats(0.0, 1.0),
       bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]), s=SCALES,
       seed=st.integers(0, 10**6))
def test_unknown_scale_recovers_label_feature_and_scale(C, d, fmt, value, bias, dtype, s, seed):
    label = _label(fmt, C, seed, value)
    kwargs, h = _victim(C, d, label, bias=bias, dtype=dtype, seed=seed)
    result = gradleak.recover_label(**_scaled(kwargs, s), gradient_scale="unknown")
    if fmt == "mixup" and C < 6:  # one equation to spare at most (one more unknown, the scale): right or undetermined
        if not result.determined:
            return
    assert result.determined, result.message
    _check(result, label, h, dtype)
    assert result.gradient_scale == pytest.approx(s, rel=1e-3 if dtype == torch.float32 else 1e-8)


@pytest.mark.parametrize("C, fmt", [(3, "hard"), (4, "smoothing"), (4, "mixup")])
def test_unknown_scale_without_equations_to_spare_is_undetermined(C, fmt):
    label = _label(fmt, C, 1, 0.4)
    kwargs, _ = _victim(C, 16, label, bias=False, dtype=torch.float64, seed=1)
    result = gradleak.recover_label(**_scaled(kwargs, -0.1), label_format=fmt, gradient_scale="unknown")
    assert not result.determined
    assert "no equation to spare once the unknown gradient scale is fitted" in result.message


def test_known_scale_reports_unit_gradient_scale():
    kwargs, _ = _victim(10, 32, smooth_label(2, 10, 0.3), bias=False, dtype=torch.float64, seed=0)
    assert gradleak.recover_label(**kwargs).gradient_scale == 1.0


def test_unknown_scale_needs_the_exact_method():
    kwargs, _ = _victim(10, 32, smooth_label(2, 10, 0.3), bias=False, dtype=torch.float64, seed=0)
    with pytest.raises(ValueError, match="gradient_scale='unknown' use method='exact'"):
        gradleak.recover_label(**kwargs, label_format="smoothing", method="pso", gradient_scale="unknown")
    with pytest.raises(ValueError, match="gradient_scale must be one of"):
        gradleak.recover_label(**kwargs, gradient_scale="maybe")


# ------------------------------------------------------------------ regressions: a raw SGD delta as a gradient

def _classifier(head_bias, seed):
    """A BERT-style classifier head (dense + tanh pooler, then a biased linear head) or a ReLU MLP."""
    torch.manual_seed(seed)
    if head_bias:
        return nn.Sequential(nn.Linear(48, 64), nn.Tanh(), nn.Linear(64, 12))
    return nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 12, bias=False))


def _train_briefly(model, seed):
    g = torch.Generator().manual_seed(seed)
    inputs, classes = torch.randn(96, 48, generator=g), torch.randint(12, (96,), generator=g)
    return fit_with_smoothing(model, inputs, classes, 12, lr=0.3, steps=60)


@pytest.mark.parametrize("head_bias", [True, False], ids=["closed-form-head-bias", "closed-form-layer-below"])
def test_raw_delta_passed_as_gradient_is_never_a_confident_wrong_answer(head_bias):
    model = _train_briefly(_classifier(head_bias, 0), 1)
    g = torch.Generator().manual_seed(2)
    hinted = 0
    for sample in range(20):
        label = smooth_label(sample % 12, 12, 0.2 * (sample % 3), dtype=torch.float32)
        grads = gradleak.single_example_gradients(model, torch.randn(48, generator=g), label)
        delta = {name: -0.1 * grad for name, grad in grads.items()}  # one SGD step, lr 0.1
        result = gradleak.recover_from_gradients(model, delta)
        assert result.method == ("closed_form" if head_bias else "feature_layer")
        error = float((result.label - label).abs().max())
        assert not (result.determined and error > 1e-3), (sample, error, result)
        assert not result.determined
        hinted += "looks like a gradient scaled by" in result.message
        scaled = gradleak.recover_from_gradients(model, delta, gradient_scale="unknown")
        if scaled.determined:
            assert float((scaled.label - label).abs().max()) < 1e-3
            assert scaled.gradient_scale == pytest.approx(-0.1, rel=1e-3)
    assert hinted >= 10


def test_float32_gradients_cast_to_float64_are_judged_at_float32_precision():
    model = _train_briefly(_classifier(False, 3), 4)
    g = torch.Generator().manual_seed(5)
    double = _classifier(False, 3)
    double.load_state_dict(model.state_dict())
    double = double.double()
    recovered = 0
    for sample in range(30):
        label = smooth_label(sample % 12, 12, 0.1 * (sample % 4), dtype=torch.float32)
        grads = gradleak.single_example_gradients(model, torch.randn(48, generator=g), label)
        result = gradleak.recover_from_gradients(double, {k: v.double() for k, v in grads.items()})
        recovered += result.determined and float((result.label - label.double()).abs().max()) < 1e-3
    assert recovered == 30


def test_saturated_heads_give_no_confident_wrong_answer():
    """Logits in the hundreds saturate the softmax: many labels explain the gradient; say so, never guess."""
    confident_wrong = 0
    for C in (5, 10):
        for seed in range(8):
            g = torch.Generator().manual_seed(seed)
            weight = (torch.rand(C, 64, generator=g) - 0.5) * 40
            h = torch.relu(torch.randn(64, generator=g))
            label = [smooth_label(seed % C, C, 0.2), mixup_label(seed % C, (seed + 1) % C, 0.3, C)][seed % 2].float()
            delta = torch.softmax(weight @ h, -1) - label
            for s, mode in ((1.0, "known"), (1.0, "unknown"), (-0.06, "known"), (-0.06, "unknown")):
                result = gradleak.recover_label(s * torch.outer(delta, h), weight, gradient_scale=mode)
                confident_wrong += result.determined and float((result.label - label).abs().max()) > 1e-3
    assert confident_wrong == 0
