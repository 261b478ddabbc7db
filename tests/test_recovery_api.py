"""The public entry points: options, diagnostics and clear errors."""
import itertools
import math

import pytest
import torch
from torch import nn

import gradleak
from gradleak.labels import mixup_label, smooth_label
from gradleak.recovery import SEARCHES
from victims import genuine_smoothed_mixups


def _mlp(head_bias=False, hidden_bias=True, activation=nn.ReLU, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 32, bias=hidden_bias), activation(), nn.Linear(32, 10, bias=head_bias)).double()


def _gradients(model, label, seed=0):
    x = torch.randn(20, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        feature = model[1](model[0](x))
    return gradleak.single_example_gradients(model, x, label), feature


def test_registry_names():
    assert {"exact", "pso", "lbfgs"} <= set(SEARCHES)


def test_head_bias_is_closed_form():
    model = _mlp(head_bias=True)
    label = mixup_label(2, 7, 0.3, 10)
    grads, feature = _gradients(model, label)
    result = gradleak.recover_from_gradients(model, grads)
    assert result.method == "closed_form" and result.determined
    torch.testing.assert_close(result.label, label)
    torch.testing.assert_close(result.feature, feature)
    assert result.label_format == "mixup" and result.classes == (2, 7)
    assert result.lam == pytest.approx(0.3)


@pytest.mark.parametrize("activation", [nn.ReLU, nn.Sigmoid])
def test_feature_layer_fixes_the_scale(activation):
    model = _mlp(activation=activation)
    label = smooth_label(4, 10, 0.2)
    grads, feature = _gradients(model, label)
    result = gradleak.recover_from_gradients(model, grads)
    assert result.method == "feature_layer"
    assert result.extra["feature_layer_residual"] < 1e-10
    torch.testing.assert_close(result.label, label)
    torch.testing.assert_close(result.feature, feature)
    head_only = gradleak.recover_from_gradients(model, grads, use_feature_layer=False)
    assert head_only.method == "exact"
    torch.testing.assert_close(head_only.label, label)


def test_feature_layer_is_not_trusted_when_it_does_not_explain_the_gradient():
    model = _mlp()
    grads, _ = _gradients(model, smooth_label(4, 10, 0.2))
    grads["0.bias"] = torch.randn_like(grads["0.bias"])
    result = gradleak.recover_from_gradients(model, grads)
    assert result.method == "exact" and result.extra["feature_layer_residual"] > 1e-3


def test_sequence_gradients_and_explicit_head():
    model = _mlp()
    grads, _ = _gradients(model, smooth_label(1, 10, 0.1))
    by_list = gradleak.recover_from_gradients(model, list(grads.values()))
    by_name = gradleak.recover_from_gradients(model, grads, head="2")
    torch.testing.assert_close(by_list.label, by_name.label)


@pytest.mark.parametrize("fmt", ["hard", "smoothing", "mixup"])
def test_format_is_reported_with_its_parameters(fmt):
    model = _mlp(hidden_bias=False)
    label = {"hard": smooth_label(3, 10, 0.0), "smoothing": smooth_label(3, 10, 0.37),
             "mixup": mixup_label(3, 8, 0.61, 10)}[fmt]
    grads, _ = _gradients(model, label)
    result = gradleak.recover_from_gradients(model, grads, label_format="auto")
    assert result.method == "exact"
    assert result.label_format == fmt and result.determined
    assert result.residual < 1e-9 and result.margin > 1e3
    assert result.rank_one_ratio < 1e-6 and result.row_sum_error < 1e-9 and result.label_valid
    if fmt == "smoothing":
        assert result.classes == (3,) and result.eps == pytest.approx(0.37, abs=1e-9)
    if fmt == "mixup":
        assert result.classes == (3, 8) and result.lam == pytest.approx(0.61, abs=1e-9)
        assert result.eps == pytest.approx(0.0, abs=1e-9)


def test_results_keep_dtype_and_the_paper_methods_run():
    model = _mlp(hidden_bias=False).float()
    label = smooth_label(5, 10, 0.25, dtype=torch.float32)
    grads = gradleak.single_example_gradients(model, torch.randn(20), label)
    for method in ("exact", "lbfgs", "pso"):
        result = gradleak.recover_from_gradients(model, grads, label_format="smoothing", method=method,
                                                 **({"population": 50, "iterations": 20} if method == "pso" else {}))
        assert result.label.dtype == torch.float32 and result.method == method
        assert result.evaluations > 0


@pytest.mark.parametrize("head_bias", [False, True])
@pytest.mark.parametrize("method", ["lbfgs", "pso"])
def test_a_named_search_runs_even_where_a_closed_form_applies(method, head_bias):
    """The closed forms (head bias, layer below) are steps of the exact pipeline: a user who asks for the paper's
    search gets that search, and its answer is judged like any other."""
    model = _mlp(head_bias=head_bias)
    label = smooth_label(4, 10, 0.2)
    grads, feature = _gradients(model, label)
    assert gradleak.recover_from_gradients(model, grads).method == ("closed_form" if head_bias else "feature_layer")
    result = gradleak.recover_from_gradients(model, grads, label_format="smoothing", method=method,
                                             **({"population": 50, "iterations": 20} if method == "pso" else {}))
    assert result.method == method and result.evaluations > 1
    assert "feature_layer_residual" not in result.extra
    if result.determined:
        torch.testing.assert_close(result.label, label)


def test_mixup_forced_on_a_single_class_label_is_undetermined():
    """A smoothed label read as a mixup puts all the weight on one class; which class is "second" is then
    arbitrary, so the answer cannot be determined, though the label itself is right."""
    model = _mlp()
    label = smooth_label(4, 10, 0.2)
    grads, _ = _gradients(model, label)
    result = gradleak.recover_from_gradients(model, grads, label_format="mixup")
    torch.testing.assert_close(result.label, label)
    assert not result.determined and "second class" in result.message
    assert min(result.lam, 1 - result.lam) < 1e-6
    genuine = gradleak.recover_from_gradients(model, _gradients(model, mixup_label(4, 6, 0.01, 10))[0],
                                              label_format="mixup")
    assert genuine.determined and genuine.classes == (4, 6) and genuine.lam == pytest.approx(0.01, abs=1e-9)


def test_paper_methods_need_a_format():
    model = _mlp(hidden_bias=False)
    grads, _ = _gradients(model, smooth_label(5, 10, 0.25))
    with pytest.raises(ValueError, match="needs a known label_format"):
        gradleak.recover_from_gradients(model, grads, method="pso")


def test_batch_gradient_is_refused():
    model = _mlp(hidden_bias=False)
    a, _ = _gradients(model, smooth_label(1, 10, 0.1), seed=1)
    b, _ = _gradients(model, smooth_label(6, 10, 0.3), seed=2)
    batch = {k: a[k] + b[k] for k in a}
    with pytest.raises(ValueError, match="batch"):
        gradleak.recover_from_gradients(model, batch)
    noisy = gradleak.recover_from_gradients(model, batch, rank_one_tol=None)
    assert not noisy.determined and noisy.rank_one_ratio > 0.01


@pytest.mark.parametrize("options, match", [
    (dict(label_format="soft"), "label_format must be one of"),
    (dict(method="adam"), "method must be one of"),
    (dict(feature_sign="positive"), "feature_sign must be one of"),
])
def test_bad_options(options, match):
    model = _mlp(hidden_bias=False)
    grads, _ = _gradients(model, smooth_label(1, 10, 0.1))
    with pytest.raises(ValueError, match=match):
        gradleak.recover_from_gradients(model, grads, **options)


@pytest.mark.parametrize("options, unknown", [
    (dict(use_feature_layer=False), "'use_feature_layer'"),  # recover_from_gradients' option, not recover_label's
    (dict(method="pso", label_format="smoothing", decades=6), "'decades'"),  # the exact search's, not the PSO's
])
def test_an_option_no_search_takes_is_named(options, unknown):
    model = _mlp(hidden_bias=False)
    grads, _ = _gradients(model, smooth_label(1, 10, 0.1))
    weight_grad, weight = grads["2.weight"], model[2].weight.detach()
    with pytest.raises(TypeError, match=f"unknown option {unknown}"):
        gradleak.recover_label(weight_grad, weight, **options)
    with pytest.raises(TypeError, match=f"unknown option {unknown}"):
        gradleak.recover_labels(weight_grad.unsqueeze(0), weight, **options)
    assert gradleak.recover_label(weight_grad, weight, decades=6.0).determined  # one it takes


def test_bad_gradients():
    model = _mlp(hidden_bias=False)
    grads, _ = _gradients(model, smooth_label(1, 10, 0.1))
    zero = dict(grads, **{"2.weight": torch.zeros_like(grads["2.weight"])})
    with pytest.raises(ValueError, match="all zeros"):
        gradleak.recover_from_gradients(model, zero)
    nan = dict(grads, **{"2.weight": grads["2.weight"].clone().fill_(math.nan)})
    with pytest.raises(ValueError, match="NaN"):
        gradleak.recover_from_gradients(model, nan)
    with pytest.raises(ValueError, match="shape"):
        gradleak.recover_label(grads["2.weight"][:, :5], model[2].weight)
    with pytest.raises(TypeError, match="no nn.Linear"):
        gradleak.recover_from_gradients(nn.Sequential(nn.Conv1d(1, 1, 1)), [torch.ones(1, 1, 1), torch.ones(1)])
    with pytest.raises(ValueError, match="gradients for a model"):
        gradleak.recover_from_gradients(model, [grads["2.weight"]])


def test_non_negative_prior_can_be_required_or_dropped():
    model = _mlp(hidden_bias=False)
    label = smooth_label(2, 10, 0.3)
    grads, feature = _gradients(model, label)
    required = gradleak.recover_from_gradients(model, grads, feature_sign="nonnegative")
    dropped = gradleak.recover_from_gradients(model, grads, feature_sign="any")
    for result in (required, dropped):
        torch.testing.assert_close(result.label, label)
        assert bool((result.feature >= 0).all())
    signed = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 10, bias=False)).double()
    grads, _ = _gradients(signed, label)
    with pytest.raises(ValueError, match="mixed signs"):
        gradleak.recover_from_gradients(signed, grads, feature_sign="nonnegative")


def test_small_heads_run_on_one_thread_and_restore_the_count(monkeypatch):
    """A small head's many tiny operations gain nothing from intra-op threads (idle ones spin on a loaded
    machine): the recovery runs on one, and the caller's thread count is restored, also after an error."""
    from gradleak.recovery import api

    model = _mlp()
    grads, _ = _gradients(model, smooth_label(4, 10, 0.2))
    seen = []
    real_factor_head = api.factor_head
    monkeypatch.setattr(api, "factor_head", lambda *a, **k: seen.append(torch.get_num_threads()) or
                        real_factor_head(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gradleak.recover_from_gradients(model, grads)
        assert seen == [1] and torch.get_num_threads() == 2
        with pytest.raises(ValueError):
            gradleak.recover_label(torch.zeros(10, 32, dtype=torch.float64), model[2].weight.detach())
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_gradient_coarser_than_its_dtype_is_judged_at_the_precision_it_carries():
    """A derived gradient (a split example's) whose errors carry 1e-4 of noise, stored in float32: at float32's
    precision no label fits; told the rounding it carries, the label is read within that noise of the truth."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(10, 32, generator=generator, dtype=torch.float64) * 0.3
    bias = torch.randn(10, generator=generator, dtype=torch.float64) * 0.1
    feature = torch.rand(32, generator=generator, dtype=torch.float64)
    label = smooth_label(4, 10, 0.2).double()
    for _ in range(3):
        noise = 1e-4 * torch.randn(10, generator=generator, dtype=torch.float64)
        errors = torch.softmax(weight @ feature + bias, -1) - label + (noise - noise.mean())
        gradient = torch.outer(errors, feature).float()
        options = dict(bias=bias.float(), bias_grad=errors.float(), label_format="smoothing")
        assert not gradleak.recover_label(gradient, weight.float(), **options).determined
        told = gradleak.recover_label(gradient, weight.float(), precision=2e-4, **options)
        assert told.determined and float((told.label.double() - label).abs().max()) < 1e-3


def test_a_split_gradient_is_judged_with_the_error_its_derivation_spreads_over_every_entry():
    """A gradient read off a batch by least squares carries its rounding on every entry of ``p - y`` alike, in
    proportion to the largest (2e-6 to 2e-5 in LeNet's splits of 8), where a network rounds each ``p_i - y_i``
    relative to itself: an entry whose ``p_i`` and ``y_i`` are near zero can read below zero. Told that error
    (``precision``, as the split measures it), the label is judged with it, determined and right; read as a
    gradient a network computed, it is refused (not read wrong)."""
    generator = torch.Generator().manual_seed(5)
    num_classes, dim, derived = 10, 64, 2e-6
    weight = torch.randn(num_classes, dim, generator=generator, dtype=torch.float64) * 1.5  # confident predictions
    bias = torch.zeros(num_classes, dtype=torch.float64)
    feature = torch.rand(dim, generator=generator, dtype=torch.float64)
    label = torch.nn.functional.one_hot(torch.tensor(3), num_classes).double()
    errors = torch.softmax(weight @ feature + bias, 0) - label
    assert int((torch.softmax(weight @ feature, 0) < derived).sum()) >= 3  # entries it can push below zero
    spread = derived * errors.abs().max() * (2 * torch.rand(num_classes, generator=generator, dtype=torch.float64) - 1)
    observed = errors + spread
    inputs = dict(weight_grad=torch.outer(observed, feature).float(), weight=weight.float(), bias=bias.float(),
                  bias_grad=observed.float())
    told = gradleak.recover_label(**inputs, precision=derived)
    assert told.determined and float((told.label.double() - label).abs().max()) < 1e-5
    as_computed = gradleak.recover_label(**inputs)
    assert not as_computed.determined and "valid label" in as_computed.message


def _smoothed_mixups_with_the_same_gradient(weight, feature, label):
    """Other smoothed-mixup labels whose feature ``s * feature`` (s > 0) gives the gradient of ``label`` exactly,
    found by a scan of ``s`` and bisection, apart from gradleak: ``G = e h^T = (e / s)(s h)^T``, so the label that
    feature needs is ``softmax(s W h) - e / s``; it is a smoothed mixup when two entries hold the rest's common share
    or more and the rest are equal."""
    errors = torch.softmax(weight @ feature, -1) - label
    num_classes = len(label)

    def needed(scale):
        return torch.softmax(scale * (weight @ feature), -1) - errors / scale

    scales = torch.logspace(-2, 2, 4001, dtype=torch.float64)
    found = []
    for rest in itertools.combinations(range(num_classes), num_classes - 2):
        gap = needed(scales.unsqueeze(-1))[:, list(rest)]
        gap = gap[:, 0] - gap[:, 1]
        for i in (gap[:-1] * gap[1:] < 0).nonzero().flatten().tolist():
            low, high = float(scales[i]), float(scales[i + 1])
            for _ in range(100):
                middle = 0.5 * (low + high)
                difference = needed(middle)[list(rest)]
                low, high = (middle, high) if float((difference[0] - difference[1]) * gap[i]) > 0 else (low, middle)
            other = needed(middle)
            if bool(genuine_smoothed_mixups(other.unsqueeze(0), rest, label)):
                found.append(other)
    return found


def test_four_classes_read_a_mixup_only_where_no_smoothed_mixup_gives_the_same_gradient():
    """With 4 classes a smoothed mixup (part of the "mixup" format) has no equation to spare: its labels fit any
    gradient at isolated scalars. Where one of them is a genuine smoothed mixup (each class at least the common
    share) other than the truth, the gradient cannot tell the two apart and the answer is ambiguous; where none
    is, the mixup is read, right. Which case holds is found by a scan apart from gradleak."""
    outcomes = set()
    for seed in range(12):
        generator = torch.Generator().manual_seed(seed)
        weight = torch.rand(4, 8, generator=generator, dtype=torch.float64) - 0.5
        feature = torch.relu(torch.randn(8, generator=generator, dtype=torch.float64)) + 0.05
        label = mixup_label(0, 1, 0.3, 4)
        gradient = torch.outer(torch.softmax(weight @ feature, -1) - label, feature)
        result = gradleak.recover_label(gradient.float(), weight.float(), label_format="mixup")
        others = _smoothed_mixups_with_the_same_gradient(weight, feature, label)
        assert result.determined == (not others), (seed, result.message)
        if result.determined:
            assert float((result.label.double() - label).abs().max()) < 1e-3
        else:
            assert "another valid label" in result.message
        outcomes.add(result.determined)
    assert outcomes == {True, False}


def test_a_simpler_label_that_fits_a_saturated_mixed_one_exactly_is_not_taken():
    """A softmax saturated on one class leaves a smoothed mixup's other entries equal whatever the feature scale,
    so a smoothed label fits its gradient exactly too, at another scale. The simpler label used to win, determined
    and 0.76 off; both fit, so the answer is ambiguous. The other label is checked apart from gradleak: its feature
    gives the observed gradient."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 8, generator=generator, dtype=torch.float64)
    feature = torch.relu(torch.randn(8, generator=generator, dtype=torch.float64)) * 12
    probabilities = torch.softmax(weight @ feature, -1)
    assert float(probabilities.max()) > 1 - 1e-7  # saturated on class 1
    label = mixup_label(1, 3, 0.2, 5, eps=0.03)  # 0.78 on the class the softmax is saturated on, 0.2 on class 3
    gradient = torch.outer(probabilities - label, feature).float()
    for label_format in ("auto", "mixup"):
        result = gradleak.recover_label(gradient, weight.float(), label_format=label_format)
        assert not result.determined and "ambiguous" in result.message
        assert float((result.label.double() - label).abs().max()) > 0.5
        other, other_feature = result.label.double(), result.feature.double()
        reproduced = torch.outer(torch.softmax(weight @ other_feature, -1) - other, other_feature)
        assert float((reproduced - gradient.double()).norm() / gradient.double().norm()) < 1e-6
