import pytest
import torch

from gradleak.labels import LabelSpec, hard_label, mix_inputs, mixup_label, smooth_label


def test_smooth_label_matches_definition():
    y = smooth_label(2, 5, 0.3)
    expected = torch.full((5,), 0.3 / 5, dtype=torch.float64)
    expected[2] = 1 - 0.3 + 0.3 / 5
    torch.testing.assert_close(y, expected)
    assert float(y.sum()) == pytest.approx(1.0)


def test_hard_label_is_one_hot():
    assert hard_label(1, 3).tolist() == [0.0, 1.0, 0.0]


def test_mixup_label_with_and_without_smoothing():
    y = mixup_label(0, 3, 0.25, 4)
    assert y.tolist() == [0.75, 0.0, 0.0, 0.25]
    smoothed = mixup_label(0, 3, 0.25, 4, eps=0.2)
    torch.testing.assert_close(smoothed, 0.8 * y + 0.2 / 4)
    assert float(smoothed.sum()) == pytest.approx(1.0)


def test_label_spec_round_trip():
    spec = LabelSpec("mixup", 10, (2, 7), eps=0.1, lam=0.4)
    torch.testing.assert_close(spec.to_tensor(), mixup_label(2, 7, 0.4, 10, eps=0.1))
    assert LabelSpec("smoothing", 10, (4,), eps=0.2).to_tensor().argmax() == 4


def test_mix_inputs():
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    torch.testing.assert_close(mix_inputs(a, b, 0.3), torch.full((2, 3), 0.3))
    with pytest.raises(ValueError, match="same shape"):
        mix_inputs(a, torch.ones(3, 2), 0.5)


@pytest.mark.parametrize("call, match", [
    (lambda: smooth_label(0, 4, 1.0), "eps"),
    (lambda: smooth_label(0, 4, -0.1), "eps"),
    (lambda: smooth_label(4, 4, 0.1), "outside"),
    (lambda: smooth_label(0, 1, 0.1), "at least 2"),
    (lambda: mixup_label(1, 1, 0.5, 4), "two different"),
    (lambda: mixup_label(0, 1, 1.5, 4), "lambda"),
])
def test_bad_label_parameters(call, match):
    with pytest.raises(ValueError, match=match):
        call()
