"""Tile / variant sweep of the quantize kernels on one GPU (issue 14, item 5).

    python scripts/sweep_quantize.py --out DIR [--sizes 8192x8192,16384x8192,4096x4096]
                                     [--kernels nvfp4,mxfp4,mxfp8,fp8_per_token,int8_per_token]
                                     [--budget 190] [--rep 10] [--quick]

--quick (about 45 s; budget 75 s, hard limit 88 s) times only today's default (pick_config),
each of its candidates, and the variants beside them (quick_grid: the fast flags per kernel),
with no persistent phase.

For every kernel and bf16 input size it times today's default (pick_config among its
candidates; label "default"), each of those candidates ("old"), and a grid of configs with the
fast arithmetic ("grid"; quantize_per_token / quantize_blocks with config=...), then persistent
grids around the two best block configs at the largest size ("persistent"). Each config is
first checked bit for bit: on a 256-row sample with
awkward rows (zeros, -0, ties, tiny, huge) against the plain-torch reference, and on the full
input against the current default kernel's codes and scales. Only exact configs are timed:
triton.testing.do_bench median of a CUDA-graph replay, L2 cleared before each call, as
quantlab.kernels.bench does. Bytes and the floor are counted as bench.quant_sweep counts them
(input read once, codes and scales written once, over the measured copy bandwidth). Writes
DIR/sweep-quantize.json ({header, rows, best}) after every kernel and prints a table.

Time: --jobs worker processes first compile every config into Triton's cache in parallel; a
config past --budget seconds (default 190) is recorded as skipped, not run, and at --hard-limit
(230) the process saves what it has and exits.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # quantlab without PYTHONPATH (the compile workers too)
    sys.path.insert(0, str(ROOT))

KINDS = ("nvfp4", "mxfp4", "mxfp8", "fp8_per_token", "int8_per_token")
BLOCK = {"mxfp8": 32, "mxfp4": 32, "nvfp4": 16}
SAMPLE_ROWS = 256
_WORKERS: list = []  # compile workers still running (the watchdog kills them)
DEVICE = "cuda"  # (a CPU dry run of this script, under TRITON_INTERPRET=1, patches it)


def per_token_grid(K: int) -> list[tuple]:
    """(BLOCK_R, BLOCK_K, num_warps, fast=True): one-pass tiles of 16-64 values per thread, and
    two-pass tiles. (The default row times the fast=False candidates.)"""
    out = [(br, K, w, True) for br, w in ((1, 4), (1, 8), (1, 16), (2, 8), (2, 16), (4, 16))
           if 16 * 32 * w <= br * K <= 64 * 32 * w]
    return out + ([(1, 4096, 8, True), (2, 2048, 8, True)] if K > 4096 else [(4, 1024, 8, True)])


def block_grid(kind: str) -> list[tuple]:
    """(BLOCK_G, num_warps, fast, programs per SM, num_stages), one program per tile: 2048 to
    16384 elements per program on 4 or 8 warps (8 to 128 values per thread)."""
    B = BLOCK[kind]
    fast = kind != "mxfp8"  # fast changes only E2M1 and NVFP4's division
    return [(elems // B, w, fast, 0, 1) for elems in (2048, 4096, 8192, 16384) for w in (4, 8)
            if 8 <= elems // (32 * w) <= 128]


def quick_grid(kind: str, K: int) -> list[tuple]:
    """--quick: the default candidates plus, per kernel, each fast flag on its best tiles
    (per token: 0 plain, 1 reciprocal division, 2 bf16-bits amax, 3 both + int8 magic codes;
    NVFP4: 1 and 2, the block scale through the reciprocal too)."""
    if kind.endswith("per_token"):
        out = [(1, K, w, f) for w in (4, 8) for f in (False, True, 2, 3) if K <= 64 * 32 * w]
    elif kind == "nvfp4":
        out = [(bg, w, f, 0, 1) for bg, w in ((256, 8), (128, 4), (256, 4), (512, 8))
               for f in (True, 2)]
    else:
        out = []
    for c in default_candidates(kind, K):
        if tuple(c) not in out:
            out.append(tuple(c))
    return out


def persistent_grid(best: list[tuple]) -> list[tuple]:
    return [(bg, w, fast, per_sm, st) for bg, w, fast, _, _ in best for per_sm in (2, 4, 8)
            for st in (1, 3)]


def awkward_sample(x: torch.Tensor, huge: float) -> torch.Tensor:
    """The first SAMPLE_ROWS rows of x with awkward rows on top: zeros, -0, E2M1/E4M3 ties at
    scale 1, half-integer ties, tiny (bf16 subnormal) and huge rows, a lone outlier. (NVFP4
    takes huge=1e4: a global scale past 2**50 would send the whole tensor down the slow path.)"""
    s = x[:SAMPLE_ROWS].float().clone()
    K = s.shape[1]
    s[0] = 0
    s[1] = -0.0
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 1.0625, 1.1875, 15.0, 17.0,
                         232.0, 240.0, 432.0, 440.0])
    s[2] = ties.repeat(K // 16) * torch.tensor([1.0, -1.0]).repeat(K // 2)
    s[2, ::64] = 448.0
    s[3] = torch.arange(K, dtype=torch.float32) % 256 - 127.5
    s[4] *= 1e-39
    s[5] *= huge
    s[6, 7] = 3e4
    return s.to(x.dtype).contiguous()


def launch(kind: str, x, config, g=None):
    from quantlab.kernels.quantize import quantize_blocks, quantize_per_token

    if kind.endswith("per_token"):
        return quantize_per_token(x, "e4m3" if kind == "fp8_per_token" else "int8",
                                  config=config)
    return quantize_blocks(x, kind, g, config=config)


def reference(kind: str, x):
    from quantlab import get_scheme, quantize

    if kind == "fp8_per_token":
        return quantize(x.cpu(), get_scheme("fp8_dynamic").activations)
    if kind == "int8_per_token":
        return quantize(x.cpu(), get_scheme("int8_w8a8").activations)
    return quantize(x.cpu(), kind)


def same(a, b) -> int:
    """Number of differing codes + scales (+ global scale) between two QuantizedTensors."""
    dev = b.codes.device
    n = int((a.codes.to(dev) != b.codes).sum()) + int(
        (a.scales.to(dev).view(torch.int32) != b.scales.view(torch.int32)).sum())
    if a.global_scale is not None or b.global_scale is not None:
        n += int(a.global_scale is None or b.global_scale is None
                 or not torch.equal(a.global_scale.to(dev), b.global_scale))
    return n


def default_candidates(kind: str, K: int) -> list[tuple]:
    from quantlab.kernels.quantize import _block_candidates, _per_token_candidates

    if kind.endswith("per_token"):
        return _per_token_candidates(K, kind == "fp8_per_token")
    return _block_candidates(kind, 0)


def warm(jobs: int, items: list[tuple], deadline: float) -> None:
    """Compile every (kind, K, config) into Triton's on-disk cache from `jobs` processes at
    once (a compile takes about a second and uses one core); the sweep's own launches then
    load them. Workers still running at `deadline` are killed (the sweep compiles the rest)."""
    if jobs <= 0 or not items:
        return
    import subprocess
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="sweep-quantize-"))
    procs = []
    for j in range(jobs):
        part = items[j::jobs]
        if part:
            f = tmp / f"warm{j}.json"
            f.write_text(json.dumps([[k, K, list(c)] for k, K, c in part]))
            procs.append(subprocess.Popen([sys.executable, __file__, "--out", str(tmp),
                                           "--warm", str(f)]))
            _WORKERS.append(procs[-1])
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def warm_worker(job: str) -> None:
    """Launch each config once on a (256, K) bf16 input: the same specialization (dtypes,
    16-divisible sizes) as the sweep's inputs, so the compiled kernels are the ones it needs."""
    items = json.loads(Path(job).read_text())
    xs = {}
    for kind, K, config in items:
        if K not in xs:
            from quantlab.kernels.quantize import nvfp4_global_scale

            x = torch.randn(SAMPLE_ROWS, K, device=DEVICE, dtype=torch.bfloat16)
            xs[K] = (x, nvfp4_global_scale(x))
        try:
            launch(kind, xs[K][0], tuple(config), xs[K][1])
        except Exception as e:  # the sweep records it
            print(f"warm {kind} {config}: {type(e).__name__}", flush=True)
    torch.cuda.synchronize()


def nbytes(kind: str, R: int, K: int) -> int:
    base = R * K * 2 + R * K
    return base + (4 * R if kind.endswith("per_token") else 4 * R * K // BLOCK[kind])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for sweep-quantize.json")
    ap.add_argument("--sizes", default="8192x8192,16384x8192,4096x4096")
    ap.add_argument("--kernels", default=",".join(KINDS))
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds; configs after this are recorded as skipped (190; --quick 75)")
    ap.add_argument("--hard-limit", type=float, default=None,
                    help="seconds; the process saves its rows and exits here, whatever it is doing")
    ap.add_argument("--rep", type=int, default=10, help="do_bench rep (ms) per timing")
    ap.add_argument("--jobs", type=int, default=8,
                    help="processes compiling the configs into Triton's cache first (0: none)")
    ap.add_argument("--quick", action="store_true",
                    help="only the default, its candidates and the fast-flag variants (~45 s)")
    ap.add_argument("--warm", help=argparse.SUPPRESS)  # internal: a compile worker's job file
    a = ap.parse_args(argv)
    if a.budget is None:
        a.budget = 75.0 if a.quick else 190.0
    if a.hard_limit is None:
        a.hard_limit = 88.0 if a.quick else 230.0
    if a.warm:
        return warm_worker(a.warm)
    t_start = time.time()
    if not torch.cuda.is_available():
        raise SystemExit("sweep_quantize needs a CUDA GPU")
    import triton
    from triton.testing import do_bench

    from quantlab.kernels import _runtime
    from quantlab.kernels._runtime import _graphed
    from quantlab.kernels.bench import copy_bandwidth, rel_err
    from quantlab.kernels.quantize import nvfp4_global_scale
    from quantlab.quantize import dequantize as deq

    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    bw = copy_bandwidth()
    header = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "date": datetime.date.today().isoformat(),
              "bandwidth": round(bw / 1e9, 1),
              "bandwidth_unit": "GB/s, device copy, read + written (bench.copy_bandwidth)",
              "timing": f"do_bench median (rep={a.rep} ms) of CUDA-graph replays, L2 cleared",
              "bytes": "input read + codes + fp32 scales written (bench.quant_sweep)"}
    print(json.dumps(header), flush=True)
    sizes = [tuple(int(v) for v in s.split("x")) for s in a.sizes.split(",")]
    rows: list[dict] = []

    def save(extra=None):
        doc = {"header": {**header, "elapsed_s": round(time.time() - t_start, 1)},
               "rows": rows, **(extra or {})}
        (out_dir / "sweep-quantize.json").write_text(json.dumps(doc, indent=1) + "\n")

    def over() -> bool:
        return time.time() - t_start > a.budget

    def watchdog(signum, frame):  # never hang: keep what was measured and stop
        rows.append({"label": "watchdog", "error": f"stopped after {a.hard_limit} s"})
        save()
        for w in _WORKERS:
            w.kill()
        print(f"watchdog: stopped after {a.hard_limit} s", flush=True)
        os._exit(3)

    signal.signal(signal.SIGALRM, watchdog)
    signal.alarm(max(1, int(a.hard_limit - (time.time() - t_start))))

    # inputs, their samples and the samples' references, made once
    inputs = {}
    for R, K in sizes:
        torch.manual_seed(0)
        x = torch.randn(R, K, device=DEVICE, dtype=torch.bfloat16)
        inputs[R, K] = {"x": x, "g": nvfp4_global_scale(x), "sample": awkward_sample(x, 1e30),
                        "sample_nvfp4": awkward_sample(x, 1e4)}

    def try_config(kind, R, K, config, label, ref, base):
        row = {"kernel": kind, "R": R, "K": K, "config": list(config) if config else None,
               "label": label}
        if over():
            row["skipped"] = "budget"
            rows.append(row)
            return row
        t0 = time.time()
        inp = inputs[R, K]
        try:
            qs = launch(kind, inp["sample_nvfp4" if kind == "nvfp4" else "sample"], config)
            row["mismatch_ref"] = same(qs, ref)
            for f in ("codes", "scales", "global_scale"):  # the reference decodes on the CPU
                if getattr(qs, f) is not None:
                    setattr(qs, f, getattr(qs, f).cpu())
            row["rel_err"] = round(rel_err(deq(qs).float(), deq(ref).float()), 8)
            if base is not None:
                row["mismatch_base"] = same(launch(kind, inp["x"], config, inp["g"]), base)
            row["exact"] = row["mismatch_ref"] == 0 and row.get("mismatch_base", 0) == 0
            if row["exact"]:
                fn = _graphed(lambda: launch(kind, inp["x"], config, inp["g"]).codes)
                ms = float(do_bench(fn, warmup=5, rep=a.rep, return_mode="median"))
                row["ms"] = round(ms, 5)
                row["floor_ms"] = round(nbytes(kind, R, K) / bw * 1e3, 5)
                row["frac"] = round(row["floor_ms"] / ms, 4)
        except Exception as e:  # a config that fails to compile or launch is a result
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        row["s"] = round(time.time() - t0, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    kinds = a.kernels.split(",")
    Ks = sorted({K for _, K in sizes})

    def screening(kind, K):
        if a.quick:
            return quick_grid(kind, K)
        grid = per_token_grid(K) if kind.endswith("per_token") else block_grid(kind)
        return grid + [tuple(c) for c in default_candidates(kind, K) if tuple(c) not in grid]

    warm(a.jobs, [(kind, K, c) for kind in kinds for K in Ks for c in screening(kind, K)],
         t_start + a.budget / 2)
    print(f"compile warm-up done: {time.time() - t_start:.0f} s", flush=True)

    refs, bases, picked = {}, {}, {}
    for kind in kinds:  # phase 1: today's default, then the one-program-per-tile grid
        for R, K in sizes:
            inp = inputs[R, K]
            try:
                refs[kind, R, K] = reference(kind, inp["sample_nvfp4" if kind == "nvfp4"
                                                        else "sample"])
                # the current default pick (pick_config), also the full-size baseline
                before = dict(_runtime._PICKED)
                bases[kind, R, K] = launch(kind, inp["x"], None, inp["g"])
                picked[kind, R, K] = [list(v) for k, v in _runtime._PICKED.items()
                                      if k not in before]
            except Exception as e:
                rows.append({"kernel": kind, "R": R, "K": K, "label": "setup",
                             "error": f"{type(e).__name__}: {str(e)[:300]}"})
                traceback.print_exc()
                continue
            row = try_config(kind, R, K, None, "default", refs[kind, R, K], bases[kind, R, K])
            row["picked"] = picked[kind, R, K]
            if a.quick:
                grid, olds = quick_grid(kind, K), []
            else:
                grid = per_token_grid(K) if kind.endswith("per_token") else block_grid(kind)
                olds = [tuple(c) for c in default_candidates(kind, K) if tuple(c) not in grid]
            for c in grid:
                try_config(kind, R, K, c, "grid", refs[kind, R, K], bases[kind, R, K])
            for c in olds:  # each of today's candidates, for A/B
                try_config(kind, R, K, c, "old", refs[kind, R, K], bases[kind, R, K])
        save()

    # phase 2: persistent grids around each block kernel's best two at the largest size
    stage2 = {}
    for kind in kinds:
        if kind.endswith("per_token") or a.quick:
            continue
        top_size = max(sizes, key=lambda s: s[0] * s[1])
        timed = sorted((r for r in rows if r["kernel"] == kind and (r["R"], r["K"]) == top_size
                        and "ms" in r and r["label"] == "grid"), key=lambda r: r["ms"])
        stage2[kind] = persistent_grid([tuple(r["config"]) for r in timed[:2]])
    warm(a.jobs, [(kind, Ks[0], c) for kind, cs in stage2.items() for c in cs],
         t_start + a.budget * 0.75)
    for kind, cs in stage2.items():
        for c in cs:
            for R, K in sizes:
                if (kind, R, K) in bases:
                    try_config(kind, R, K, c, "persistent", refs[kind, R, K], bases[kind, R, K])
        save()

    best: dict = {}
    for kind in kinds:
        for R, K in sizes:
            timed = [r for r in rows if r["kernel"] == kind and (r["R"], r["K"]) == (R, K)
                     and "ms" in r]
            if timed:
                b = min(timed, key=lambda r: r["ms"])
                d = next((r for r in timed if r["label"] == "default"), None)
                best.setdefault(kind, {})[f"{R}x{K}"] = {
                    "config": b["config"] or ["default", *(d or {}).get("picked", [])],
                    "ms": b["ms"], "frac": b["frac"],
                    "default_ms": d and d["ms"], "default_frac": d and d["frac"]}

    bad = [r for r in rows if r.get("exact") is False]
    save({"best": best, "inexact": len(bad),
          "inexact_configs": [[r["kernel"], f"{r['R']}x{r['K']}", r["config"],
                               r.get("mismatch_ref"), r.get("mismatch_base")] for r in bad],
          "pick_config": [[str(k), list(v)] for k, v in _runtime._PICKED.items()]})
    print(f"\n{'kernel':15} {'size':11} {'default ms':>10} {'def %':>6} {'best ms':>9} "
          f"{'best %':>6}  best config")
    for kind, d in best.items():
        for size, b in d.items():
            dm = f"{'-':>10}" if b["default_ms"] is None else f"{b['default_ms']:10.4f}"
            df = f"{'-':>6}" if b["default_frac"] is None else f"{100 * b['default_frac']:6.1f}"
            print(f"{kind:15} {size:11} {dm} {df} {b['ms']:9.4f} {100 * b['frac']:6.1f}  "
                  f"{b['config']}")
    for r in bad:  # never a candidate: say which
        print(f"INEXACT {r['kernel']} {r['R']}x{r['K']} {r['config'] or 'default'}: "
              f"{r.get('mismatch_ref')} vs reference, {r.get('mismatch_base')} vs default")
    print(f"inexact configs: {len(bad)}; errors: {sum('error' in r for r in rows)}; skipped: "
          f"{sum('skipped' in r for r in rows)}; {time.time() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
