"""FP8 W8A8 GEMM: E4M3 activations (M, K) times E4M3 weights (N, K)^T with fp32 scales, bf16 out.

Three scale granularities, told apart by the scale shapes (the layouts vLLM and
llm-compressor use):
  tensor: x_scale and w_scale one element each                  (fp8 per-tensor)
  row:    x_scale (M, 1) per token, w_scale (N, 1) per channel  (FP8_DYNAMIC)
  block:  x_scale (M, ceil(K/128)) per 1x128 group, w_scale (ceil(N/128), ceil(K/128)) per
          128x128 block                                         (DeepSeek-style FP8_BLOCK)
out[m, n] = sum_k x[m, k] xs[m, k] w[n, k] ws[n, k]. Tensor and row scales factor out of the
K sum and are applied once to the accumulator; block scales change every 128 k, so each
128-deep partial product is scaled before it is added (BLOCK_K is 128 there).

Accuracy: Hopper's FP8 tensor cores (wgmma) add products into the accumulator with fewer
mantissa bits than fp32, and Triton's default on sm_90 never promotes the running sum
(max_num_imprecise_acc_default = 2**30), so the error grew with K (2-5x torch._scaled_mm's at
K = 4k-19k, M >= 64). Each BLOCK_K-deep partial sum is promoted into an fp32 accumulator
(max_num_imprecise_acc = BLOCK_K), as CUTLASS and DeepGEMM do every 128 k: the error then
stays within 1.2x of cuBLAS's up to K = 28672 (tests/kernels/test_kernels_fp8.py, GPU
only; measured equal within 1e-6 on an H200).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from quantlab.kernels._runtime import (
    check_contiguous,
    check_device,
    check_dtype,
    interpreted,
    pick_config,
)

FP8 = torch.float8_e4m3fn
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SCALE_KINDS = ("tensor", "row", "block")


def scale_kind(M: int, N: int, K: int, x_scale: Tensor, w_scale: Tensor) -> str:
    """Which granularity the two scale tensors describe; ValueError says what shapes fit."""
    kb = -(-K // 128)
    if x_scale.numel() == 1 and w_scale.numel() == 1:
        return "tensor"
    if tuple(x_scale.shape) == (M, 1) and tuple(w_scale.shape) == (N, 1):
        return "row"
    if tuple(x_scale.shape) == (M, kb) and tuple(w_scale.shape) == (-(-N // 128), kb):
        return "block"
    raise ValueError(
        f"scale shapes x_scale {tuple(x_scale.shape)}, w_scale {tuple(w_scale.shape)} match no "
        f"granularity for M={M}, N={N}, K={K}: use one element each (tensor), (M, 1) and (N, 1) "
        f"(row), or ({M}, {kb}) and ({-(-N // 128)}, {kb}) (1x128 / 128x128 blocks)")


def _expand(scale: Tensor, rows: int, K: int, kind: str, block_rows: int) -> Tensor:
    if kind == "tensor":
        return scale.reshape(1, 1).expand(rows, K)
    if kind == "row":
        return scale.reshape(rows, 1).expand(rows, K)
    s = scale.repeat_interleave(block_rows, 0)[:rows]
    return s.repeat_interleave(128, 1)[:, :K]


def fp8_matmul_ref(xq: Tensor, x_scale: Tensor, wq: Tensor, w_scale: Tensor,
                   out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Reference: dequantize both operands to float32, multiply, round once to out_dtype."""
    M, K = xq.shape
    N = wq.shape[0]
    kind = scale_kind(M, N, K, x_scale, w_scale)
    x = xq.float() * _expand(x_scale.float(), M, K, kind, 1)
    w = wq.float() * _expand(w_scale.float(), N, K, kind, 128)
    return (x @ w.t()).to(out_dtype)


@triton.jit
def _fp8_kernel(
    a_ptr,          # (M, K) e4m3 activations, row-major
    b_ptr,          # (N, K) e4m3 weights, row-major (= K-major B, what fp8 wgmma wants)
    as_ptr,         # activation scales, float32 (layout per SCALE, module doc)
    bs_ptr,         # weight scales, float32
    c_ptr,          # (M, N) output
    M, N, K,
    SCALE: tl.constexpr,            # 0 tensor, 1 row, 2 block
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,          # tiles of M walked together so B tiles stay in L2
    USE_TMA: tl.constexpr,          # tensor descriptors (bulk copies) instead of pointer loads
):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    KB = tl.cdiv(K, 128)
    if USE_TMA:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = kt * BLOCK_K
        if USE_TMA:
            a = a_desc.load([pid_m * BLOCK_M, k0])
            b = b_desc.load([pid_n * BLOCK_N, k0]).T
        else:
            k_ok = (k0 + offs_k) < K
            a = tl.load(a_ptr + offs_m[:, None] * K + k0 + offs_k[None, :],
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptr + offs_n[None, :] * K + k0 + offs_k[:, None],
                        mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        if SCALE == 2:
            sa = tl.load(as_ptr + offs_m * KB + kt, mask=m_ok, other=0.0)
            sb = tl.load(bs_ptr + (offs_n // 128) * KB + kt, mask=n_ok, other=0.0)
            acc += tl.dot(a, b) * (sa[:, None] * sb[None, :])
        else:
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)  # fp32 every BLOCK_K
    if SCALE == 0:
        acc = acc * (tl.load(as_ptr) * tl.load(bs_ptr))
    if SCALE == 1:
        sa = tl.load(as_ptr + offs_m, mask=m_ok, other=0.0)
        sb = tl.load(bs_ptr + offs_n, mask=n_ok, other=0.0)
        acc = acc * sa[:, None] * sb[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_ALLOCATOR_SET = False


def _tma_allocator() -> None:
    """Device-side tensor descriptors need scratch memory from a Triton allocator."""
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET:
        triton.set_allocator(lambda size, align, stream: torch.empty(
            size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR_SET = True


def _launch(xq, x_scale, wq, w_scale, out, kind, cfg):
    BM, BN, BK, warps, stages, tma = cfg
    M, K = xq.shape
    N = wq.shape[0]
    if tma:
        _tma_allocator()
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    _fp8_kernel[grid](xq, wq, x_scale, w_scale, out, M, N, K, SCALE=SCALE_KINDS.index(kind),
                      BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=8, USE_TMA=tma,
                      num_warps=warps, num_stages=stages)
    return out


def _candidates(M: int, N: int, K: int, kind: str) -> list[tuple]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, use_tma) worth timing."""
    if interpreted():
        return [(16, 32, 128 if kind == "block" else 64, 4, 1, False)]
    tma = K % 16 == 0
    if kind == "block":
        c = [(128, 128, 128, 8, 3, tma), (64, 128, 128, 4, 4, tma), (128, 128, 128, 4, 3, tma)]
        if M >= 256:  # wider tiles: fewer CUDA-core rescales per tensor-core FLOP
            c += [(128, 256, 128, 8, 3, tma), (128, 128, 128, 8, 4, tma),
                  (256, 128, 128, 8, 3, tma)]
    elif M >= 256:
        c = [(128, 256, 128, 8, 3, tma), (128, 128, 128, 8, 4, tma), (128, 256, 64, 8, 4, tma),
             (128, 128, 128, 4, 4, tma), (256, 128, 128, 8, 3, tma), (128, 256, 128, 8, 4, tma)]
    else:
        c = [(64, 128, 128, 4, 4, tma), (64, 64, 128, 4, 5, tma), (128, 128, 128, 8, 3, tma)]
    if M <= 32:
        c = [(max(16, triton.next_power_of_2(M)), *cc[1:]) for cc in c]
    return c


def fp8_matmul(xq: Tensor, x_scale: Tensor, wq: Tensor, w_scale: Tensor,
               out_dtype: torch.dtype = torch.bfloat16, config: tuple | None = None) -> Tensor:
    """xq (M, K) e4m3, wq (N, K) e4m3, float32 scales (module doc) -> (M, N) out_dtype.

    config: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, use_tma) to force one.
    """
    where = "fp8_matmul"
    check_dtype(where, "xq", xq, (FP8,))
    check_dtype(where, "wq", wq, (FP8,))
    check_dtype(where, "x_scale", x_scale, (torch.float32,))
    check_dtype(where, "w_scale", w_scale, (torch.float32,))
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"{where}: out_dtype {out_dtype}; use one of {OUT_DTYPES}")
    check_device(where, "quantlab.kernels.fp8_gemm.fp8_matmul_ref", xq, x_scale, wq, w_scale)
    if xq.ndim != 2 or wq.ndim != 2 or xq.shape[1] != wq.shape[1]:
        raise ValueError(f"{where}: need xq (M, K) and wq (N, K), got {tuple(xq.shape)} and "
                         f"{tuple(wq.shape)}")
    for name, t in (("xq", xq), ("wq", wq), ("x_scale", x_scale), ("w_scale", w_scale)):
        check_contiguous(where, name, t)
    M, K = xq.shape
    N = wq.shape[0]
    kind = scale_kind(M, N, K, x_scale, w_scale)
    out = torch.empty((M, N), dtype=out_dtype, device=xq.device)
    if config is None:
        key = ("fp8", triton.next_power_of_2(M), N, K, kind, out_dtype)
        config = pick_config(key, _candidates(M, N, K, kind),
                             lambda c: _launch(xq, x_scale, wq, w_scale, out, kind, c))
    if kind == "block" and config[2] != 128:
        raise ValueError(f"{where}: block scales need BLOCK_K = 128, config has {config[2]}")
    return _launch(xq, x_scale, wq, w_scale, out, kind, config)
