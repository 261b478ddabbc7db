import pytest
import torch
from torch import nn

from gradleak.client import single_example_gradients, soft_cross_entropy
from gradleak.labels import smooth_label


def test_soft_cross_entropy_matches_hard_cross_entropy_on_one_hot():
    logits = torch.randn(3, 5)
    target = torch.nn.functional.one_hot(torch.tensor([1, 4, 0]), 5).float()
    torch.testing.assert_close(soft_cross_entropy(logits, target),
                               torch.nn.functional.cross_entropy(logits, torch.tensor([1, 4, 0])))


def test_head_gradient_is_p_minus_y_times_feature():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4, bias=False)).double()
    x = torch.randn(6, dtype=torch.float64)
    y = smooth_label(2, 4, 0.3)
    grads = single_example_gradients(model, x, y)
    h = model[1](model[0](x))
    p = torch.softmax(model[2](h), -1)
    torch.testing.assert_close(grads["2.weight"], torch.outer(p - y, h))
    assert set(grads) == {"0.weight", "0.bias", "2.weight"}


def test_errors_name_the_problem():
    model = nn.Linear(3, 4)
    with pytest.raises(ValueError, match="4 logits"):
        single_example_gradients(model, torch.randn(3), torch.ones(5) / 5)
    with pytest.raises(ValueError, match="NaN"):
        single_example_gradients(model, torch.tensor([1.0, float("nan"), 0.0]), torch.ones(4) / 4)
    with pytest.raises(ValueError, match=r"shape \(C,\)"):
        single_example_gradients(model, torch.randn(3), torch.ones(2, 4) / 4)
    with pytest.raises(TypeError, match="nn.Module"):
        single_example_gradients(lambda x: x, torch.randn(3), torch.ones(4) / 4)
