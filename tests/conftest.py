"""Test-wide fixtures. The tree mirrors the package (tests/model for mom/model, ...); builders live in helpers.py."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for the module: tiny models and convolutions gain nothing from a second one, and on a
    busy 2-core machine OpenMP's spin-waiting made them far slower (test_image_tokenizer: 139 s on two threads
    against 12 s on one, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
