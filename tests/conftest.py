import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """CI machines have 2 cores; one intra-op thread per test process avoids oversubscription."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
