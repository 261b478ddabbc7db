"""Training: a few steps raise train accuracy; checkpoints (ours and bare state dicts) round-trip."""
from __future__ import annotations

import pytest
import torch

from gradleak.data import load_samples
from gradleak.models import build_model
from gradleak.training import load_checkpoint, train



def _accuracy(model, images, labels):
    with torch.no_grad():
        return float((model(images).argmax(-1) == labels).float().mean())


@pytest.mark.parametrize("augmentation", ["smoothing", "mixup"])
def test_training_raises_accuracy_and_checkpoint_round_trips(tmp_path, augmentation):
    images, labels = load_samples("cifar10")
    before = _accuracy(build_model("lenet", 10, seed=1), images, labels)
    path = train("lenet", "cifar10", augmentation=augmentation, eps=0.1, epochs=60, lr=3e-3, seed=1,
                 out=tmp_path, progress=False)
    assert path.name == f"lenet-cifar10-{augmentation}.pt" and path.is_file()
    model = load_checkpoint(path)
    assert not model.training
    after = _accuracy(model, images, labels)
    assert after > before and after >= 0.8
    info = model.checkpoint_info
    assert info["augmentation"] == augmentation and info["model"] == "lenet"
    assert info["train_accuracy"] == pytest.approx(after)
    blob = torch.load(path, weights_only=False)
    assert set(blob) >= {"model", "num_classes", "kwargs", "state_dict", "augmentation", "train_accuracy"}
    again = load_checkpoint(path)
    assert torch.equal(again(images[:2]), model(images[:2]))


def test_load_bare_state_dict(tmp_path):
    model = build_model("lenet", 10, seed=3, channels=1, image_size=28)
    for blob, name in ((model.state_dict(), "bare.pt"), ({"net": model.state_dict()}, "official.pth")):
        torch.save(blob, tmp_path / name)
        loaded = load_checkpoint(tmp_path / name, network="lenet", channels=1, image_size=28)
        x = torch.randn(1, 1, 28, 28)
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match="network="):
        load_checkpoint(tmp_path / "bare.pt")


def test_training_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="augmentation"):
        train("lenet", "cifar10", augmentation="cutmix", out=tmp_path, progress=False)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
