"""Test-session setup shared by every test file.

Triton reads TRITON_INTERPRET once, when it is first imported, so on a machine without a GPU it
is switched on here, before any test module can import triton: every Triton kernel then runs in
the CPU interpreter against its plain-torch reference.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Tests under tests/kernels/ are kernel tests; `gpu` tests are skipped without a GPU."""
    import pytest

    cuda = torch.cuda.is_available()
    for item in items:
        if "tests/kernels/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.kernels)
        if item.get_closest_marker("gpu") and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
