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


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, use_tma, chain): every constexpr branch
CONFIGS = {
    "tensor": [(16, 32, 128, 4, 1, False, 1), (16, 32, 128, 4, 1, True, 1),
               (16, 32, 64, 4, 1, True, 2), (16, 64, 64, 4, 1, False, 3)],
    "row": [(16, 32, 128, 4, 1, False, 1), (16, 32, 128, 4, 1, True, 1),
            (16, 32, 64, 4, 1, True, 0), (32, 32, 64, 4, 1, False, 2)],
    "block": [(16, 32, 128, 4, 1, False, 1), (16, 32, 128, 4, 1, True, 1),
              (16, 256, 128, 4, 1, True, 1), (32, 256, 128, 4, 1, False, 1)],
}
GPU_CONFIGS = [(64, 64, 128, 4, 3, False, 1), (64, 64, 128, 4, 3, True, 1),
               (64, 128, 128, 4, 3, True, 2), (64, 256, 128, 8, 3, True, 1)]
# the Gluon kernel (chain < 0): K = 320 is 3 K blocks, one unrolled pair and one alone
LAGGED = [(64, 64, 128, 4, 3, True, -2), (64, 128, 128, 4, 2, True, -1),
          (128, 64, 128, 8, 3, True, -2), (64, 32, 128, 4, 4, True, -4)]


@pytest.mark.parametrize("kind", ["tensor", "row", "block"])
@pytest.mark.parametrize("i", range(4))
def test_matches_reference(poison, kind, i):
    """Pointer and TMA loads, promotion inside the dot (chain 1), chained dots (chain 2, 3),
    unpromoted (chain 0), block scales with one (BLOCK_N <= 128) or per-column weight scales."""
    xq, xs, wq, ws = operands(kind)
    cfg = CONFIGS[kind][i] if interpreted() else GPU_CONFIGS[i]
    if kind == "block":
        cfg = (*cfg[:6], 1)
    out = fp8_gemm.fp8_matmul(xq, xs, wq, ws, config=cfg)
    ref = fp8_gemm.fp8_matmul_ref(xq, xs, wq, ws)
    assert out.shape == (M, N) and out.dtype == torch.bfloat16
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) < TOL


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["tensor", "row", "block"])
@pytest.mark.parametrize("cfg", LAGGED)
def test_lagged_matches_reference(poison, kind, cfg):
    xq, xs, wq, ws = operands(kind)
    out = fp8_gemm.fp8_matmul(xq, xs, wq, ws, config=cfg)
    assert not torch.isnan(out).any()
    assert rel_err(out, fp8_gemm.fp8_matmul_ref(xq, xs, wq, ws)) < TOL


@pytest.mark.skipif(not interpreted(), reason="the CPU interpreter's refusal")
def test_lagged_refuses_the_interpreter():
    with pytest.raises(RuntimeError, match="cannot run in the CPU interpreter|needs Triton's"):
        fp8_gemm.fp8_matmul(*operands("row"), config=LAGGED[0])


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
    with pytest.raises(ValueError, match="chain 1"):
        fp8_gemm.fp8_matmul(*operands("block"), config=(16, 32, 128, 4, 1, False, 2))


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


@pytest.mark.parametrize("kind", ["tensor", "row", "block"])
@pytest.mark.parametrize("M", [1, 16, 33, 64, 65, 256, 1023, 1024, 4096])
def test_candidates_per_bucket(monkeypatch, kind, M):
    """The GPU's candidate lists, built on the CPU: Gluon's winners first where it is usable,
    the Triton ones kept as candidates and as the whole list without Gluon; every config is
    one the block kernel accepts and the Gluon kernel can launch."""
    monkeypatch.setattr(fp8_gemm, "interpreted", lambda: False)
    with_g = fp8_gemm._candidates(M, 4096, 4096, kind, gluon_ok=True)
    without = fp8_gemm._candidates(M, 4096, 4096, kind, gluon_ok=False)
    assert with_g[0][6] < 0
    assert [c for c in with_g if c[6] >= 0] == without and without
    assert all(c[6] == 1 for c in without)
    assert len(set(with_g)) == len(with_g)
    for c in with_g:
        assert len(c) == 7 and c[5] is True
        if kind == "block":
            assert c[2] == 128 and (c[6] == 1 or (c[6] in (-1, -2, -4) and c[1] <= 128))
        if c[6] < 0:
            assert c[0] >= 64 and c[3] * 16 <= c[0] and c[4] >= 2
        elif M <= 32:
            assert c[0] == max(16, 1 << (M - 1).bit_length())
    if M >= 1024:  # the large-M winners of the H200 sweep
        best = (128, 128, 128, 8, 4, True, -2) if kind == "block" else \
            (128, 128, 256, 8, 3, True, -2)
        assert best in with_g


@pytest.mark.parametrize("K,aligned", [(4104, True), (4096, False)])
def test_candidates_without_tma(monkeypatch, K, aligned):
    """Rows not a multiple of 16 bytes, or an operand off 16-byte alignment: no TMA, so no
    Gluon either, even where Gluon is usable."""
    monkeypatch.setattr(fp8_gemm, "interpreted", lambda: False)
    for M in (16, 256, 4096):
        c = fp8_gemm._candidates(M, 4096, K, "row", aligned, gluon_ok=True)
        assert c and all(cc[6] == 1 and cc[5] is False for cc in c)


def test_gluon_not_usable_in_the_interpreter():
    if interpreted():
        assert not fp8_gemm.gluon_usable()


def test_failing_gluon_config_is_dropped_once(monkeypatch):
    """A Gluon config that fails to compile or launch (say a Triton whose Gluon API moved) is
    warned about once and no longer offered; the Triton configs are never test-launched."""
    monkeypatch.setattr(fp8_gemm, "_BROKEN", {})
    monkeypatch.setattr(fp8_gemm, "_WORKS", set())
    calls = []

    def run(c):
        calls.append(c)
        if c[0] == 64:
            raise RuntimeError("no wgmma here")

    cands = [(64, 128, 128, 4, 4, True, -2), (128, 128, 128, 8, 4, True, -2),
             (64, 128, 128, 4, 4, True, 1)]
    tag = ("row", torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="no wgmma here"):
        assert fp8_gemm._compiling(cands, run, tag) == cands[1:]
    assert calls == cands[:2]
    assert fp8_gemm._compiling(cands, run, tag) == cands[1:]  # no launch, no warning again
    assert calls == cands[:2]
    calls.clear()  # another out dtype compiles other kernels: checked afresh
    with pytest.warns(RuntimeWarning):
        assert fp8_gemm._compiling(cands, run, ("row", torch.float16)) == cands[1:]
    assert calls == cands[:2]
