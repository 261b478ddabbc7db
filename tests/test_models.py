"""The paper's networks: shapes, head protocol, initialisations, eval mode, errors, finite gradients."""
from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from gradleak.models import (MODELS, AlexNet, Classifier, FullyConnected, build_model, fcn, fcn4, initialize,
                             lenet, resnet18)

# (name, builder options, input shape, feature dim d); ResNets take any size, so they get small inputs.
CASES = [
    ("fcn4", (), (2, 3, 64, 64), 256),
    ("lenet", (), (2, 3, 32, 32), 768),
    ("lenet", (("channels", 1), ("image_size", 28)), (2, 1, 28, 28), 588),
    ("alexnet", (), (2, 3, 64, 64), 4096),
    ("resnet18", (), (2, 3, 16, 16), 512),
    ("resnet18", (("stem", "imagenet"),), (2, 3, 32, 32), 512),
    ("resnet50", (("stem", "cifar"),), (2, 3, 16, 16), 2048),
    ("resnet50", (), (2, 3, 32, 32), 2048),
]


def case_id(name: str, options: tuple, *rest) -> str:
    return name + "".join(f"-{value}" for _, value in options)


CASE_IDS = [case_id(*case) for case in CASES]
NUM_CLASSES = 7


@functools.lru_cache(maxsize=None)
def cached_model(name: str, options: tuple, init: str | None = None) -> Classifier:
    """Models are read-only in these tests, so each configuration is built once."""
    return build_model(name, NUM_CLASSES, init=init, seed=0, **dict(options))


def inputs(shape: tuple) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name, options, shape, d", CASES, ids=CASE_IDS)
def test_shapes_and_head_protocol(name, options, shape, d):
    model = cached_model(name, options)
    x = inputs(shape)
    with torch.no_grad():
        h = model.features(x)
        logits = model(x)
        assert h.shape == (shape[0], d) and model.feature_dim == d
        assert logits.shape == (shape[0], NUM_CLASSES) and model.num_classes == NUM_CLASSES
        torch.testing.assert_close(logits, model.head(h), rtol=0, atol=0)
    last_linear = [m for _, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    assert last_linear is model.head
    assert model.head.bias is None


@pytest.mark.parametrize("name, options, shape, d", CASES, ids=CASE_IDS)
def test_built_in_eval_mode_so_examples_do_not_interact(name, options, shape, d):
    model = cached_model(name, options)
    assert not any(m.training for m in model.modules())
    x = inputs(shape)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:1], model(x[:1]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


PAPER_INIT_CASES = [case for case in CASES if case[0] in ("lenet", "alexnet")]
GRADIENT_CASES = [case + (None,) for case in CASES] + [case + ("default",) for case in PAPER_INIT_CASES]
GRADIENT_IDS = [f"{case_id(*case)}-init={case[-1]}" for case in GRADIENT_CASES]


@pytest.mark.parametrize("name, options, shape, d, init", GRADIENT_CASES, ids=GRADIENT_IDS)
def test_gradients_are_finite_and_the_head_gradient_is_rank_one(name, options, shape, d, init):
    model = cached_model(name, options, init)
    x = inputs(shape)[:1]
    label = torch.full((1, NUM_CLASSES), 0.1 / NUM_CLASSES)
    label[0, 2] += 0.9
    loss = -(label * torch.log_softmax(model(x), dim=-1)).sum()
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params)
    assert all(torch.isfinite(g).all() for g in grads)
    head_grad = grads[[i for i, p in enumerate(params) if p is model.head.weight][0]]
    assert head_grad.abs().sum() > 0
    singular_values = torch.linalg.svdvals(head_grad.double())
    assert singular_values[1] < 1e-5 * singular_values[0]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_head_bias_on_request(name):
    options = {"image_size": 8} if name == "fcn4" else {}
    model = build_model(name, 3, head_bias=True, seed=0, **options)
    assert model.head.bias is not None and model.head.bias.shape == (3,)
    assert [m for m in model.modules() if isinstance(m, nn.Linear)][-1] is model.head


def test_fcn_layers_biases_and_structure():
    model = fcn([10, 6, 4, 3])
    assert [type(m) for m in model.body] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear, nn.ReLU]
    assert [(m.in_features, m.out_features) for m in model.hidden_layers] == [(10, 6), (6, 4)]
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Linear))
    with_bias = fcn([10, 6, 3], bias=True)
    assert all(m.bias is not None for m in with_bias.modules() if isinstance(m, nn.Linear))
    assert fcn([10, 6, 3], bias=True, head_bias=False).head.bias is None
    assert fcn([10, 3]).features(torch.ones(2, 2, 5)).shape == (2, 10)


def test_classifier_wraps_any_body():
    model = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.Tanh()), nn.Linear(4, 3, bias=False))
    x = torch.randn(5, 2, 3)
    assert model.features(x).shape == (5, 4) and model.feature_dim == 4 and model.num_classes == 3
    torch.testing.assert_close(model(x), model.head(model.features(x)))
    with pytest.raises(TypeError, match="head an nn.Linear"):
        Classifier(nn.Flatten(), nn.Conv2d(1, 1, 1))


def test_fcn4_is_the_papers_network():
    model = cached_model("fcn4", ())
    sizes = [(m.in_features, m.out_features) for m in model.hidden_layers + [model.head]]
    assert sizes == [(12288, 4096), (4096, 1024), (1024, 256), (256, NUM_CLASSES)]
    assert not any(m.bias is not None for m in model.modules() if isinstance(m, nn.Linear))
    assert isinstance(fcn4(10, image_size=28, channels=1), FullyConnected)


def test_paper_init_is_uniform_on_the_half_interval():
    values = torch.cat([p.detach().flatten() for p in cached_model("lenet", ()).parameters()])
    assert values.min() >= -0.5 and values.max() <= 0.5
    assert values.min() < -0.49 and values.max() > 0.49
    assert abs(float(values.mean())) < 0.02
    assert abs(float(values.std()) - 1 / math.sqrt(12)) < 0.01
    alexnet_head = cached_model("alexnet", ()).head.weight
    assert alexnet_head.abs().max() <= 0.5 and alexnet_head.abs().max() > 0.49


def test_init_none_is_the_papers_choice_per_network():
    assert cached_model("fcn4", ()).hidden_layers[0].weight.abs().max() <= 1 / math.sqrt(12288)
    assert cached_model("alexnet", ()).body.convolutions[0].weight.abs().max() > 0.49
    resnet = cached_model("resnet50", ())
    assert resnet.body.stem[0][0].weight.abs().max() < 0.5 and resnet.head.weight.abs().max() <= 1 / math.sqrt(2048)


def test_default_init_of_resnets_is_kaiming_fan_out_with_unit_batchnorm():
    model = resnet18(10, init="default", generator=torch.Generator().manual_seed(0))
    conv = model.body.layer3[0].residual[0][0]                     # 3x3, 128 -> 256
    fan_out = conv.weight.shape[0] * conv.weight[0, 0].numel()
    assert abs(float(conv.weight.detach().std()) - math.sqrt(2 / fan_out)) < 0.05 * math.sqrt(2 / fan_out)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in norms)
    assert all(bool((m.running_mean == 0).all() and (m.running_var == 1).all()) for m in norms)


def test_default_init_of_linear_and_conv_is_pytorchs_fan_in_uniform():
    model = lenet(10, init="default", generator=torch.Generator().manual_seed(0))
    conv = model.body[2]
    bound = 1 / math.sqrt(12 * 5 * 5)
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.95 * bound
    assert conv.bias.abs().max() <= bound


def test_seeded_builds_are_reproducible_and_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    first, second = build_model("lenet", 10, seed=3), build_model("lenet", 10, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    other = build_model("lenet", 10, seed=4)
    assert not torch.equal(first.head.weight, other.head.weight)


def test_initialize_works_on_any_module_and_is_seedable():
    def make() -> nn.Module:
        return nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 3), nn.LayerNorm(3))

    built = [initialize(make(), "default", torch.Generator().manual_seed(9)) for _ in range(2)]
    for a, b in zip(built[0].parameters(), built[1].parameters()):
        assert torch.equal(a, b)
    paper = initialize(make(), "paper", torch.Generator().manual_seed(9))
    assert all(p.abs().max() <= 0.5 for p in paper.parameters())
    assert isinstance(initialize(make()), nn.Sequential)


def test_unknown_names_and_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'vgg'.*alexnet.*resnet50"):
        build_model("vgg", 10)
    with pytest.raises(ValueError, match="unknown init 'xavier'"):
        build_model("lenet", 10, init="xavier")
    with pytest.raises(ValueError, match="unknown stem"):
        build_model("resnet18", 10, stem="tiny")
    with pytest.raises(ValueError, match="num_classes must be positive"):
        build_model("lenet", 0)
    with pytest.raises(TypeError, match="num_classes must be an int"):
        build_model("lenet", 2.5)
    with pytest.raises(TypeError, match="seed must be an int"):
        build_model("lenet", 10, seed="1")
    with pytest.raises(ValueError, match="at least an input size"):
        fcn([10])
    with pytest.raises(TypeError, match="cannot apply the default initialisation"):
        initialize(nn.MultiheadAttention(4, 2), "default")


def test_wrong_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="at least 63x63"):
        cached_model("alexnet", ())(torch.zeros(1, 3, 32, 32))
    assert AlexNet.min_image_size == 63
    with pytest.raises(ValueError, match="built for 32x32"):
        cached_model("lenet", ())(torch.zeros(1, 3, 28, 28))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        cached_model("resnet18", ())(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="12288 entries per example"):
        cached_model("fcn4", ())(torch.zeros(1, 3, 32, 32))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        cached_model("lenet", ())([[0.0]])
