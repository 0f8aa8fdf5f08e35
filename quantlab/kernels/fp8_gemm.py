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

Speed of the promotion (config's `chain`): Triton lowers the promoted dot to the wgmmas of one
BLOCK_K partial followed by fp32 adds that read their result, so ptxas waits for those wgmmas
before the adds (its C7517 note) and the tensor cores idle during them. chain R > 1 chains R
dots on the tensor cores' own sum before one fp32 add (Triton then waits after every dot);
chain 0 never promotes (a speed baseline only). chain -G runs a Gluon kernel instead that
starts block j + 1's wgmma into a second register tile before adding block j's, G blocks
unrolled per loop step (nothing stays in flight across the loop's back edge, where ptxas
would serialize the wgmmas); it needs a Hopper GPU (no CPU interpreter for Gluon).
Without a config, fp8_matmul times the configs that won the H200 sweep for the granularity and
M bucket (_WON): Gluon ones where gluon_usable(), the best Triton ones always.
"""

from __future__ import annotations

import warnings
from functools import partial

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
from quantlab.kernels._tiles import grouped_tile

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
    CHAIN: tl.constexpr,            # BLOCK_K steps summed on the tensor cores per fp32 add
                                    # (0: never promoted; a timing baseline, not accurate)
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
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
    for kc in range(0, tl.cdiv(K, BLOCK_K * (CHAIN + (CHAIN == 0)))):
        if CHAIN == 0 and SCALE != 2:
            a, b = _fp8_tiles(a_ptr, b_ptr, a_desc if USE_TMA else None,
                              b_desc if USE_TMA else None, kc * BLOCK_K, K, offs_m, offs_n,
                              offs_k, m_ok, n_ok, pid_m, pid_n, BLOCK_M, BLOCK_N, USE_TMA)
            acc = tl.dot(a, b, acc)
        elif CHAIN == 1 and SCALE != 2:
            # one dot; Triton splits it into BLOCK_K-deep partials added in fp32
            a, b = _fp8_tiles(a_ptr, b_ptr, a_desc if USE_TMA else None,
                              b_desc if USE_TMA else None, kc * BLOCK_K, K, offs_m, offs_n,
                              offs_k, m_ok, n_ok, pid_m, pid_n, BLOCK_M, BLOCK_N, USE_TMA)
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
        else:
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for r in tl.static_range(CHAIN):  # CHAIN dots on the tensor cores' own sum
                a, b = _fp8_tiles(a_ptr, b_ptr, a_desc if USE_TMA else None,
                                  b_desc if USE_TMA else None, (kc * CHAIN + r) * BLOCK_K, K,
                                  offs_m, offs_n, offs_k, m_ok, n_ok, pid_m, pid_n, BLOCK_M,
                                  BLOCK_N, USE_TMA)
                part = tl.dot(a, b, part)
            if SCALE == 2:  # CHAIN is 1 and BLOCK_K 128 here: one scale block per step
                sa = tl.load(as_ptr + offs_m * KB + kc, mask=m_ok, other=0.0)
                if BLOCK_N <= 128:  # the tile lies in one 128-row weight block: one scale
                    sb = tl.load(bs_ptr + (pid_n * BLOCK_N // 128) * KB + kc)
                    acc += part * (sa * sb)[:, None]
                else:
                    sb = tl.load(bs_ptr + (offs_n // 128) * KB + kc, mask=n_ok, other=0.0)
                    acc += part * (sa[:, None] * sb[None, :])
            else:
                acc += part
    if SCALE == 0:
        acc = acc * (tl.load(as_ptr) * tl.load(bs_ptr))
    if SCALE == 1:
        sa = tl.load(as_ptr + offs_m, mask=m_ok, other=0.0)
        sb = tl.load(bs_ptr + offs_n, mask=n_ok, other=0.0)
        acc = acc * sa[:, None] * sb[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _fp8_tiles(a_ptr, b_ptr, a_desc, b_desc, k0, K, offs_m, offs_n, offs_k, m_ok, n_ok, pid_m,
               pid_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    """The (BLOCK_M, BLOCK_K) tile of A and the (BLOCK_K, BLOCK_N) tile of B^T at k0."""
    if USE_TMA:
        a = a_desc.load([pid_m * BLOCK_M, k0])
        b = b_desc.load([pid_n * BLOCK_N, k0]).T
    else:
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptr + offs_m[:, None] * K + k0 + offs_k[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[None, :] * K + k0 + offs_k[:, None],
                    mask=n_ok[None, :] & k_ok[:, None], other=0.0)
    return a, b


try:  # Gluon (explicit wgmma / TMA / mbarrier control): Hopper only, no CPU interpreter
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # older Triton: the lagged kernel is not offered
    gluon = None
else:  # names that changed after Triton 3.6: its async_copy_global_to_shared is async_load
    # later (the old name kept as a stub that raises, hence the look at its parameters), its
    # thread_barrier is barrier
    import inspect

    _old = getattr(tma, "async_copy_global_to_shared", None)
    _tma_load = getattr(tma, "async_load", None)
    if _tma_load is None or (_old is not None
                             and "tensor_desc" in inspect.signature(_old).parameters):
        _tma_load = _old
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # renamed after 3.6


if gluon is not None:
    @gluon.jit
    def _lagged_step(a_bufs, b_bufs, bars, as_ptr, bs_ptr, k, off_n, offs_m, m_ok, KB, zero,
                     SCALE: gl.constexpr, STAGES: gl.constexpr):
        """Start the wgmma of K block k into a fresh register tile; its scale (SCALE 2)."""
        slot = k % STAGES
        mbarrier.wait(bars.index(slot), (k // STAGES) & 1)
        part = warpgroup_mma(a_bufs.index(slot), b_bufs.index(slot).permute((1, 0)), zero,
                             use_acc=False, is_async=True)
        if SCALE == 2:
            sa = gl.load(as_ptr + offs_m * KB + k, mask=m_ok, other=0.0)
            s = sa * gl.load(bs_ptr + (off_n // 128) * KB + k)
        else:
            s = gl.zeros_like(offs_m.to(gl.float32))
        return part, s

    @gluon.jit
    def _lagged_retire(acc, part, s, PENDING: gl.constexpr, SCALE: gl.constexpr):
        """Wait for `part` (PENDING later wgmmas may stay in flight); add it in fp32."""
        done = warpgroup_mma_wait(num_outstanding=PENDING, deps=(part, ))
        if SCALE == 2:
            return acc + done * s[:, None]
        return acc + done

    @gluon.jit
    def _lagged_refill(a_desc, b_desc, a_bufs, b_bufs, bars, j, n_k, off_m, off_n,
                       STAGES: gl.constexpr, BLOCK_K: gl.constexpr, nbytes: gl.constexpr):
        """K block j is retired: its slot takes block j + STAGES."""
        _cta_barrier()  # every warpgroup has retired it
        nk = j + STAGES
        ns = j % STAGES
        ok = nk < n_k
        mbarrier.expect(bars.index(ns), nbytes, pred=ok)
        _tma_load(a_desc, [off_m, nk * BLOCK_K], bars.index(ns), a_bufs.index(ns), pred=ok)
        _tma_load(b_desc, [off_n, nk * BLOCK_K], bars.index(ns), b_bufs.index(ns), pred=ok)

    @gluon.jit
    def _fp8_lagged_kernel(a_desc, b_desc, as_ptr, bs_ptr, c_ptr, M, N, K,
                           SCALE: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                           GROUP_K: gl.constexpr, num_warps: gl.constexpr):
        """The same product with the fp32 promotion one step behind: the wgmma of K block k
        runs on the tensor cores while the CUDA cores add (and for block scales, rescale) the
        partial of block k - 1, so neither waits for the other. Every partial is BLOCK_K deep,
        summed into a fresh register tile (use_acc=False) and added in fp32."""
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        pid = gl.program_id(0)  # the order of _tiles.grouped_tile, in Gluon ops
        grid_m = gl.cdiv(M, BLOCK_M)
        grid_n = gl.cdiv(N, BLOCK_N)
        width = GROUP_M * grid_n
        first_m = (pid // width) * GROUP_M
        size_m = gl.minimum(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N

        mma: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 32])
        rows: gl.constexpr = gl.SliceLayout(1, mma)
        cols: gl.constexpr = gl.SliceLayout(0, mma)
        offs_m = off_m + gl.arange(0, BLOCK_M, layout=rows)
        offs_n = off_n + gl.arange(0, BLOCK_N, layout=cols)
        m_ok = offs_m < M
        n_ok = offs_n < N
        KB = gl.cdiv(K, 128)

        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, BLOCK_K],
                                           a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_N, BLOCK_K],
                                           b_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
        n_k = gl.cdiv(K, BLOCK_K)
        for i in gl.static_range(STAGES):  # prologue: the first STAGES K blocks
            ok = i < n_k
            mbarrier.expect(bars.index(i), nbytes, pred=ok)
            _tma_load(a_desc, [off_m, i * BLOCK_K], bars.index(i), a_bufs.index(i), pred=ok)
            _tma_load(b_desc, [off_n, i * BLOCK_K], bars.index(i), b_bufs.index(i), pred=ok)

        zero = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, mma)
        acc = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, mma)
        # groups of GROUP_K blocks, unrolled: within a group the add of block j runs while the
        # wgmma of block j + 1 is in flight; none is in flight across the loop's back edge
        # (ptxas serializes every wgmma when registers of one still in flight there are read)
        for kg in range(n_k // GROUP_K):
            j0 = kg * GROUP_K
            p_prev, s_prev = _lagged_step(a_bufs, b_bufs, bars, as_ptr, bs_ptr, j0, off_n,
                                          offs_m, m_ok, KB, zero, SCALE, STAGES)
            for u in gl.static_range(1, GROUP_K):
                p, s_now = _lagged_step(a_bufs, b_bufs, bars, as_ptr, bs_ptr, j0 + u, off_n,
                                        offs_m, m_ok, KB, zero, SCALE, STAGES)
                acc = _lagged_retire(acc, p_prev, s_prev, 1, SCALE)
                _lagged_refill(a_desc, b_desc, a_bufs, b_bufs, bars, j0 + u - 1, n_k, off_m,
                               off_n, STAGES, BLOCK_K, nbytes)
                p_prev = p
                s_prev = s_now
            acc = _lagged_retire(acc, p_prev, s_prev, 0, SCALE)
            _lagged_refill(a_desc, b_desc, a_bufs, b_bufs, bars, j0 + GROUP_K - 1, n_k, off_m,
                           off_n, STAGES, BLOCK_K, nbytes)
        for j in range(n_k // GROUP_K * GROUP_K, n_k):  # the rest, one at a time
            p, s_now = _lagged_step(a_bufs, b_bufs, bars, as_ptr, bs_ptr, j, off_n, offs_m,
                                    m_ok, KB, zero, SCALE, STAGES)
            acc = _lagged_retire(acc, p, s_now, 0, SCALE)
            _lagged_refill(a_desc, b_desc, a_bufs, b_bufs, bars, j, n_k, off_m, off_n, STAGES,
                           BLOCK_K, nbytes)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

        if SCALE == 0:
            acc = acc * (gl.load(as_ptr) * gl.load(bs_ptr))
        if SCALE == 1:
            sa = gl.load(as_ptr + offs_m, mask=m_ok, other=0.0)
            sb = gl.load(bs_ptr + offs_n, mask=n_ok, other=0.0)
            acc = acc * sa[:, None] * sb[None, :]
        out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        out = gl.convert_layout(acc.to(c_ptr.dtype.element_ty), out_layout)
        om = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out_layout))
        on = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, out_layout))
        gl.store(c_ptr + om[:, None] * N + on[None, :], out,
                 mask=(om < M)[:, None] & (on < N)[None, :])


def _launch_lagged(xq, x_scale, wq, w_scale, out, kind, cfg):
    BM, BN, BK, warps, stages = cfg[:5]
    if gluon is None:
        raise RuntimeError("fp8_matmul: chain < 0 (lagged promotion) needs Triton's Gluon "
                           "(triton >= 3.5); use chain 1")
    if interpreted():
        raise RuntimeError("fp8_matmul: chain < 0 (a Gluon kernel) cannot run in the CPU "
                           "interpreter; use chain 1 there")
    M, K = xq.shape
    if kind == "block" and BN > 128:
        raise ValueError("fp8_matmul: chain < 0 with block scales needs BLOCK_N <= 128")
    if K % 16 or stages < 2:
        raise ValueError(f"fp8_matmul: chain < 0 needs K % 16 == 0 (TMA rows) and 2+ stages, "
                         f"got K = {K}, {stages} stages")
    N = wq.shape[0]
    ga = gl.NVMMASharedLayout.get_default_for([BM, BK], gl.float8e4nv)
    gb = gl.NVMMASharedLayout.get_default_for([BN, BK], gl.float8e4nv)
    a_desc = TensorDescriptor(xq, [M, K], [K, 1], [BM, BK], ga)
    b_desc = TensorDescriptor(wq, [N, K], [K, 1], [BN, BK], gb)
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    _fp8_lagged_kernel[grid](a_desc, b_desc, x_scale, w_scale, out, M, N, K,
                             SCALE=SCALE_KINDS.index(kind), STAGES=stages, GROUP_M=8,
                             GROUP_K=-cfg[6], num_warps=warps)
    return out


_ALLOCATOR_SET = False


def _tma_allocator() -> None:
    """Device-side tensor descriptors need scratch memory from a Triton allocator."""
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET:
        triton.set_allocator(lambda size, align, stream: torch.empty(
            size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR_SET = True


def _launch(xq, x_scale, wq, w_scale, out, kind, cfg):
    BM, BN, BK, warps, stages, tma, chain = (*cfg, 1)[:7]
    if chain < 0:
        return _launch_lagged(xq, x_scale, wq, w_scale, out, kind, cfg)
    M, K = xq.shape
    N = wq.shape[0]
    if tma:
        _tma_allocator()
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    _fp8_kernel[grid](xq, wq, x_scale, w_scale, out, M, N, K, SCALE=SCALE_KINDS.index(kind),
                      BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=8, USE_TMA=tma, CHAIN=chain,
                      num_warps=warps, num_stages=stages)
    return out


def gluon_usable() -> bool:
    """Whether the Gluon kernel (chain < 0) can run here: Triton with Gluon, not the CPU
    interpreter, and a Hopper GPU (it issues wgmma, which sm_90 alone has)."""
    if gluon is None or interpreted() or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability()[0] == 9


# Per granularity and M bucket: the configs that won the H200 sweep (scripts/sweep_fp8.py:
# the fastest accurate config of 8 Llama-3 8B/70B shapes, or needed for the fastest of some).
# "gluon" is tried first where gluon_usable(); "triton" is also timed there, and is the whole
# list where Gluon is not usable. BLOCK_M 64 in the Gluon kernel also serves M <= 32 (its wgmma
# layout needs 16 rows per warp); the Triton kernel's BLOCK_M shrinks to M there.
_SMALL, _MID, _LARGE = 32, 64, 1024  # bucket bounds: M <= 32, <= 64, < 1024, >= 1024
_WON = {
    ("scalar", "tiny"): {"gluon": [(64, 128, 128, 4, 4, -2)],
                         "triton": [(16, 128, 256, 4, 3, 1), (16, 128, 128, 4, 4, 1)]},
    ("scalar", "small"): {"gluon": [(64, 128, 128, 4, 4, -2)],
                          "triton": [(64, 128, 128, 4, 4, 1)]},
    ("scalar", "mid"): {"gluon": [(64, 128, 128, 4, 4, -2), (128, 128, 128, 8, 4, -2),
                                  (128, 128, 256, 8, 3, -2)],
                        "triton": [(64, 128, 128, 4, 4, 1), (128, 128, 256, 8, 3, 1)]},
    ("scalar", "large"): {"gluon": [(128, 128, 256, 8, 3, -2), (128, 128, 128, 8, 4, -2)],
                          "triton": [(128, 128, 256, 8, 3, 1), (128, 256, 128, 8, 3, 1)]},
    ("block", "tiny"): {"gluon": [(64, 128, 128, 4, 4, -2)],
                        "triton": [(16, 128, 128, 4, 4, 1)]},
    ("block", "small"): {"gluon": [(64, 128, 128, 4, 4, -2)],
                         "triton": [(64, 128, 128, 4, 4, 1)]},
    ("block", "mid"): {"gluon": [(128, 128, 128, 8, 4, -2), (64, 128, 128, 4, 4, -2)],
                       "triton": [(64, 128, 128, 4, 4, 1), (128, 128, 128, 8, 4, 1)]},
    ("block", "large"): {"gluon": [(128, 128, 128, 8, 4, -2)],
                         "triton": [(128, 128, 128, 8, 4, 1)]},
}


def _bucket(M: int) -> str:
    if M <= _SMALL:
        return "tiny"
    if M <= _MID:
        return "small"
    return "mid" if M < _LARGE else "large"


def _candidates(M: int, N: int, K: int, kind: str, aligned: bool = True,
                gluon_ok: bool | None = None) -> list[tuple]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, use_tma, chain) worth timing.

    aligned: both operands start on 16 bytes (TMA needs it, and K % 16 == 0 for its rows);
    gluon_ok: override gluon_usable() (tests)."""
    if interpreted():
        return [(16, 32, 128 if kind == "block" else 64, 4, 1, False, 1)]
    tma = aligned and K % 16 == 0
    if gluon_ok is None:
        gluon_ok = gluon_usable()
    won = _WON[("block" if kind == "block" else "scalar", _bucket(M))]
    tiny = max(16, triton.next_power_of_2(M))
    c = [(tiny if M <= _SMALL else bm, *rest[:4], tma, rest[4])
         for bm, *rest in won["triton"]]
    if gluon_ok and tma:
        c = [(*g[:5], True, g[5]) for g in won["gluon"]] + c
    return c


_BROKEN: dict[tuple, str] = {}  # (Gluon config, kind, out dtype) -> why it failed here
_WORKS: set[tuple] = set()         # (Gluon config, kind, out dtype) launched fine here


def _compiling(candidates: list[tuple], run, tag: tuple) -> list[tuple]:
    """candidates less the Gluon ones that fail to compile or launch (an experimental API that
    may change between Triton releases). Each is launched once per (kind, out dtype) the first
    time it is offered; a failure is warned about once and that config is not offered again."""
    keep = []
    for c in candidates:
        if c[6] < 0 and (c, *tag) not in _WORKS and (c, *tag) not in _BROKEN:
            try:
                run(c)
                _WORKS.add((c, *tag))
            except Exception as e:  # any failure: the Triton configs remain
                _BROKEN[(c, *tag)] = f"{type(e).__name__}: {e}"
                warnings.warn(f"fp8_matmul: Gluon config {c} failed "
                              f"({_BROKEN[(c, *tag)][:200]}); timing the others",
                              RuntimeWarning, stacklevel=3)
        if (c, *tag) not in _BROKEN:
            keep.append(c)
    return keep


def fp8_matmul(xq: Tensor, x_scale: Tensor, wq: Tensor, w_scale: Tensor,
               out_dtype: torch.dtype = torch.bfloat16, config: tuple | None = None) -> Tensor:
    """xq (M, K) e4m3, wq (N, K) e4m3, float32 scales (module doc) -> (M, N) out_dtype.

    config: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, use_tma[, chain]) to force
    one; chain (default 1) = BLOCK_K steps the tensor cores sum before each fp32 add; chain
    -G runs the Gluon kernel that adds each BLOCK_K partial while the next one's wgmma runs
    (G K blocks unrolled per loop step; -1 overlaps nothing). Gluon needs a GPU.
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
        aligned = xq.data_ptr() % 16 == 0 and wq.data_ptr() % 16 == 0
        key = ("fp8", triton.next_power_of_2(M), N, K, kind, out_dtype, aligned)
        run = partial(_launch, xq, x_scale, wq, w_scale, out, kind)
        cands = _compiling(_candidates(M, N, K, kind, aligned), run, (kind, out_dtype))
        config = pick_config(key, cands, run)
    if kind == "block" and (config[2] != 128 or (*config, 1)[6] not in (1, -1, -2, -4)):
        raise ValueError(f"{where}: block scales need BLOCK_K = 128 and chain 1 or < 0, config has "
                         f"{config}")
    return _launch(xq, x_scale, wq, w_scale, out, kind, config)
