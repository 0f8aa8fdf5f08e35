"""Test helpers for tests/test_kernels_*.py. Import this module before any kernel module: with
no GPU here it selects Triton's CPU interpreter (TRITON_INTERPRET=1, unless already set), so the
same tests check the interpreted kernels on a CPU machine and the compiled ones on a GPU."""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set, so its own "
                           "helpers (tl.zeros ...) are not interpretable: run the kernel tests "
                           "with TRITON_INTERPRET=1 in the environment")
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

from quantlab.kernels._runtime import interpreted  # noqa: E402

DEV = "cpu" if interpreted() else "cuda"
_empty = torch.empty


def _poisoned_empty(*args, **kwargs):
    t = _empty(*args, **kwargs)
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        t.fill_(0x5A)
    return t


class _PoisonedTorch:
    """torch, except that empty() returns poisoned memory."""

    empty = staticmethod(_poisoned_empty)

    def __getattr__(self, name):
        return getattr(torch, name)


@pytest.fixture
def poison(monkeypatch):
    """Every torch.empty the kernel launchers call returns NaN (floats) or 0x5A (ints), so an
    element a kernel forgets to write shows up as a mismatch."""
    import importlib

    for name in ("w4a16", "fp8_gemm", "fp4_gemm", "quantize"):
        mod = importlib.import_module(f"quantlab.kernels.{name}")
        monkeypatch.setattr(mod, "torch", _PoisonedTorch())


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def randn(*shape, seed=0, dtype=torch.float32, std=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * std).to(dtype).to(DEV)
