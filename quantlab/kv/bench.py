"""GPU benchmark of decode attention: our Triton kernel on int8 / fp8 per-token-head and bf16 caches
against bf16 F.scaled_dot_product_attention, with the byte floor. Needs a CUDA GPU.

    python -m quantlab.kv.bench --out data/bench/kv-h100.json

Shape: Llama-3-8B attention (32 query heads, 8 kv heads, head_dim 128), one query token a sequence,
contexts 1k-128k, batch 1-64 (B * T capped by --max-tokens to fit memory). Every timing is the
median of CUDA-graph replays over enough copies of the cache to spill the 50 MB L2 (so small
shapes are timed from HBM, as a real cache would be). The byte floor is (bytes of q, k, v, scales
and output) / measured copy bandwidth (bytes read + written by a 1 GiB device copy).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
from functools import partial
from pathlib import Path

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from quantlab.kernels.bench import copy_bandwidth
from quantlab.kv.attention import decode_attention, decode_attention_ref, sdpa_decode

HQ, HKV, D = 32, 8, 128
CONTEXTS = (1024, 4096, 16384, 32768, 65536, 131072)
BATCHES = (1, 4, 16, 64)


def make_cache(kind: str, B: int, T: int):
    """(q, k, v, k_scale, v_scale): random codes (int8 / e4m3) with fp32 scales, or bf16 k, v."""
    q = torch.randn(B, HQ, D, device="cuda", dtype=torch.bfloat16)
    if kind == "bf16":
        k = torch.randn(B, HKV, T, D, device="cuda", dtype=torch.bfloat16)
        return q, k, torch.randn_like(k), None, None
    if kind == "int8":
        k = torch.randint(-127, 128, (B, HKV, T, D), device="cuda", dtype=torch.int8)
        v = torch.randint(-127, 128, (B, HKV, T, D), device="cuda", dtype=torch.int8)
    else:
        k = (torch.randn(B, HKV, T, D, device="cuda") * 32).clamp(-448, 448).to(torch.float8_e4m3fn)
        v = (torch.randn(B, HKV, T, D, device="cuda") * 32).clamp(-448, 448).to(torch.float8_e4m3fn)
    ks = torch.rand(B, HKV, T, device="cuda") / 100 + 1e-3
    return q, k, v, ks, torch.rand_like(ks) / 100 + 1e-3


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def time_over_copies(fn, sets) -> float:
    """Median ms of one call, replaying a CUDA graph that runs fn over every set in turn."""
    def run_all():
        for s in sets:
            fn(*s)
    try:
        ms = do_bench_cudagraph(run_all, rep=60, return_mode="median")
    except Exception:  # some torch/triton pairs refuse capture: fall back to events
        ms = do_bench(run_all, warmup=10, rep=60, return_mode="median")
    return ms / len(sets)


def check(kind: str) -> float:
    """Relative error of the kernel against the fp32 reference, random cache, ragged lengths."""
    q, k, v, ks, vs = make_cache(kind, 3, 3000)
    lens = torch.tensor([3000, 1, 1234], dtype=torch.int32, device="cuda")
    out = decode_attention(q, k, v, ks, vs, lens).float()
    ref = decode_attention_ref(q, k, v, ks, vs, lens)
    return float((out - ref).norm() / ref.norm())


def _launch(q, k, v, ks, vs, **settings):
    return decode_attention(q, k, v, ks, vs, **settings)


TUNE_SHAPES = ((1, 8192), (1, 32768), (4, 32768), (16, 32768))
# (block_n, num_warps, num_stages, splits per SM or 0 for decode_attention's own choice); 8 warps
# lost in every shape of the first sweep (data/bench/tune-kv-decode-nvidia-h200.json)
TUNE_CONFIGS = tuple((bn, 4, st, per_sm) for bn in (64, 128) for st in (2, 3, 4)
                     for per_sm in (0, 4, 16))


def tune(out: Path) -> None:
    """Every (block_n, num_warps, num_stages, splits per SM) on a few decode shapes, per cache
    kind, against SDPA: what the kernel's defaults are chosen from. Rows to `out` (JSON)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    errors = {kind: check(kind) for kind in ("int8", "fp8", "bf16")}
    print("kernel vs fp32 reference, relative error:", errors, flush=True)
    assert all(e < 6e-3 for e in errors.values()), errors
    bw = copy_bandwidth()
    header = {"device": torch.cuda.get_device_name(), "sms": sms, "torch": torch.__version__,
              "triton": triton.__version__, "date": datetime.date.today().isoformat(),
              "command": "python -m quantlab.kv.bench --tune", "bandwidth_GBps": bw / 1e9,
              "kernel_rel_error": errors}
    rows = []
    for B, T in TUNE_SHAPES:
        for kind in ("int8", "fp8", "bf16"):
            one = make_cache(kind, B, T)
            n_sets = max(1, min(64, math.ceil(256e6 / nbytes(*one))))
            sets = [one] + [make_cache(kind, B, T) for _ in range(n_sets - 1)]
            floor_ms = (nbytes(*one) + nbytes(one[0])) / bw * 1e3
            if kind == "bf16":
                ms = time_over_copies(lambda q, k, v, ks, vs: sdpa_decode(q, k, v), sets)
                rows.append({"impl": "sdpa_bf16", "batch": B, "context": T, "ms": ms,
                             "floor_frac": floor_ms / ms})
            for bn, w, st, per_sm in TUNE_CONFIGS:
                splits = max(1, min(-(-per_sm * sms // (B * HKV)), T // bn, 256)) if per_sm \
                    else None
                try:
                    ms = time_over_copies(partial(_launch, block_n=bn, num_warps=w,
                                                  num_stages=st, n_splits=splits), sets)
                except Exception as e:  # a config that does not compile (shared memory)
                    print(f"{kind} B={B} T={T} {bn, w, st, per_sm}: {type(e).__name__}")
                    continue
                rows.append({"impl": f"triton_{kind}", "batch": B, "context": T, "ms": ms,
                             "block_n": bn, "num_warps": w, "num_stages": st,
                             "splits_per_sm": per_sm, "n_splits": splits,
                             "floor_frac": floor_ms / ms})
            best = min((r for r in rows if r["impl"] == f"triton_{kind}" and r["batch"] == B
                        and r["context"] == T), key=lambda r: r["ms"])
            print(json.dumps(best), flush=True)
            del sets, one
            torch.cuda.empty_cache()
        out.parent.mkdir(parents=True, exist_ok=True)  # after every shape: a cut run keeps rows
        out.write_text(json.dumps({"header": header, "rows": rows}, indent=1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-tokens", type=int, default=1 << 21, help="cap on batch * context")
    ap.add_argument("--tune", action="store_true",
                    help="sweep the kernel's launch settings on a few shapes instead (tune())")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.tune:
        return tune(args.out)
    dev = torch.cuda.get_device_name()
    errors = {kind: check(kind) for kind in ("int8", "fp8", "bf16")}
    print("kernel vs fp32 reference, relative error:", errors)
    assert all(e < 2e-2 for e in errors.values()), errors
    bw = copy_bandwidth()
    header = {"device": dev, "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.date.today().isoformat(), "bandwidth_GBps": round(bw / 1e9, 1),
              "shape": {"n_q_heads": HQ, "n_kv_heads": HKV, "head_dim": D},
              "kernel_rel_error": errors}
    rows = []
    print(f"{dev}: copy bandwidth {bw / 1e9:.0f} GB/s")
    print(f"{'B':>3} {'T':>7} {'sdpa':>8} {'bf16':>8} {'int8':>8} {'fp8':>8}  ms; "
          "int8 x bf16-kernel, x sdpa; int8 floor frac")
    for T in CONTEXTS:
        for B in BATCHES:
            if B * T > args.max_tokens:
                continue
            times = {}
            for kind in ("bf16", "int8", "fp8"):
                one = make_cache(kind, B, T)
                n_sets = max(1, min(64, math.ceil(256e6 / nbytes(*one))))
                sets = [one] + [make_cache(kind, B, T) for _ in range(n_sets - 1)]
                floor_ms = (nbytes(*one) + nbytes(one[0])) / bw * 1e3  # + output
                ms = time_over_copies(decode_attention, sets)  # the kernel's own settings
                times[kind] = ms
                rows.append({"impl": f"triton_{kind}", "batch": B, "context": T, "ms": ms,
                             "bytes": nbytes(*one), "floor_ms": floor_ms,
                             "floor_frac": floor_ms / ms})
                if kind == "bf16":
                    ms = time_over_copies(lambda q, k, v, ks, vs: sdpa_decode(q, k, v), sets)
                    times["sdpa"] = ms
                    rows.append({"impl": "sdpa_bf16", "batch": B, "context": T, "ms": ms,
                                 "bytes": nbytes(*one), "floor_ms": floor_ms,
                                 "floor_frac": floor_ms / ms})
                del sets, one
                torch.cuda.empty_cache()
            for r in rows[-4:]:
                r["speedup_vs_sdpa_bf16"] = times["sdpa"] / r["ms"]
                r["speedup_vs_triton_bf16"] = times["bf16"] / r["ms"]
            fl = rows[-2]["floor_frac"]
            print(f"{B:>3} {T:>7} {times['sdpa']:8.4f} {times['bf16']:8.4f} {times['int8']:8.4f} "
                  f"{times['fp8']:8.4f}  {times['bf16'] / times['int8']:.2f}x "
                  f"{times['sdpa'] / times['int8']:.2f}x {fl:.2f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
