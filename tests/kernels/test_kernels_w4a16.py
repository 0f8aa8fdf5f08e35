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


@pytest.mark.parametrize("scheme,dtype,M", [("w4a16", torch.bfloat16, 1),
                                            ("w4a16_asym", torch.float16, 4),
                                            ("w4a16", torch.float16, 5),
                                            ("w4a16_asym", torch.bfloat16, 19),
                                            ("w4a16_asym", torch.float16, 3)])
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


@pytest.mark.parametrize("scheme,group,dtype", [("w4a16", 256, torch.bfloat16),
                                                 ("w4a16_asym", 32, torch.float16),
                                                 ("w4a16", 16, torch.bfloat16)])
def test_gemv_path_handles_groups_across_and_within_blocks(poison, scheme, group, dtype):
    N, K = 72, 512
    codes = torch.randint(0, 16, (N, K), generator=torch.Generator().manual_seed(14))
    scales = torch.rand(N, K // group, generator=torch.Generator().manual_seed(15)) + 0.5
    zp = torch.randint(0, 16, (N, K // group), generator=torch.Generator().manual_seed(16))
    w = (w4a16.pack_int4(codes - 8, scales, group) if scheme == "w4a16"
         else w4a16.pack_int4(codes, scales, group, zp))
    w = w.to(DEV)
    x = randn(3, K, seed=17, dtype=dtype)
    for split, flags in ((1, 0), (2, 1), (1, 2), (2, 3)):  # flags: prefetch (1), nibble pairs (2)
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


def test_no_gpu_and_no_interpreter_names_the_reference(monkeypatch):
    w = w4a16.from_quantized(quantize(randn(32, 128, seed=10), "w4a16"))
    x = randn(1, 128, seed=11, dtype=torch.bfloat16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="w4a16_matmul_ref"):
        w4a16.w4a16_matmul(x.cpu(), w4a16.Int4Weight(w.qweight.cpu(), w.scales.cpu(), None, 128))
