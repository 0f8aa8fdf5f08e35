"""FP8 GEMM tile/promotion sweep against torch._scaled_mm (issue 14, item 2). Needs a CUDA GPU.

    PYTHONPATH=. python scripts/sweep_fp8.py --out DIR [--quick] [--budget 170]
                        [--M 16,64,256,1024,4096] [--kinds tensor,row,block] [--models 8b,70b]

--quick times, per shape and M, only fp8_gemm._candidates (what fp8_matmul picks from) plus the
NEW configs below at M >= 256, and fp8_matmul's own pick (config=None: pick_config over the
candidates, the "auto" rows), longest K first; about 60-80 s on an H200 (--budget 80).

For each granularity (tensor, row, 128-block), Llama-3 8B/70B shape (bench.SHAPES) and M, it
quantizes random operands the way the GPU accuracy test does, times torch._scaled_mm with the
same granularity (bench.scaled_mm_peer) and every config of the grid below, each first checked:
rel. error against the fp32 reference (fp8_matmul_ref) and, on the first 128 rows, error against
an fp64 product of the same quantized operands divided by _scaled_mm's (err_x; <= 1.2 needed).
Timing: do_bench median of a CUDA-graph replay, L2 cleared before each call, as the bench does.
Prints a table per granularity (time ratio _scaled_mm / ours per config, '*' = err_x > 1.2 or
wrong) and the err_x of every config at K = 28672 (70B down); writes DIR/sweep-fp8.json (rows
saved after every shape, so a cut-short run keeps what it measured). A config that fails to
compile or launch is recorded with its error and skipped for the rest of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import traceback
from functools import partial
from pathlib import Path

import torch

DEV = "cuda"
TOL = 3e-3  # vs the fp32 reference: one bf16 rounding (~7e-4) plus fp32 summation order

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, use_tma, chain); chain 1: Triton splits the
# dot into BLOCK_K-deep wgmma partials added in fp32 (max_num_imprecise_acc = BLOCK_K), so
# BLOCK_K 256 promotes every 256 k; chain R > 1: R chained dots then one fp32 add; chain 0:
# never promoted (speed baseline only: its error grows with K); chain -G: the Gluon kernel
# (fp32 add of one partial overlapping the next wgmma, G K blocks unrolled per loop step)
GRID = {
    "scalar": [  # tensor and row
        (128, 256, 128, 8, 3, True, 1),   # the committed large-M pick (255 regs, spills)
        (128, 128, 128, 8, 4, True, 1),
        (128, 128, 256, 8, 3, True, 1),   # promote every 256
        (64, 128, 128, 4, 4, True, 1),    # 4 warps: 2+ CTAs per SM hide each other's adds
        (64, 128, 256, 4, 3, True, 1),
        (128, 128, 128, 8, 4, True, 2),   # two chained dots per fp32 add
        (128, 256, 128, 8, 3, True, 0),   # unpromoted: speed baseline (inaccurate at long K)
        # Gluon, chain -G: the fp32 add of K block j runs while block j + 1's wgmma does
        (128, 128, 128, 8, 4, True, -2),
        (128, 128, 128, 8, 3, True, -2),
        (128, 128, 256, 8, 3, True, -2),  # BLOCK_K 256: promote every 256
        (64, 128, 128, 4, 4, True, -2),
        (128, 128, 128, 8, 4, True, -1),  # Gluon without the overlap
    ],
    "block": [
        (128, 128, 128, 8, 3, True, 1),
        (128, 128, 128, 8, 4, True, 1),
        (64, 128, 128, 4, 4, True, 1),
        (128, 64, 128, 4, 4, True, 1),
        (128, 256, 128, 8, 3, True, 1),   # per-column weight scales
        (128, 128, 128, 8, 4, True, -2),
        (128, 128, 128, 8, 3, True, -2),
        (64, 128, 128, 4, 4, True, -2),
        (128, 64, 128, 4, 4, True, -2),
        (128, 128, 128, 8, 4, True, -1),
    ],
}
# new levers for M >= 1024 (round 2), in both grids. A 5th and 6th smem stage: stages 3 -> 4
# took Gluon 128x128x128 from 0.68 to 0.85 x cuBLAS, and compiled for sm_90 (Triton 3.9,
# ptxas 13.4; not yet the GPU's 3.6) they keep 206-222 registers, no spills, 164 / 197 KB smem.
# G = 4 K blocks per unrolled step (one full wgmma wait per 4 blocks instead of 2) spilled
# there and ptxas serialized its wgmmas (C7512); timed once to see whether 3.6 does the same.
# Ruled out by the same compile: 128x256 and 256x128 Gluon tiles (three 128-register tiles per
# thread: 255 registers, spills, serialized wgmmas), G = 3 (spills).
NEW = {
    "scalar": [(128, 128, 128, 8, 5, True, -2), (128, 128, 128, 8, 6, True, -2),
               (128, 128, 128, 8, 4, True, -4)],
    "block": [(128, 128, 128, 8, 5, True, -2), (128, 128, 128, 8, 6, True, -2),
              (128, 128, 128, 8, 4, True, -4)],
}
for _g in GRID:
    GRID[_g] += NEW[_g]
SMALL_M = 64  # at M <= this only configs with BLOCK_M <= 64 (Triton's: 16 rows at M <= 16)


def quantized(kind, M, N, K, seed):
    """x (M, K) ~ N(0, 1), w (N, K) ~ N(0, 0.02^2), quantized to E4M3 per granularity."""
    from quantlab.kernels.fp8_gemm import FP8

    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(M, K, device=DEV, generator=g)
    w = torch.randn(N, K, device=DEV, generator=g) * 0.02
    if kind == "tensor":
        xs, ws = x.abs().amax().reshape(1, 1) / 448, w.abs().amax().reshape(1, 1) / 448
        xq, wq = (x / xs).to(FP8), (w / ws).to(FP8)
    elif kind == "row":
        xs, ws = x.abs().amax(1, keepdim=True) / 448, w.abs().amax(1, keepdim=True) / 448
        xq, wq = (x / xs).to(FP8), (w / ws).to(FP8)
    else:
        xs = x.reshape(M, K // 128, 128).abs().amax(-1) / 448
        wb = w.reshape(N // 128, 128, K // 128, 128)
        ws = wb.abs().amax((1, 3)) / 448
        xq = (x.reshape(M, K // 128, 128) / xs[..., None]).reshape(M, K).to(FP8)
        del x
        wq = (wb / ws[:, None, :, None]).reshape(N, K).to(FP8)
    return xq, xs.float().contiguous(), wq, ws.float().contiguous()


def rel(out, ref):
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true",
                    help="only fp8_matmul's candidates, the NEW configs and its own pick")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds after which no new (shape, M) is started (170; 80 quick)")
    ap.add_argument("--M", default="16,64,256,1024,4096")
    ap.add_argument("--kinds", default="row,tensor,block")
    ap.add_argument("--models", default="8b,70b")
    ap.add_argument("--rep", type=int, default=8, help="do_bench rep (ms)")
    ap.add_argument("--hang", type=float, default=60.0,
                    help="seconds one candidate (compile included) may take before the run "
                         "saves and exits with status 3")
    args = ap.parse_args(argv)
    if args.budget is None:
        args.budget = 80.0 if args.quick else 170.0

    from triton.testing import do_bench

    from quantlab.kernels import _runtime, fp8_gemm
    from quantlab.kernels._runtime import _graphed
    from quantlab.kernels.bench import SHAPES, scaled_mm_peer

    t0 = time.time()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    Ms = [int(m) for m in args.M.split(",")]
    import triton

    device = torch.cuda.get_device_name() if DEV == "cuda" else DEV
    result = {"header": {"device": device, "torch": torch.__version__,
                         "triton": triton.__version__, "tol": TOL,
                         "config": "(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, "
                                   "use_tma, chain)", "quick": args.quick,
                         "gluon_usable": fp8_gemm.gluon_usable()},
              "rows": [], "skipped": []}
    broken: dict[tuple, str] = {}

    def save():
        (out_dir / "sweep-fp8.json").write_text(json.dumps(result, indent=1))

    now = {"t": time.time(), "what": "start"}

    def watchdog():  # a kernel that never finishes must not take the run's results with it
        while True:
            time.sleep(5)
            if time.time() - now["t"] > args.hang:
                result["hang"] = now["what"]
                save()
                print(f"HANG: {now['what']} ran over {args.hang} s; results so far saved",
                      flush=True)
                os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()

    def bench(fn):
        return float(do_bench(_graphed(fn), warmup=3, rep=args.rep, return_mode="median"))

    jobs = [(kind, model, name, N, K) for model in args.models.split(",")
            for name, N, K in SHAPES[model] for kind in args.kinds.split(",")]
    if args.quick:  # longest K first: the accuracy check at K = 28672 is never cut by --budget
        jobs.sort(key=lambda j: -j[4])
    for kind, model, name, N, K in jobs:
        if time.time() - t0 > args.budget:
            result["skipped"].append([kind, model, name])
            print(f"budget: skipped {kind} {model} {name}", flush=True)
            continue
        family = "block" if kind == "block" else "scalar"
        for M in Ms:
            if args.quick:
                grid = fp8_gemm._candidates(M, N, K, kind)
                grid += [c for c in NEW[family] if M >= 256 and c not in grid]
            else:
                grid = GRID[family]
            if time.time() - t0 > args.budget:
                result["skipped"].append([kind, model, name, M])
                continue
            now.update(t=time.time(), what=f"{kind} {model} {name} M={M} operands, cuBLAS")
            xq, xs, wq, ws = quantized(kind, M, N, K, seed=K + M)
            ref = fp8_gemm.fp8_matmul_ref(xq, xs, wq, ws)
            r = min(M, 128)  # fp64 truth on the first rows (rows are independent)
            truth = (xq[:r].double() * fp8_gemm._expand(xs[:r].double(), r, K, kind, 1)) @ \
                (wq.double() * fp8_gemm._expand(ws.double(), N, K, kind, 128)).t()
            base = {"kind": kind, "model": model, "layer": name, "M": M, "N": N, "K": K}
            peer_row = dict(base, who="scaled_mm")
            peer_err = None
            try:
                peer = scaled_mm_peer(xq, xs, wq, ws, kind)
                po = peer()
                peer_err = rel(po[:r], truth)
                peer_row.update(err_ref=round(rel(po, ref), 6), err64=peer_err,
                                ms=round(bench(peer), 5))
            except Exception as e:
                peer_row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            if peer_err is None:  # no cuBLAS blockwise: judge against the fp32 reference
                peer_err = rel(ref[:r], truth)
            result["rows"].append(peer_row)
            line = [f"{kind:6s} {model} {name:7s} M={M:5d}: cuBLAS {peer_row.get('ms', 'ERR')}"]
            for cfg in grid:
                if M <= SMALL_M and cfg[0] > 64 and not args.quick:
                    continue
                if M <= 32 and cfg[6] >= 0:  # Gluon's wgmma layout needs 16 rows per warp
                    cfg = (max(16, triton.next_power_of_2(M)), *cfg[1:])
                key = (kind, cfg)
                row = dict(base, who="ours", config=list(cfg))
                now.update(t=time.time(), what=f"{kind} {model} {name} M={M} {cfg}")
                if key in broken:
                    continue
                try:
                    fn = partial(fp8_gemm.fp8_matmul, xq, xs, wq, ws, config=cfg)
                    out = fn()
                    if DEV == "cuda":
                        torch.cuda.synchronize()
                    row["err_ref"] = round(rel(out, ref), 6)
                    row["err64"] = rel(out[:r], truth)
                    row["err_x"] = round(row["err64"] / max(peer_err, 1e-30), 4)
                    row["ok"] = row["err_ref"] < TOL
                    if row["ok"]:
                        row["ms"] = round(bench(fn), 5)
                        if "ms" in peer_row:
                            row["speed_x"] = round(peer_row["ms"] / row["ms"], 3)
                except Exception as e:
                    msg = f"{type(e).__name__}: {str(e)[:300]}"
                    row["error"] = msg
                    broken[key] = msg
                    print(f"  config {cfg} broken: {msg}\n{traceback.format_exc()[-600:]}",
                          flush=True)
                result["rows"].append(row)
                mark = "" if row.get("ok") and row.get("err_x", 9) <= 1.2 else "*"
                line.append(f"{cfg}: {row.get('speed_x', row.get('ms', 'ERR'))}{mark}")
            if args.quick:  # fp8_matmul's own pick, as the bench calls it
                now.update(t=time.time(), what=f"{kind} {model} {name} M={M} auto")
                row = dict(base, who="auto")
                try:
                    fn = partial(fp8_gemm.fp8_matmul, xq, xs, wq, ws)
                    out = fn()
                    torch.cuda.synchronize()
                    key = ("fp8", triton.next_power_of_2(M), N, K, kind, torch.bfloat16,
                           xq.data_ptr() % 16 == 0 and wq.data_ptr() % 16 == 0)
                    picked = _runtime._PICKED.get(key)  # None: one candidate, not timed
                    row["config"] = list(picked) if picked else None
                    row["err_ref"] = round(rel(out, ref), 6)
                    row["err64"] = rel(out[:r], truth)
                    row["err_x"] = round(row["err64"] / max(peer_err, 1e-30), 4)
                    row["ok"] = row["err_ref"] < TOL
                    row["ms"] = round(bench(fn), 5)
                    if "ms" in peer_row:
                        row["speed_x"] = round(peer_row["ms"] / row["ms"], 3)
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                result["rows"].append(row)
                mark = "" if row.get("ok") and row.get("err_x", 9) <= 1.2 else "*"
                line.append(f"auto {row.get('config')}: "
                            f"{row.get('speed_x', row.get('ms', 'ERR'))}{mark}")
            print("\n    ".join(line), flush=True)
            del ref, truth
            torch.cuda.empty_cache()
        save()
    summarize(result)
    result["header"]["seconds"] = round(time.time() - t0, 1)
    save()
    print(f"wrote {out_dir / 'sweep-fp8.json'} in {time.time() - t0:.0f} s", flush=True)


def summarize(result):
    """Per kind and config: min / median speed_x over M >= 256, and the worst err_x."""
    import statistics

    rows = [r for r in result["rows"] if r["who"] == "ours"]
    summary = {}
    for kind in ("tensor", "row", "block"):
        cfgs = sorted({tuple(r["config"]) for r in rows if r["kind"] == kind})
        if not cfgs:
            continue
        print(f"\n== {kind}: speed_x (_scaled_mm ms / ours) over M >= 256; err_x = ours / "
              "cuBLAS error vs fp64")
        print(f"{'config':36s} {'n':>3s} {'min':>6s} {'median':>6s} {'max':>6s} "
              f"{'err_x max':>9s} {'err_x K=28672':>13s}")
        for c in cfgs:
            rs = [r for r in rows if r["kind"] == kind and tuple(r["config"]) == c]
            big = [r["speed_x"] for r in rs if r["M"] >= 256 and "speed_x" in r]
            ex = [r["err_x"] for r in rs if "err_x" in r]
            ex28 = [r["err_x"] for r in rs if "err_x" in r and r["K"] == 28672]
            s = {"n": len(big), "min": min(big, default=None),
                 "median": statistics.median(big) if big else None,
                 "max": max(big, default=None), "err_x_max": max(ex, default=None),
                 "err_x_k28672": max(ex28, default=None)}
            summary[f"{kind} {c}"] = s
            f = (lambda v: f"{v:6.3f}" if isinstance(v, float) else f"{'-':>6s}")
            print(f"{str(c):36s} {s['n']:3d} {f(s['min'])} {f(s['median'])} {f(s['max'])} "
                  f"{f(s['err_x_max']):>9s} {f(s['err_x_k28672']):>13s}")
        # best config per (shape, M): what a per-shape pick would give
        best = {}
        for r in rows:
            if r["kind"] == kind and "speed_x" in r and r.get("err_x", 9) <= 1.2 \
                    and r["config"][6] != 0:
                k = (r["model"], r["layer"], r["M"])
                if k not in best or r["speed_x"] > best[k]["speed_x"]:
                    best[k] = r
        print(f"-- {kind}: best accurate config per shape")
        for k, r in sorted(best.items()):
            print(f"   {k[0]} {k[1]:7s} M={k[2]:5d} {r['speed_x']:.3f} {tuple(r['config'])}")
        summary[f"{kind} best"] = {f"{k[0]} {k[1]} {k[2]}": [r["speed_x"], r["config"]]
                                   for k, r in sorted(best.items())}
        auto = [r for r in result["rows"] if r["who"] == "auto" and r["kind"] == kind]
        if auto:
            big = [r["speed_x"] for r in auto if r["M"] >= 256 and "speed_x" in r]
            ex = [r["err_x"] for r in auto if "err_x" in r]
            s = {"n": len(big), "min": min(big, default=None),
                 "median": statistics.median(big) if big else None,
                 "max": max(big, default=None), "err_x_max": max(ex, default=None),
                 "wrong": sum(not r.get("ok") for r in auto)}
            summary[f"{kind} auto"] = s
            print(f"-- {kind}: fp8_matmul's own pick (auto), M >= 256: n {s['n']} "
                  f"min {s['min']} median {s['median']} max {s['max']}; err_x max "
                  f"{s['err_x_max']}; wrong or failed {s['wrong']}")
            for r in sorted(auto, key=lambda r: (r["model"], r["layer"], r["M"])):
                print(f"   {r['model']} {r['layer']:7s} M={r['M']:5d} {r.get('speed_x')} "
                      f"{r.get('config')} {r.get('error', '')}")
    result["summary"] = summary


if __name__ == "__main__":
    main()
