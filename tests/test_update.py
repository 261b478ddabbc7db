"""Weight updates as a server sees them: one plain SGD step (torch.optim.SGD) or DP-SGD (Opacus) on one example."""
import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import gradleak
from gradleak.cli import main
from gradleak.models import FullyConnected, LeNet
from victims import fit_with_smoothing

NUM_CLASSES = 10
LEARNING_RATES = (1e-3, 1e-2, 0.1, 1.0)


def _truths(seed):
    """A smoothed, a mixup and a hard label, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    a, b = (int(i) for i in rng.choice(NUM_CLASSES, size=2, replace=False))
    return [gradleak.smooth_label(a, NUM_CLASSES, float(rng.uniform(0.05, 0.5)), dtype=torch.float32),
            gradleak.mixup_label(a, b, float(rng.uniform(0.1, 0.9)), NUM_CLASSES, dtype=torch.float32),
            gradleak.smooth_label(b, NUM_CLASSES, 0.0, dtype=torch.float32)]


def _mlp(seed, *, bias, head_bias):
    return FullyConnected([24, 32, 20, NUM_CLASSES], bias=bias, head_bias=head_bias,
                          generator=torch.Generator().manual_seed(seed))


def _trained_mlp(seed):
    """A ReLU MLP with a bias-free head, briefly trained (40 SGD steps) on random data with label smoothing 0.1."""
    model = _mlp(seed, bias=True, head_bias=False)
    generator = torch.Generator().manual_seed(seed + 1)
    inputs = torch.randn(64, 24, generator=generator)
    return fit_with_smoothing(model, inputs, torch.randint(NUM_CLASSES, (64,), generator=generator), NUM_CLASSES,
                              lr=0.5, steps=40)


VICTIMS = {
    "mlp-head-bias": lambda: _mlp(0, bias=True, head_bias=True),
    "mlp-no-head-bias": lambda: _mlp(1, bias=True, head_bias=False),
    "mlp-no-biases": lambda: _mlp(2, bias=False, head_bias=False),
    "mlp-trained-smoothing": lambda: _trained_mlp(3),
    "lenet": lambda: LeNet(NUM_CLASSES, generator=torch.Generator().manual_seed(4)),
    "lenet-head-bias": lambda: LeNet(NUM_CLASSES, head_bias=True, generator=torch.Generator().manual_seed(5)),
}


def _input(model, seed):
    shape = (3, 32, 32) if isinstance(model, LeNet) else (24,)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _sgd_client(model, x, label, lr, weight_decay=0.0):
    """The client: one plain torch.optim.SGD step on (x, label); its new weights as numpy, in state_dict order."""
    client = copy.deepcopy(model)
    optimizer = torch.optim.SGD(client.parameters(), lr=lr, weight_decay=weight_decay)
    gradleak.soft_cross_entropy(client(x.unsqueeze(0)), label.unsqueeze(0)).backward()
    optimizer.step()
    return [value.numpy().copy() for value in client.state_dict().values()]


def _numpy_update(model, new_weights):
    """new - old per state_dict entry, in numpy: what a server diffing Flower's arrays computes."""
    return [new - old.numpy() for new, old in zip(new_weights, model.state_dict().values())]


def _misses(result, label, feature, scale=None):
    """Why ``result`` misses the truth (empty when label, feature and scale are all recovered)."""
    error = float((result.label - label).abs().max())
    cosine = float(nn.functional.cosine_similarity(result.feature.double(), feature.double(), dim=0))
    misses = []
    if not result.determined:
        misses.append(f"undetermined: {result.message}")
    if not error < 1e-3:
        misses.append(f"label error {error:.2g}")
    if not cosine > 0.999:
        misses.append(f"feature cosine {cosine:.6f}")
    if scale is not None and not abs(result.gradient_scale / scale - 1) < 1e-3:
        misses.append(f"scale {result.gradient_scale:.6g} vs {scale:.6g}")
    return misses


def _sgd_updates(model, weight_decay=0.0):
    """``(lr, label, feature, update)`` per learning rate and label: one SGD client's numpy update, with the truth."""
    for seed, lr in enumerate(LEARNING_RATES):
        x = _input(model, seed)
        with torch.no_grad():
            feature = model.features(x.unsqueeze(0))[0]
        for label in _truths(seed):
            yield lr, label, feature, _numpy_update(model, _sgd_client(model, x, label, lr, weight_decay))


def _judge(results, complete_from=0.1):
    """Assert the honest-answer property on ``(lr, misses)`` pairs: no answer is confidently wrong at any lr; at
    lr >= ``complete_from`` every answer is determined and right. Below, float32 rounding of ``new - old``
    (relative error ~ulp(W) / (lr |g|)) may leave an answer undetermined, never wrong."""
    wrong = [(lr, m) for lr, m in results if m and not m[0].startswith("undetermined")]
    assert not wrong, wrong[:3]
    if complete_from is not None:
        assert not [(lr, m) for lr, m in results if m and lr >= complete_from], results


@pytest.mark.parametrize("victim", list(VICTIMS))
@pytest.mark.parametrize("weight_decay", [0.0, 5e-3])
def test_sgd_client_update_with_known_lr(victim, weight_decay):
    model = VICTIMS[victim]()
    results = []
    for lr, label, feature, update in _sgd_updates(model, weight_decay):
        result = gradleak.recover_from_update(model, update, lr=lr, weight_decay=weight_decay)
        assert result.gradient_scale == -lr
        results.append((lr, _misses(result, label, feature)))
    _judge(results)


@pytest.mark.parametrize("victim", list(VICTIMS))
def test_sgd_client_update_with_unknown_lr(victim):
    model = VICTIMS[victim]()
    results = []
    for lr, label, feature, update in _sgd_updates(model):
        result = gradleak.recover_from_update(model, update)
        results.append((lr, _misses(result, label, feature, scale=-lr)))
    # Without any bias nothing but the label structure fixes t, and these untrained MLPs predict almost uniformly
    # (logits spread over ~0.2): there an unknown scale trades against the smoothing mass, and the answer's
    # standard error at float32 precision is a few 1e-4, so "undetermined" is the honest answer at any lr.
    _judge(results, complete_from=None if victim == "mlp-no-biases" else 0.1)


def _batchnorm_model():
    """Linear -> BatchNorm1d (eval mode, non-trivial running statistics) -> ReLU -> head."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, NUM_CLASSES)).eval()
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def batchnorm_victim():
    """``(model, x, label, feature, lr, new weights as numpy in state_dict order)``."""
    model = _batchnorm_model()
    x = torch.randn(12, generator=torch.Generator().manual_seed(7))
    label = _truths(7)[0]
    with torch.no_grad():
        feature = model[:-1](x.unsqueeze(0))[0]
    lr = 0.05
    return model, x, label, feature, lr, _sgd_client(model, x, label, lr)


def test_update_forms_state_dict_parameters_and_dict_agree(batchnorm_victim):
    model, _, label, feature, lr, new_weights = batchnorm_victim
    state_order = _numpy_update(model, new_weights)
    assert len(state_order) == len(model.state_dict()) > len(list(model.parameters()))
    names = list(model.state_dict())
    parameter_names = [name for name, _ in model.named_parameters()]
    parameter_order = [torch.from_numpy(state_order[names.index(name)]) for name in parameter_names]
    as_dict = dict(zip(names, state_order))  # buffers included: they are ignored
    for scale in (lr, None):
        results = [gradleak.recover_from_update(model, form, lr=scale)
                   for form in (state_order, parameter_order, as_dict)]
        assert not _misses(results[0], label, feature, scale=-lr), _misses(results[0], label, feature, scale=-lr)
        for other in results[1:]:
            assert torch.equal(other.label, results[0].label) and torch.equal(other.feature, results[0].feature)
            assert other.gradient_scale == results[0].gradient_scale


def test_update_from_weights_is_the_stored_precision_difference(batchnorm_victim):
    model, *_, new_weights = batchnorm_victim
    names = list(model.state_dict())
    old = {name: value.detach().numpy() for name, value in model.named_parameters()}
    expected = {name: new_weights[names.index(name)] - old[name] for name in old}  # float32 - float32, in numpy
    for form in (new_weights,
                 [torch.from_numpy(new_weights[names.index(name)]) for name in old],
                 {name: new_weights[names.index(name)].astype(np.float64) for name in old}):
        update = gradleak.update_from_weights(model, form)
        assert list(update) == list(old)  # parameters only, buffers dropped
        for name, value in update.items():
            assert value.dtype == torch.float32 and not value.requires_grad
            np.testing.assert_array_equal(value.numpy(), expected[name])


def test_update_from_weights_matches_the_sgd_step():
    """The independent truth: one SGD step with weight decay moves W by exactly -lr * (g + wd * W), up to rounding."""
    model = _mlp(8, bias=True, head_bias=True)
    x, label = _input(model, 8), _truths(8)[1]
    lr, weight_decay = 0.1, 1e-2
    update = gradleak.update_from_weights(model, _sgd_client(model, x, label, lr, weight_decay))
    gradients = gradleak.single_example_gradients(model, x, label)
    for name, parameter in model.named_parameters():
        expected = -lr * (gradients[name] + weight_decay * parameter.detach())
        torch.testing.assert_close(update[name], expected, rtol=0, atol=1e-6 * float(parameter.detach().abs().max()))


@pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing")
def test_opacus_dp_sgd_client():
    opacus = pytest.importorskip("opacus")
    from torch.utils.data import DataLoader, TensorDataset

    model = _mlp(9, bias=True, head_bias=False)
    x, label = _input(model, 9), _truths(9)[0]
    gradients = gradleak.single_example_gradients(model, x, label)  # the clean per-example gradient
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in gradients.values())))
    with torch.no_grad():
        feature = model.features(x.unsqueeze(0))[0]
    lr = 0.05
    for max_grad_norm in (0.25 * norm, 4.0 * norm):  # clips, does not clip
        client = copy.deepcopy(model)
        module, optimizer, loader = opacus.PrivacyEngine().make_private(
            module=client, optimizer=torch.optim.SGD(client.parameters(), lr=lr),
            data_loader=DataLoader(TensorDataset(x.unsqueeze(0), label.unsqueeze(0)), batch_size=1),
            noise_multiplier=0.0, max_grad_norm=max_grad_norm, poisson_sampling=False)
        for inputs, targets in loader:
            optimizer.zero_grad()
            gradleak.soft_cross_entropy(module(inputs), targets).backward()
            optimizer.step()
        update = gradleak.update_from_weights(model, client.state_dict())
        clip = min(1.0, max_grad_norm / norm)
        for name, value in update.items():
            torch.testing.assert_close(value, -lr * clip * gradients[name], rtol=1e-4,
                                       atol=1e-6 * float(model.get_parameter(name).detach().abs().max()))
        result = gradleak.recover_from_update(model, update)
        assert not _misses(result, label, feature, scale=-lr * clip), _misses(result, label, feature, -lr * clip)


def test_errors_name_the_problem(batchnorm_victim):
    model, *_, new_weights = batchnorm_victim
    update = _numpy_update(model, new_weights)
    names = list(model.state_dict())
    parameter_names = [name for name, _ in model.named_parameters()]
    with pytest.raises(ValueError, match=r"has 5 arrays.*9 state_dict\(\) entries.*6 parameters"):
        gradleak.recover_from_update(model, update[:5], lr=0.1)
    wrong = list(update)
    wrong[7] = wrong[7].T
    with pytest.raises(ValueError, match=r"entry 7 \('3.weight'\) has shape \(16, 10\), expected \(10, 16\)"):
        gradleak.recover_from_update(model, wrong, lr=0.1)
    # a common mistake: parameters first, then buffers; the head weight's place gets running_mean
    params_then_buffers = [update[names.index(name)] for name in parameter_names] + \
                          [update[i] for i, name in enumerate(names) if name not in parameter_names]
    with pytest.raises(ValueError, match=r"entry 7 \('3.weight'\), a parameter, has the shape of the buffer "
                                         r"'1.running_mean': the arrays look out of order"):
        gradleak.recover_from_update(model, params_then_buffers, lr=0.1)
    in_parameter_order = [update[names.index(name)] for name in parameter_names]
    in_parameter_order[4] = model[1].running_mean.numpy()
    with pytest.raises(ValueError, match=r"entry 4 \('3.weight'\) has shape \(16,\), expected \(10, 16\).*"
                                         r"shape of the buffer '1.running_mean'.*parameters\(\) order"):
        gradleak.update_from_weights(model, in_parameter_order)
    poisoned = list(update)
    poisoned[3] = poisoned[3].copy()
    poisoned[3][2] = np.nan
    with pytest.raises(ValueError, match=r"entry 3 \('1.bias'\) contains 1 NaN or infinite"):
        gradleak.recover_from_update(model, poisoned)
    with pytest.raises(ValueError, match=r"new_weights entry 3 \('1.bias'\) contains 1 NaN"):
        gradleak.update_from_weights(model, poisoned)
    with pytest.raises(ValueError, match=r"model.state_dict\(\) does not have: \['head.weight'\]"):
        gradleak.recover_from_update(model, {"head.weight": update[7]})
    integers = list(update)
    integers[0] = integers[0].astype(np.int64)
    with pytest.raises(TypeError, match=r"entry 0 \('0.weight'\) has dtype int64"):
        gradleak.recover_from_update(model, integers)
    with pytest.raises(TypeError, match=r"entry 8 \('3.bias'\) must be a torch.Tensor or a numpy array, got list"):
        gradleak.recover_from_update(model, update[:8] + [update[8].tolist()])
    with pytest.raises(TypeError, match="dict name -> array or a list"):
        gradleak.recover_from_update(model, update[7])
    for lr in (0.0, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match="lr must be a positive finite number"):
            gradleak.recover_from_update(model, update, lr=lr)
    with pytest.raises(ValueError, match="weight_decay needs lr"):
        gradleak.recover_from_update(model, update, weight_decay=1e-4)
    with pytest.raises(ValueError, match="weight_decay must be a non-negative"):
        gradleak.recover_from_update(model, update, lr=0.1, weight_decay=-1e-4)
    with pytest.raises(TypeError, match="sets gradient_scale itself"):
        gradleak.recover_from_update(model, update, gradient_scale="unknown")


@pytest.mark.parametrize("flags, scale", [(["--lr", "0.1"], -0.1), (["--lr", "0.1", "--unknown-scale"], -0.1),
                                          (["--unknown-scale"], 1.0)])
def test_cli_recover_from_an_sgd_update(capsys, flags, scale):
    assert main(["recover", "--network", "lenet", "--label", "smoothing", "--eps", "0.2"] + flags) == 0
    report = json.loads(capsys.readouterr().out)
    recovered, evaluation = report["recovered"], report["evaluation"]
    assert evaluation["true_gradient_scale"] == scale
    assert recovered["determined"] and evaluation["max_label_error"] < 1e-3
    assert abs(recovered["gradient_scale"] / scale - 1) < 1e-3


@pytest.mark.parametrize("victim", ["mlp-no-head-bias", "mlp-trained-smoothing", "lenet"])
def test_several_local_steps_never_give_a_confident_wrong_answer(victim):
    """K steps send -lr * sum_k g(theta_k): read to first order (divided by K * lr), the drift along the path
    must show as an undetermined answer, never as a wrong one."""
    model = VICTIMS[victim]()
    determined = 0
    for seed, lr in enumerate((1e-3, 1e-2, 1e-1)):
        x = _input(model, seed)
        for label in _truths(seed):
            for steps in (2, 5):
                client = copy.deepcopy(model)
                optimizer = torch.optim.SGD(client.parameters(), lr=lr)
                for _ in range(steps):
                    optimizer.zero_grad()
                    gradleak.soft_cross_entropy(client(x.unsqueeze(0)), label.unsqueeze(0)).backward()
                    optimizer.step()
                update = {name: new.detach() - old.detach()
                          for (name, new), old in zip(client.named_parameters(), model.parameters())}
                for result in (gradleak.recover_from_update(model, update, lr=lr, local_steps=steps,
                                                            rank_one_tol=None),
                               gradleak.recover_from_update(model, update, rank_one_tol=None)):
                    error = float((result.label - label).abs().max())
                    assert not (result.determined and error > 1e-3), (lr, steps, error, result.message)
                    determined += result.determined
                assert result.gradient_scale < 0
    assert determined < 2 * 3 * 3 * 2  # the drift is seen: not every answer is claimed


def test_local_steps_scale_and_errors():
    model = VICTIMS["lenet"]()
    label = _truths(0)[0]
    update = dict(zip((name for name, _ in model.named_parameters()),
                      (torch.as_tensor(u) for u in _numpy_update(model, _sgd_client(model, _input(model, 0), label, 0.01))
                       [:len(list(model.parameters()))])))
    assert gradleak.recover_from_update(model, update, lr=0.005, local_steps=2).gradient_scale == pytest.approx(-0.01)
    with pytest.raises(ValueError, match="local_steps > 1 needs lr"):
        gradleak.recover_from_update(model, update, local_steps=3)
    with pytest.raises(ValueError, match="local_steps must be a positive int"):
        gradleak.recover_from_update(model, update, lr=0.01, local_steps=0)
