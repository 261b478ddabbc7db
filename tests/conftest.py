import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """CI machines have 2 cores; one intra-op thread per test process avoids oversubscription."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def cifar10():
    """foolbox's bundled CIFAR-10 images and labels (a module may define its own, e.g. resized)."""
    from gradleak.data import load_samples
    return load_samples("cifar10")


@pytest.fixture(scope="session")
def resnet18():
    """An untrained CIFAR ResNet18 with a head bias. Its features are ReLU outputs averaged over space: too few
    zeros to split a batch by them, so its batches are split by their labels or solved at once."""
    from gradleak.experiments.common import input_options
    from gradleak.models import build_model
    return build_model("resnet18", 10, head_bias=True, init="default", seed=3,
                       **input_options("resnet18", channels=3, image_size=32))
