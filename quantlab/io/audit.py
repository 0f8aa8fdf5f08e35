"""Audit a quantized checkpoint: what each Linear layer really holds, and whether it is right.

For a compressed-tensors directory or a GGUF file: per layer, the scheme read from the tensors
(not just the config), bits per weight, and, given the unquantized weights, the error. Flags:
- a Linear layer the config targets but that is stored in full precision ("silently
  unquantized"), as opposed to one the ignore list keeps in full precision;
- a scale that cannot be right: dequantized weights far larger or smaller than the reference,
  or, with no reference, an NVFP4 global scale that implies absurd weights (the classic bug:
  ModelOpt's multiplied weight_scale_2 = amax / 2688 stored where compressed-tensors divides by
  weight_global_scale = 2688 / amax).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from quantlab.quantize import QuantizedTensor, dequantize
from quantlab.scales import GGUF_Q4_0

# Trained LLM weights stay far below this; an inverted NVFP4 global scale gives ~7e6 / amax.
PLAUSIBLE_WEIGHT_MAX = 1e3
AUDITED_GGUF = ("Q8_0", "Q4_0", "F16", "BF16", "F32")
SCALE_RATIO_LIMIT = 2.0  # rms(dequantized) / rms(reference) outside [1/2, 2]: a wrong scale


@dataclass
class LayerAudit:
    layer: str
    status: str  # "quantized", "ignored", "UNQUANTIZED", "UNSUPPORTED", "full precision"
    scheme: str
    bits_per_weight: float
    sqnr_db: float | None = None
    max_abs_error: float | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class AuditReport:
    path: str
    kind: str  # "compressed-tensors" or "gguf"
    layers: list[LayerAudit]

    @property
    def problems(self) -> list[str]:
        return [f"{r.layer}: {p}" for r in self.layers for p in r.problems]


def _describe(q: QuantizedTensor) -> str:
    from quantlab.io.compressed_tensors import preset_name

    name = preset_name(q.scheme)
    return f"{name} ({q.scheme.describe()})" if name else q.scheme.describe()


def _check_scale_values(q: QuantizedTensor) -> list[str]:
    """Scales no checkpoint should hold, whatever the reference: NaN/inf (the group decodes to
    NaN), negative (only GGUF Q4_0's signed d may be), all zero (the layer decodes to 0)."""
    problems = []
    s = q.scales.float()
    bad = int((~torch.isfinite(s)).sum())
    if bad:
        problems.append(f"{bad} of {s.numel()} scales are NaN or inf: those groups dequantize "
                        "to NaN; re-export from the original weights")
    signed = q.scheme.scale_rule is GGUF_Q4_0  # Q4_0 stores a signed scale (llama.cpp)
    neg = 0 if signed else int((s < 0).sum())
    if neg:
        problems.append(f"{neg} of {s.numel()} scales are negative; scales of this format are "
                        "positive: the checkpoint is corrupt or mislabelled")
    if bool((s == 0).all()):
        problems.append("every scale is 0: the layer dequantizes to all zeros")
    g = q.global_scale
    if g is not None and not (bool(torch.isfinite(g).all()) and bool((g > 0).all())):
        problems.append(f"global scale {g.flatten().tolist()} is not finite and positive")
    return problems


@dataclass(frozen=True)
class _Stats:
    """What the audit asks of (checkpoint values, reference): sums in float64 over row chunks,
    so no float32 copy of a whole (maybe 128256 x 4096) tensor is made beyond the two given."""

    amax: float  # max |approx|
    sqnr_db: float | None  # 10 log10(sum ref^2 / sum (ref - approx)^2)
    max_abs_error: float | None
    rms_ratio: float | None  # rms(approx) / rms(ref)


def _stats(name: str, approx: Tensor, ref: Tensor | None, rows: int = 2**24) -> _Stats:
    """approx (N, K) and ref (N, K) of any float dtype; chunks of about `rows` elements."""
    if ref is not None and tuple(ref.shape) != tuple(approx.shape):
        raise ValueError(f"{name}: the reference weight has shape {tuple(ref.shape)} but the "
                         f"checkpoint's is {tuple(approx.shape)}; is it the same model?")
    step = max(1, rows // max(1, approx[0].numel())) if approx.ndim > 1 else len(approx)
    amax = err = 0.0
    sig = noise = power = 0.0
    for i in range(0, len(approx), step):
        a = approx[i:i + step].float()
        amax = max(amax, float(a.abs().max()) if a.numel() else 0.0)
        if ref is None:
            continue
        r = ref[i:i + step].float()
        d = r - a
        err = max(err, float(d.abs().max()) if d.numel() else 0.0)
        sig += float(torch.sum(r * r, dtype=torch.float64))
        noise += float(torch.sum(d * d, dtype=torch.float64))
        power += float(torch.sum(a * a, dtype=torch.float64))
    if ref is None:
        return _Stats(amax, None, None, None)
    db = math.inf if noise == 0 else -math.inf if sig == 0 else 10 * math.log10(sig / noise)
    return _Stats(amax, db, err, math.sqrt(power) / max(math.sqrt(sig), 1e-30))


def _check_scale(q: QuantizedTensor, st: _Stats) -> list[str]:
    problems = _check_scale_values(q)
    if problems:
        return problems
    if q.global_scale is not None and st.amax > PLAUSIBLE_WEIGHT_MAX:
        inv_amax = st.amax / float(q.global_scale) ** 2
        problems.append(
            f"NVFP4 global scale looks inverted: dequantized |w| reaches {st.amax:.3g}; "
            f"with the reciprocal global scale it would reach {inv_amax:.3g}. compressed-tensors "
            "divides by weight_global_scale = 448*6/amax; ModelOpt multiplies by weight_scale_2 "
            "= amax/(448*6): store the reciprocal")
    r = st.rms_ratio
    if r is not None and not (1 / SCALE_RATIO_LIMIT <= r <= SCALE_RATIO_LIMIT):
        problems.append(f"scale is wrong: dequantized weights are {r:.3g}x the reference's "
                        "RMS (expected about 1)")
    return problems


def _audit_one(name: str, value: QuantizedTensor | Tensor, reference, full_label) -> LayerAudit:
    """One layer's row; reference: anything with .get("<module>.weight") (a dict, or
    io.stream.LazyCheckpoint, which reads that one tensor)."""
    ref = reference.get(f"{name}.weight") if reference is not None else None
    if isinstance(value, QuantizedTensor):
        deq = dequantize(value, torch.float32)
        st = _stats(name, deq, ref)
        return LayerAudit(name, "quantized", _describe(value), value.bits_per_weight,
                          st.sqnr_db, st.max_abs_error, _check_scale(value, st))
    status, problems = full_label(name)
    st = _stats(name, value, ref)
    return LayerAudit(name, status, f"{str(value.dtype).removeprefix('torch.')}",
                      float(torch.finfo(value.dtype).bits), st.sqnr_db, st.max_abs_error,
                      problems)


def audit_compressed_tensors(path: str | os.PathLike, reference=None) -> AuditReport:
    """Module by module: each module's tensors are read (memory-mapped, io.stream), decoded,
    checked and dropped before the next, so memory peaks at about the largest tensor."""
    from quantlab.io.compressed_tensors import (
        _matches_target,
        decode_module,
        module_names,
        read_quantization_config,
    )
    from quantlab.io.stream import LazyCheckpoint

    path = Path(path)
    _, qc = read_quantization_config(path)
    groups, ignore = qc["config_groups"], list(qc.get("ignore") or [])
    ckpt = LazyCheckpoint(path)
    by_module: dict[str, list[str]] = {}
    for n in ckpt:
        by_module.setdefault(n.rpartition(".")[0], []).append(n)

    def full_label(name: str):
        if any(_matches_target(name, p) and p != "Linear" for p in ignore):
            return "ignored", []
        targeted = any(_matches_target(name, t) for g in groups.values()
                       for t in g.get("targets", []))
        if targeted:
            return "UNQUANTIZED", ["the config targets this layer and does not ignore it, but "
                                   "it is stored in full precision (silently unquantized)"]
        return "full precision", []

    rows = []
    for mod in module_names(ckpt):
        names = by_module[mod]
        local = {n[len(mod) + 1:]: t for n, t in ckpt.load(names).items()}
        value = decode_module(mod, local, qc, path / "config.json")
        del local
        if value is not None:
            rows.append(_audit_one(mod, value, reference, full_label))
        del value
    for row in rows:
        if row.layer in ignore and row.status == "quantized":
            row.problems.append("listed in ignore but stored quantized")
    return AuditReport(str(path), "compressed-tensors", rows)


def audit_gguf(path: str | os.PathLike, reference=None) -> AuditReport:
    """Tensor by tensor (io.gguf.iter_gguf reads each one's bytes when it is reached)."""
    from quantlab.io.gguf import iter_gguf

    _, tensors = iter_gguf(path)
    types: dict[str, str] = {}

    def full_label(name: str):
        t = types.get(name, "F32")
        if t in ("F16", "BF16", "F32"):
            return "full precision", []
        return "UNSUPPORTED", [f"stored as {t}, a GGUF type quantlab does not audit (it checks "
                               f"{', '.join(AUDITED_GGUF)}); its values were dequantized by "
                               "gguf-py but its scales were not checked"]

    rows = []
    for name, qtype, load in tensors:
        types[name] = qtype
        if load is None or ("embed" in name and qtype not in ("Q8_0", "Q4_0")):
            continue  # norms; a full-precision embedding is no Linear layer
        value = load()
        r = _audit_one(name, value, reference, full_label)
        if r.status != "quantized":
            r.scheme = qtype
            r.bits_per_weight = {"F16": 16.0, "BF16": 16.0, "F32": 32.0}.get(qtype, math.nan)
        else:
            r.scheme = f"{qtype}: {r.scheme}"
        rows.append(r)
        del value
    rows.sort(key=lambda r: r.layer)
    return AuditReport(str(path), "gguf", rows)


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:  # 4 bytes, not the whole (maybe many-GB) file
        return f.read(4)


def audit(path: str | os.PathLike, reference=None) -> AuditReport:
    """Audit a compressed-tensors directory or a .gguf file, one tensor in memory at a time.
    reference: the unquantized weights, anything with .get("<module>.weight") -> tensor or None:
    a dict, or quantlab.io.stream.LazyCheckpoint(original_dir), which reads each when asked."""
    path = Path(path)
    if path.suffix == ".gguf" or (path.is_file() and _magic(path) == b"GGUF"):
        return audit_gguf(path, reference)
    if path.is_dir():
        return audit_compressed_tensors(path, reference)
    raise FileNotFoundError(f"{path} is neither a compressed-tensors directory (with config.json)"
                            " nor a .gguf file")


def format_audit(report: AuditReport) -> str:
    from quantlab.report import format_table

    rows = [{"layer": r.layer, "status": r.status, "scheme": r.scheme,
             "bits": r.bits_per_weight,
             "sqnr": "-" if r.sqnr_db is None else f"{r.sqnr_db:.2f}",
             "err": "-" if r.max_abs_error is None else f"{r.max_abs_error:.3g}",
             "flag": "PROBLEM" if r.problems else ""} for r in report.layers]
    text = format_table(rows, [("layer", "layer", ""), ("status", "status", ""),
                               ("scheme", "scheme read from the tensors", ""),
                               ("bits", "bits/weight", ".3f"), ("sqnr", "SQNR dB", ">"),
                               ("err", "max |err|", ">"), ("flag", "", "")])
    n_q = sum(r.status == "quantized" for r in report.layers)
    lines = [f"{report.kind} checkpoint {report.path}: {n_q} of {len(report.layers)} Linear "
             "layers quantized", text]
    problems = report.problems
    lines.append(f"{len(problems)} problem(s)" + (":" if problems else "."))
    lines += [f"  - {p}" for p in problems]
    return "\n".join(lines)
