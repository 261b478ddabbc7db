"""Analytic inversion of fully connected ReLU networks from the recovered label and feature."""
import time

import pytest
import torch
from torch import nn

import gradleak
from gradleak.metrics import psnr
from gradleak.reconstruct import fully_connected_inversion, invert_fully_connected


def _relu_stack(sizes, bias, dtype, seed):
    torch.manual_seed(seed)
    layers = [nn.Flatten()]
    for n_in, n_out in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(n_in, n_out, bias=bias), nn.ReLU()]
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=bias))
    return nn.Sequential(*layers).to(dtype).eval()


def _victim(model, x, label):
    gradients = gradleak.single_example_gradients(model, x, label)
    res = gradleak.recover_from_gradients(model, gradients, label_format="smoothing")
    return gradients, res


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("sizes", [[24, 6], [30, 20, 7], [40, 64, 32, 10], [50, 80, 60, 40, 30, 12]])
def test_exact_in_float64_on_random_relu_networks(sizes, bias):
    model = _relu_stack(sizes, bias, torch.float64, seed=len(sizes))
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(sizes[0], generator=generator, dtype=torch.float64)
    label = gradleak.smooth_label(2, sizes[-1], 0.3)
    gradients, res = _victim(model, x, label)
    assert res.determined
    observed = {name: grad.clone() for name, grad in gradients.items()}
    out = fully_connected_inversion(model, gradients, res)
    assert all(torch.equal(gradients[name], observed[name]) for name in observed)  # inputs left untouched
    assert out.input.dtype == torch.float64 and out.input.shape == x.shape
    assert torch.allclose(out.input, x, rtol=0, atol=1e-10 * float(x.abs().max()))
    # every hidden activation is the true one too (independent forward pass)
    hidden = x
    for activation, layer in zip(out.activations, [m for m in model if isinstance(m, nn.Linear)]):
        hidden = hidden.detach()
        assert torch.allclose(activation, hidden, atol=1e-10 * float(hidden.abs().max().clamp_min(1)))
        hidden = torch.relu(layer(hidden))
    assert [layer.solved for layer in out.layers] == [True] * (len(sizes) - 2) + [False]
    assert out.worst_rank_one_ratio < 1e-12


@pytest.mark.parametrize("bias", [False, True])
def test_backprop_and_bias_gradient_deltas_agree(bias):
    model = _relu_stack([30, 25, 20, 8], bias, torch.float64, seed=3)
    x = torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gradients, res = _victim(model, x, gradleak.smooth_label(5, 8, 0.1))
    via_backprop = fully_connected_inversion(model, gradients, res, use_bias_gradients=False)
    via_bias = fully_connected_inversion(model, gradients, res)
    assert {layer.delta_source for layer in via_backprop.layers[:-1]} == {"backprop"}
    assert {layer.delta_source for layer in via_bias.layers[:-1]} == {"bias_grad" if bias else "backprop"}
    assert torch.allclose(via_backprop.input, x, atol=1e-11) and torch.allclose(via_bias.input, x, atol=1e-11)


def _real_image_fcn4(dtype):
    data = pytest.importorskip("gradleak.data")
    models = pytest.importorskip("gradleak.models")
    images, labels = data.load_samples("imagenet", size=64)
    x = images[0].to(dtype)
    model = models.build_model("fcn4", 17, seed=0).to(dtype)
    label = gradleak.smooth_label(int(labels[0]) % 17, 17, 0.2717, dtype=dtype)
    gradients, res = _victim(model, x, label)
    return model, x, gradients, res, data


@pytest.mark.parametrize("dtype, min_psnr", [(torch.float32, 90.0), (torch.float64, 200.0)])
def test_fcn4_real_image(dtype, min_psnr):
    model, x, gradients, res, data = _real_image_fcn4(dtype)
    start = time.perf_counter()
    out = fully_connected_inversion(model, gradients, res, input_shape=x.shape)
    seconds = time.perf_counter() - start
    assert out.input.shape == x.shape and out.input.dtype == dtype
    display = data.denormalize(torch.stack([out.input, x]), "imagenet")
    assert psnr(display[0], display[1]) > min_psnr
    assert [layer.usable_rows > 0 for layer in out.layers] == [True] * 4
    assert seconds < 10.0  # generous: about 0.2 s on an idle CPU, see benchmarks/bench_reconstruction.py


def test_inversion_uses_the_recovery_not_the_truth():
    """A wrong recovered scale must give a wrong input: nothing else feeds the inversion."""
    model = _relu_stack([20, 16, 6], False, torch.float64, seed=0)
    x = torch.rand(20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gradients, res = _victim(model, x, gradleak.smooth_label(1, 6, 0.2))

    class Fake:
        label = res.label
        feature = 2.0 * res.feature

    out = fully_connected_inversion(model, gradients, Fake())
    assert not torch.allclose(out.input, x, atol=1e-3)


def test_errors():
    model = _relu_stack([12, 8, 4], False, torch.float64, seed=0)
    x = torch.rand(12, dtype=torch.float64)
    gradients, res = _victim(model, x, gradleak.smooth_label(0, 4, 0.2))
    with pytest.raises(TypeError, match="not a fully connected"):
        invert_fully_connected(nn.Sequential(nn.Conv2d(1, 1, 3), nn.Flatten(), nn.Linear(4, 2)), {}, res)
    with pytest.raises(TypeError, match="ReLU"):
        invert_fully_connected(nn.Sequential(nn.ReLU(), nn.Linear(4, 2)), {}, res)
    with pytest.raises(ValueError, match="no entry"):
        invert_fully_connected(model, {"1.weight": gradients["1.weight"]}, res)
    bad = dict(gradients)
    bad["1.weight"] = bad["1.weight"].clone()
    bad["1.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        invert_fully_connected(model, bad, res)

    class Short:
        label = res.label[:-1]
        feature = res.feature

    with pytest.raises(ValueError, match="res.label"):
        invert_fully_connected(model, gradients, Short())
    with pytest.raises(ValueError, match="input_shape"):
        invert_fully_connected(model, gradients, res, input_shape=(5, 5))


def test_forward_that_is_not_the_layer_chain_is_rejected():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 6, bias=False)
            self.head = nn.Linear(6, 3, bias=False)

        def forward(self, x):
            return self.head(torch.relu(self.a(x)) + x)  # a residual connection hidden in forward

    model = Skip().double()
    with pytest.raises(TypeError, match="chain"):
        invert_fully_connected(model, {}, None)


def test_runner_writes_figure_and_json_for_fcn4(tmp_path):
    pytest.importorskip("gradleak.data")
    import json

    from gradleak.experiments.reconstruction import run_reconstruction

    report = run_reconstruction("fcn4", "cifar10", "smoothing", ["analytic"], sample=3, seed=1, num_classes=10,
                                dtype=torch.float64, out_dir=str(tmp_path), progress=False)
    result = report["results"]["analytic"]
    assert result["psnr"] > 200 and result["ssim"] == pytest.approx(1.0, abs=1e-9) and result["lpips"] is None
    assert report["recovery"]["determined"] and 0 <= report["victim"]["eps"] < 0.5
    with open(report["files"]["json"]) as handle:
        assert json.load(handle)["results"]["analytic"]["psnr"] == pytest.approx(result["psnr"])
    assert (tmp_path / "fcn4_cifar10_smoothing_sample3.png").stat().st_size > 1000
    with pytest.raises(TypeError, match="fully connected"):
        run_reconstruction("lenet", "cifar10", "smoothing", ["analytic"], progress=False)
    with pytest.raises(ValueError, match="valid"):
        run_reconstruction("fcn4", "cifar10", "smoothing", ["magic"], progress=False)


def test_invert_fully_connected_returns_the_input_tensor():
    """The documented facade: ``x = gradleak.invert_fully_connected(model, gradients, res)``."""
    import gradleak

    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 5, bias=False)).double()
    x = torch.rand(3, 2, 2, dtype=torch.float64)
    gradients = gradleak.single_example_gradients(model, x, gradleak.smooth_label(2, 5, 0.3))
    res = gradleak.recover_from_gradients(model, gradients)
    out = gradleak.invert_fully_connected(model, gradients, res, input_shape=x.shape)
    assert isinstance(out, torch.Tensor) and out.shape == x.shape
    torch.testing.assert_close(out, fully_connected_inversion(model, gradients, res, input_shape=x.shape).input)
    torch.testing.assert_close(out, x)
