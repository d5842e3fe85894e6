"""Shared test settings."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """Tiny inputs run fastest on one thread (less threading overhead, no contention); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
