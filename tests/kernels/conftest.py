"""Kernel tests: the poison fixture. tests/conftest.py switches the Triton interpreter on when
no GPU is here."""

from quantlab.kernels.testing import poison  # noqa: F401  (fixture)
