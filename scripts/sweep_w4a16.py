"""Sweep the W4A16 "mm" path (x as the tensor-core A operand) against cuBLAS bf16 on one GPU.

    python scripts/sweep_w4a16.py --out DIR [--models 8b,70b] [--ms 16,64,...] [--budget 85]

For every layer of the 8B and 70B shapes (quantlab.kernels.bench.SHAPES) and every M it times,
with do_bench medians of CUDA-graph replays: cuBLAS bf16 (F.linear with the dequantized
weight), w4a16_matmul's default pick for the weight packed with fp16 scales ("default") and
with bf16 scales ("default_bf16s": scales in x's dtype, so "mm" may dequantize in 16-bit pairs),
the dequantize + cuBLAS path, and a short grid of "mm" configs per M bucket: "fp32" (fp16
scales, fp32 dequantization) and "pairs" (bf16 scales, two weights per 32-bit PTX operation)
for the same tiles. Both weights hold the same codes; the bf16 one's scales are rounded to bf16,
so each candidate is checked against its own weight's reference (x.float() @
dequantize_int4(w).float().T, i.e. w4a16_matmul_ref) and only timed when its relative error is
below 5e-3. Before that, a bit-exactness check: x = I through every "pairs" ORDER, bf16 and
fp16 with scales of the same dtype, must return dequantize_int4's weights exactly.
Prints a table and writes DIR/sweep-w4a16.json (rewritten after every shape, so a killed run
leaves what it measured).

Time: the configs are first compiled in parallel worker processes (they fill Triton's on-disk
cache); grid timings stop once --budget seconds have passed (the rows say so), and the
baselines stop at budget + 15 s, so the run ends in about 100 s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

T0 = time.time()
ERR_MAX = 5e-3  # bf16 outputs with fp32 sums land near 1e-3
DEV = "cuda"


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def mm_grid(M: int, N: int, K: int, sms: int) -> list[tuple]:
    """(variant, config) timed for this shape: per M bucket a few tiles, each as "pairs" in the
    three k orders (ORDER 0 x gathered, 1 weight permuted, 2 x permuted) and as "fp32" in the
    order that won the first sweep (that is the baseline the pairs must beat)."""
    import triton

    bk = 256 if K % 256 == 0 else 128
    if M <= 32:
        bm = max(16, triton.next_power_of_2(M))
        tiles = [(bm, 128, bk, 4, 3, 1), (bm, 64, bk, 4, 4, 1)]
    elif M <= 64:
        tiles = [(64, 128, 128, 4, 4, 2), (64, 256, bk, 8, 2, 1)]
    elif M <= 256:
        tiles = [(128, 256, 128, 8, 3, 1), (128, 128, 128, 4, 4, 1)]
    else:
        tiles = [(128, 256, 128, 8, 3, 1), (128, 128, 128, 4, 4, 1), (256, 128, 128, 8, 3, 1)]

    def split_for(tiles_mn, bk_):
        split = 1
        while tiles_mn * split < sms and K // bk_ >= 4 * split:
            split *= 2
        return split

    out = []
    for t, (bm, bn, bk_, warps, stages, order) in enumerate(tiles):
        split = split_for(math.ceil(M / bm) * math.ceil(N / bn), bk_) if M <= 512 else 1
        base = ("mm", bm, bn, bk_, split, warps, stages, 8)
        if t < 2:
            out.append(("fp32", base + (order,)))
        for o in ((0, 1, 2) if t < 2 else (order, 2)):
            out.append(("pairs", base + (o, 1)))
    return out


def compile_class(cfg: tuple, K: int) -> tuple:
    """What Triton's compile cache sees of a launch: the config, whether split-K is on, and how
    steps_per_split specializes (1, a multiple of 16, or neither)."""
    if cfg[0] == "dequant":
        return cfg
    n_steps = K // cfg[3]
    per = -(-n_steps // cfg[4])
    atomic = -(-n_steps // per) > 1
    return cfg[:4] + cfg[5:] + (atomic, per == 1, per % 16 == 0)


EXACT_CFGS = (("mm", 64, 64, 128, 1, 4, 2, 8, 0, 1), ("mm", 128, 256, 128, 1, 8, 3, 8, 1, 1),
              ("mm", 64, 128, 128, 2, 4, 3, 8, 2, 1))


def exact_jobs() -> list:
    """Bit-exactness cases: x = I through the "pairs" dequantization in every ORDER, bf16 and
    fp16 with scales of the same dtype, symmetric group 128 and asymmetric group 64."""
    return [("exact", dt, group, asym, cfg) for dt in ("bfloat16", "float16")
            for group, asym in ((128, False), (64, True)) for cfg in EXACT_CFGS]


def _exact(job) -> dict:
    """Worker: one bit-exactness case: the output of x = I must be dequantize_int4's weights."""
    import torch

    from quantlab.kernels import w4a16

    _, dt, group, asym, cfg = job
    dtype = getattr(torch, dt)
    N, K = 200, 512
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (N, K), generator=g)
    scales = torch.rand(N, K // group, generator=g) * 0.01 + 1e-4
    zp = torch.randint(0, 16, (N, K // group), generator=g)
    w = (w4a16.pack_int4(codes, scales, group, zp, scale_dtype=dtype) if asym
         else w4a16.pack_int4(codes - 8, scales, group, scale_dtype=dtype)).to(DEV)
    ref = w4a16.dequantize_int4(w, dtype)
    out = w4a16._launch(torch.eye(K, dtype=dtype, device=DEV), w, cfg)
    torch.cuda.synchronize()
    return {"equal": bool(torch.equal(out.t(), ref)),
            "max_abs_diff": float((out.t().float() - ref.float()).abs().max()),
            "asm_failed": cfg in w4a16._ASM_FAILED}


def _warm(job):
    """Worker: launch one config once on empty tensors of the real sizes (fills the cache), or
    run one bit-exactness case (job[0] == "exact"): -> (job key, seconds, error, result)."""
    t = time.time()
    if job[0] == "exact":
        try:
            res = _exact(job)
        except Exception as e:  # noqa: BLE001
            res = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        return str(job[1:]), round(time.time() - t, 2), None, res
    cfg, M, N, K, sdt = job
    try:
        import torch

        from quantlab.kernels import w4a16

        x = torch.empty(M, K, dtype=torch.bfloat16, device=DEV)
        words = torch.zeros(N, K // 8, dtype=torch.int32, device=DEV)
        scales = torch.zeros(K // 128, N, dtype=getattr(torch, sdt), device=DEV)
        w = w4a16.Int4Weight(words, scales, None, 128)
        w4a16._launch(x.zero_(), w, cfg)
        torch.cuda.synchronize()
        return cfg, round(time.time() - t, 2), None, None
    except Exception as e:  # noqa: BLE001  (recorded; the main process retries and records it)
        return cfg, round(time.time() - t, 2), f"{type(e).__name__}: {str(e)[:200]}", None
    finally:
        try:
            from quantlab.kernels import w4a16

            if w4a16._ASM_FAILED:
                print(f"[worker] inline PTX failed: {w4a16._ASM_FAILED}", flush=True)
        except Exception:  # noqa: BLE001
            pass


def precompile(jobs: list, workers: int, timeout: float) -> dict:
    import multiprocessing as mp

    if not jobs or workers < 2:  # (the bit-exactness cases run here then, one by one)
        return {"jobs": len(jobs), "skipped": True,
                "exact": {r[0]: r[3] for r in map(_warm, jobs) if r[3] is not None}}
    t = time.time()
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(workers)
    res, errors = [], []
    try:
        it = pool.imap_unordered(_warm, jobs)
        for _ in jobs:
            left = timeout - (time.time() - t)
            r = it.next(timeout=max(1.0, left))
            res.append(r)
            if r[2]:
                errors.append([str(r[0]), r[2]])
        pool.close()
    except Exception as e:  # noqa: BLE001  (timeout: the main process compiles the rest)
        log(f"precompile stopped: {type(e).__name__} after {len(res)}/{len(jobs)} jobs")
        pool.terminate()
    pool.join()
    secs = [r[1] for r in res]
    log(f"precompiled {len(res)}/{len(jobs)} configs in {time.time() - t:.1f}s with {workers} "
        f"workers (per config max {max(secs, default=0):.1f}s, {len(errors)} errors)")
    exact = {r[0]: r[3] for r in res if r[3] is not None}
    bad = {k: v for k, v in exact.items() if not v.get("equal")}
    log(f"bit-exact (x = I through the 16-bit pairs): {len(exact) - len(bad)}/{len(exact)} "
        "equal to dequantize_int4")
    for k, v in bad.items():
        log(f"  NOT EXACT {k}: {v}")
    return {"jobs": len(jobs), "done": len(res), "seconds": round(time.time() - t, 1),
            "max_config_s": max(secs, default=0), "errors": errors[:20], "exact": exact}


def timed(fn) -> float:
    from triton.testing import do_bench

    from quantlab.kernels._runtime import _graphed

    return float(do_bench(_graphed(fn), warmup=3, rep=10, return_mode="median"))


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def measure(fn, ref) -> dict:
    """Run fn once, compare with ref, and time it (graph replay) when it is right."""
    rec = {}
    try:
        out = fn()
        rec["err"] = rel(out, ref)
        if not rec["err"] < ERR_MAX:
            rec["error"] = f"rel. error {rec['err']:.2e} >= {ERR_MAX}"
            return rec
        rec["ms"] = timed(fn)
    except Exception as e:  # noqa: BLE001  (recorded per candidate)
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return rec


def sweep_shape(doc, mdl, name, N, K, ms_list, sms, budget, hard) -> bool:
    """Time every M for one layer; append the rows to doc. True when it stopped for time."""
    import torch
    import torch.nn.functional as F

    from quantlab.kernels import w4a16

    stopped = False
    torch.manual_seed(0)
    codes = torch.randint(-8, 8, (N, K), device=DEV, dtype=torch.int8)
    scales = torch.rand(N, K // 128, device=DEV) * 0.004 + 0.001
    ws = {"fp32": w4a16.pack_int4(codes, scales, 128),
          "pairs": w4a16.pack_int4(codes, scales, 128, scale_dtype=torch.bfloat16)}
    del codes
    wds = {k: w4a16.dequantize_int4(w, torch.bfloat16) for k, w in ws.items()}
    wfs = {k: wd.float() for k, wd in wds.items()}
    wd = wds["fp32"]
    log(f"{mdl} {name} N={N} K={K}: packed")
    for M in ms_list:
        if time.time() - T0 > hard:
            stopped = True
            break
        x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
        refs = {k: (x.float() @ wf.t()).to(torch.bfloat16) for k, wf in wfs.items()}
        ref = refs["fp32"]
        row = {"model": mdl, "layer": name, "N": N, "K": K, "M": M}
        row["cublas"] = measure(lambda x=x: F.linear(x, wd), ref)
        row["default"] = measure(lambda x=x: w4a16.w4a16_matmul(x, ws["fp32"]), ref)
        row["default"]["config"] = str(w4a16._PICKED_CONFIG(M, N, K, ws["fp32"], x.dtype))
        row["default_bf16s"] = measure(lambda x=x: w4a16.w4a16_matmul(x, ws["pairs"]),
                                       refs["pairs"])
        row["default_bf16s"]["config"] = str(w4a16._PICKED_CONFIG(M, N, K, ws["pairs"], x.dtype))
        row["dequant"] = measure(lambda x=x: w4a16._launch(x, ws["fp32"], ("dequant",)), ref)
        row["grid"] = []
        for variant, cfg in mm_grid(M, N, K, sms):
            if time.time() - T0 > budget:
                row["grid"].append({"variant": variant, "config": str(cfg),
                                    "error": "skipped: time budget"})
                continue
            rec = measure(lambda x=x, cfg=cfg, w=ws[variant]: w4a16._launch(x, w, cfg),
                          refs[variant])
            rec["variant"] = variant
            rec["config"] = str(cfg)
            if variant == "pairs" and cfg in w4a16._ASM_FAILED:
                rec["ran_as"] = "fp32 (inline PTX failed)"
            row["grid"].append(rec)
        cb = row["cublas"].get("ms")
        for variant in ("fp32", "pairs"):
            ok = [g for g in row["grid"] if "ms" in g and g["variant"] == variant]
            if ok:
                best = min(ok, key=lambda g: g["ms"])
                row[f"best_{variant}"] = {"config": best["config"], "ms": best["ms"]}
                if cb:
                    row[f"ratio_best_{variant}"] = cb / best["ms"]
        for k in ("default", "default_bf16s", "dequant"):
            if cb and "ms" in row[k]:
                row[f"ratio_{k}"] = cb / row[k]["ms"]
        doc["rows"].append(row)
        bp = row.get("best_pairs", {})
        nan = float("nan")
        log(f"  M={M:5d} cuBLAS {cb or nan:.4f} ms | default {row.get('ratio_default', 0):.2f}x "
            f"{row['default']['config']} | bf16s {row.get('ratio_default_bf16s', 0):.2f}x "
            f"{row['default_bf16s']['config']} | mm fp32 {row.get('ratio_best_fp32', 0):.2f}x "
            f"| pairs {row.get('ratio_best_pairs', 0):.2f}x {bp.get('config', '-')} | "
            f"{sum('ms' in g for g in row['grid'])}/{len(row['grid'])} timed")
        del x, refs, ref
    return stopped


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="8b,70b")
    ap.add_argument("--ms", default="16,64,128,256,1024,4096")
    ap.add_argument("--budget", type=float, default=85.0,
                    help="seconds after which grid configs are no longer timed")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "sweep-w4a16.json")

    import torch
    import triton

    from quantlab.kernels import w4a16

    try:
        from quantlab.kernels.bench import SHAPES
    except Exception:  # noqa: BLE001  (bench's own imports changed: its shapes as of 2026-11-30)
        SHAPES = {"8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096),
                         ("down", 4096, 14336)],
                  "70b": [("qkv", 10240, 8192), ("o", 8192, 8192), ("gate_up", 57344, 8192),
                          ("down", 8192, 28672)]}

    ms_list = [int(m) for m in args.ms.split(",")]
    models = args.models.split(",")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    shapes = [(mdl, name, N, K) for mdl in models for name, N, K in SHAPES[mdl]]
    doc = {"device": torch.cuda.get_device_name(0), "sms": sms, "torch": torch.__version__,
           "triton": triton.__version__,
           "scheme": "w4a16 (symmetric, group 128; fp16 scales, and bf16 scales for 'pairs')",
           "x_dtype": "bfloat16", "err_max": ERR_MAX, "budget_s": args.budget, "rows": []}
    log(f"{doc['device']}, torch {torch.__version__}, triton {triton.__version__}, "
        f"{len(shapes)} shapes x {len(ms_list)} M")

    # 1. compile every config once, in parallel processes
    jobs, seen = [], set()
    for _, _, N, K in shapes:
        for M in ms_list:
            todo = [(c, "float16") for c in w4a16._candidates(M, N, K, sms, 128, False)]
            todo += [(c, "bfloat16") for c in w4a16._candidates(M, N, K, sms, 128, True)]
            todo += [(c, "bfloat16" if v == "pairs" else "float16")
                     for v, c in mm_grid(M, N, K, sms)] + [(("dequant",), "float16")]
            for cfg, sdt in todo:
                key = compile_class(cfg, K) + (sdt,)
                if key not in seen:
                    seen.add(key)
                    jobs.append((cfg, M, N, K, sdt))
    jobs.sort(key=lambda j: -j[1])  # big tiles first
    jobs = exact_jobs() + jobs
    doc["precompile"] = precompile(jobs, args.workers, timeout=min(50.0, args.budget / 2))
    doc["bit_exact"] = doc["precompile"].pop("exact", {})

    hard = args.budget + 15.0
    stopped = False
    for mdl, name, N, K in shapes:
        if time.time() - T0 > hard:
            stopped = True
            break
        stopped = sweep_shape(doc, mdl, name, N, K, ms_list, sms, args.budget, hard) or stopped
        torch.cuda.empty_cache()
        doc["elapsed_s"] = round(time.time() - T0, 1)
        doc["stopped_early"] = stopped
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)

    doc["elapsed_s"] = round(time.time() - T0, 1)
    doc["stopped_early"] = stopped
    doc["asm_failed"] = {str(k): v for k, v in w4a16._ASM_FAILED.items()}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print("\ncuBLAS bf16 time / ours. default: fp16 scales; bf16s: default with bf16 scales; "
          "fp32 / pairs: best of the grid")
    print("model layer       M | cuBLAS ms | default | bf16s | dequant | mm fp32 | pairs | "
          "best pairs config")
    for r in doc["rows"]:
        print(f"{r['model']:4s} {r['layer']:8s} {r['M']:5d} | "
              f"{r['cublas'].get('ms', float('nan')):9.4f} | {r.get('ratio_default', 0):7.2f} | "
              f"{r.get('ratio_default_bf16s', 0):5.2f} | {r.get('ratio_dequant', 0):7.2f} | "
              f"{r.get('ratio_best_fp32', 0):7.2f} | {r.get('ratio_best_pairs', 0):5.2f} | "
              f"{r.get('best_pairs', {}).get('config', '-')}")
    log(f"wrote {path}" + (" (stopped early: time)" if stopped else ""))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
