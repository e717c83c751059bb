import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests with one intra-op thread: on tiny tensors extra threads only add overhead
    (and thrash on a busy 2-core runner). The previous setting is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
