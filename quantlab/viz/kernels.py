"""Chapter 8 (kernels and throughput): which GPU benchmark file to read, kernel time against M
per layer shape, and rooflines (one layer shape and scheme, or a measured sweep)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go

from quantlab.viz.book import COLORS, dropdown

BENCH_KINDS = ("kernels", "kv", "e2e")

# The W4A16 rows of a kernels-*.json and their legend labels: ours and its peers. A figure or
# panel draws a peer only where the file has its rows (gemlite and Marlin are in some files only).
W4A16_KERNELS = {
    "ours_w4a16": "ours (W4A16)",
    "ours_w4a16_bf16s": "ours, scales in bf16 (16-bit dequant)",
    "cublas_bf16": "cuBLAS bf16",
    "aten_int4pack": "tinygemm (aten._weight_int4pack_mm)",
    "gemlite_w4a16": "gemlite",
    "marlin_w4a16": "Marlin (vLLM gptq_marlin, built from source)",
}


@dataclass(frozen=True)
class BenchFile:
    """One data/bench/<kind>-*.json measured on a GPU: its path, device, date and contents."""

    path: Path
    device: str
    date: str
    data: dict
    note: str = ""  # set when the file is not the GPU that was asked for

    def describe(self) -> str:
        """'kernels-nvidia-h200.json: NVIDIA H200, 2026-11-23' (plus the note, if any, and the
        file's own "superseded" remark: what changed in the code since it was measured)."""
        head = self.data.get("header", self.data)
        return (f"{self.path.name}: {self.device}, {self.date}"
                + (f" ({self.note})" if self.note else "")
                + (f"; superseded: {head['superseded']}" if head.get("superseded") else ""))


def bench_files(kind: str, bench_dir: Path | None = None) -> list[BenchFile]:
    """Every <kind>-*.json in bench_dir (default data/bench) with a device and a date (in its
    "header", or at its top level), newest first: by date, then by name (later name first).
    Files without a device, such as the CPU accuracy study kv-accuracy-*.json, are skipped."""
    if kind not in BENCH_KINDS:
        raise ValueError(f"kind={kind!r}: pick one of {BENCH_KINDS}")
    if bench_dir is None:
        from quantlab.models import data_dir

        bench_dir = data_dir() / "bench"
    found = []
    for path in sorted(Path(bench_dir).glob(f"{kind}-*.json")):
        data = json.loads(path.read_text())
        head = data.get("header", data)
        if head.get("device") and head.get("date"):
            found.append(BenchFile(path, head["device"], str(head["date"]), data))
    return sorted(found, key=lambda b: (b.date, b.path.name), reverse=True)


def read_bench(kind: str, gpu: str | None = None, strict: bool = True,
               bench_dir: Path | None = None) -> BenchFile:
    """The newest <kind>-*.json (gpu None), or the newest whose device name contains `gpu`
    (case-insensitive: "H100", "h200"). With no such file: strict raises, listing the files
    there are; strict=False reads the newest of any GPU and says so in BenchFile.note."""
    files = bench_files(kind, bench_dir)
    if not files:
        raise ValueError(f"no {kind}-*.json with a device and a date in "
                         f"{bench_dir or 'data/bench'}: run the benchmark on a GPU first "
                         "(README, 'GPU numbers')")
    if gpu is None:
        return files[0]
    match = [b for b in files if gpu.lower() in b.device.lower()]
    if match:
        return match[0]
    listing = "; ".join(b.describe() for b in files)
    if strict:
        raise ValueError(f"no {kind}-*.json measured on a GPU named like {gpu!r}; there are: "
                         f"{listing}. Set GPU = None for the newest, or to part of one of "
                         "those device names")
    b = files[0]
    return BenchFile(b.path, b.device, b.date, b.data,
                     note=f"no {kind} file for {gpu!r}, so the newest one")


def kernel_shapes_figure(bench: dict, kernels: dict, floor_of: str | None = None,
                         ratio_to: dict | None = None, what: str = "") -> go.Figure:
    """bench: data/bench/kernels-*.json. kernels: row kernel name -> legend label (colours follow
    its order). One line per kernel the file measured at the shape, against M (log); a dropdown
    picks the (model, layer) shape. y: time in ms (log), plus a 'floor' line = max(bytes floor,
    compute floor) of kernel floor_of; or, with ratio_to (kernel -> its peer kernel), the peer's
    time divided by the kernel's (above 1: faster than it)."""
    h = bench["header"]
    rows = [r for r in bench["rows"] if "ms" in r and r.get("model")]
    shapes = list(dict.fromkeys((r["model"], r["layer"], r["N"], r["K"]) for r in rows
                                if r["kernel"] in kernels))
    fig, groups = go.Figure(), {}
    for m, layer, N, K in shapes:
        lab = f"{m} {layer} (N={N}, K={K})"
        groups[lab] = []
        here = [r for r in rows if r["model"] == m and r["layer"] == layer]
        at = lambda k, here=here: {r["M"]: r for r in here if r["kernel"] == k}
        series = []
        for i, (k, label) in enumerate(kernels.items()):
            ref = at(ratio_to[k]) if ratio_to else {}
            series.append((label, COLORS[i % len(COLORS)],
                           {M: (ref[M]["ms"] / r["ms"] if ratio_to else r["ms"])
                            for M, r in at(k).items() if not ratio_to or M in ref}))
        if floor_of:
            series.append(("floor", "#444", {M: max(r["floor_ms"], r["compute_ms"])
                                             for M, r in at(floor_of).items()}))
        for label, color, pts in series:
            if not pts:  # a kernel the file did not measure at this shape: no empty legend entry
                continue
            groups[lab].append(len(fig.data))
            Ms = sorted(pts)
            fig.add_trace(go.Scatter(
                x=Ms, y=[pts[M] for M in Ms], mode="lines+markers", name=label,
                line=dict(color=color, dash="dot" if label == "floor" else "solid"),
                hovertemplate=label + "<br>M=%{x}<br>%{y:.4g}<extra></extra>"))
    title = lambda lab: f"{what}: {lab} ({h['device']}, {h['date']})"
    dropdown(fig, groups, title_of=title)
    fig.update_layout(template="plotly_white", height=500,
                      xaxis_type="log", xaxis_title="M (tokens in the batch, log)",
                      xaxis_tickvals=sorted({r["M"] for r in rows}),
                      yaxis_type=None if ratio_to else "log",
                      yaxis_title=("speed relative to the peer (its time / ours)" if ratio_to
                                   else "time (ms, log)"))
    if ratio_to:
        fig.add_hline(y=1, line_dash="dot", line_color="#888")
    return fig


def roofline_figure(M: list[int], series: dict, title: str) -> go.Figure:
    """series: label -> list of ms per M (e.g. the byte floor, the compute floor, a measured
    kernel). Lines on log-log axes: where the byte and compute floors cross is the ridge."""
    fig = go.Figure()
    for i, (lab, ys) in enumerate(series.items()):
        fig.add_trace(go.Scatter(x=list(M), y=list(ys), mode="lines+markers", name=lab,
                                 line=dict(color=COLORS[i]),
                                 hovertemplate=lab + "<br>M=%{x}<br>%{y:.4g} ms<extra></extra>"))
    fig.update_layout(title=title, template="plotly_white", height=460, xaxis_type="log",
                      xaxis_tickvals=list(M),
                      legend=dict(x=0.99, xanchor="right", y=0.01, yanchor="bottom"),
                      yaxis_type="log", xaxis_title="M (tokens in the batch, log)",
                      yaxis_title="time (ms, log)")
    return fig


def decode_throughput_figure(e2e: dict, model: str = "8b", kv: str = "bf16",
                             context: int = 512) -> go.Figure:
    """e2e: a data/bench/e2e-<device>.json. Decode tokens/s against batch (log-log) for each
    scheme of `model` with a `kv` cache holding `context` positions, solid, with its byte floor
    (weights + KV read per step at the measured copy bandwidth) dotted in the same colour."""
    rows = [r for r in e2e["rows"] if r["model"] == model and r["kind"] == "decode"
            and r["kv"] == kv and r["context"] == context]
    fig = go.Figure()
    for i, scheme in enumerate(dict.fromkeys(r["scheme"] for r in rows)):
        rs = sorted((r for r in rows if r["scheme"] == scheme), key=lambda r: r["batch"])
        b = [r["batch"] for r in rs]
        color = COLORS[i % len(COLORS)]
        fig.add_trace(go.Scatter(x=b, y=[r["tokens_per_s"] for r in rs], mode="lines+markers",
                                 name=scheme, line=dict(color=color),
                                 hovertemplate=scheme + "<br>batch %{x}<br>%{y:.4g} tok/s"
                                 "<extra></extra>"))
        fig.add_trace(go.Scatter(x=b, y=[r["floor_tokens_per_s"] for r in rs], mode="lines",
                                 name=f"{scheme} floor", line=dict(color=color, dash="dot"),
                                 hovertemplate=scheme + " floor<br>batch %{x}<br>%{y:.4g} tok/s"
                                 "<extra></extra>"))
    scaled = " (times scaled from fewer layers)" if rows and rows[0]["scaled"] else ""
    fig.update_layout(title=f"{model}: decode tokens/s on {e2e['device']}{scaled}",
                      template="plotly_white", height=460, xaxis_type="log", yaxis_type="log",
                      xaxis_tickvals=sorted({r["batch"] for r in rows}),
                      xaxis_title="batch (sequences decoded together, log)",
                      yaxis_title="tokens/s (log)")
    return fig


@dataclass(frozen=True)
class RooflineScheme:
    """How one scheme's matmul moves bytes, as quantlab.kernels.bench counts them: weight bits
    per element with block scales, bytes per output row (per-channel scales), bytes per input
    activation element (bf16 2, fp8 1, plus an fp32 scale per token), the header key of the
    tensor-core rate its matmul runs at, the bench kernel that runs it, and the bench kernels
    measured beside it on the same layers (its peers, drawn where a file has them)."""

    bits: float
    row_bytes: int
    act_bytes: int
    rate: str
    kernel: str
    peers: tuple[str, ...] = ()

    def bytes_moved(self, M: int, N: int, K: int) -> float:
        """Weight, activations in and bf16 outputs out, each once: the byte floor's numerator."""
        token_scale = 4 * M if self.act_bytes == 1 else 0
        return (self.bits * N * K / 8 + self.row_bytes * N + self.act_bytes * M * K
                + token_scale + 2 * M * N)


# The schemes quantlab's kernels serve, as kernels/bench.py times them (a16: bf16 activations).
ROOFLINE_SCHEMES = {
    "bf16": RooflineScheme(16, 0, 2, "bf16_tflops", "cublas_bf16"),
    "w4a16 (int4, fp16 scale per 128)": RooflineScheme(
        4 + 16 / 128, 0, 2, "bf16_tflops", "ours_w4a16",
        tuple(k for k in W4A16_KERNELS if k != "ours_w4a16")),
    "mxfp4_a16 (E8M0 scale per 32)": RooflineScheme(4 + 8 / 32, 0, 2, "bf16_tflops",
                                                    "ours_mxfp4"),
    "nvfp4_a16 (E4M3 scale per 16)": RooflineScheme(4 + 8 / 16, 0, 2, "bf16_tflops",
                                                    "ours_nvfp4"),
    "fp8 W8A8 (per row x per token)": RooflineScheme(8, 4, 1, "fp8_tflops", "ours_fp8_row",
                                                     ("scaled_mm_row",)),
}


def roofline_point(bench: dict, scheme: str, M: int, N: int, K: int) -> dict:
    """bench: a data/bench/kernels-*.json (its header's copy bandwidth, GB/s, and matmul rates,
    TFLOP/s). For an (M, K) x (K, N) matmul of `scheme` (a ROOFLINE_SCHEMES key): arithmetic
    intensity (FLOP per byte moved), the byte floor and the compute floor (ms), which one binds,
    the ridge M where they cross (a float; None if they never do), the measured row of that
    shape and M if the file has it (else None), and "peers": the scheme's peer kernels the file
    measured at that shape and M, kernel -> row (in ROOFLINE_SCHEMES order; empty if none)."""
    if scheme not in ROOFLINE_SCHEMES:
        raise ValueError(f"scheme={scheme!r}: pick one of {list(ROOFLINE_SCHEMES)}")
    if min(M, N, K) < 1:
        raise ValueError(f"M={M}, N={N}, K={K}: each must be >= 1")
    s, h = ROOFLINE_SCHEMES[scheme], bench["header"]
    bw, rate = h["bandwidth"] * 1e9, h[s.rate] * 1e12
    nbytes, flops = s.bytes_moved(M, N, K), 2 * M * N * K
    # bytes = fixed (weights) + per-token (activations in, outputs out), both linear in M, as
    # are the flops: the floors cross where 2MNK / rate = bytes / bw (none if a token's bytes
    # alone take longer than its flops, as for a tiny layer).
    fixed = s.bytes_moved(0, N, K)
    per_m = s.bytes_moved(1, N, K) - fixed
    gap = 2 * N * K / rate - per_m / bw
    ridge = fixed / bw / gap if gap > 0 else None
    at = {}  # kernel -> its first row at this shape and M
    for r in bench["rows"]:
        if "ms" in r and (r["M"], r.get("N"), r.get("K")) == (M, N, K):
            at.setdefault(r["kernel"], r)
    memory_ms, compute_ms = nbytes / bw * 1e3, flops / rate * 1e3
    return {"intensity": flops / nbytes, "memory_ms": memory_ms, "compute_ms": compute_ms,
            "bound": "memory" if memory_ms >= compute_ms else "compute", "ridge_M": ridge,
            "measured": at.get(s.kernel), "peers": {k: at[k] for k in s.peers if k in at}}


def layer_roofline_figure(bench: dict, scheme: str, N: int, K: int, M: int,
                          Ms: tuple[int, ...] = (1, 4, 16, 64, 256, 1024, 4096)) -> go.Figure:
    """Time (ms, log) against M (log) for one (N, K) layer of `scheme` on bench's GPU: the byte
    floor, the compute floor, the measured kernel and each of its peers (ROOFLINE_SCHEMES) that
    the file measured at this shape, and a star at the chosen M."""
    Ms = sorted(set(Ms) | {M})
    pts = {m: roofline_point(bench, scheme, m, N, K) for m in Ms}
    series = {"byte floor": [pts[m]["memory_ms"] for m in Ms],
              "compute floor": [pts[m]["compute_ms"] for m in Ms]}
    fig = roofline_figure(Ms, series, "")
    meas = [(m, p["measured"]["ms"]) for m, p in pts.items() if p["measured"]]
    if meas:
        name = f"measured: {ROOFLINE_SCHEMES[scheme].kernel}"
        fig.add_trace(go.Scatter(x=[m for m, _ in meas], y=[t for _, t in meas],
                                 mode="lines+markers", name=name, line=dict(color=COLORS[2])))
    for i, k in enumerate(ROOFLINE_SCHEMES[scheme].peers):
        peer = [(m, p["peers"][k]["ms"]) for m, p in pts.items() if k in p["peers"]]
        if peer:  # only peers the file measured at this shape
            fig.add_trace(go.Scatter(
                x=[m for m, _ in peer], y=[t for _, t in peer], mode="lines+markers",
                name=f"measured: {W4A16_KERNELS.get(k, k)}",
                line=dict(color=COLORS[(4 + i) % len(COLORS)], dash="dash")))
    p = pts[M]
    fig.add_trace(go.Scatter(x=[M], y=[max(p["memory_ms"], p["compute_ms"])], mode="markers",
                             name=f"M = {M}: {p['bound']}-bound",
                             marker=dict(symbol="star", size=16, color=COLORS[3])))
    h = bench["header"]
    fig.update_layout(title=f"{scheme}, N={N}, K={K} on {h['device']} ({h['date']})")
    return fig


def _ratios(rows: list[dict], num: str, den: str, keep) -> list[float]:
    """num's time / den's time on every (model, layer, M) both have and keep(M) accepts."""
    t = {k: {(r["model"], r["layer"], r["M"]): r["ms"] for r in rows if r["kernel"] == k}
         for k in (num, den)}
    return [t[num][key] / t[den][key] for key in t[den] if key in t[num] and keep(key[2])]


def kernel_summary(bench: dict) -> dict:
    """The numbers chapter 8 quotes from a data/bench/kernels-*.json, over every model-layer
    shape: speed ratios (peer time / ours; above 1: ours faster) as (min, max) or sorted lists,
    our best fraction of the floor at M <= 16, gemlite's (None when the file has none), and
    Marlin's against cuBLAS on 8b gate_up (peer_vs_cublas; None when the file has none)."""
    rows = [r for r in bench["rows"] if "ms" in r and r.get("model")]
    span = lambda v: (min(v), max(v)) if v else None
    out = {
        "w4_floor_frac": max(r["floor_frac"] for r in rows
                             if r["kernel"] == "ours_w4a16" and r["M"] <= 16),
        "vs_cublas_m1": span(_ratios(rows, "cublas_bf16", "ours_w4a16", lambda m: m == 1)),
        # scales in x's dtype (the 16-bit "pairs" dequant) against fp16 scales, per M; {} if none
        "bf16s_vs_fp16s": {m: span(v) for m in (16, 64) if (v := _ratios(
            rows, "ours_w4a16", "ours_w4a16_bf16s", lambda mm, m=m: mm == m))},
        "vs_int4pack_m4": span(_ratios(rows, "aten_int4pack", "ours_w4a16", lambda m: m <= 4)),
        "vs_int4pack_m16": span(_ratios(rows, "aten_int4pack", "ours_w4a16",
                                        lambda m: m >= 16)),
        "vs_int4pack_m4096": span(_ratios(rows, "aten_int4pack", "ours_w4a16",
                                          lambda m: m == 4096)),
        "vs_cublas_m4096": span(_ratios(rows, "cublas_bf16", "ours_w4a16",
                                        lambda m: m == 4096)),
        "vs_cublas_mid": span(_ratios(rows, "cublas_bf16", "ours_w4a16",
                                      lambda m: 64 <= m <= 1024)),
        "fp8": {s: sorted(_ratios(rows, f"scaled_mm_{s}", f"ours_fp8_{s}", lambda m: m >= 256))
                for s in ("tensor", "row", "block")},
        "gemlite": None,
    }
    if any(r["kernel"] == "gemlite_w4a16" for r in rows):
        err = lambda k: [r["rel_err"] for r in rows if r["kernel"] == k and r["M"] == 1]
        out["gemlite"] = {"vs_ours_m1": span(_ratios(rows, "ours_w4a16", "gemlite_w4a16",
                                                     lambda m: m == 1)),
                          "rel_err_m1": span(err("gemlite_w4a16")),
                          "ours_rel_err_m1": span(err("ours_w4a16"))}
    out["marlin"] = peer_vs_cublas(rows, "marlin_w4a16", "8b", "gate_up")
    return out


def peer_vs_cublas(rows: list[dict], kernel: str, model: str, layer: str,
                   Ms: tuple[int, ...] = (1, 256)) -> dict | None:
    """A W4A16 kernel and ours on one (model, layer) of a kernels-*.json's rows: speed relative
    to cuBLAS bf16 (cuBLAS's time / its time; above 1: faster) at each M of Ms, under "vs_cublas"
    and "ours_vs_cublas", and the fraction of the floor each reaches at Ms[0] ("floor_frac",
    "ours_floor_frac"; at M = 1 the int4 byte floor, the same bytes for both). None unless the
    rows have all three kernels at every M of Ms."""
    t = {(r["kernel"], r["M"]): r for r in rows if "ms" in r
         and (r.get("model"), r.get("layer")) == (model, layer)}
    names = (kernel, "ours_w4a16", "cublas_bf16")
    if any((k, M) not in t for k in names for M in Ms):
        return None
    vs = lambda k: {M: t["cublas_bf16", M]["ms"] / t[k, M]["ms"] for M in Ms}
    return {"shape": f"{model} {layer}", "vs_cublas": vs(kernel),
            "ours_vs_cublas": vs("ours_w4a16"), "floor_frac": t[kernel, Ms[0]]["floor_frac"],
            "ours_floor_frac": t["ours_w4a16", Ms[0]]["floor_frac"]}
