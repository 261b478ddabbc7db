"""Image and label metrics against independent computations (scikit-image, direct formulas)."""
import math

import numpy as np
import pytest
import torch

from gradleak import metrics


def _pair(seed=0, shape=(3, 32, 40), noise=0.1):
    generator = torch.Generator().manual_seed(seed)
    true = torch.rand(shape, generator=generator, dtype=torch.float64)
    pred = (true + noise * torch.randn(shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    return pred, true


def test_psnr_matches_direct_formula():
    pred, true = _pair()
    mse = float(((pred - true) ** 2).mean())
    assert metrics.psnr(pred, true) == pytest.approx(10 * math.log10(1 / mse), rel=1e-12)


def test_psnr_batch_is_per_image():
    pred, true = _pair()
    batch_pred = torch.stack([pred, true])
    values = metrics.psnr(batch_pred, torch.stack([true, true]))
    assert values.shape == (2,)
    assert float(values[0]) == pytest.approx(metrics.psnr(pred, true), rel=1e-12)
    assert math.isinf(float(values[1]))


def test_images_are_denormalised_and_clamped_not_wrapped():
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    true = torch.full((3, 16, 16), 0.9, dtype=torch.float64)
    pred = true.clone()
    pred[:, 0, 0] = 1.7  # out of range: clamps to 1, an error of 0.1 per channel
    mean_t, std_t = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    normalise = lambda img: (img - mean_t.view(3, 1, 1)) / std_t.view(3, 1, 1)
    expected_mse = 3 * 0.1 ** 2 / pred.numel()
    value = metrics.psnr(normalise(pred), normalise(true), mean=mean, std=std)
    assert value == pytest.approx(10 * math.log10(1 / expected_mse), rel=1e-9)


def test_ssim_matches_scikit_image():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    for seed, shape, noise in [(0, (3, 32, 40), 0.1), (1, (1, 28, 28), 0.3), (2, (3, 64, 64), 0.02)]:
        pred, true = _pair(seed, shape, noise)
        reference = skimage_metrics.structural_similarity(
            pred.numpy(), true.numpy(), channel_axis=0, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=1.0)
        assert metrics.ssim(pred, true) == pytest.approx(reference, abs=1e-10)


def test_ssim_identity_and_batch():
    pred, true = _pair()
    assert metrics.ssim(true, true) == pytest.approx(1.0, abs=1e-12)
    values = metrics.ssim(torch.stack([pred, true]), torch.stack([true, true]))
    assert values.shape == (2,)
    assert float(values[0]) == pytest.approx(metrics.ssim(pred, true), abs=1e-12)


def test_ssim_rejects_small_images():
    with pytest.raises(ValueError, match="at least 11"):
        metrics.ssim(torch.rand(3, 8, 8), torch.rand(3, 8, 8))


def test_image_metric_errors():
    with pytest.raises(ValueError, match="shape"):
        metrics.psnr(torch.rand(3, 16, 16), torch.rand(3, 16, 17))
    with pytest.raises(ValueError, match="NaN"):
        metrics.psnr(torch.full((3, 16, 16), float("nan")), torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="both mean and std"):
        metrics.psnr(torch.rand(3, 16, 16), torch.rand(3, 16, 16), mean=[0.5, 0.5, 0.5])
    with pytest.raises(TypeError):
        metrics.psnr(np.zeros((3, 16, 16)), torch.rand(3, 16, 16))


def test_lpips_is_none_without_local_weights(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty cache: nothing may be fetched
    assert metrics.lpips_available("alex") is False
    assert metrics.lpips(torch.rand(3, 32, 32), torch.rand(3, 32, 32)) is None
    pred, true = _pair(3, (3, 32, 32), 0.05)
    scores = metrics.image_scores(pred, true)
    assert scores.lpips is None
    assert scores.ssim == pytest.approx(metrics.ssim(pred, true))
    assert scores.psnr == pytest.approx(metrics.psnr(pred, true))
    with pytest.raises(ValueError, match="valid"):
        metrics.lpips_available("resnet")


def test_label_metrics_against_numpy():
    generator = np.random.default_rng(0)
    a, b = generator.random(10), generator.random(10)
    ta, tb = torch.tensor(a), torch.tensor(b)
    assert metrics.label_error(ta, tb) == pytest.approx(np.abs(a - b).max())
    assert metrics.label_l1(ta, tb) == pytest.approx(np.abs(a - b).sum())
    assert metrics.cosine_similarity(ta, tb) == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    batch = metrics.label_error(torch.stack([ta, ta]), torch.stack([tb, ta]))
    assert batch.shape == (2,) and float(batch[1]) == 0.0
    assert metrics.cosine_similarity(torch.zeros(3), torch.ones(3)) == 0.0
    with pytest.raises(ValueError, match="shape"):
        metrics.label_error(torch.zeros(3), torch.zeros(4))
