"""Kernel benchmark: ours against the peers on Llama-3 linear shapes, with the roofline floor.

    python -m quantlab.kernels.bench [--models 8b,70b] [--layers gate_up,...] [--M 1,4,16]
                             [--kernels w4a16,fp8,...] [--out PATH]

Needs a CUDA GPU. For every (shape, M) it times, with triton.testing.do_bench (median; do_bench
clears the L2 cache before every timed call, so weights are read from DRAM even when they would
fit in L2): cuBLAS bf16 (F.linear), our W4A16 kernel (symmetric and asymmetric, g = 128; the
symmetric one also with its scales in bf16, x's dtype, as vLLM holds them: ours_w4a16_bf16s),
torch.ops.aten._weight_int4pack_mm (tinygemm), vLLM's Marlin (gptq_marlin, built from source by
scripts/peers/marlin_peer.py when .peers/ holds it), our FP8 GEMM and torch._scaled_mm with the same
scale granularity (tensor, row, 128-block), our MXFP4/NVFP4 dequant GEMMs, gemlite when it is
installed; then the quantize kernels. floor_ms = bytes moved (each input read once, output
written once) / measured copy bandwidth; compute_ms = 2MNK / measured matmul rate. Rows go to
data/bench/kernels-<device>.json with a header {device, torch, triton, date, bandwidth}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from quantlab.kernels._runtime import _graphed

SHAPES = {  # (name, N, K) of the fused linear layers vLLM runs
    "8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)],
    "70b": [("qkv", 10240, 8192), ("o", 8192, 8192), ("gate_up", 57344, 8192),
            ("down", 8192, 28672)],
}
MS = (1, 4, 16, 64, 256, 1024, 4096)
KERNELS = ("bf16", "w4a16", "int4pack", "fp8", "fp4", "gemlite", "marlin", "quant")


def bench(fn, rep: int = 25) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=5, rep=rep, return_mode="median"))


def graphed(fn):
    """fn captured in a CUDA graph (as vLLM serves decode), so host launch overhead (tens of us
    for a Triton launch from Python) does not hide the GPU time of microsecond kernels. Every
    kernel, ours and the peers', is timed this way; None if capture fails (timed eagerly)."""
    g = _graphed(fn)
    return None if g is fn else g


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting bytes read plus bytes written."""
    a = torch.empty(2**29, dtype=torch.float16, device="cuda")
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a), rep=200)
    return 2 * a.numel() * a.element_size() / (ms * 1e-3)


def matmul_rate(dtype) -> float:
    """FLOP/s of an 8192^3 product: cuBLAS bf16, or torch._scaled_mm for fp8 (per tensor)."""
    n = 8192
    a = torch.randn(n, n, device="cuda").to(dtype)
    b = torch.randn(n, n, device="cuda").to(dtype)
    if dtype == torch.bfloat16:
        ms = bench(lambda: a @ b, rep=200)
    else:
        one = torch.ones((), device="cuda")
        ms = bench(lambda: torch._scaled_mm(a, b.t(), one, one, out_dtype=torch.bfloat16), rep=200)
    return 2 * n**3 / (ms * 1e-3)


def rel_err(out, ref) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


class Sweep:
    def __init__(self, bw, peak_bf16, peak_fp8):
        self.bw, self.peak = bw, {"bf16": peak_bf16, "fp8": peak_fp8}
        self.rows = []

    def add(self, kernel, M, N, K, fn, nbytes, peak="bf16", ref=None, **extra):
        row = {"kernel": kernel, "M": M, "N": N, "K": K, **extra}
        try:
            out = fn()
            if ref is not None:
                row["rel_err"] = round(rel_err(out, ref), 6)
            replay = graphed(fn)
            row["graph"] = replay is not None
            row["ms"] = round(bench(replay or fn), 5)
        except Exception as e:  # a peer that refuses a shape is a result worth keeping
            row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        row["bytes"] = int(nbytes)
        row["floor_ms"] = round(nbytes / self.bw * 1e3, 5)
        row["compute_ms"] = round(2 * M * N * K / self.peak[peak] * 1e3, 5)
        if "ms" in row:
            row["floor_frac"] = round(max(row["floor_ms"], row["compute_ms"]) / row["ms"], 4)
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return row


def int4pack_peer(w_codes, scales, g):
    """torch's tinygemm: nibbles q = code + 8, even k in the high nibble; (K/g, N, 2) scale/zero
    with w = (q - 8) * scale + zero."""
    q = (w_codes.to(torch.int32) + 8)
    packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    wp = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
    sz = torch.stack([scales.t(), torch.zeros_like(scales.t())], -1).to(torch.bfloat16).contiguous()
    return lambda x: torch.ops.aten._weight_int4pack_mm(x, wp, g, sz)


def gemlite_peer(w_codes, scales, g):
    """gemlite's A16W4 Triton kernels (GEMV / split-K GEMM / GEMM picked by M, its own tuned
    configs): unsigned nibbles q = code + 8 with zero point 8, w = (q - 8) * scale. gemlite wants
    scales in the activation dtype, so our fp16 scales are rounded to bf16 (rel_err shows it)."""
    from gemlite.helper import A16Wn

    q = (w_codes.to(torch.int16) + 8).to(torch.uint8)
    s = scales.to(torch.bfloat16)
    layer = A16Wn(device=str(w_codes.device), dtype=torch.bfloat16).from_weights(
        q, s, torch.full_like(s, 8), W_nbits=4, group_size=g)
    return lambda x: layer(x)


def _marlin_module():
    """scripts/peers/marlin_peer.py, imported by path (scripts/ is not a package)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[2] / "scripts" / "peers" / "marlin_peer.py"
    if "quantlab_marlin_peer_py" not in sys.modules:
        spec = importlib.util.spec_from_file_location("quantlab_marlin_peer_py", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules["quantlab_marlin_peer_py"] = mod
    return sys.modules["quantlab_marlin_peer_py"]


def marlin_peer(w_codes, scales, g):
    """vLLM's gptq_marlin GEMM (uint4b8 weights, i.e. code + 8 with the 8 subtracted in the
    kernel; fp32 global reduce as vLLM runs it on Hopper), from the peer build in
    scripts/peers/. Its scales are read in the activation dtype, so ours are rounded to bf16
    (rel_err shows it)."""
    if g != 128:
        raise ValueError("the Marlin peer is built for group size 128 only")
    mp = _marlin_module()
    packed = mp.pack(w_codes, scales)
    return lambda x: mp.matmul(x, packed)


def scaled_mm_peer(xq, xs, wq, ws, kind):
    """torch._scaled_mm with the same granularity; rows padded to 16 (cuBLAS needs it)."""
    M = xq.shape[0]
    pad = (-M) % 16
    if pad:
        xq = torch.cat([xq, xq.new_zeros(pad, xq.shape[1])])
        xs = torch.cat([xs, xs.new_ones(pad, xs.shape[1])]) if kind != "tensor" else xs
    if kind == "tensor":
        sa, sb = xs.reshape(()), ws.reshape(())
    elif kind == "row":
        sa, sb = xs.contiguous(), ws.reshape(1, -1).contiguous()
    else:  # cuBLAS blockwise: 1x128 activations, 128x128 weights, through the recipe API
        from torch.nn.functional import ScalingType, scaled_mm

        names = ScalingType.__members__
        r1 = names.get("BlockWise1x128") or names["Blockwise_1x128"]
        r128 = names.get("BlockWise128x128") or names["Blockwise_128x128"]
        sa, sb = xs.t().contiguous().t(), ws.t()  # both outer-dim-major, as cuBLAS wants
        return lambda: scaled_mm(xq, wq.t(), sa, r1, sb, r128, output_dtype=torch.bfloat16)[:M]
    return lambda: torch._scaled_mm(xq, wq.t(), sa, sb, out_dtype=torch.bfloat16)[:M]


def gemm_sweep(sw: Sweep, models, Ms, kernels, save=lambda: None, layers=None):
    from quantlab import quantize
    from quantlab.kernels import fp4_gemm, fp8_gemm, w4a16
    from quantlab.kernels.quantize import quantize_blocks, quantize_per_token

    if "gemlite" in kernels:
        try:
            import gemlite  # noqa: F401
        except ImportError:
            print("gemlite not installed: skipped")
            kernels = [k for k in kernels if k != "gemlite"]
    if "marlin" in kernels:
        print("marlin peer: building (first build on a machine compiles CUDA, ~1-2 min)",
              flush=True)
        try:
            _marlin_module().build()
        except Exception as e:  # no .peers/ sources, no nvcc, a compile error ...
            print(f"marlin peer not available ({type(e).__name__}: {str(e)[-300:]}): skipped")
            kernels = [k for k in kernels if k != "marlin"]
    for model in models:
        for name, N, K in SHAPES[model]:
            if layers and name not in layers:
                continue
            torch.manual_seed(0)
            W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
            prep = {}
            if {"w4a16", "int4pack", "gemlite", "marlin"} & set(kernels):
                q = quantize(W, "w4a16")
                prep["w4"] = w4a16.from_quantized(q)
                prep["w4_ref"] = w4a16.dequantize_int4(prep["w4"])
                # scales in x's dtype, as vLLM holds them (the 16-bit "pairs" dequant path)
                prep["w4b"] = w4a16.from_quantized(q, scale_dtype=torch.bfloat16)
                prep["w4b_ref"] = w4a16.dequantize_int4(prep["w4b"])
                prep["w4a"] = w4a16.from_quantized(quantize(W, "w4a16_asym"))
                prep["w4a_ref"] = w4a16.dequantize_int4(prep["w4a"])
                if "int4pack" in kernels:
                    prep["tiny"] = int4pack_peer(q.codes, q.scales, 128)
                if "gemlite" in kernels:
                    prep["gemlite"] = gemlite_peer(q.codes, q.scales, 128)
                if "marlin" in kernels:
                    try:
                        prep["marlin"] = marlin_peer(q.codes, q.scales, 128)
                    except Exception as e:
                        prep["marlin"] = e
                del q
            if "fp8" in kernels:
                wq_t = quantize(W, "fp8_per_tensor")
                wq_r = quantize(W, "fp8_dynamic")
                wq_b = quantize(W, "fp8_block")
                prep["fp8"] = {k: (q.codes.view(torch.float8_e4m3fn), q.scales.float().reshape(
                    (1, 1) if k == "tensor" else q.scales.shape))
                               for k, q in (("tensor", wq_t), ("row", wq_r), ("block", wq_b))}
            if "fp4" in kernels:
                # our bit-exact quantize kernel (the reference's minifloat tables live on the CPU)
                prep["fp4"] = {k: fp4_gemm.pack_fp4(quantize_blocks(W, k))
                               for k in ("mxfp4", "nvfp4")}
            for M in Ms:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                io = (M * K + M * N) * 2
                tag = {"model": model, "layer": name}
                if "bf16" in kernels:
                    sw.add("cublas_bf16", M, N, K, partial(F.linear, x, W), N * K * 2 + io, **tag)
                if "w4a16" in kernels:
                    for kname, w, wr in (("ours_w4a16", prep["w4"], prep["w4_ref"]),
                                         ("ours_w4a16_bf16s", prep["w4b"], prep["w4b_ref"]),
                                         ("ours_w4a16_asym", prep["w4a"], prep["w4a_ref"])):
                        row = sw.add(kname, M, N, K, partial(w4a16.w4a16_matmul, x, w),
                                     w.nbytes + io, ref=F.linear(x, wr), **tag)
                        row["config"] = str(w4a16._PICKED_CONFIG(M, N, K, w, x.dtype))
                if "int4pack" in kernels:
                    r4 = F.linear(x, prep["w4_ref"])
                    sw.add("aten_int4pack", M, N, K, partial(prep["tiny"], x),
                           prep["w4"].nbytes + io, ref=r4, **tag)
                if "gemlite" in kernels:
                    sw.add("gemlite_w4a16", M, N, K, partial(prep["gemlite"], x),
                           prep["w4"].nbytes + io, ref=F.linear(x, prep["w4_ref"]), **tag)
                if "marlin" in kernels:
                    mfn = prep["marlin"]
                    if isinstance(mfn, Exception):  # pack failed: the row says why
                        def mfn(x, e=mfn):
                            raise e
                    sw.add("marlin_w4a16", M, N, K, partial(mfn, x),
                           prep["w4"].nbytes + io, ref=F.linear(x, prep["w4_ref"]), **tag)
                if "fp8" in kernels:
                    for kind, (wq, ws) in prep["fp8"].items():
                        if kind == "tensor":
                            xs = x.float().abs().amax().reshape(1, 1) / 448
                            xq = (x.float() / xs).to(torch.float8_e4m3fn)
                        elif kind == "row":
                            xqt = quantize_per_token(x)
                            xq, xs = xqt.codes.view(torch.float8_e4m3fn), xqt.scales
                        else:
                            xg = x.float().reshape(M, K // 128, 128)
                            xs = (xg.abs().amax(-1) / 448).clamp_min(1e-12)
                            xq = (xg / xs[..., None]).reshape(M, K).to(torch.float8_e4m3fn)
                        nb = N * K + M * K + M * N * 2 + 4 * (ws.numel() + xs.numel())
                        rf = fp8_gemm.fp8_matmul_ref(xq, xs, wq, ws)
                        sw.add(f"ours_fp8_{kind}", M, N, K,
                               partial(fp8_gemm.fp8_matmul, xq, xs, wq, ws),
                               nb, peak="fp8", ref=rf, **tag)
                        sw.add(f"scaled_mm_{kind}", M, N, K, scaled_mm_peer(xq, xs, wq, ws, kind),
                               nb, peak="fp8", ref=rf, **tag)
                if "fp4" in kernels:
                    for kind, w in prep["fp4"].items():
                        rf = fp4_gemm.fp4_matmul_ref(x, w) if M <= 16 else None
                        sw.add(f"ours_{kind}", M, N, K, partial(fp4_gemm.fp4_matmul, x, w),
                               w.nbytes + io, ref=rf, **tag)
            del prep, W
            torch.cuda.empty_cache()
            save()


def quant_sweep(sw: Sweep):
    """Quantize kernels: bytes = input read + codes and scales written."""
    from quantlab.kernels.quantize import nvfp4_global_scale, quantize_blocks, quantize_per_token

    for R, K in ((4096, 4096), (8192, 8192), (16384, 8192)):
        x = torch.randn(R, K, device="cuda", dtype=torch.bfloat16)
        g = nvfp4_global_scale(x)
        base = R * K * 2
        sw.add("quant_fp8_per_token", R, 1, K, lambda x=x: quantize_per_token(x, "e4m3").codes,
               base + R * K + 4 * R, peak="fp8")
        sw.add("quant_int8_per_token", R, 1, K, lambda x=x: quantize_per_token(x, "int8").codes,
               base + R * K + 4 * R, peak="fp8")
        for kind, B in (("mxfp8", 32), ("mxfp4", 32), ("nvfp4", 16)):
            sw.add(f"quant_{kind}", R, 1, K,
                   lambda x=x, kind=kind, g=g: quantize_blocks(x, kind, g).codes,
                   base + R * K + 4 * R * K // B, peak="fp8")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="8b,70b")
    ap.add_argument("--layers", default="", help="e.g. gate_up,down (default: all)")
    ap.add_argument("--M", default=",".join(map(str, MS)))
    ap.add_argument("--kernels", default=",".join(KERNELS))
    ap.add_argument("--out", default=None,
                    help="JSON path (default data/bench/kernels-<device>.json)")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="join runs of one device (e.g. --models 8b and --models 70b made in "
                         "separate sessions) into --out; no GPU needed")
    a = ap.parse_args(argv)
    if a.merge:
        if not a.out:
            raise SystemExit("--merge needs --out")
        Path(a.out).write_text(json.dumps(merge_runs([json.loads(Path(p).read_text())
                                                      for p in a.merge]), indent=1) + "\n")
        return
    if not torch.cuda.is_available():
        raise SystemExit("quantlab.kernels.bench needs a CUDA GPU; the kernels' correctness "
                         "tests run on the CPU (pytest tests/kernels)")
    import triton

    kernels = a.kernels.split(",")
    bw = copy_bandwidth()
    peak_bf16, peak_fp8 = matmul_rate(torch.bfloat16), matmul_rate(torch.float8_e4m3fn)
    dev = torch.cuda.get_device_name()
    header = {"device": dev, "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.date.today().isoformat(), "bandwidth": round(bw / 1e9, 1),
              "bandwidth_unit": "GB/s, device copy, read + written",
              "bf16_tflops": round(peak_bf16 / 1e12, 1), "fp8_tflops": round(peak_fp8 / 1e12, 1),
              "timing": "triton.testing.do_bench median of CUDA-graph replays, L2 cleared "
                        "before each call"}
    print(json.dumps(header), flush=True)
    sw = Sweep(bw, peak_bf16, peak_fp8)
    out = Path(a.out or f"data/bench/kernels-{slug(dev)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every shape, so a run cut short still leaves its rows
        out.write_text(json.dumps({"header": header, "rows": sw.rows}, indent=1) + "\n")

    if "quant" in kernels:
        quant_sweep(sw)
    gemm_kernels = [k for k in kernels if k != "quant"]
    if gemm_kernels:
        gemm_sweep(sw, a.models.split(","), [int(m) for m in a.M.split(",")], gemm_kernels, save,
                   [n for n in a.layers.split(",") if n])
    save()
    summarize(sw.rows)


def merge_runs(runs: list[dict]) -> dict:
    """Runs ({header, rows}) of one device and software -> one {header, rows}: the first header,
    every run's header under header["runs"]; each row keeps the floor_ms of its own run's
    bandwidth and says which run it came from ("run": index). A later run's row replaces an
    earlier one of the same kernel, shape and layer (a rerun after a fix)."""
    keys = ("device", "torch", "triton")
    first = runs[0]["header"]
    for r in runs[1:]:
        if any(r["header"][k] != first[k] for k in keys):
            raise ValueError(f"runs differ in {keys}: {first} vs {r['header']}")
    header = {**first, "runs": [r["header"] for r in runs]}
    rows = {}
    for i, r in enumerate(runs):
        for row in r["rows"]:
            key = tuple(row.get(k) for k in ("kernel", "M", "N", "K", "model", "layer"))
            rows.pop(key, None)  # the replacement goes last, in its own run's order
            rows[key] = {**row, "run": i}
    return {"header": header, "rows": list(rows.values())}


def summarize(rows):
    """Short table: ours / peer time ratios and floor fractions per (shape, M)."""
    by = {}
    for r in rows:
        if "ms" in r:
            by.setdefault((r.get("model", "-"), r.get("layer", "q"), r["M"], r["N"], r["K"]), {})[
                r["kernel"]] = r
    pairs = [("ours_w4a16", "cublas_bf16"), ("ours_w4a16", "aten_int4pack"),
             ("ours_fp8_row", "scaled_mm_row"), ("ours_fp8_block", "scaled_mm_block"),
             ("ours_fp8_tensor", "scaled_mm_tensor"), ("ours_w4a16", "gemlite_w4a16"),
             ("ours_w4a16", "marlin_w4a16")]
    print("\nmodel layer      M   w4a16_ms  floor%  x_vs_bf16  x_vs_int4pack  fp8row/peer  "
          "fp8blk/peer  fp8t/peer  x_vs_gemlite  x_vs_marlin  mxfp4_ms nvfp4_ms")
    for (model, layer, M, _N, _K), d in sorted(by.items()):
        if "ours_w4a16" not in d and "quant" not in layer:
            continue

        def sp(a, b, d=d):
            return f"{d[b]['ms'] / d[a]['ms']:.2f}" if a in d and b in d else "-"

        w = d.get("ours_w4a16", {})
        print(f"{model:5} {layer:8} {M:5}  {w.get('ms', float('nan')):8.4f}  "
              f"{100 * w.get('floor_frac', math.nan):5.1f}  {sp(*pairs[0]):>9}  {sp(*pairs[1]):>13}"
              f"  {sp(*pairs[2]):>11}  {sp(*pairs[3]):>11}  {sp(*pairs[4]):>9}"
              f"  {sp(*pairs[5]):>12}  {sp(*pairs[6]):>11}  "
              f"{d.get('ours_mxfp4', {}).get('ms', math.nan):8.4f} "
              f"{d.get('ours_nvfp4', {}).get('ms', math.nan):8.4f}")
    for r in rows:
        if r["kernel"].startswith("quant_") and "ms" in r:
            print(f"{r['kernel']:22} {r['M']}x{r['K']}: {r['ms']:.4f} ms, "
                  f"{100 * r['floor_frac']:.1f}% of copy bandwidth")


if __name__ == "__main__":
    main()
