"""Where kernels run, input checks shared by every launcher, and a tiny config picker.

Kernels run on a CUDA GPU, or on the CPU through Triton's interpreter when the environment
variable TRITON_INTERPRET=1 is set *before* quantlab.kernels is imported (that is how CI checks
them). Anywhere else the launchers raise and name the plain-torch reference to use instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(where: str, reference: str, *tensors: Tensor) -> None:
    """Raise unless every tensor sits where the kernels can run (CUDA, or CPU when interpreted)."""
    devices = {t.device.type for t in tensors}
    if interpreted():
        if devices != {"cpu"}:
            raise ValueError(f"{where}: TRITON_INTERPRET=1 runs kernels on the CPU; move the "
                             f"inputs to the CPU (got devices {sorted(devices)})")
        return
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{where}: no CUDA GPU and TRITON_INTERPRET is not set. Use the plain-torch "
            f"reference {reference} on this machine, or set TRITON_INTERPRET=1 before importing "
            "quantlab.kernels to run the Triton kernel in the (slow) CPU interpreter")
    if devices != {"cuda"} or len({t.device for t in tensors}) != 1:
        raise ValueError(f"{where}: inputs must all be on one CUDA device, got "
                         f"{sorted(str(t.device) for t in tensors)}")


def check_dtype(where: str, name: str, t: Tensor, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{where}: {name} has dtype {str(t.dtype).replace('torch.', '')}; "
                        f"expected one of ({names}); convert it with .to(...)")


def check_contiguous(where: str, name: str, t: Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{where}: {name} of shape {tuple(t.shape)} is not contiguous (strides "
                         f"{t.stride()}); pass {name}.contiguous()")


_PICKED: dict[tuple, object] = {}


def picked(key: tuple):
    """The config pick_config chose for key, or None (for benchmark records)."""
    return _PICKED.get(key)


def pick_config(key: tuple, candidates: Sequence, run: Callable[[object], object]):
    """The fastest of `candidates` for `key`, timed once on the GPU with do_bench and cached.

    run(config) launches the kernel once. In the interpreter the first candidate is used: the
    interpreter cannot time, and every candidate computes the same function.
    """
    if interpreted() or len(candidates) == 1:
        return candidates[0]
    if key not in _PICKED:
        from triton.testing import do_bench

        times = [do_bench(_graphed(lambda c=c: run(c)), warmup=5, rep=20, return_mode="median")
                 for c in candidates]
        _PICKED[key] = candidates[min(range(len(candidates)), key=times.__getitem__)]
    return _PICKED[key]


def _graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """fn replayed from a CUDA graph, so that timing sees GPU time rather than the host's
    launch overhead (which swamps microsecond kernels); fn itself if capture fails."""
    try:
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g.replay
    except Exception:  # some launches cannot be captured: time them eagerly
        torch.cuda.synchronize()
        return fn
