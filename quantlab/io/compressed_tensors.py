"""compressed-tensors checkpoints (what llm-compressor writes and vLLM serves), both ways.

Layout per quantized Linear (compressed-tensors 0.20, compressors/*/base.py):
- float-quantized / int-quantized: `weight` as float8_e4m3fn / int8, `weight_scale`, and a
  static `input_scale` for static activations.
- pack-quantized (int weights, 16-bit activations): `weight_packed` int32 (N, K * bits / 32),
  element i at bits [bits * (i % (32 / bits)), ...) of word i // (32 / bits), stored with a
  +2**(bits-1) offset; `weight_shape` int64 [N, K]; `weight_scale`; asymmetric schemes add
  `weight_zero_point` packed the same way along dim 0: (N * bits / 32, groups).
- nvfp4-pack-quantized: `weight_packed` uint8 (N, K / 2), element 2i in the low nibble, each nibble
  an E2M1 bit pattern; `weight_scale` float8_e4m3fn (N, K / 16); `weight_global_scale` fp32 (1,)
  that is *divided by* (= 448 * 6 / amax), the reciprocal of quantlab's multiplied global scale;
  W4A4 adds a calibrated `input_global_scale`.
Our unsigned asymmetric int4 codes u in [0, 15] with zero points z in [0, 15] are exactly the
stored nibbles: compressed-tensors' signed codes u - 8 and zero points z - 8 plus its +8 offset.

Scales are stored in the export dtype when every scale is exactly representable in it (what
llm-compressor does), else in float32, so the peer's decompressor reproduces our dequantized
weights bit for bit. NVFP4 is the exception, and cannot be bit-exact in float32: the peer computes
code * (block_scale / weight_global_scale) and we compute code * block_scale * global_scale;
the two fp32 roundings differ by at most an ulp or two (tests pin the bound).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from quantlab.io.safetensors_io import atomic_output, read_safetensors_dir, torch_dtype_name
from quantlab.layers import matches
from quantlab.nn import QuantLinear
from quantlab.packing import pack_nibbles, unpack_nibbles
from quantlab.quantize import NVFP4_GLOBAL_DENOM, QuantizedTensor
from quantlab.scales import NVFP4, Absmax
from quantlab.schemes import PRESETS, Scheme, TensorScheme

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")
SUPPORTED = ("fp8_per_tensor", "fp8_dynamic", "fp8_block", "int8_w8a8", "w8a16", "w4a16",
             "w4a16_asym", "nvfp4", "nvfp4_a16")
STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------- scheme <-> config JSON

def weight_args(ts: TensorScheme) -> dict:
    """Our weight TensorScheme -> compressed-tensors QuantizationArgs as JSON (model_dump form)."""
    if ts.scale_rule == NVFP4:
        return {"dynamic": False, "group_size": 16, "num_bits": 4,
                "scale_dtype": "torch.float8_e4m3fn", "strategy": "tensor_group",
                "symmetric": True, "type": "float"}
    kinds = {"e4m3": ("float", 8), "int8": ("int", 8), "int4": ("int", 4), "uint4": ("int", 4)}
    if ts.format not in kinds or not isinstance(ts.scale_rule, Absmax):
        raise ValueError(f"{ts.describe()} has no compressed-tensors layout; export one of "
                         f"{', '.join(SUPPORTED)}, or use --format gguf for gguf_q8_0/gguf_q4_0")
    typ, bits = kinds[ts.format]
    args = {"dynamic": False, "group_size": ts.group_size, "num_bits": bits,
            "strategy": ts.granularity.name, "symmetric": ts.symmetric, "type": typ}
    if ts.block is not None:
        args["block_structure"] = list(ts.block)
    return args


def activation_args(ts: TensorScheme | None) -> dict | None:
    if ts is None:
        return None
    if ts.scale_rule == NVFP4:
        # dynamic "local": per-block scales from each input, global scale calibrated (static).
        return {"dynamic": "local", "group_size": 16, "num_bits": 4,
                "scale_dtype": "torch.float8_e4m3fn", "strategy": "tensor_group",
                "symmetric": True, "type": "float"}
    kinds = {"e4m3": ("float", 8), "int8": ("int", 8)}
    if ts.format not in kinds or not isinstance(ts.scale_rule, Absmax) or not ts.symmetric:
        raise ValueError(f"activations {ts.describe()} have no compressed-tensors layout; export "
                         f"one of {', '.join(SUPPORTED)}")
    typ, bits = kinds[ts.format]
    return {"dynamic": ts.dynamic, "group_size": ts.group_size, "num_bits": bits,
            "strategy": ts.granularity.name, "symmetric": True, "type": typ}


def compression_format(scheme: Scheme) -> str:
    """The compressed-tensors format llm-compressor infers for a scheme (infer_model_format)."""
    w = scheme.weights
    if w.scale_rule == NVFP4:
        return "nvfp4-pack-quantized"
    if w.format == "e4m3":
        return "float-quantized"
    act_float = scheme.activations is not None and scheme.activations.format == "e4m3"
    if scheme.activations is None or (w.element_bits < 8 and not act_float):
        return "pack-quantized"
    return "int-quantized"


def scheme_from_args(w: dict) -> TensorScheme:
    """compressed-tensors weight args (JSON) -> our TensorScheme (scale format guessed fp32;
    read_compressed_tensors sets it from the stored dtype)."""
    typ, bits, strat = w.get("type"), w.get("num_bits"), w.get("strategy")
    if typ == "float" and bits == 4 and strat == "tensor_group" and w.get("group_size") == 16:
        return TensorScheme("e2m1", "group", group_size=16, scale_format="e4m3",
                            scale_rule="nvfp4")
    fmt = {("float", 8): "e4m3", ("int", 8): "int8", ("int", 4): "int4"}.get((typ, bits))
    if fmt is None or strat not in ("tensor", "channel", "group", "block"):
        raise ValueError(f"weights {w} are not a layout quantlab reads (float8, int8, int4 "
                         "per tensor/channel/group/block, or NVFP4)")
    sym = w.get("symmetric", True)
    if not sym and fmt != "int4":
        raise ValueError(f"asymmetric {typ}{bits} weights are not supported: {w}")
    return TensorScheme(fmt if sym else "uint4", strat,
                        group_size=w.get("group_size") if strat == "group" else None,
                        block=tuple(w["block_structure"]) if strat == "block" else None,
                        symmetric=sym)


# ---------------------------------------------------------------- packing

def pack_int32(codes: Tensor, bits: int) -> Tensor:
    """(N, K) stored codes (unsigned, < 2**bits) -> (N, K * bits / 32) int32, little-endian,
    element i in the bits [bits * (i % (32 / bits)), ...) of word i // (32 / bits)."""
    if sys.byteorder != "little":
        raise RuntimeError("int32 packing assumes a little-endian host")
    K = codes.shape[-1]
    if (K * bits) % 32:
        raise ValueError(f"K={K} is not a multiple of {32 // bits}: pad the layer to pack it")
    b = pack_nibbles(codes) if bits == 4 else codes.to(torch.uint8)
    # a fresh tensor: contiguous() may keep stride 1 on a size-1 dim (one zero-point group),
    # which view(int32) refuses
    return b.new_empty(b.shape).copy_(b).view(torch.int32)


def unpack_int32(packed: Tensor, bits: int, cols: int) -> Tensor:
    """Inverse of pack_int32: (N, W) int32 -> (N, cols) uint8 stored codes."""
    b = packed.contiguous().view(torch.uint8)
    u = unpack_nibbles(b) if bits == 4 else b
    if u.shape[-1] < cols:
        raise ValueError(f"packed tensor holds {u.shape[-1]} values per row, fewer than {cols}")
    return u[..., :cols]


def _pad_rows(x: Tensor, multiple: int) -> Tensor:
    pad = -x.shape[0] % multiple
    return torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x


def _store_scale(s: Tensor, dtype: torch.dtype) -> Tensor:
    """float32 scales in `dtype` if that is lossless, else float32 (bit-exact decompression)."""
    s = s.float()
    low = s.to(dtype)
    return low if torch.equal(low.float(), s) else s


def nvfp4_divisor(glob: Tensor) -> Tensor:
    """quantlab's multiplied global scale -> compressed-tensors' divided weight_global_scale,
    (1,) float32, chosen among fp32 neighbours of 1/glob so that 1 / stored == glob exactly
    when one exists (then import gives back our global scale bit for bit)."""
    g = glob.float().reshape(1)
    d = 1.0 / g
    for cand in (d, torch.nextafter(d, d + 1), torch.nextafter(d, d - 1)):
        if torch.equal(1.0 / cand, g):
            return cand
    return d


def layer_tensors(q: QuantizedTensor, dtype: torch.dtype, fmt: str) -> dict[str, Tensor]:
    """One QuantizedTensor (N, K) -> its tensors (local names) in compressed-tensors format fmt."""
    ts = q.scheme
    if len(q.shape) != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(q.shape)}")
    if ts.scale_rule == NVFP4:
        return {"weight_packed": pack_nibbles(q.codes),
                "weight_scale": q.scales.to(torch.float8_e4m3fn),
                "weight_global_scale": nvfp4_divisor(q.global_scale)}
    scale = q.scales.reshape(1) if q.scales.ndim == 0 else q.scales
    out = {"weight_scale": _store_scale(scale, dtype)}
    if ts.format == "e4m3":
        out["weight"] = q.codes.view(torch.float8_e4m3fn)
        return out
    bits = ts.element_bits
    if fmt != "pack-quantized":
        out["weight"] = q.codes.to(torch.int8)
        return out
    offset = 0 if not ts.symmetric else 1 << (bits - 1)
    out["weight_packed"] = pack_int32((q.codes.to(torch.int32) + offset).to(torch.uint8), bits)
    out["weight_shape"] = torch.tensor(list(q.shape), dtype=torch.int64)
    if q.zero_points is not None:
        zp = _pad_rows(q.zero_points.to(torch.uint8), 32 // bits)
        out["weight_zero_point"] = pack_int32(zp.t().contiguous(), bits).t().contiguous()
    return out


# ---------------------------------------------------------------- export

def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def full_precision_linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def quantization_config(model: nn.Module) -> dict:
    """config.json's quantization_config for a model quantized with quantize_model: one config
    group per scheme (targets ["Linear"] when a single scheme covers every quantized layer),
    every Linear left in full precision in `ignore`."""
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("the model has no QuantLinear layers: run quantlab.nn.quantize_model "
                         "(model, scheme) first")
    return quantization_config_for({n: m.scheme for n, m in layers.items()},
                                   full_precision_linears(model))


def quantization_config_for(schemes_by_layer: dict[str, Scheme], full_precision: list[str]
                            ) -> dict:
    """quantization_config from names alone: {quantized layer: its scheme} in module order and
    the Linear layers left in full precision (what the layer-sequential exporter knows)."""
    by_scheme: dict[str, list[str]] = {}
    schemes: dict[str, Scheme] = {}
    for name, s in schemes_by_layer.items():
        by_scheme.setdefault(s.name, []).append(name)
        schemes[s.name] = s
    formats = {compression_format(s) for s in schemes.values()}
    groups = {}
    for i, (sname, names) in enumerate(by_scheme.items()):
        s = schemes[sname]
        groups[f"group_{i}"] = {
            "format": compression_format(s),
            "input_activations": activation_args(s.activations),
            "output_activations": None,
            "targets": ["Linear"] if len(by_scheme) == 1 else names,
            "weights": weight_args(s.weights)}
    import quantlab
    return {"config_groups": groups,
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "global_compression_ratio": None,
            "ignore": list(full_precision),
            "kv_cache_scheme": None,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
            "sparsity_config": {},
            "transform_config": {},
            "version": f"quantlab-{getattr(quantlab, '__version__', '0')}"}


def model_tensors(model: nn.Module, dtype: torch.dtype,
                  input_global_scales: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The whole checkpoint: compressed tensors for QuantLinear layers, everything else in dtype."""
    layers = quantized_layers(model)
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        prefix = name.rpartition(".")[0]
        if prefix in layers and name != f"{prefix}.bias":
            continue  # replaced by the layer's compressed tensors below
        if tied and t.data_ptr() in seen:
            continue  # tied lm_head: transformers re-ties it on load
        seen.add(t.data_ptr())
        out[name] = (t.to(dtype) if t.is_floating_point() else t).contiguous().clone()
    for name, m in layers.items():
        for local, t in layer_tensors(m.qweight, dtype, compression_format(m.scheme)).items():
            out[f"{name}.{local}"] = t
        if m.input_scale is not None:
            # a copy: GPTQ gives q/k/v one shared scale tensor, which safetensors refuses to save
            out[f"{name}.input_scale"] = m.input_scale.float().reshape(1).clone()
        act = m.scheme.activations
        if act is not None and act.scale_rule == NVFP4:
            if not input_global_scales or name not in input_global_scales:
                raise ValueError(
                    f"{name}: {m.scheme.name} (W4A4) needs a calibrated input_global_scale "
                    "(448 * 6 / amax of the layer's inputs); compute them with "
                    "quantlab.io.compressed_tensors.calibrate_input_global_scales(model, ids) "
                    "or export nvfp4_a16 instead")
            out[f"{name}.input_global_scale"] = input_global_scales[name].float().reshape(1)
    return out


@torch.inference_mode()
def calibrate_input_global_scales(model: nn.Module, ids: Tensor) -> dict[str, Tensor]:
    """NVFP4 W4A4: per QuantLinear, input_global_scale = 448 * 6 / amax(its inputs on ids (B, T)),
    as llm-compressor's static_minmax observer does; compressed-tensors divides by it."""
    from quantlab.algorithms.calibration import capture_linear_io

    names = [n for n, m in quantized_layers(model).items()
             if m.scheme.activations is not None and m.scheme.activations.scale_rule == NVFP4]
    acts = capture_linear_io(model, names, ids)
    return {n: NVFP4_GLOBAL_DENOM / a.abs().amax().clamp(min=1e-12) for n, a in acts.items()}


def export_compressed_tensors(model: nn.Module, out: str | Path, tokenizer=None,
                              source_dir: str | Path | None = None,
                              dtype: torch.dtype = torch.bfloat16,
                              input_global_scales: dict[str, Tensor] | None = None,
                              overwrite: bool = False) -> Path:
    """Write a Hugging Face directory (config.json with quantization_config, model.safetensors,
    tokenizer files) for a model quantized with quantlab.nn.quantize_model. dtype: the dtype of
    every unquantized tensor and of config.json's dtype. source_dir: the original checkpoint
    directory, whose tokenizer and generation_config files are copied (else tokenizer.save_
    pretrained). Written to a temporary directory and renamed: a failure leaves nothing."""
    from safetensors.torch import save_file

    qconfig = quantization_config(model)
    tensors = model_tensors(model, dtype, input_global_scales)
    with atomic_output(out, overwrite, source=source_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_config_and_tokenizer(tmp, model.config.to_dict(), dtype, qconfig, source_dir,
                                   tokenizer)
    return Path(out)


def write_config_and_tokenizer(folder: Path, config: dict, dtype: torch.dtype, qconfig: dict,
                               source_dir: str | Path | None = None, tokenizer=None) -> None:
    """config.json (the model's config with dtype and quantization_config) and the tokenizer and
    generation_config files (copied from source_dir, else tokenizer.save_pretrained)."""
    config = dict(config)
    config["dtype"] = torch_dtype_name(dtype)
    config.pop("torch_dtype", None)
    config["quantization_config"] = qconfig
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copied = False
    if source_dir is not None:
        for f in TOKENIZER_FILES:
            if (Path(source_dir) / f).is_file():
                shutil.copy2(_inside(Path(source_dir), f), folder / f)
                copied = copied or f.startswith("tokenizer")
    if tokenizer is not None and not copied:
        tokenizer.save_pretrained(str(folder))


def _inside(source_dir: Path, name: str) -> Path:
    """source_dir / name, refusing a symlink that leads out of the model folder (a Hugging Face
    cache snapshot's links into its own blobs/ folder are fine)."""
    path, root = source_dir / name, source_dir.resolve()
    real = path.resolve()
    allowed = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    if not any(real == a or a in real.parents for a in allowed):
        raise ValueError(f"{path} is a link to {real}, outside the model folder {root}; quantlab "
                         "will not copy files from elsewhere into an export: replace the link "
                         "with the file itself")
    return path


def vllm_serve_command(out: str | Path, scheme: Scheme | None = None) -> str:
    """The command line that serves an exported directory with vLLM."""
    line = f"vllm serve {out} --quantization compressed-tensors"
    if scheme is not None and scheme.weights.scale_rule == NVFP4:
        line += "  # NVFP4 kernels need Blackwell (sm100); Hopper falls back to emulation or Marlin"
    return line


# ---------------------------------------------------------------- import

@dataclass
class CompressedCheckpoint:
    """What a compressed-tensors directory holds. layers: quantized Linear weights by module name;
    full_precision: 2-D float '.weight' tensors other than embeddings (Linear layers left
    unquantized) by module name; targeted: module names the config's groups cover minus its
    ignore list; group_of: module name -> config group name."""

    config: dict
    layers: dict[str, QuantizedTensor] = field(default_factory=dict)
    full_precision: dict[str, Tensor] = field(default_factory=dict)
    ignore: list[str] = field(default_factory=list)
    group_of: dict[str, str] = field(default_factory=dict)


def _matches_target(name: str, target: str) -> bool:
    """compressed-tensors' rule: "Linear" (the class) targets every linear, else an exact name
    or "re:<regex>"."""
    return target == "Linear" or matches(name, target, loose=False)


def _check_groups(cfg_path: Path, groups, ignore) -> None:
    """config_groups {name: {targets: [str], weights: {...}}} and ignore [str], with every
    "re:" pattern a valid regex; else ValueError naming the field."""
    import re

    def patterns(where: str, items) -> None:
        if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
            raise ValueError(f"{cfg_path}: {where} must be a list of layer names or 're:' "
                             f"patterns, got {items!r}")
        for t in items:
            if t.startswith("re:"):
                try:
                    re.compile(t[3:])
                except re.error as err:
                    raise ValueError(f"{cfg_path}: {where} pattern {t!r} is not a valid "
                                     f"regular expression ({err})") from err

    if not isinstance(groups, dict):
        raise ValueError(f"{cfg_path}: config_groups must be an object {{name: group}}, got "
                         f"{type(groups).__name__}")
    for name, g in groups.items():
        if not isinstance(g, dict) or not isinstance(g.get("weights"), dict):
            raise ValueError(f"{cfg_path}: config group {name!r} must be an object with "
                             f"'targets' and 'weights', got {g!r}")
        patterns(f"config group {name!r} targets", g.get("targets", []))
    patterns("ignore", ignore)


def read_quantization_config(path: str | Path) -> tuple[dict, dict]:
    """(config.json, its checked quantization_config) of a compressed-tensors directory, reading
    no tensor. Raises ValueError when the config is malformed or not compressed-tensors."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path} holds a JSON {type(config).__name__}, not an object; a "
                         "Hugging Face config.json is {{...}}: re-export the checkpoint")
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        raise ValueError(f"{cfg_path}: quantization_config.quant_method is {method!r}, not "
                         "'compressed-tensors'; quantlab audits compressed-tensors directories "
                         "and .gguf files")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise ValueError(f"{cfg_path}: quantization_config has no config_groups")
    _check_groups(cfg_path, groups, qc.get("ignore") or [])
    return config, qc


def module_names(tensor_names) -> list[str]:
    """The modules (sorted) holding a `weight` or `weight_packed` among the tensor names."""
    return sorted({n.rpartition(".")[0] for n in tensor_names
                   if n.endswith((".weight", ".weight_packed"))})


def decode_module(mod: str, local: dict[str, Tensor], qc: dict, cfg_path: Path
                  ) -> QuantizedTensor | Tensor | None:
    """One module's tensors (local names) -> QuantizedTensor (quantized), its 2-D float weight
    (a Linear left in full precision), or None (an embedding, a norm)."""
    groups = qc["config_groups"]
    gname = next((g for g, spec in groups.items()
                  if any(_matches_target(mod, t) for t in spec.get("targets", []))), None)
    w = local.get("weight")
    if w is not None and w.is_floating_point() and w.dtype not in (torch.float8_e4m3fn,):
        return w if w.ndim == 2 and "embed" not in mod else None
    if gname is None:
        raise ValueError(f"{mod} holds quantized tensors {sorted(local)} but no config "
                         "group targets it; the config does not match the tensors")
    fmt = groups[gname].get("format") or qc.get("format")
    try:
        return decode_layer(mod, local, groups[gname]["weights"], fmt)
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{cfg_path}: config group {gname!r} has malformed weights "
                         f"{groups[gname]['weights']!r} ({type(err).__name__}: {err}); "
                         "compare it with a compressed-tensors preset") from err


def read_compressed_tensors(path: str | Path) -> CompressedCheckpoint:
    """A compressed-tensors directory -> CompressedCheckpoint. Reads only config.json and
    safetensors. Raises ValueError when the config and the tensors disagree. (io.audit reads
    the same module by module: read_quantization_config, then decode_module.)"""
    path = Path(path)
    config, qc = read_quantization_config(path)
    tensors = read_safetensors_dir(path)
    ckpt = CompressedCheckpoint(config=config, ignore=list(qc.get("ignore") or []))
    for mod in module_names(tensors):
        local = {n[len(mod) + 1:]: t for n, t in tensors.items() if n.startswith(mod + ".")
                 and "." not in n[len(mod) + 1:]}
        got = decode_module(mod, local, qc, path / "config.json")
        if isinstance(got, QuantizedTensor):
            ckpt.layers[mod] = got
            ckpt.group_of[mod] = next(g for g, spec in qc["config_groups"].items() if any(
                _matches_target(mod, t) for t in spec.get("targets", [])))
        elif got is not None:
            ckpt.full_precision[mod] = got
    return ckpt


def _expect(mod: str, what: str, t: Tensor | None, shape=None, dtype=None) -> Tensor:
    if t is None:
        raise ValueError(f"{mod}: {what} is missing; the config and the tensors disagree")
    if dtype is not None and t.dtype not in (dtype if isinstance(dtype, tuple) else (dtype,)):
        raise ValueError(f"{mod}.{what} is {t.dtype}, expected {dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{mod}.{what} has shape {tuple(t.shape)}, but the config's scheme "
                         f"and the weight shape need {tuple(shape)}")
    return t


def _scale_shape(ts: TensorScheme, shape: tuple[int, int]) -> tuple[int, ...]:
    """The stored weight_scale's shape: the granularity's, one value per tensor as (1,)."""
    ts.granularity.check(shape)
    return ts.granularity.scale_shape(shape) or (1,)


def _scale_format(t: Tensor) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(t.dtype, "fp32")


def decode_layer(mod: str, local: dict[str, Tensor], wargs: dict, fmt: str) -> QuantizedTensor:
    """One layer's compressed-tensors tensors (local names) -> QuantizedTensor."""
    ts = scheme_from_args(wargs)
    if ts.scale_rule == NVFP4:
        packed = _expect(mod, "weight_packed", local.get("weight_packed"), dtype=torch.uint8)
        N, K = packed.shape[0], packed.shape[1] * 2
        scale = _expect(mod, "weight_scale", local.get("weight_scale"), (N, K // 16),
                        torch.float8_e4m3fn)
        gs = _expect(mod, "weight_global_scale", local.get("weight_global_scale"))
        if gs.numel() != 1:
            raise ValueError(f"{mod}.weight_global_scale has {gs.numel()} values, expected 1")
        return QuantizedTensor(unpack_nibbles(packed), scale.float(), ts, torch.Size((N, K)),
                               torch.float32, None, (1.0 / gs.float()).reshape(()))
    if "weight_packed" in local:
        if fmt not in ("pack-quantized", "mixed-precision"):
            raise ValueError(f"{mod} holds weight_packed but its config format is {fmt!r}")
        shape = _expect(mod, "weight_shape", local.get("weight_shape"))
        N, K = (int(v) for v in shape.tolist())
        bits = ts.element_bits
        packed = _expect(mod, "weight_packed", local["weight_packed"], (N, -(-K * bits // 32)),
                         torch.int32)
        u = unpack_int32(packed, bits, K)
        codes = (u.to(torch.int16) - (1 << (bits - 1))).to(torch.int8) if ts.symmetric else u
        sshape = _scale_shape(ts, (N, K))
        scale = _expect(mod, "weight_scale", local.get("weight_scale"), sshape)
        zp = None
        if not ts.symmetric:
            zpp = _expect(mod, "weight_zero_point", local.get("weight_zero_point"),
                          (-(-sshape[0] * bits // 32), sshape[1]), torch.int32)
            zp = unpack_int32(zpp.t().contiguous(), bits, N).t().to(torch.int32).contiguous()
        elif "weight_zero_point" in local:
            raise ValueError(f"{mod} has a weight_zero_point but the config says symmetric")
    else:
        want = torch.float8_e4m3fn if ts.format == "e4m3" else torch.int8
        w = _expect(mod, "weight", local.get("weight"), dtype=want)
        if w.ndim != 2:
            raise ValueError(f"{mod}.weight has shape {tuple(w.shape)}, expected 2-D")
        N, K = w.shape
        codes = w.view(torch.uint8) if ts.format == "e4m3" else w
        scale = _expect(mod, "weight_scale", local.get("weight_scale"), _scale_shape(ts, (N, K)))
        zp = None
    ts = TensorScheme(ts.format, ts.granularity, ts.group_size, ts.block, ts.symmetric,
                      _scale_format(scale), ts.scale_rule)
    s = scale.float().reshape(ts.granularity.scale_shape((N, K)))
    return QuantizedTensor(codes.contiguous(), s, ts, torch.Size((N, K)), torch.float32, zp)


def preset_name(ts: TensorScheme) -> str | None:
    """The preset whose weights match ts, ignoring the scale's storage dtype, or None."""
    for name, s in PRESETS.items():
        w = s.weights
        if (w.format, w.granularity, w.group_size, w.block, w.symmetric, w.scale_rule) == \
                (ts.format, ts.granularity, ts.group_size, ts.block, ts.symmetric, ts.scale_rule):
            return name
    return None
