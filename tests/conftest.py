"""Test-session setup shared by every test file.

Triton reads TRITON_INTERPRET once, when it is first imported, so on a machine without a GPU it
is switched on here, before any test module can import triton: every Triton kernel then runs in
the CPU interpreter against its plain-torch reference.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
