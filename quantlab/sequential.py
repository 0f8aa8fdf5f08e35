"""Layer-sequential quantization and streaming compressed-tensors export, in memory bounded by
one decoder layer: an 8B model on a 24 GB CPU machine, or a 10 GB slice of a GPU.

The model is built from its config on the `meta` device (no weights), and its tensors are read
from the safetensors shards only when needed (quantlab.io.stream.LazyCheckpoint, memory-mapped):
- round to nearest with dynamic or no activation quantization needs no forward pass: each tensor
  is read, quantized and handed to the shard writer alone;
- calibrated work (GPTQ, AWQ, static activation scales, NVFP4 input global scales) materializes
  one decoder layer at a time on `device`, runs the calibration hidden states (B, T, d) through
  it, quantizes it, writes it and releases it before the next one. The hidden states carried
  forward are what the in-memory reference would give that layer: the quantized previous layers'
  outputs for GPTQ (as algorithms.gptq) and for NVFP4 W4A4 input scales (calibrated on the
  quantized model, as io.compressed_tensors does), the float outputs for static activation
  scales and AWQ (both computed from the float model in memory).
Every tensor is the one `quantlab export` writes through the in-memory path (quantize_model or
algorithms.gptq/awq, then export_compressed_tensors), bit for bit: tests/test_sequential.py checks
it; only the file layout differs (model-0000i-of-0000N.safetensors shards plus an index).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from quantlab.io import compressed_tensors as ct
from quantlab.io.safetensors_io import atomic_output
from quantlab.io.stream import LazyCheckpoint, ShardWriter
from quantlab.layers import matches_any
from quantlab.nn import QuantLinear
from quantlab.quantize import NVFP4_GLOBAL_DENOM, QuantizedTensor, quantize
from quantlab.scales import NVFP4
from quantlab.schemes import Scheme, get_scheme

ALGORITHMS = ("rtn", "gptq", "awq")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def skeleton(model_dir: str | Path) -> nn.Module:
    """The causal LM of model_dir's config.json with every tensor on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, the decoder layers): the first ModuleList named `layers` or `h` inside
    the model. Raises ValueError when the decoder layers are not a ModuleList."""
    for name, m in model.named_modules():
        if name.rpartition(".")[2] in ("layers", "h"):
            if isinstance(m, nn.ModuleList) and len(m):
                return name, m
            raise ValueError(
                f"{type(model).__name__}.{name} is a {type(m).__name__}, not a non-empty "
                "nn.ModuleList of decoder layers, so it cannot be run one layer at a time; "
                "export it with --pipeline in-memory (the whole model in float32) instead")
    raise ValueError(f"{type(model).__name__} has no decoder-layer ModuleList (model.layers or "
                     "transformer.h); export it with --pipeline in-memory instead")


def _rounded(t: Tensor, dtype: torch.dtype, device) -> Tensor:
    """What the in-memory path quantizes: the checkpoint's values rounded to --dtype, in float32."""
    return t.to(device).float().to(dtype).float()


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t as model_tensors stores an unquantized tensor (float32 -> dtype), without a float32 copy
    of a whole embedding when t already is in dtype (the round trip is exact then)."""
    if not t.is_floating_point() or t.dtype == dtype:
        return t
    out = torch.empty_like(t, dtype=dtype)
    rows = max(1, 2**24 // max(1, t[0].numel())) if t.ndim > 1 else len(t)
    for i in range(0, len(t), rows):  # 64 MB of float32 at a time
        out[i:i + rows] = t[i:i + rows].float().to(dtype)
    return out


def materialize(module: nn.Module, prefix: str, ckpt: LazyCheckpoint, dtype, device) -> None:
    """Give module (on meta) its checkpoint tensors, rounded to dtype, as float32 on device."""
    names = list(module.state_dict())
    loaded = ckpt.load([prefix + n for n in names])
    module.load_state_dict({n: _rounded(loaded[prefix + n], dtype, device) for n in names},
                           assign=True)


def release(layers: nn.ModuleList, i: int) -> None:
    layers[i] = nn.Identity()  # drops the layer's tensors (its QuantLinears' codes and caches)


def targets(model: nn.Module, scheme: Scheme, ignore) -> tuple[dict[str, Scheme], list[str]]:
    """({linear to quantize: scheme} in module order, [linears left in full precision]), with
    quantize_model's group-size check."""
    quant, full = {}, []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        if matches_any(name, ignore):
            full.append(name)
            continue
        g = scheme.weights.group_size
        if g and m.in_features % g:
            raise ValueError(f"{name}: in_features={m.in_features} is not a multiple of "
                             f"{scheme.name}'s group size {g}; add it to ignore=, or use a "
                             "per-channel scheme (e.g. w8a16)")
        quant[name] = scheme
    return quant, full


def _check_disk(out: Path, ckpt: LazyCheckpoint, model: nn.Module, quant: dict, dtype) -> None:
    """Refuse before any work when the output cannot fit (an estimate within a few percent)."""
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    need = 0
    for n, shape in shapes.items():
        mod = n.rpartition(".")[0]
        if mod in quant and n.endswith(".weight"):
            need += quant[mod].weights.storage_bits(shape) // 8
        else:
            need += torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if need > free:
        raise OSError(f"the export needs about {need / 1e9:.2f} GB but {parent} has "
                      f"{free / 1e9:.2f} GB free; free space or choose an --out on another disk")


class ShardSink:
    """Where the exporter's finished tensors go for --to compressed-tensors: each quantized
    linear's tensors exactly as io.compressed_tensors.model_tensors writes them, into
    io.stream.ShardWriter's shards. (io.gguf.GGUFStream is the GGUF sink: same two methods.)"""

    def __init__(self, writer: ShardWriter, dtype: torch.dtype):
        self.writer, self.dtype = writer, dtype

    def linear(self, name: str, qweight: QuantizedTensor, scheme: Scheme,
               bias: Tensor | None = None, input_scale: Tensor | None = None,
               igs: Tensor | None = None) -> None:
        fmt = ct.compression_format(scheme)
        for local, t in ct.layer_tensors(qweight, self.dtype, fmt).items():
            self.writer.add(f"{name}.{local}", t)
        if bias is not None:
            self.writer.add(f"{name}.bias", bias.to(self.dtype))
        if input_scale is not None:
            self.writer.add(f"{name}.input_scale", input_scale.float().reshape(1))
        if igs is not None:
            self.writer.add(f"{name}.input_global_scale", igs.float().reshape(1))

    def tensor(self, name: str, t: Tensor) -> None:
        """An unquantized tensor, stored in the export dtype."""
        self.writer.add(name, t.to(self.dtype) if t.is_floating_point() else t)


def _emit_module(sink, prefix: str, module: nn.Module, igs: dict[str, Tensor]) -> None:
    """A materialized module's tensors: QuantLinears compressed, everything else as it is (the
    sink casts: compressed-tensors to the export dtype; GGUF stores norms as F32, so AWQ's
    rescaled norms keep their float32 values there, as the in-memory export does)."""
    qls = {n: m for n, m in module.named_modules() if isinstance(m, QuantLinear)}
    for n, t in module.state_dict().items():
        mod = n.rpartition(".")[0]
        if mod not in qls:
            sink.tensor(prefix + n, t)
    for n, q in qls.items():
        sink.linear(prefix + n, q.qweight, q.scheme, q.bias, q.input_scale, igs.get(n))


def first_hidden(model: nn.Module, ckpt: LazyCheckpoint, calib: Tensor, dtype, device):
    """(hidden (B, T, d), layer kwargs) entering decoder layer 0: the embeddings materialized,
    the rotary embedding rebuilt on device (its buffers are not in the checkpoint), then the
    model run up to layer 0, as algorithms.calibration.first_layer_inputs does."""
    from quantlab.algorithms.calibration import first_layer_inputs

    inner = model.get_submodule(layer_list(model)[0].rpartition(".")[0])
    embed = model.get_input_embeddings()
    prefix = next(n for n, m in model.named_modules() if m is embed) + "."
    materialize(embed, prefix, ckpt, dtype, device)
    rot = getattr(inner, "rotary_emb", None)
    if rot is not None:
        with torch.device(device):
            inner.rotary_emb = type(rot)(config=model.config)
    try:
        return first_layer_inputs(model, calib.to(device))
    finally:
        embed.to_empty(device="meta")


def amax_hooks(modules: dict[str, nn.Module], store: dict[str, Tensor]):
    from quantlab.algorithms.calibration import input_hooks

    return input_hooks(modules, lambda n, x: store.__setitem__(
        n, torch.maximum(store.get(n, torch.zeros(())), x.detach().abs().amax().float().cpu())))


def checkpoint_names(model: nn.Module, ckpt: LazyCheckpoint, model_dir) -> list[str]:
    """The state_dict names of the skeleton to read, tied weights once (the first name, as
    model_tensors does); ValueError when a shard lacks any of them."""
    seen, wanted = set(), []
    for n, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            wanted.append(n)
    missing = [n for n in wanted if n not in ckpt]
    if missing:
        raise ValueError(f"{model_dir}: {len(missing)} tensors the config needs are in no "
                         f"shard, e.g. {missing[:3]}; the checkpoint is incomplete or belongs to "
                         "another config (check config.json and re-download the shards)")
    return wanted


def static_scales(amax: dict[str, Tensor], act) -> dict[str, Tensor]:
    """{linear: amax of its inputs / the activation format's max}: static_act_scales' rule."""
    fmax = act.element.max if act is not None else 1.0
    return {n: (a / fmax).clamp(min=1e-12) for n, a in amax.items()}


def rtn_layer(layer: nn.Module, prefix: str, quant: dict[str, Scheme],
              act_scales: dict[str, Tensor]) -> None:
    """quantize_model on one layer: its targeted nn.Linear -> QuantLinear, in place."""
    for n, m in list(layer.named_modules()):
        if isinstance(m, nn.Linear) and prefix + n in quant:
            parent, _, child = n.rpartition(".")
            q = QuantLinear.from_linear(m, quant[prefix + n], act_scale=act_scales.get(n))
            setattr(layer.get_submodule(parent) if parent else layer, child, q)


CONTAINERS = ("compressed-tensors", "gguf")


def export_sequential(model_dir: str | Path, scheme: Scheme | str, out: str | Path, *,
                      algorithm: str = "rtn", calib: Tensor | None = None,
                      device: str | None = None, dtype: torch.dtype = torch.bfloat16,
                      ignore: tuple[str, ...] = ("lm_head",), max_shard_bytes: int | str = "1GB",
                      overwrite: bool = False, tokenizer=None, percdamp: float = 0.1,
                      blocksize: int = 128, act_order: bool = False,
                      progress: bool | None = None, to: str = "compressed-tensors",
                      name: str | None = None) -> Path:
    """Quantize the safetensors checkpoint in model_dir one decoder layer at a time and write
    it to out as the layers finish: to="compressed-tensors", a directory (shards + index,
    config.json, tokenizer files); to="gguf", one .gguf file (out ends in .gguf; tokenizer
    required; name: general.name, default the folder's name), byte-identical to io.gguf's
    in-memory export. calib: (B, T) int64 token ids, needed for gptq/awq and for schemes with
    static activation scales or NVFP4 activations. progress: tqdm bars (None: when a terminal).
    Written to a temporary path beside out and renamed at the end."""
    from quantlab.algorithms.calibration import check_calibration, input_hooks, run_layer

    scheme = get_scheme(scheme)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm!r} is not one of {ALGORITHMS}")
    if to not in CONTAINERS:
        raise ValueError(f"to={to!r} is not one of {CONTAINERS}")
    out = Path(out)
    if to == "gguf" and (out.suffix != ".gguf" or tokenizer is None):
        raise ValueError(f"a GGUF export needs an out ending in .gguf (got {out}) and the "
                         "model's tokenizer (GGUF stores it)")
    device = device or default_device()
    act = scheme.activations
    static = act is not None and not act.dynamic
    w4a4 = act is not None and act.scale_rule == NVFP4
    if algorithm == "awq" and (static or w4a4):
        raise ValueError(f"AWQ with {scheme.name}'s calibrated activation scales is not "
                         "layer-sequential yet (the reference calibrates them on the clipped "
                         "model); use --pipeline in-memory, or a weight-only/dynamic scheme")
    needs_forward = algorithm != "rtn" or static or w4a4
    if needs_forward:
        if calib is None:
            raise ValueError(f"{algorithm} with {scheme.name} needs calibration token ids (B, T)")
        check_calibration(calib, 1 if algorithm == "rtn" else 512)
    model = skeleton(model_dir)
    layers_name, layers = layer_list(model)
    if to == "compressed-tensors":
        ct.weight_args(scheme.weights)  # unsupported schemes fail before any work
        ct.activation_args(act)
    quant, full = targets(model, scheme, ignore)
    outer_quant = [n for n in quant if not n.startswith(layers_name + ".")]
    if needs_forward and outer_quant:
        raise ValueError(f"{outer_quant} lie outside the decoder layers and would need "
                         "calibration there; leave them in ignore= or use --pipeline in-memory")
    ckpt = LazyCheckpoint(model_dir)
    wanted = checkpoint_names(model, ckpt, model_dir)
    _check_disk(out, ckpt, model, quant, dtype)
    in_layer = {n for n in wanted if n.startswith(layers_name + ".")}
    first = next(i for i, n in enumerate(wanted) if n in in_layer)
    # outside the layers, in file order: what comes before them (embeddings), what after
    before = [n for n in wanted[:first] if n not in in_layer]
    after = [n for n in wanted[first:] if n not in in_layer]
    bar = dict(disable=None if progress is None else not progress, dynamic_ncols=True)

    with atomic_output(out, overwrite, is_dir=to != "gguf", source=model_dir) as tmp:
        shards = None
        if to == "gguf":
            from quantlab.io.gguf import GGUFStream

            sink = GGUFStream(tmp, model, quant, tokenizer, name or Path(model_dir).name)
        else:
            shards = tqdm(desc="shards written", unit="shard", position=1, **bar)
            writer = ShardWriter(tmp, max_shard_bytes, progress=shards)
            sink = ShardSink(writer, dtype)

        def write_tensor(n: str) -> None:  # read, quantize or cast, write: one tensor alone
            t = ckpt.load([n])[n]
            mod = n.rpartition(".")[0]
            if mod in quant and n == f"{mod}.weight":
                qt = quantize(_rounded(t, dtype, device), quant[mod].weights)
                bias = (_rounded(ckpt.load([f"{mod}.bias"])[f"{mod}.bias"], dtype, device)
                        if f"{mod}.bias" in ckpt else None)
                sink.linear(mod, qt, quant[mod], bias)
            elif not (mod in quant and n == f"{mod}.bias"):
                sink.tensor(n, _cast(t, dtype))

        for n in before:
            write_tensor(n)
        hidden = kwargs = None
        if needs_forward:
            hidden, kwargs = first_hidden(model, ckpt, calib, dtype, device)
        for i in tqdm(range(len(layers)), desc="layers", unit="layer", position=0, **bar):
            prefix = f"{layers_name}.{i}."
            if not needs_forward:
                for n in wanted:
                    if n.startswith(prefix):
                        write_tensor(n)
                release(layers, i)
                continue
            layer = layers[i]
            materialize(layer, prefix, ckpt, dtype, device)
            igs: dict[str, Tensor] = {}
            if algorithm == "gptq":
                from quantlab.algorithms.gptq import gptq_layer

                gptq_layer(layer, prefix, hidden, kwargs, scheme, ignore, percdamp, blocksize,
                           act_order)
            elif algorithm == "awq":
                xs: dict[str, Tensor] = {}
                probes = {"qkv": layer.self_attn.q_proj, "o": layer.self_attn.o_proj,
                          "gate_up": layer.mlp.gate_proj, "down": layer.mlp.down_proj}
                with input_hooks(probes, lambda k, x, xs=xs: xs.__setitem__(
                        k, x.reshape(-1, x.shape[-1]).float())):
                    hidden = run_layer(layer, hidden, kwargs)  # the float model's stream
                step = max(1, -(-calib.numel() // 4096))  # collect_inputs' max_rows=4096
                from quantlab.algorithms.awq import awq_layer

                awq_layer(layer, {k: x[::step] for k, x in xs.items()}, scheme.weights)
                del xs
                rtn_layer(layer, prefix, quant, {})
            else:
                amax: dict[str, Tensor] = {}
                if static:  # static_act_scales: the float model's inputs
                    lins = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)
                            and prefix + n in quant}
                    with amax_hooks(lins, amax):
                        hidden = run_layer(layer, hidden, kwargs)
                rtn_layer(layer, prefix, quant, static_scales(amax, act))
            if algorithm == "gptq" or w4a4:  # the quantized model's stream
                qls = {n: m for n, m in layer.named_modules() if isinstance(m, QuantLinear)}
                with amax_hooks(qls if w4a4 else {}, igs):
                    hidden = run_layer(layer, hidden, kwargs)
                igs = {n: NVFP4_GLOBAL_DENOM / a.clamp(min=1e-12) for n, a in igs.items()}
            _emit_module(sink, prefix, layer, igs)
            release(layers, i)
        for n in after:
            write_tensor(n)
        if to == "gguf":
            sink.close()
        else:
            writer.close()
            shards.close()
            ct.write_config_and_tokenizer(tmp, model.config.to_dict(), dtype,
                                          ct.quantization_config_for(quant, full), model_dir,
                                          tokenizer)
    return out
