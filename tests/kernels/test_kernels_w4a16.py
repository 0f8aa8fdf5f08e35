"""W4A16 kernel: packing is exact, the matmul matches the reference, bad input raises."""

import pytest
import torch

from quantlab.kernels.testing import DEV, randn, rel_err  # noqa: I001  (sets TRITON_INTERPRET)

pytest.importorskip("triton")
from quantlab import dequantize, quantize  # noqa: E402
from quantlab.kernels import w4a16  # noqa: E402
from quantlab.kernels._runtime import interpreted  # noqa: E402

# bf16 products summed in fp32 on the GPU land near 1e-3; the interpreter truncates fp32 -> bf16,
# which biases every weight by up to 2**-8, so allow 1e-2 there.
TOL = 1e-2 if interpreted() else 3e-3


def _on_gpu_only(params, keep):
    """All of params in the interpreter; on the GPU, where each new config is a compile of
    seconds, the ones at the indices keep (each path stays covered there)."""
    return params if interpreted() else [params[i] for i in keep]


@pytest.mark.parametrize("scheme", ["w4a16", "w4a16_asym"])
def test_pack_unpack_and_dequantize_are_exact(scheme):
    W = randn(48, 256, seed=1)
    q = quantize(W, scheme)
    w = w4a16.from_quantized(q)
    codes, scales, zeros = w4a16.unpack_int4(w)
    assert torch.equal(codes, q.codes)
    assert torch.equal(scales.float(), q.scales)
    assert (zeros is None) == (q.zero_points is None)
    if zeros is not None:
        assert torch.equal(zeros.long(), q.zero_points.long())
    assert torch.equal(w4a16.dequantize_int4(w, torch.float32), dequantize(q, torch.float32))


def test_layout_is_the_documented_one():
    codes = torch.randint(-8, 8, (3, 256), generator=torch.Generator().manual_seed(2))
    w = w4a16.pack_int4(codes, torch.ones(3, 2), 128)
    words = w.qweight.long() & 0xFFFFFFFF
    for b in range(2):
        for j in range(8):
            for i in (0, 7, 15):
                nib = (words[:, 16 * b + i] >> (4 * j)) & 0xF
                assert torch.equal(nib - 8, codes[:, 128 * b + 16 * j + i])


@pytest.mark.parametrize("scheme,dtype,M", _on_gpu_only([("w4a16", torch.bfloat16, 1),
                                                          ("w4a16_asym", torch.float16, 4),
                                                          ("w4a16", torch.float16, 5),
                                                          ("w4a16_asym", torch.bfloat16, 19),
                                                          ("w4a16_asym", torch.float16, 3)],
                                                         (0, 2, 3)))
def test_matmul_matches_reference(poison, scheme, dtype, M):
    N, K = 80, 384  # N not a multiple of the tile, three 128-blocks of K, split-K in play
    w = w4a16.from_quantized(quantize(randn(N, K, seed=3), scheme))
    x = randn(M, K, seed=4, dtype=dtype)
    out = w4a16.w4a16_matmul(x, w)
    ref = w4a16.w4a16_matmul_ref(x, w)
    assert out.shape == (M, N) and out.dtype == dtype
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) < TOL


def test_split_k_and_group_64_agree_with_reference(poison):
    N, K = 40, 512
    codes = torch.randint(-8, 8, (N, K), generator=torch.Generator().manual_seed(5))
    scales = torch.rand(N, K // 64, generator=torch.Generator().manual_seed(6)) + 0.5
    w = w4a16.pack_int4(codes, scales, 64)
    w = w4a16.Int4Weight(w.qweight.to(DEV), w.scales.to(DEV), None, 64)
    x = randn(2, 3, K, seed=7, dtype=torch.float16)  # leading batch dims are kept
    ref = w4a16.w4a16_matmul_ref(x, w)
    for split in (1, 4):
        out = w4a16.w4a16_matmul(x, w, config=("dot", 16, 32, 128, split, 4, 1))
        assert out.shape == (2, 3, N)
        assert rel_err(out, ref) < TOL
    out = w4a16.w4a16_matmul(x[0, :2], w, config=("gemv", 2, 32, 128, 4, 4, 1))
    assert rel_err(out, ref[0, :2]) < TOL


def _weight(scheme, group, N=40, K=512, seed=20):
    codes = torch.randint(0, 16, (N, K), generator=torch.Generator().manual_seed(seed))
    scales = torch.rand(N, K // group, generator=torch.Generator().manual_seed(seed + 1)) + 0.5
    zp = torch.randint(0, 16, (N, K // group), generator=torch.Generator().manual_seed(seed + 2))
    w = (w4a16.pack_int4(codes - 8, scales, group) if scheme == "w4a16"
         else w4a16.pack_int4(codes, scales, group, zp))
    return w.to(DEV)


@pytest.mark.parametrize("scheme,dtype,M,cfg", [
    ("w4a16", torch.bfloat16, 19, ("mm", 16, 32, 128, 1, 4, 2, 8, 1)),     # odd M, 2 M-tiles
    ("w4a16_asym", torch.float16, 37, ("mm", 32, 32, 256, 2, 4, 2, 2, 0)),  # split-K, x gathered
    ("w4a16_asym", torch.bfloat16, 16, ("mm", 16, 64, 256, 1, 4, 2, 1, 2)),  # x permuted
    ("w4a16", torch.float16, 70, ("mm", 64, 16, 128, 3, 4, 2, 4, 1)),       # uneven split-K
])
def test_mm_path_matches_reference(poison, scheme, dtype, M, cfg):
    N, K = 72, 512  # N not a multiple of the tile
    w = w4a16.from_quantized(quantize(randn(N, K, seed=21), scheme))
    x = randn(M, K, seed=22, dtype=dtype)
    out = w4a16.w4a16_matmul(x, w, config=cfg)
    assert out.shape == (M, N) and out.dtype == dtype and not torch.isnan(out).any()
    assert rel_err(out, w4a16.w4a16_matmul_ref(x, w)) < TOL


def test_mm_path_takes_3d_and_strided_x(poison):
    N, K = 48, 256
    w = w4a16.from_quantized(quantize(randn(N, K, seed=23), "w4a16_asym"))
    x3 = randn(2, 20, K, seed=24, dtype=torch.bfloat16)
    assert w4a16._candidates(40, N, K, 1)[0][0] == ("mm" if interpreted() else "dot")
    out = w4a16.w4a16_matmul(x3, w)  # the interpreter takes the first candidate: "mm"
    assert out.shape == (2, 20, N)
    assert rel_err(out, w4a16.w4a16_matmul_ref(x3, w)) < TOL
    rows = randn(21, K + 64, seed=25, dtype=torch.float16)[:, :K]  # row stride K + 64
    out = w4a16.w4a16_matmul(rows, w, config=("mm", 16, 32, 256, 1, 4, 2, 8, 1))
    assert rel_err(out, w4a16.w4a16_matmul_ref(rows, w)) < TOL


def test_gpu_candidates_follow_the_sweep(monkeypatch):
    """The GPU short lists per M bucket (scripts/sweep_w4a16.py round 2 on an H200): GEMV up to
    M = 4, swap-AB dot up to 64 (one tile from 16), with scales in x's dtype the pairs "mm"
    16 x 128 at M <= 32 and 64 x 128 (x permuted) at 64, else fp32 "mm" 64 x 128 and 64 x 256;
    "mm" 128 x 256 from 65 to 256; dequantize + cuBLAS from 128 (alone from 257)."""
    monkeypatch.setattr(w4a16, "interpreted", lambda: False)
    N, K, sms = 28672, 4096, 132

    def paths(M, pairs=False):
        return [c[0] + ("+pairs" if len(c) > 9 and c[9] else "")
                for c in w4a16._candidates(M, N, K, sms, 128, pairs)]

    assert paths(1) == ["gemv"] * 4 + ["dot"] * 2 and paths(8) == ["dot", "dot"]
    assert paths(16) == ["dot"] and paths(32) == ["dot"]
    assert paths(16, True) == ["dot", "mm+pairs"] and paths(32, True) == ["dot", "mm+pairs"]
    assert paths(64) == ["dot", "mm", "mm"] and paths(64, True) == ["dot", "mm+pairs"]
    assert [c[1:4] + c[5:] for c in w4a16._candidates(64, N, K, sms, 128, True)][1] == (
        64, 128, 128, 4, 4, 8, 2, 1)
    assert paths(128) == ["mm", "dequant"] and paths(256, True) == ["mm+pairs", "dequant"]
    assert ("mm", 128, 256, 128, 2, 8, 3, 8, 1) in w4a16._candidates(128, N, K, sms)
    assert paths(512) == ["dequant"] and paths(4096, True) == ["dequant"]
    assert all(len(c) == 7 for c in w4a16._candidates(3, N, K, sms, 129))  # fp4_gemm's list


@pytest.mark.parametrize("scheme,group,dtype", _on_gpu_only([("w4a16", 128, torch.float16),
                                                             ("w4a16_asym", 64, torch.float16),
                                                             ("w4a16_asym", 256, torch.float16),
                                                             ("w4a16", 16, torch.bfloat16),
                                                             ("w4a16_asym", 128, torch.bfloat16)],
                                                            (2, 3)))
def test_mm_pairs_weights_are_bit_exact(poison, scheme, group, dtype):
    """Scales in x's dtype: the "mm" path dequantizes two weights per 32-bit operation (inline
    PTX on the GPU, its plain-Triton twin in the interpreter); with x = I the output is the
    kernel's weight tile, which must equal dequantize_int4's bit for bit (bf16 is only compared
    on the GPU: the interpreter truncates fp32 -> bf16)."""
    w = _weight(scheme, group, N=40, K=256)
    w = w4a16.Int4Weight(w.qweight, w.scales.to(dtype), w.zeros, group)
    eye = torch.eye(256, dtype=dtype, device=DEV)
    ref = w4a16.dequantize_int4(w, dtype)
    for order, bk in ((0, 128), (1, 256), (2, 256)):
        out = w4a16.w4a16_matmul(eye, w, config=("mm", 64, 32, bk, 1, 4, 2, 2, order, 1))
        if dtype == torch.float16 or not interpreted():
            assert torch.equal(out.t(), ref), (order, bk)
        else:
            assert rel_err(out.t(), ref) < TOL
    assert not w4a16._ASM_FAILED


def test_pack_with_scales_in_the_activation_dtype(poison):
    N, K = 72, 512
    q = quantize(randn(N, K, seed=28), "w4a16_asym")
    wb = w4a16.from_quantized(q, scale_dtype=torch.bfloat16)
    assert wb.scales.dtype == torch.bfloat16
    assert w4a16.from_quantized(q).scales.dtype == torch.float16
    with pytest.raises(ValueError, match="scale_dtype"):
        w4a16.from_quantized(q, scale_dtype=torch.float32)
    x = randn(37, K, seed=29, dtype=torch.bfloat16)
    out = w4a16.w4a16_matmul(x, wb, config=("mm", 32, 32, 256, 2, 4, 2, 2, 1, 1))  # split-K
    assert rel_err(out, w4a16.w4a16_matmul_ref(x, wb)) < TOL
    xh = randn(37, K, seed=30, dtype=torch.float16)  # scales bf16, x fp16: the fp32 dequant
    out = w4a16.w4a16_matmul(xh, wb, config=("mm", 32, 32, 256, 1, 4, 2, 2, 1, 1))
    assert rel_err(out, w4a16.w4a16_matmul_ref(xh, wb)) < TOL


@pytest.mark.parametrize("scheme,group", _on_gpu_only([("w4a16", 128), ("w4a16_asym", 128),
                                                        ("w4a16", 16), ("w4a16_asym", 64),
                                                        ("w4a16_asym", 256)], (3,)))
def test_mm_path_weights_are_bit_exact(poison, scheme, group):
    """x = I makes the output the kernel's dequantized weights (each sum has one nonzero term):
    they must equal dequantize_int4's, bit for bit, in every k order and block depth (fp16 in
    the interpreter, which truncates fp32 -> bf16; bf16 as well on the GPU)."""
    w = _weight(scheme, group, N=40, K=512)
    dtypes = (torch.float16,) if interpreted() else (torch.float16, torch.bfloat16)
    for dtype in dtypes:
        eye = torch.eye(512, dtype=dtype, device=DEV)
        for order, bk in ((0, 128), (1, 256), (2, 256)):
            out = w4a16.w4a16_matmul(eye, w, config=("mm", 64, 32, bk, 1, 4, 2, 2, order))
            assert torch.equal(out.t(), w4a16.dequantize_int4(w, dtype)), (dtype, order, bk)


@pytest.mark.parametrize("scheme,group,dtype", _on_gpu_only([("w4a16", 256, torch.bfloat16),
                                                              ("w4a16_asym", 32, torch.float16),
                                                              ("w4a16", 16, torch.bfloat16)],
                                                             (0, 1)))
def test_gemv_path_handles_groups_across_and_within_blocks(poison, scheme, group, dtype):
    N, K = 72, 512
    codes = torch.randint(0, 16, (N, K), generator=torch.Generator().manual_seed(14))
    scales = torch.rand(N, K // group, generator=torch.Generator().manual_seed(15)) + 0.5
    zp = torch.randint(0, 16, (N, K // group), generator=torch.Generator().manual_seed(16))
    w = (w4a16.pack_int4(codes - 8, scales, group) if scheme == "w4a16"
         else w4a16.pack_int4(codes, scales, group, zp))
    w = w.to(DEV)
    x = randn(3, K, seed=17, dtype=dtype)
    # flags: prefetch (1), nibble pairs (2); the GPU runs the two the candidates use
    for split, flags in ((1, 0), (2, 1), (1, 2), (2, 3)) if interpreted() else ((2, 1), (2, 3)):
        out = w4a16.w4a16_matmul(x, w, config=("gemv", 1, 32, 128, split, 4, flags))
        assert rel_err(out, w4a16.w4a16_matmul_ref(x, w)) < TOL


@pytest.mark.parametrize("scheme", ["w4a16", "w4a16_asym"])
def test_triton_dequantize_is_bit_exact_and_feeds_the_large_m_path(poison, scheme):
    w = w4a16.from_quantized(quantize(randn(40, 256, seed=12), scheme))
    if not interpreted():  # the interpreter truncates fp32 -> bf16, so compare exactly on fp16
        assert torch.equal(w4a16.dequantize_int4_triton(w, torch.bfloat16),
                           w4a16.dequantize_int4(w, torch.bfloat16))
    assert torch.equal(w4a16.dequantize_int4_triton(w, torch.float16),
                       w4a16.dequantize_int4(w, torch.float16))
    x = randn(3, 256, seed=13, dtype=torch.float16)
    out = w4a16.w4a16_matmul(x, w, config=("dequant",))
    assert rel_err(out, w4a16.w4a16_matmul_ref(x, w)) < TOL


def test_bad_input_raises_with_advice():
    w = w4a16.from_quantized(quantize(randn(32, 256, seed=8), "w4a16"))
    x = randn(2, 256, seed=9, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="expected one of"):
        w4a16.w4a16_matmul(x.float(), w)
    with pytest.raises(ValueError, match="K=128"):
        w4a16.w4a16_matmul(x[:, :128], w)
    with pytest.raises(ValueError, match="contiguous"):
        w4a16.w4a16_matmul(randn(256, 2, seed=9, dtype=torch.bfloat16).t(), w)
    with pytest.raises(ValueError, match="pad K to 256"):
        w4a16.pack_int4(torch.zeros(4, 200, dtype=torch.int8), torch.ones(4, 2), 100 - 36)
    with pytest.raises(ValueError, match="multiple of 16"):
        w4a16.pack_int4(torch.zeros(4, 384, dtype=torch.int8), torch.ones(4, 8), 48)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        w4a16.pack_int4(torch.full((4, 128), 9), torch.ones(4, 1), 128)


def test_bad_weight_tensors_raise_with_the_expected_shape():
    w = w4a16.from_quantized(quantize(randn(32, 256, seed=26), "w4a16_asym"))
    x = randn(2, 256, seed=27, dtype=torch.bfloat16)

    def run(**kw):
        parts = {"qweight": w.qweight, "scales": w.scales, "zeros": w.zeros,
                 "group_size": w.group_size} | kw
        w4a16.w4a16_matmul(x, w4a16.Int4Weight(**parts))

    with pytest.raises(ValueError, match=r"w.scales has shape \(1, 32\), expected \(2, 32\)"):
        run(scales=w.scales[:1])  # too few scale groups: would read past the tensor
    with pytest.raises(ValueError, match=r"expected \(2, 32\)"):
        run(scales=w.scales.t().contiguous())  # (N, K // g), the pre-packing orientation
    with pytest.raises(ValueError, match=r"w.scales has shape \(2, 32\), expected \(4, 32\)"):
        run(group_size=64)  # scales of group 128 read as group 64
    with pytest.raises(TypeError, match="w.scales has dtype float32"):
        run(scales=w.scales.float())
    with pytest.raises(ValueError, match=r"w.zeros has shape \(2, 16\), expected \(2, 32\)"):
        run(zeros=w.zeros[:, :16].contiguous())
    with pytest.raises(TypeError, match="w.zeros has dtype int32"):
        run(zeros=w.zeros.to(torch.int32))
    with pytest.raises(ValueError, match="w.scales .* is not contiguous"):
        run(scales=w.scales.t().contiguous().t())  # the right values, column-major
    with pytest.raises(ValueError, match="w.zeros .* is not contiguous"):
        run(zeros=w.zeros.t().contiguous().t())
    with pytest.raises(ValueError, match="w.qweight must be 2-D"):
        run(qweight=w.qweight.reshape(2, 16, 32))


def test_no_gpu_and_no_interpreter_names_the_reference(monkeypatch):
    w = w4a16.from_quantized(quantize(randn(32, 128, seed=10), "w4a16"))
    x = randn(1, 128, seed=11, dtype=torch.bfloat16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="w4a16_matmul_ref"):
        w4a16.w4a16_matmul(x.cpu(), w4a16.Int4Weight(w.qweight.cpu(), w.scales.cpu(), None, 128))
