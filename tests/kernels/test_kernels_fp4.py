"""MXFP4 / NVFP4 dequant GEMM: exact packing, matmul against the dequantized reference."""

import pytest
import torch

from quantlab.kernels.testing import DEV, randn, rel_err  # noqa: I001  (sets TRITON_INTERPRET)

pytest.importorskip("triton")
from quantlab import dequantize, quantize  # noqa: E402
from quantlab.kernels import fp4_gemm  # noqa: E402
from quantlab.kernels._runtime import interpreted  # noqa: E402

TOL = 1e-2 if interpreted() else 3e-3


@pytest.mark.parametrize("kind", ["mxfp4", "nvfp4"])
def test_packed_weight_dequantizes_exactly(kind):
    W = randn(48, 256, seed=1, std=3.0)
    W[0, :32] = 0  # an all-zero block: E8M0 scale 2**-127, E4M3 scale 0
    q = quantize(W.cpu(), kind)  # the reference runs on the CPU
    w = fp4_gemm.pack_fp4(q)
    assert torch.equal(fp4_gemm.dequantize_fp4(w, torch.float32), dequantize(q, torch.float32))
    assert torch.equal(fp4_gemm.dequantize_fp4(w.to(DEV)).cpu(), dequantize(q, torch.bfloat16))


@pytest.mark.parametrize("kind,dtype,M", [("mxfp4", torch.bfloat16, 1),
                                          ("mxfp4", torch.float16, 7),
                                          ("nvfp4", torch.bfloat16, 3),
                                          ("nvfp4", torch.float16, 1)])
def test_matmul_matches_reference(poison, kind, dtype, M):
    w = fp4_gemm.pack_fp4(quantize(randn(72, 256, seed=2).cpu(), kind)).to(DEV)
    x = randn(M, 256, seed=3, dtype=dtype)
    out = fp4_gemm.fp4_matmul(x, w)
    ref = fp4_gemm.fp4_matmul_ref(x, w)
    assert out.shape == (M, 72) and not torch.isnan(out).any()
    assert rel_err(out, ref) < TOL


def test_bad_input_raises_with_advice():
    with pytest.raises(ValueError, match="MXFP4 or NVFP4"):
        fp4_gemm.pack_fp4(quantize(randn(8, 128, seed=4), "w4a16"))
    with pytest.raises(ValueError, match="pad K to 256"):
        fp4_gemm.pack_fp4(quantize(randn(8, 160, seed=4).cpu(), "mxfp4"))
    w = fp4_gemm.pack_fp4(quantize(randn(8, 128, seed=5).cpu(), "mxfp4")).to(DEV)
    with pytest.raises(TypeError, match="expected one of"):
        fp4_gemm.fp4_matmul(randn(1, 128, seed=6), w)
