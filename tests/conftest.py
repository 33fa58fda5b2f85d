"""Settings shared by every test module."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_cpu_thread():
    """Run the tests' tiny models on one CPU thread. At these sizes thread hand-offs cost more
    than the math, and on a shared 2-core CI machine extra threads only contend (measured: 12 s
    with one thread vs ~60 s with torch's default under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
