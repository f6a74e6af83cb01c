import pytest
import torch

from tests.tiny_adm import tiny_pixel_diffusion
from tests.toy import make_toy


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests: extra intra-op threads only hand work
    back and forth, and stall badly on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def toy():
    """The toy latent diffusion model and its conditioning (``make_toy(0)``); a module may define its own."""
    return make_toy(0)


@pytest.fixture(scope="module")
def adm():
    """The tiny random-weight pixel ADM; a module may define its own."""
    return tiny_pixel_diffusion()
