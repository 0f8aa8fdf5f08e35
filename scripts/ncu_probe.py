"""One launch of one of our kernels between cudaProfilerStart/Stop, for Nsight Compute.

    ncu --clock-control none --profile-from-start off --set full --csv \
        python scripts/ncu_probe.py w4a16 --model 8b --layer gate_up --M 1

The config is picked first (the autotuning launches happen outside the profiled range), then the
picked config is launched once inside it, so ncu sees exactly the kernel the benchmark times.
Kinds: w4a16 (symmetric, g = 128), w4a16_asym, fp8_row, fp8_tensor, fp8_block (GEMMs of
--model/--layer at --M rows); quant_int8, quant_nvfp4 (the per-token int8 and NVFP4 quantize of
a bf16 (--M, --K) input; the NVFP4 global scale is computed outside the profiled range);
kv_int8, kv_fp8, kv_bf16 (decode attention, Llama-3-8B heads, batch --M, context --K). Needs a
CUDA GPU.
"""

from __future__ import annotations

import argparse

import torch


def main(argv=None) -> None:
    from quantlab import quantize
    from quantlab.kernels import fp8_gemm, w4a16
    from quantlab.kernels.bench import SHAPES
    from quantlab.kernels.quantize import quantize_per_token

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=("w4a16", "w4a16_asym", "fp8_row", "fp8_tensor", "fp8_block",
                                     "quant_int8", "quant_nvfp4", "kv_int8", "kv_fp8", "kv_bf16"))
    ap.add_argument("--model", default="8b", choices=sorted(SHAPES))
    ap.add_argument("--layer", default="gate_up")
    ap.add_argument("--M", type=int, default=1)
    ap.add_argument("--K", type=int, default=8192, help="quant_*: columns; kv_*: context")
    a = ap.parse_args(argv)
    N, K = {n: (N, K) for n, N, K in SHAPES[a.model]}[a.layer]
    torch.manual_seed(0)
    if a.kind.startswith(("quant", "kv")):
        return _profile(_quant_or_kv(a), f"{a.kind} M={a.M} K={a.K}")
    W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(a.M, K, device="cuda", dtype=torch.bfloat16)
    if a.kind.startswith("w4a16"):
        w = w4a16.from_quantized(quantize(W, "w4a16" if a.kind == "w4a16" else "w4a16_asym"))
        w4a16.w4a16_matmul(x, w)  # picks the config
        cfg = w4a16._PICKED_CONFIG(a.M, N, K, w, x.dtype)
        run = lambda: w4a16._launch(x, w, cfg)  # noqa: E731
    else:
        kind = a.kind.split("_")[1]
        scheme = {"row": "fp8_dynamic", "tensor": "fp8_per_tensor", "block": "fp8_block"}[kind]
        q = quantize(W, scheme)
        wq = q.codes.view(torch.float8_e4m3fn)
        ws = q.scales.float().reshape((1, 1) if kind == "tensor" else q.scales.shape)
        if kind == "row":
            xq_t = quantize_per_token(x)
            xq, xs = xq_t.codes.view(torch.float8_e4m3fn), xq_t.scales
        elif kind == "tensor":
            xs = x.float().abs().amax().reshape(1, 1) / 448
            xq = (x.float() / xs).to(torch.float8_e4m3fn)
        else:
            xg = x.float().reshape(a.M, K // 128, 128)
            xs = (xg.abs().amax(-1) / 448).clamp_min(1e-12)
            xq = (xg / xs[..., None]).reshape(a.M, K).to(torch.float8_e4m3fn)
        cfg = None
        run = lambda: fp8_gemm.fp8_matmul(xq, xs, wq, ws)  # noqa: E731
    _profile(run, f"{a.kind} {a.model} {a.layer} N={N} K={K} M={a.M} config={cfg}")


def _quant_or_kv(a):
    """The launch to profile for the quant_* and kv_* kinds (configs picked on the first call)."""
    from quantlab.kernels.quantize import nvfp4_global_scale, quantize_blocks, quantize_per_token
    from quantlab.kv.attention import decode_attention
    from quantlab.kv.bench import make_cache

    if a.kind.startswith("quant"):
        x = torch.randn(a.M, a.K, device="cuda", dtype=torch.bfloat16)
        if a.kind == "quant_int8":
            return lambda: quantize_per_token(x, "int8")
        glob = nvfp4_global_scale(x)
        return lambda: quantize_blocks(x, "nvfp4", global_scale=glob)
    q, k, v, ks, vs = make_cache(a.kind[3:], a.M, a.K)
    return lambda: decode_attention(q, k, v, ks, vs)


def _profile(run, what: str) -> None:
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    print(what, flush=True)
    torch.cuda.profiler.start()
    run()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
