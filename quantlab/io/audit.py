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

from quantlab.eval import sqnr_db
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


def _check_scale(name: str, q: QuantizedTensor, deq: Tensor, ref: Tensor | None) -> list[str]:
    problems = _check_scale_values(q)
    if problems:
        return problems
    amax = float(deq.abs().max())
    if q.global_scale is not None and amax > PLAUSIBLE_WEIGHT_MAX:
        inv_amax = amax / float(q.global_scale) ** 2
        problems.append(
            f"NVFP4 global scale looks inverted: dequantized |w| reaches {amax:.3g}; "
            f"with the reciprocal global scale it would reach {inv_amax:.3g}. compressed-tensors "
            "divides by weight_global_scale = 448*6/amax; ModelOpt multiplies by weight_scale_2 "
            "= amax/(448*6): store the reciprocal")
    if ref is not None:
        r = float(deq.float().pow(2).mean().sqrt() / ref.float().pow(2).mean().sqrt().clamp(
            min=1e-30))
        if not (1 / SCALE_RATIO_LIMIT <= r <= SCALE_RATIO_LIMIT):
            problems.append(f"scale is wrong: dequantized weights are {r:.3g}x the reference's "
                            "RMS (expected about 1)")
    return problems


def _error(deq: Tensor, ref: Tensor | None, name: str) -> tuple[float | None, float | None]:
    if ref is None:
        return None, None
    if tuple(ref.shape) != tuple(deq.shape):
        raise ValueError(f"{name}: the reference weight has shape {tuple(ref.shape)} but the "
                         f"checkpoint's is {tuple(deq.shape)}; is it the same model?")
    return sqnr_db(ref.float(), deq.float()), float((ref.float() - deq.float()).abs().max())


def _audit_layers(quantized: dict[str, QuantizedTensor], full: dict[str, Tensor],
                  ignored: set[str], reference: dict[str, Tensor] | None,
                  full_label) -> list[LayerAudit]:
    ref = reference or {}
    rows = []
    for name in sorted(set(quantized) | set(full)):
        r = ref.get(f"{name}.weight")
        if name in quantized:
            q = quantized[name]
            deq = dequantize(q, torch.float32)
            db, err = _error(deq, r, name)
            rows.append(LayerAudit(name, "quantized", _describe(q), q.bits_per_weight, db, err,
                                   _check_scale(name, q, deq, r)))
        else:
            w = full[name]
            status, problems = full_label(name)
            db, err = _error(w.float(), r, name)
            rows.append(LayerAudit(name, status, f"{str(w.dtype).removeprefix('torch.')}",
                                   float(torch.finfo(w.dtype).bits), db, err, problems))
    return rows


def audit_compressed_tensors(path: str | os.PathLike,
                             reference: dict[str, Tensor] | None = None) -> AuditReport:
    from quantlab.io.compressed_tensors import _matches_target, read_compressed_tensors

    ck = read_compressed_tensors(path)
    groups = ck.config["quantization_config"]["config_groups"]

    def ignored(name: str) -> bool:
        return any(_matches_target(name, p) and p != "Linear" for p in ck.ignore)

    def full_label(name: str):
        if ignored(name):
            return "ignored", []
        targeted = any(_matches_target(name, t) for g in groups.values()
                       for t in g.get("targets", []))
        if targeted:
            return "UNQUANTIZED", ["the config targets this layer and does not ignore it, but "
                                   "it is stored in full precision (silently unquantized)"]
        return "full precision", []

    rows = _audit_layers(ck.layers, ck.full_precision, set(ck.ignore), reference, full_label)
    for name in ck.ignore:
        if not name.startswith("re:") and name in ck.layers:
            row = next(r for r in rows if r.layer == name)
            row.problems.append("listed in ignore but stored quantized")
    return AuditReport(str(path), "compressed-tensors", rows)


def audit_gguf(path: str | os.PathLike, reference: dict[str, Tensor] | None = None
               ) -> AuditReport:
    from quantlab.io.gguf import read_gguf

    ck = read_gguf(path)
    full = {n: w for n, w in ck.other.items() if "embed" not in n}
    types = ck.types

    def full_label(name: str):
        t = types.get(name, "F32")
        if t in ("F16", "BF16", "F32"):
            return "full precision", []
        return "UNSUPPORTED", [f"stored as {t}, a GGUF type quantlab does not audit (it checks "
                               f"{', '.join(AUDITED_GGUF)}); its values were dequantized by "
                               "gguf-py but its scales were not checked"]

    rows = _audit_layers(ck.layers, full, set(), reference, full_label)
    for r in rows:
        if r.status != "quantized":
            r.scheme = types.get(r.layer, r.scheme)
            r.bits_per_weight = {"F16": 16.0, "BF16": 16.0, "F32": 32.0}.get(r.scheme, math.nan)
        else:
            r.scheme = f"{types[r.layer]}: {r.scheme}"
    return AuditReport(str(path), "gguf", rows)


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:  # 4 bytes, not the whole (maybe many-GB) file
        return f.read(4)


def audit(path: str | os.PathLike, reference: dict[str, Tensor] | None = None) -> AuditReport:
    """Audit a compressed-tensors directory or a .gguf file. reference: unquantized weights
    {"<module>.weight": tensor} (e.g. quantlab.io.read_safetensors_dir(original_dir))."""
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
