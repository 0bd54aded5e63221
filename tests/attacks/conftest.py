import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread avoids OpenMP barrier stalls on a shared 2-core machine
    (20x slower steps were measured with 2 threads under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
