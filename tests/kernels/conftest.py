"""Kernel tests run the Triton kernels in the CPU interpreter when no GPU is here. Triton reads
TRITON_INTERPRET when it is first imported, so it is set here, before any test module loads."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from quantlab.kernels.testing import poison  # noqa: E402, F401  (fixture)
