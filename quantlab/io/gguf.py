"""GGUF (llama.cpp) export and import for Llama-architecture models, through the `gguf` package.

Export writes what llama.cpp's convert_hf_to_gguf.py writes for a Llama: general.* and llama.*
metadata, the byte-level BPE tokenizer as tokenizer.ggml.* ("gpt2" model), tensors named by
gguf's own TensorNameMap (token_embd, blk.N.attn_q, ..., output), with attn_q / attn_k rows
permuted into llama.cpp's rope layout (convert_hf_to_gguf's LlamaModel.permute). Linear layers
quantized with gguf_q8_0 / gguf_q4_0 are written as ggml Q8_0 / Q4_0 blocks (quantlab.packing,
byte-exact with gguf's reference quantizers); Linear layers left in full precision and the token
embedding as F16; norms as F32. The row permutation commutes with quantization because every
ggml block lies inside one row.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from quantlab.io.safetensors_io import atomic_output
from quantlab.nn import QuantLinear
from quantlab.packing import gguf_q4_0_blocks, gguf_q8_0_blocks
from quantlab.quantize import QuantizedTensor
from quantlab.schemes import PRESETS


def _gguf():
    try:
        import gguf
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("GGUF export and import need the gguf package: "
                                  "pip install gguf (or quantlab[peers])") from err
    return gguf


FILE_TYPE = {"Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0"}


def rope_permutation(n_rows: int, n_head: int) -> Tensor:
    """Row order llama.cpp wants for a q/k projection of n_head heads: within each head, the
    even rotary halves interleaved, as convert_hf_to_gguf's permute(w, n_head, n_head_kv)
    (reshape (n_head, 2, head_dim/2, K) -> swap axes 1, 2). Returns new_row -> old_row."""
    idx = torch.arange(n_rows)
    return idx.reshape(n_head, 2, n_rows // n_head // 2).transpose(1, 2).reshape(-1)


def _permute_rows(q: QuantizedTensor, perm: Tensor) -> QuantizedTensor:
    return QuantizedTensor(q.codes[perm], q.scales[perm], q.scheme, q.shape, q.dtype,
                           None if q.zero_points is None else q.zero_points[perm], q.global_scale)


def hf_to_gguf_names(n_blocks: int) -> dict[str, str]:
    """HF Llama module names -> gguf tensor base names, from gguf's own TensorNameMap."""
    gguf = _gguf()
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    names = ["model.embed_tokens", "model.norm", "lm_head"]
    for i in range(n_blocks):
        names += [f"model.layers.{i}.{s}" for s in (
            "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
            "mlp.down_proj")]
    return {n: tmap.get_name(n) for n in names}


def _rope_heads(name: str, cfg) -> int | None:
    if name.endswith("self_attn.q_proj"):
        return cfg.num_attention_heads
    if name.endswith("self_attn.k_proj"):
        return cfg.num_key_value_heads or cfg.num_attention_heads
    return None


def _tokenizer_metadata(writer, tokenizer, vocab_size: int) -> None:
    """tokenizer.ggml.* for a byte-level BPE tokenizer, as convert_hf_to_gguf's _set_vocab_gpt2."""
    gguf = _gguf()
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre = backend.get("model", {}), backend.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre]) if pre else []
    byte_level = [p for p in pres if p.get("type") == "ByteLevel"]
    if model.get("type") != "BPE" or len(pres) != 1 or not byte_level \
            or byte_level[0].get("add_prefix_space") or not byte_level[0].get("use_regex", True):
        raise ValueError("quantlab writes GGUF tokenizers for byte-level BPE with GPT-2 "
                         "pre-tokenization only; for other tokenizers convert the exported "
                         "safetensors with llama.cpp's convert_hf_to_gguf.py")
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    special = set(tokenizer.all_special_ids)
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif reverse[i] in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's regex: what ByteLevel(use_regex=True) applies
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = model.get("merges", [])
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is not None:
            getattr(writer, f"add_{kind}_token_id")(tid)


def _llama_metadata(writer, cfg, name: str, file_type: str) -> None:
    gguf = _gguf()
    if getattr(cfg, "model_type", None) != "llama":
        raise ValueError(f"GGUF export supports the Llama architecture, not "
                         f"{getattr(cfg, 'model_type', None)!r}")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {rope.get('rope_type')!r} is not written by quantlab's GGUF "
                         "exporter; use llama.cpp's convert_hf_to_gguf.py")
    writer.add_name(name)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, file_type)))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads or cfg.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))


def _quantized_entry(name: str, q: QuantizedTensor, heads: int | None,
                     ) -> tuple[np.ndarray, str]:
    """A Q8_0 / Q4_0 linear's (N, bytes per row) uint8 ggml blocks, rows in llama.cpp's order."""
    qtype = q.scheme.scale_rule.ggml_type
    if qtype is None:
        raise ValueError(f"{name} is quantized with {q.scheme.describe()}, which GGUF cannot "
                         "store; quantize with gguf_q8_0 or gguf_q4_0")
    if heads:
        q = _permute_rows(q, rope_permutation(q.shape[0], heads).to(q.codes.device))
    blocks = gguf_q8_0_blocks(q) if qtype == "Q8_0" else gguf_q4_0_blocks(q)
    return blocks.reshape(q.shape[0], -1).cpu().numpy(), qtype


def _float_entry(w: Tensor, heads: int | None) -> tuple[np.ndarray, str]:
    """An unquantized weight as GGUF stores it: F32 when 1-D (norms), else F16, converted 16M
    values at a time through float32 (no float32 copy of a whole 128256-row embedding)."""
    w = w.detach().cpu()
    if heads:
        w = w[rope_permutation(w.shape[0], heads)]
    if w.ndim == 1:
        return w.float().numpy(), "F32"
    out = torch.empty(w.shape, dtype=torch.float16)
    rows = max(1, 2**24 // max(1, w[0].numel()))
    for i in range(0, len(w), rows):
        out[i:i + rows] = w[i:i + rows].float().to(torch.float16)
    return out.numpy(), "F16"


def gguf_tensors(model: nn.Module) -> list[tuple[str, np.ndarray, str]]:
    """[(gguf name, numpy data, ggml type name)] for every tensor of a (quantized) Llama, in
    llama.cpp's row layout. Quantized data are (N, bytes per row) uint8 blocks."""
    cfg = model.config
    names = hf_to_gguf_names(cfg.num_hidden_layers)
    out = []
    types = set()
    for mod_name, mod in model.named_modules():
        if mod_name not in names:
            continue
        base = names[mod_name]
        if base is None:
            raise ValueError(f"gguf has no tensor name for {mod_name}")
        if getattr(mod, "bias", None) is not None:  # llama.cpp's Llama graph has no biases
            raise ValueError(f"{mod_name} has a bias, which a llama.cpp Llama GGUF file has no "
                             "place for (quantlab writes Llama's embedding, norms and seven "
                             "projections per layer); convert this model with llama.cpp's "
                             "convert_hf_to_gguf.py")
        heads = _rope_heads(mod_name, cfg)
        if isinstance(mod, QuantLinear):
            data, qtype = _quantized_entry(mod_name, mod.qweight, heads)
            types.add(qtype)
        else:
            data, qtype = _float_entry(mod.weight, heads)
        out.append((f"{base}.weight", data, qtype))
    if not types:
        raise ValueError("no layer is quantized with gguf_q8_0 or gguf_q4_0: run quantize_model"
                         "(model, 'gguf_q8_0') (or gguf_q4_0) first")
    return out


def _file_type(qtypes: set[str]) -> str:
    return FILE_TYPE[sorted(qtypes)[-1]] if len(qtypes) == 1 else "MOSTLY_Q8_0"


def _add_metadata(writer, cfg, tokenizer, name: str, qtypes: set[str]) -> None:
    _llama_metadata(writer, cfg, name, _file_type(qtypes))
    _tokenizer_metadata(writer, tokenizer, cfg.vocab_size)


def export_gguf(model: nn.Module, out: str | os.PathLike, tokenizer,
                name: str = "quantlab-model", overwrite: bool = False) -> Path:
    """Write a .gguf file for a Llama model quantized with gguf_q8_0 or gguf_q4_0. out: a file
    path ending in .gguf. Written to a temporary file and renamed: a failure leaves nothing."""
    gguf = _gguf()
    out = Path(out)
    if out.suffix != ".gguf":
        raise ValueError(f"{out}: a GGUF file name must end in .gguf")
    tensors = gguf_tensors(model)
    qtypes = {t for _, _, t in tensors} - {"F16", "F32"}
    with atomic_output(out, overwrite, is_dir=False) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        _add_metadata(writer, model.config, tokenizer, name, qtypes)
        for tname, data, ttype in tensors:
            raw = getattr(gguf.GGMLQuantizationType, ttype)
            writer.add_tensor(tname, data, raw_dtype=raw if ttype not in ("F16", "F32") else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


class GGUFStream:
    """A .gguf file written as tensors arrive (the layer-sequential exporter's sink): the header
    and tensor infos are computed first from the model skeleton (meta tensors: names, shapes)
    and which linears are quantized with which scheme, then each tensor's data is written when
    it and every tensor before it in the file have arrived (a reorder buffer: at most a few of
    one decoder layer's tensors wait). Same bytes as export_gguf of the quantized model.

    path: the file to write (created); skeleton: the Llama on the meta device; quant: {linear
    name: Scheme} (gguf_q8_0 / gguf_q4_0)."""

    def __init__(self, path: str | os.PathLike, skeleton: nn.Module, quant: dict, tokenizer,
                 name: str = "quantlab-model"):
        gguf = _gguf()
        cfg = skeleton.config
        names = hf_to_gguf_names(cfg.num_hidden_layers)
        qtypes = {m: s.weights.scale_rule.ggml_type for m, s in quant.items()}
        bad = sorted(m for m, t in qtypes.items() if t is None)
        if bad:
            raise ValueError(f"{bad[0]} (and {len(bad) - 1} more) would be quantized with "
                             f"{quant[bad[0]].name}, which GGUF cannot store; use gguf_q8_0 or "
                             "gguf_q4_0")
        if not qtypes:
            raise ValueError("no layer is quantized with gguf_q8_0 or gguf_q4_0")
        self.cfg = cfg
        self.names = names
        self.order: list[str] = []  # gguf tensor names in file order
        self.writer = gguf.GGUFWriter(str(path), "llama")
        _add_metadata(self.writer, cfg, tokenizer, name, set(qtypes.values()))
        for mod_name, mod in skeleton.named_modules():
            if mod_name not in names:
                continue
            if names[mod_name] is None:
                raise ValueError(f"gguf has no tensor name for {mod_name}")
            tname = f"{names[mod_name]}.weight"
            shape = tuple(mod.weight.shape)
            if mod_name in qtypes:
                width = {"Q8_0": 34, "Q4_0": 18}[qtypes[mod_name]]
                byte_shape = (shape[0], shape[1] // 32 * width)
                self.writer.add_tensor_info(tname, byte_shape, np.dtype(np.uint8),
                                            byte_shape[0] * byte_shape[1],
                                            raw_dtype=getattr(gguf.GGMLQuantizationType,
                                                              qtypes[mod_name]))
            else:
                dt = np.dtype(np.float32 if len(shape) == 1 else np.float16)
                self.writer.add_tensor_info(tname, shape, dt, int(np.prod(shape)) * dt.itemsize)
            self.order.append(tname)
        self.writer.write_header_to_file()
        self.writer.write_kv_data_to_file()
        self.writer.write_ti_data_to_file()
        self.pending: dict[str, np.ndarray] = {}
        self.done = 0

    def _gguf_name(self, module: str) -> str:
        base = self.names.get(module)
        if base is None:
            raise ValueError(f"{module} has no place in a llama.cpp GGUF file (quantlab writes "
                             "Llama's embedding, norms and seven projections per layer, without "
                             "biases); convert this model with llama.cpp's convert_hf_to_gguf.py")
        return f"{base}.weight"

    def _put(self, tname: str, data: np.ndarray) -> None:
        self.pending[tname] = data
        while self.done < len(self.order) and self.order[self.done] in self.pending:
            self.writer.write_tensor_data(self.pending.pop(self.order[self.done]))
            self.done += 1

    def linear(self, name: str, qweight: QuantizedTensor, scheme=None, bias=None,
               input_scale=None, igs=None) -> None:
        """A quantized linear's weight (its module name, e.g. model.layers.0.self_attn.q_proj)."""
        if bias is not None:
            self._gguf_name(f"{name}.bias")  # raises: no GGUF name
        data, _ = _quantized_entry(name, qweight, _rope_heads(name, self.cfg))
        self._put(self._gguf_name(name), data)

    def tensor(self, name: str, t: Tensor) -> None:
        """An unquantized tensor by its checkpoint name (e.g. model.norm.weight)."""
        module, _, leaf = name.rpartition(".")
        if leaf != "weight":
            self._gguf_name(name)  # raises: no GGUF name
        data, _ = _float_entry(t, _rope_heads(module, self.cfg))
        self._put(self._gguf_name(module), data)

    def close(self) -> None:
        missing = self.order[self.done:]
        if missing:
            raise ValueError(f"the GGUF file still lacks {len(missing)} tensors, e.g. "
                             f"{missing[:3]}; the export did not emit them")
        self.writer.close()


# ---------------------------------------------------------------- import

@dataclass
class GGUFCheckpoint:
    """What a GGUF file holds. layers: Q8_0/Q4_0 tensors as QuantizedTensor by HF module name
    (rows back in HF order); other: every other 2-D tensor as (ggml type name, float32 values);
    metadata: the scalar key-values."""

    metadata: dict
    layers: dict[str, QuantizedTensor] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)
    other: dict[str, Tensor] = field(default_factory=dict)


def _open_reader(path: Path):
    gguf = _gguf()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, KeyError, IndexError, TypeError, OverflowError) as err:
        raise ValueError(f"{path}: not a readable GGUF file ({err}); it is corrupt, truncated "
                         "or not GGUF") from err
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            end = t.data_offset + t.n_bytes
            raise ValueError(f"{path}: tensor {t.name} needs bytes up to {end} but the file "
                             f"has {size}; the file is truncated")
    return reader


def _scalar_fields(reader) -> dict:
    meta = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or len(f.types) != 1:
            continue
        try:
            meta[key] = f.contents()
        except (ValueError, IndexError):
            continue
    return meta


def decode_blocks(data: np.ndarray, qtype: str) -> tuple[Tensor, Tensor]:
    """(N, bytes per row) uint8 Q8_0 / Q4_0 blocks -> (codes (N, K), scales float32 (N, K/32))."""
    width = {"Q8_0": 34, "Q4_0": 18}[qtype]
    raw = torch.from_numpy(np.array(data, dtype=np.uint8, copy=True))
    N = raw.shape[0]
    blocks = raw.reshape(-1, width)
    d = blocks[:, :2].contiguous().view(torch.float16).float().reshape(N, -1)
    if qtype == "Q8_0":
        codes = blocks[:, 2:].contiguous().view(torch.int8)
    else:
        qs = blocks[:, 2:]
        codes = torch.cat([qs & 0xF, qs >> 4], dim=1)  # weight j low nibble, j + 16 high
    return codes.reshape(N, -1).contiguous(), d


def _read_data(path: Path, t) -> np.ndarray:
    """One tensor's bytes read from the file (not through the reader's memory map, whose touched
    pages would stay resident while it is open), in the reader's numpy shape and dtype."""
    view = t.data  # a memmap view: its shape and dtype, no data read
    buf = bytearray(int(t.n_bytes))
    with open(path, "rb") as f:
        f.seek(int(t.data_offset))
        got = f.readinto(buf)
    if got != len(buf):
        raise ValueError(f"{path}: tensor {t.name} is cut short ({got} of {len(buf)} bytes); "
                         "the file is truncated")
    return np.frombuffer(buf, dtype=view.dtype).reshape(view.shape)


def iter_gguf(path: str | os.PathLike):
    """(metadata, generator of (HF module name, ggml type name, load)) for a .gguf file, no
    tensor data read until load() is called: it returns a QuantizedTensor (Q8_0 / Q4_0, rows in
    HF order) or the values as a tensor (F16 / F32 as stored, other types dequantized to float32
    by gguf-py); load is None for 1-D tensors (norms). Memory: one tensor at a time."""
    gguf = _gguf()
    path = Path(path)
    reader = _open_reader(path)
    meta = _scalar_fields(reader)
    arch = meta.get("general.architecture")
    n_blocks = int(meta.get(f"{arch}.block_count", 0) or 0)
    back = {g: h for h, g in hf_to_gguf_names(n_blocks).items() if g} if arch == "llama" else {}
    heads = {"attn_q": meta.get("llama.attention.head_count"),
             "attn_k": meta.get("llama.attention.head_count_kv")}

    def load(t, qtype: str, inv: Tensor | None) -> QuantizedTensor | Tensor:
        data = _read_data(path, t)
        if qtype in ("Q8_0", "Q4_0"):
            codes, d = decode_blocks(data, qtype)
            rule = {"Q8_0": "gguf_q8_0", "Q4_0": "gguf_q4_0"}[qtype]
            q = QuantizedTensor(codes, d, PRESETS[rule].weights, torch.Size(codes.shape),
                                torch.float32)
            return _permute_rows(q, inv) if inv is not None else q
        if qtype in ("F16", "F32"):
            w = torch.from_numpy(data)  # the bytes just read, no float32 copy of an F16 table
        else:
            w = torch.from_numpy(gguf.quants.dequantize(data, t.tensor_type).copy())
        return w[inv] if inv is not None else w

    def tensors():
        for t in reader.tensors:
            base = t.name.removesuffix(".weight")
            qtype = t.tensor_type.name
            if len(t.shape) < 2:
                yield back.get(base, base), qtype, None
                continue
            n_head = heads.get(base.rpartition(".")[2])
            inv = (torch.argsort(rope_permutation(int(t.shape[1]), int(n_head)))
                   if n_head else None)
            yield back.get(base, base), qtype, lambda t=t, q=qtype, i=inv: load(t, q, i)

    return meta, tensors()


def read_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """A .gguf file -> GGUFCheckpoint (never unpickles: GGUF is plain binary)."""
    meta, tensors = iter_gguf(path)
    ckpt = GGUFCheckpoint(metadata=meta)
    for name, qtype, load in tensors:
        ckpt.types[name] = qtype
        value = load() if load is not None else None
        if isinstance(value, QuantizedTensor):
            ckpt.layers[name] = value
        elif value is not None:
            ckpt.other[name] = value.float()
    return ckpt
