"""FP8 W8A8 GEMM: three scale granularities against the dequantized reference; bad input raises."""

import pytest
import torch

from quantlab.kernels.testing import DEV, randn, rel_err  # noqa: I001  (sets TRITON_INTERPRET)

pytest.importorskip("triton")
from quantlab.kernels import fp8_gemm  # noqa: E402
from quantlab.kernels._runtime import interpreted  # noqa: E402

TOL = 1e-2 if interpreted() else 2e-3  # fp32 sums, one rounding to bf16 (truncation on the CPU)
M, N, K = 20, 160, 320  # partial tiles everywhere; K not a multiple of 128


def operands(kind, seed=0):
    xq = randn(M, K, seed=seed).to(fp8_gemm.FP8)
    wq = randn(N, K, seed=seed + 1).to(fp8_gemm.FP8)
    shapes = {"tensor": ((1,), (1,)), "row": ((M, 1), (N, 1)), "block": ((M, 3), (2, 3))}[kind]
    xs, ws = (randn(*s, seed=seed + 2 + i).abs() + 0.1 for i, s in enumerate(shapes))
    return xq, xs, wq, ws


@pytest.mark.parametrize("kind", ["tensor", "row", "block"])
@pytest.mark.parametrize("tma", [False, True])
def test_matches_reference(poison, kind, tma):
    xq, xs, wq, ws = operands(kind)
    cfg = (16, 32, 128, 4, 1, tma) if interpreted() else (64, 64, 128, 4, 3, tma)
    out = fp8_gemm.fp8_matmul(xq, xs, wq, ws, config=cfg)
    ref = fp8_gemm.fp8_matmul_ref(xq, xs, wq, ws)
    assert out.shape == (M, N) and out.dtype == torch.bfloat16
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) < TOL


def test_default_config_and_fp16_out(poison):
    xq, xs, wq, ws = operands("row", seed=5)
    out = fp8_gemm.fp8_matmul(xq, xs, wq, ws, out_dtype=torch.float16)
    assert out.dtype == torch.float16
    assert rel_err(out, fp8_gemm.fp8_matmul_ref(xq, xs, wq, ws)) < TOL


def test_bad_input_raises_with_advice():
    xq, xs, wq, ws = operands("row")
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        fp8_gemm.fp8_matmul(xq.float(), xs, wq, ws)
    with pytest.raises(TypeError, match="float32"):
        fp8_gemm.fp8_matmul(xq, xs.half(), wq, ws)
    with pytest.raises(ValueError, match="match no granularity"):
        fp8_gemm.fp8_matmul(xq, xs, wq, torch.ones(N, 2, device=DEV))
    with pytest.raises(ValueError, match="contiguous"):
        fp8_gemm.fp8_matmul(xq, xs, wq.t().contiguous().t(), ws)
    with pytest.raises(ValueError, match=r"need xq \(M, K\)"):
        fp8_gemm.fp8_matmul(xq, xs, wq[:, :64].contiguous(), ws)
    with pytest.raises(ValueError, match="BLOCK_K = 128"):
        fp8_gemm.fp8_matmul(*operands("block"), config=(16, 32, 64, 4, 1, False))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["tensor", "row", "block"])
@pytest.mark.parametrize("M,K", [(64, 4096), (256, 14336), (256, 28672)])
def test_long_k_error_equals_scaled_mm(kind, M, K):
    """At M >= 64 Hopper runs wgmma, whose FP8 accumulation keeps fewer bits than fp32: without
    promoting each 128-deep partial sum the error grew with K to 2-5x cuBLAS's. Against an fp64
    product of the same quantized operands, ours must be within 1.2x of torch._scaled_mm's."""
    from quantlab.kernels.bench import scaled_mm_peer

    N = 1024
    g = torch.Generator(device="cuda").manual_seed(K + M)
    x = torch.randn(M, K, device="cuda", generator=g)
    w = torch.randn(N, K, device="cuda", generator=g) * 0.02
    if kind == "tensor":
        xs, ws = x.abs().amax().reshape(1) / 448, w.abs().amax().reshape(1) / 448
        xq, wq = (x / xs).to(fp8_gemm.FP8), (w / ws).to(fp8_gemm.FP8)
    elif kind == "row":
        xs, ws = x.abs().amax(1, keepdim=True) / 448, w.abs().amax(1, keepdim=True) / 448
        xq, wq = (x / xs).to(fp8_gemm.FP8), (w / ws).to(fp8_gemm.FP8)
    else:
        xs = x.reshape(M, K // 128, 128).abs().amax(-1) / 448
        wb = w.reshape(N // 128, 128, K // 128, 128)
        ws = wb.abs().amax((1, 3)) / 448
        xq = (x.reshape(M, K // 128, 128) / xs[..., None]).reshape(M, K).to(fp8_gemm.FP8)
        wq = (wb / ws[:, None, :, None]).reshape(N, K).to(fp8_gemm.FP8)
    xs, ws = xs.float().contiguous(), ws.float().contiguous()
    truth = (xq.double() * fp8_gemm._expand(xs.double(), M, K, kind, 1)) @ \
        (wq.double() * fp8_gemm._expand(ws.double(), N, K, kind, 128)).t()
    ours = rel_err(fp8_gemm.fp8_matmul(xq, xs, wq, ws), truth)
    try:
        peer = rel_err(scaled_mm_peer(xq, xs, wq, ws, kind)(), truth)
    except (RuntimeError, ImportError, KeyError, AttributeError):  # no cuBLAS blockwise here
        peer = rel_err(fp8_gemm.fp8_matmul_ref(xq, xs, wq, ws), truth)
    assert ours <= 1.2 * peer, (ours, peer)
