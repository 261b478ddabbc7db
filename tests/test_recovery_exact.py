"""Property tests: exact recovery on random heads against the truth that built the gradient."""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import gradleak
from gradleak.labels import mixup_label, smooth_label
from victims import head_with_logits

SETTINGS = settings(max_examples=int(os.environ.get("GRADLEAK_EXAMPLES", 40)), deadline=None, derandomize="GRADLEAK_EXAMPLES" not in os.environ,
                    suppress_health_check=[HealthCheck.too_slow])


def _victim(num_classes, dim, label, *, bias, dtype, seed, nonnegative=True):
    """A random head and the gradient of one example; returns (kwargs for recover_label, true feature)."""
    g = torch.Generator().manual_seed(seed)
    weight = (torch.rand(num_classes, dim, generator=g, dtype=torch.float64) - 0.5).to(dtype)
    raw = torch.randn(dim, generator=g, dtype=torch.float64)
    h = (torch.relu(raw) + 0.05 * raw.abs() if nonnegative else raw).to(dtype)
    b = (torch.rand(num_classes, generator=g, dtype=torch.float64) - 0.5).to(dtype) if bias else None
    z = weight @ h + (b if bias else 0)
    delta = torch.softmax(z, -1) - label.to(dtype)
    kwargs = dict(weight_grad=torch.outer(delta, h), weight=weight, bias=b, bias_grad=delta if bias else None)
    return kwargs, h


def _check(result, label, h, dtype):
    err = float((result.label.double() - label.double()).abs().max())
    cos = float(torch.nn.functional.cosine_similarity(result.feature.double(), h.double(), dim=0))
    limit = 1e-3 if dtype == torch.float32 else 1e-9
    assert err < limit, (err, result)
    assert cos > 1 - limit, (cos, result)
    assert result.label.dtype == dtype and result.feature.dtype == dtype


classes = st.integers(4, 1000)
dims = st.sampled_from([8, 64, 300])
dtypes = st.sampled_from([torch.float32, torch.float64])


@SETTINGS
@given(C=classes, d=dims, eps=st.floats(0.0, 0.95), bias=st.booleans(), dtype=dtypes, seed=st.integers(0, 10**6))
def test_label_smoothing(C, d, eps, bias, dtype, seed):
    target = seed % C
    label = smooth_label(target, C, eps)
    kwargs, h = _victim(C, d, label, bias=bias, dtype=dtype, seed=seed)
    result = gradleak.recover_label(**kwargs, label_format="smoothing")
    assert result.determined, result.message
    _check(result, label, h, dtype)
    assert result.classes == (target,) or eps > 1 - 1 / C * 2
    assert result.eps == pytest.approx(eps, abs=1e-3 * C if dtype == torch.float32 else 1e-6 * C)


@SETTINGS
@given(C=classes, d=dims, lam=st.floats(0.0, 1.0), eps=st.sampled_from([0.0, 0.1]), bias=st.booleans(),
       dtype=dtypes, seed=st.integers(0, 10**6))
def test_mixup(C, d, lam, eps, bias, dtype, seed):
    # mixup with smoothing (part of the format) has an equation to spare only from 5 classes on; with 4, a smoothed
    # mixup can give the same gradient (test_recovery_api: test_four_classes_...)
    assume(C >= 5)
    a, b = seed % C, (seed // C + 1 + seed % C) % C
    if a == b:
        b = (a + 1) % C
    label = mixup_label(a, b, lam, C, eps=eps)
    kwargs, h = _victim(C, d, label, bias=bias, dtype=dtype, seed=seed)
    result = gradleak.recover_label(**kwargs, label_format="mixup")
    minor = min(lam, 1 - lam) * (1 - eps)  # the weight of the lesser class
    assume(not 0.5e-3 < minor < 2e-3)  # away from the 1e-3 resolution, where either reading is right
    if minor <= 0.5e-3:  # one class holds (almost) all the weight: which class is "second" is arbitrary
        assert not result.determined and "second class" in result.message
        torch.testing.assert_close(result.label, label.to(dtype), atol=1e-3, rtol=0)
        return
    assert result.determined, result.message
    _check(result, label, h, dtype)


@SETTINGS
@given(C=st.integers(3, 1000), d=dims, dtype=dtypes, seed=st.integers(0, 10**6))
def test_hard(C, d, dtype, seed):
    label = smooth_label(seed % C, C, 0.0)
    kwargs, h = _victim(C, d, label, bias=False, dtype=dtype, seed=seed)
    result = gradleak.recover_label(**kwargs, label_format="hard")
    assert result.determined, result.message
    _check(result, label, h, dtype)
    assert result.classes == (seed % C,)


@SETTINGS
@given(C=st.integers(4, 200), eps=st.floats(0.0, 0.5), dtype=dtypes, seed=st.integers(0, 10**6))
def test_mixed_sign_features(C, eps, dtype, seed):
    """Heads whose input is not non-negative (no ReLU before the head): both signs of t are searched."""
    label = smooth_label(seed % C, C, eps)
    kwargs, h = _victim(C, 64, label, bias=False, dtype=dtype, seed=seed, nonnegative=False)
    result = gradleak.recover_label(**kwargs, label_format="smoothing", feature_sign="any")
    assert result.determined, result.message
    _check(result, label, h, dtype)


@SETTINGS
@given(C=st.integers(2, 3), eps=st.floats(0.0, 0.9), lam=st.floats(0.0, 1.0), mixup=st.booleans(),
       seed=st.integers(0, 10**6))
def test_too_few_classes_is_flagged_not_guessed(C, eps, lam, mixup, seed):
    """With 2-3 classes the smoothing / mixup structures have no equation to spare: either the answer is
    right or the result says it is undetermined; never a confident wrong answer."""
    label = mixup_label(0, 1, lam, C) if mixup else smooth_label(seed % C, C, eps)
    kwargs, h = _victim(C, 16, label, bias=False, dtype=torch.float64, seed=seed)
    if mixup and C == 2:
        with pytest.raises(ValueError, match="no label entry to check"):
            gradleak.recover_label(**kwargs, label_format="mixup")
        return
    result = gradleak.recover_label(**kwargs, label_format="mixup" if mixup else "smoothing")
    if result.determined:
        _check(result, label, h, torch.float64)
    else:
        assert result.message


@pytest.mark.parametrize("seed", range(30))
def test_auto_detects_the_format(seed):
    g = torch.Generator().manual_seed(seed)
    C = [10, 100, 1000][seed % 3]
    kind = ["hard", "smoothing", "mixup"][(seed // 3) % 3]
    a, b = torch.randperm(C, generator=g)[:2].tolist()
    value = 0.05 + 0.9 * float(torch.rand((), generator=g))
    label = {"hard": smooth_label(a, C, 0.0), "smoothing": smooth_label(a, C, value * 0.5),
             "mixup": mixup_label(a, b, value, C)}[kind]
    kwargs, h = _victim(C, 128, label, bias=False, dtype=torch.float32, seed=seed)
    result = gradleak.recover_label(**kwargs)
    assert result.label_format == kind, result
    assert result.determined
    _check(result, label, h, torch.float32)
    # mixup with smoothing, the most general structure, is tried only when the others leave the answer open
    assert {"hard", "smoothing", "mixup"} <= set(result.residuals) <= {"hard", "smoothing", "mixup", "mixup_smoothing"}
    # the answer's residual is its own structure's lowest: the simplest structure that fits answers, and the more
    # general one (mixup with smoothing) can fit the same gradient more closely by its rounding alone (seed 24:
    # 2.5e-8 against 2.7e-8)
    assert result.residual in [result.residuals[k] for k in result.residuals if k.startswith(kind[:3])] or \
        kind == "hard"
    if kind == "mixup":
        assert set(result.classes) == {a, b}
        lam = value if result.classes == (min(a, b), max(a, b)) and a < b else 1 - value
        assert result.lam == pytest.approx(lam, abs=1e-4)
    assert math.isfinite(result.margin) or result.margin == math.inf


@pytest.mark.parametrize("dtype, logits", [
    (torch.float32, [0.0, -120.0, -135.0, 20.0]),   # p_1, p_2 ~ 1e-61, 1e-68: their rows underflow to 0 in float32
    (torch.float32, [0.0, -78.0, -82.0, 20.0]),     # p_1, p_2 ~ 3e-43, 5e-45: subnormal rows, a fixed rounding step
    (torch.float64, [0.0, -380.0, -700.0, 20.0]),   # p down to 2e-313: error squares below the smallest double
])
def test_a_softmax_saturated_past_the_dtype_still_gives_the_label(dtype, logits):
    """A network rounds each row ``(p_i - y_i) h`` of the gradient relative to itself, down to its type's smallest
    normal number, and to a fixed step below it: the fit test expects no more of a tiny row than that (the truth
    fits, told the format), and its weighting does not underflow."""
    weight, h = head_with_logits(logits)
    label = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    grad = torch.outer(torch.softmax(weight @ h, -1) - label, h).to(dtype)
    result = gradleak.recover_label(grad, weight.to(dtype), label_format="hard")
    assert result.determined, result.message
    _check(result, label, h, dtype)


def test_a_continuum_of_smoothed_mixups_is_not_read_as_one_label():
    """5 classes, an unknown scale, a softmax whose structured classes are below rounding but one (p ~ 1e-81,
    1e-89, 2.5e-9, 1e-53): ``y_1 = y_2 = y_3`` leaves one equation for the two scalars. Computed here apart: at other
    feature scales the one equation fixes ``alpha``, and the labels it gives are valid smoothed mixups 0.19 to 0.5
    from the truth with exactly this gradient's direction. The answer must not be determined."""
    logits = torch.tensor([-186.0, -204.0, -19.8, -120.0, 0.0], dtype=torch.float64)
    weight, h = head_with_logits(logits, offset=-0.5)
    label = torch.tensor([0.294, 0, 0, 0, 0.706], dtype=torch.float64) * (1 - 0.003) + 0.003 / 5
    errors = torch.softmax(weight @ h, -1) - label
    for factor in (0.95, 1.05, 1.1):
        p = torch.softmax(factor * logits, -1)
        other = p - errors * (p[2] - p[1]) / (errors[2] - errors[1])   # y_1 = y_2 fixes 1 / alpha
        shares = other[1:4]
        assert float(shares.max() - shares.min()) < 1e-15 and bool((other >= 0).all() & (other <= 1).all())
        assert bool((other[[0, 4]] >= shares[0]).all()) and float((other - label).abs().max()) > 0.1
    result = gradleak.recover_label(-0.3 * torch.outer(errors, h), weight, gradient_scale="unknown")
    assert not result.determined, result


def test_a_label_flat_near_the_answer_and_moving_far_from_it_is_not_determined():
    """10 classes, an unknown scale, the truth's softmax 0.995 on class 0 and below 1e-10 on the smoothed classes
    (``--seed 20`` of the random heads drew one). Every larger feature scale saturates the softmax further and
    fits the gradient as well: computed here apart, the smoothed classes' labels stay equal to 7e-8 of
    themselves (float32's rounding), and the labels move 2.5e-3 from the truth. Near the saturated end the label
    hardly moves with ``t``, so a probe scaled by the slope there sees nothing. In float64 the smoothed classes
    tell the scales apart, and the truth is determined."""
    logits = torch.tensor([0.0, -52, -31, -5.3, -34, -41, -46, -23, -49, -29], dtype=torch.float64)
    weight, h = head_with_logits(logits)
    label = torch.zeros(10, dtype=torch.float64)
    label[3], label[9] = 0.456, 0.544
    label = label * (1 - 0.0144) + 0.0144 / 10
    errors = torch.softmax(weight @ h, -1) - label
    smoothed = [0, 1, 2, 4, 5, 6, 7, 8]
    for factor in (1.5, 2.0, 4.0):
        p = torch.softmax(factor * logits, -1)
        other = p - errors * (p[0] - p[1]) / (errors[0] - errors[1])   # y_0 = y_1 fixes 1 / alpha
        shares = other[smoothed]
        assert float((shares.max() - shares.min()) / shares.mean()) < 1e-7 and bool((other >= 0).all())
        assert float((other - label).abs().max()) > 2e-3
    grad = -0.1 * torch.outer(errors, h)
    result = gradleak.recover_label(grad.float(), weight.float(), gradient_scale="unknown")
    assert not result.determined, result
    exact = gradleak.recover_label(grad, weight, gradient_scale="unknown")
    assert exact.determined, exact.message
    _check(exact, label, h, torch.float64)
