"""Triton kernels, each beside the plain-torch reference it must match.

    w4a16      int4 weights (per-group scales, sym/asym) x bf16/fp16 activations
    fp8_gemm   FP8 W8A8 GEMM with per-tensor, per-token x per-channel, or 128-block scales
    fp4_gemm   MXFP4 / NVFP4 weights decoded to 16-bit in registers, then tensor cores
    quantize   fp8 / int8 per token, MXFP8 / MXFP4 / NVFP4 blocks (bit-exact with quantlab.quantize)

They run on a CUDA GPU, or on the CPU under TRITON_INTERPRET=1 (set before this import). Import
the submodule you need: importing this package loads no Triton code.
"""

__all__ = ["fp4_gemm", "fp8_gemm", "quantize", "w4a16"]
