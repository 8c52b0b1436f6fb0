"""Test-wide fixtures. The tree mirrors the package (tests/model for mom/model, ...); builders live in helpers.py."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
