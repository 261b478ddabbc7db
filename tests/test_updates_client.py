"""The victim clients of real updates: plain SGD (one and K steps, weight decay) and Opacus DP-SGD, each checked
against an independent hand computation."""
from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch
from torch import nn

from gradleak import single_example_gradients, smooth_label
from gradleak.updates_client import DPTruth, dp_sgd_update, opacus_compatible, sgd_update, sgd_updates

needs_opacus = pytest.mark.skipif(importlib.util.find_spec("opacus") is None, reason="opacus is not installed")


def _net(hidden: int = 16, *, batchnorm: bool = False, dropout: bool = False) -> nn.Module:
    """A small float64 ReLU classifier for (3, 2, 2) inputs: 1x1 conv to 4 channels (then BatchNorm if asked),
    16 -> hidden -> 5 (head with bias)."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 1)] + ([nn.BatchNorm2d(4)] if batchnorm else [])
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(16, hidden), nn.ReLU()] + ([nn.Dropout(0.5)] if dropout else [])
    return nn.Sequential(*layers, nn.Linear(hidden, 5)).double().eval()


def _example():
    torch.manual_seed(1)
    return torch.randn(3, 2, 2, dtype=torch.float64), smooth_label(2, 5, 0.3)


def _hand_gradient(model: nn.Module, x: torch.Tensor, label: torch.Tensor) -> dict:
    """dL/dtheta of -sum_i y_i log softmax(z)_i, straight from autograd (no gradleak code)."""
    loss = -(label * torch.log_softmax(model(x[None])[0], dim=0)).sum()
    names, params = zip(*model.named_parameters())
    return dict(zip(names, torch.autograd.grad(loss, params)))


def _state(model: nn.Module) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _same(a: dict, b: dict, rtol: float) -> None:
    assert list(a) == list(b)
    for name in a:
        scale = float(b[name].abs().max())
        assert float((a[name] - b[name]).abs().max()) <= rtol * scale + 1e-300, name


def test_one_sgd_step_is_minus_lr_times_the_gradient_and_leaves_the_model():
    model, (x, label) = _net(), _example()
    before = _state(model)
    g = _hand_gradient(model, x, label)
    for lr in (1e-3, 0.5):
        _same(sgd_update(model, x, label, lr=lr), {n: -lr * v for n, v in g.items()}, 1e-12)
    wd = 0.01
    _same(sgd_update(model, x, label, lr=0.1, weight_decay=wd),
          {n: -0.1 * (g[n] + wd * before[n]) for n in g}, 1e-12)
    _same(_state(model), before, 0.0)


def test_k_sgd_steps_match_a_hand_rolled_loop_and_one_trajectory():
    model, (x, label) = _net(), _example()
    lr, steps = 0.3, 4
    walker = _net()
    walker.load_state_dict(model.state_dict())
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for _ in range(steps):
        g = _hand_gradient(walker, x, label)
        with torch.no_grad():
            for n, p in walker.named_parameters():
                p -= lr * g[n]
                total[n] -= lr * g[n]
    update = sgd_update(model, x, label, lr=lr, steps=steps)
    _same(update, total, 1e-10)
    # not one step scaled by K: the trajectory moved
    one = sgd_update(model, x, label, lr=lr)
    assert max(float((update[n] - steps * one[n]).abs().max()) for n in one) > 1e-4
    along = sgd_updates(model, x, label, lr=lr, steps=(1, steps, 2))
    for k, got in zip((1, steps, 2), along):
        _same(got, sgd_update(model, x, label, lr=lr, steps=k), 0.0)
    with pytest.raises(ValueError, match="steps"):
        sgd_update(model, x, label, lr=lr, steps=0)
    with pytest.raises(ValueError, match="lr"):
        sgd_update(model, x, label, lr=-1.0)


@needs_opacus
@pytest.mark.parametrize("ratio", [0.3, 3.0])   # clips, does not clip
def test_dp_step_without_noise_is_the_clipped_gradient(ratio):
    model, (x, label) = _net(), _example()
    before = _state(model)
    g = single_example_gradients(model, x, label)
    norm = math.sqrt(sum(float(v.square().sum()) for v in g.values()))
    lr, clip = 0.2, ratio * norm
    factor = min(1.0, clip / norm)
    update, truth = dp_sgd_update(model, x, label, lr=lr, max_grad_norm=clip, noise_multiplier=0.0, seed=0)
    assert isinstance(truth, DPTruth)
    assert truth.grad_norm == pytest.approx(norm, rel=1e-12)
    assert truth.clip_factor == pytest.approx(factor, rel=1e-12)
    assert truth.scale == pytest.approx(-lr * factor, rel=1e-12) and truth.noise_std == 0.0
    # Opacus divides by ||g|| + 1e-6: a relative difference of 1e-6 / ||g||
    _same(update, {n: -lr * factor * v for n, v in g.items()}, 1e-5)
    _same(_state(model), before, 0.0)


@needs_opacus
def test_dp_noise_has_the_opacus_std_and_follows_the_seed():
    model, (x, label) = _net(hidden=400), _example()
    lr, clip, sigma = 0.1, 0.5, 0.2
    clean, _ = dp_sgd_update(model, x, label, lr=lr, max_grad_norm=clip, noise_multiplier=0.0, seed=0)
    noisy, truth = dp_sgd_update(model, x, label, lr=lr, max_grad_norm=clip, noise_multiplier=sigma, seed=3)
    assert truth.noise_std == pytest.approx(lr * sigma * clip)
    noise = torch.cat([(noisy[n] - clean[n]).flatten() for n in clean])
    assert noise.numel() > 6000
    assert float(noise.std()) == pytest.approx(truth.noise_std, rel=0.05)
    assert abs(float(noise.mean())) < 0.05 * truth.noise_std
    again, _ = dp_sgd_update(model, x, label, lr=lr, max_grad_norm=clip, noise_multiplier=sigma, seed=3)
    other, _ = dp_sgd_update(model, x, label, lr=lr, max_grad_norm=clip, noise_multiplier=sigma, seed=4)
    _same(again, noisy, 0.0)
    assert all(not torch.equal(other[n], noisy[n]) for n in noisy)


@needs_opacus
def test_dp_refuses_what_opacus_cannot_train_and_opacus_compatible_fixes_batchnorm():
    x, label = _example()
    with pytest.raises(ValueError, match="opacus_compatible"):
        dp_sgd_update(_net(batchnorm=True), x, label, lr=0.1, max_grad_norm=1.0, noise_multiplier=0.0, seed=0)
    with pytest.raises(ValueError, match="dropout"):
        dp_sgd_update(_net(dropout=True), x, label, lr=0.1, max_grad_norm=1.0, noise_multiplier=0.0, seed=0)
    plain = _net()
    assert opacus_compatible(plain) == (plain, [])
    fixed, changes = opacus_compatible(_net(batchnorm=True))
    assert changes and not any(isinstance(m, nn.BatchNorm2d) for m in fixed.modules())
    assert not fixed.training
    update, truth = dp_sgd_update(fixed, x, label, lr=0.1, max_grad_norm=1e6, noise_multiplier=0.0, seed=0)
    assert list(update) == [n for n, _ in fixed.named_parameters()] and truth.clip_factor == 1.0


def test_missing_opacus_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus", None)
    x, label = _example()
    with pytest.raises(ImportError, match="pip install"):
        dp_sgd_update(_net(), x, label, lr=0.1, max_grad_norm=1.0, noise_multiplier=0.0, seed=0)
