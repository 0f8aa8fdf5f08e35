"""A quantized KV cache that transformers' generate() and forward() use on Llama-style models.

    >>> cache = QuantizedKVCache("int8_per_token_head", config=model.config)
    >>> out = model.generate(ids, past_key_values=cache, max_new_tokens=32)
    >>> cache.nbytes()   # bytes of the codes, scales and full-precision window it holds

Each layer holds only codes and scales (plus KIVI's window of recent tokens in full precision) and
decodes them on every update, as transformers' own QuantizedLayer does. Write-then-read: a new
token's keys and values are encoded before attention reads them, as vLLM's cache does, so a chunked
forward over the cache gives what token-by-token decoding gives. KIVI's window is the exception the
paper makes: tokens are read in full precision until their block of `window` tokens is encoded.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from quantlab.kv.codecs import KVCodec, Parts, get_codec, static_scale


class QuantizedKVLayer(CacheLayerMixin):
    """One attention layer's quantized cache: k_parts / v_parts (codec dicts, token axis dim 2),
    k_window / v_window (B, H, r, D) full precision, r < codec.flush_every; static k_scale /
    v_scale (fp32 scalars) for per-tensor codecs. max_cache_len: refuse to grow past it."""

    is_compileable = False
    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, codec: str | KVCodec, k_scale: float | None = None,
                 v_scale: float | None = None, max_cache_len: int | None = None):
        super().__init__()
        self.codec = get_codec(codec)
        self.max_cache_len = max_cache_len
        self.k_scale = None if k_scale is None else static_scale(k_scale, "k_scale")
        self.v_scale = None if v_scale is None else static_scale(v_scale, "v_scale")
        self.k_parts: Parts | None = None
        self.v_parts: Parts | None = None
        self.k_window = self.v_window = None
        self.n_tokens = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.codec.check_head_dim(key_states.shape[-1])
        if self.codec.static and self.k_scale is None:
            # vLLM's calculate_kv_scales: no calibrated scale given, take the first batch's amax,
            # over finite values: one NaN key would otherwise make every key NaN for the cache's
            # lifetime (the NaN itself still decodes to NaN)
            finite_amax = lambda t: t.detach().float().nan_to_num(0, 0, 0).abs().amax().cpu()  # noqa: E731
            amax = [finite_amax(t) if t.numel() else torch.tensor(0.0)
                    for t in (key_states, value_states)]
            if not all(a > 0 for a in amax):  # scale 0 would decode every later token to 0
                raise ValueError(f"{self.codec.name} takes its scales from the first batch's "
                                 f"amax, but that batch's keys/values have amax {float(amax[0])}"
                                 f"/{float(amax[1])} (empty, all zero or non-finite); write a "
                                 "real batch first or pass static_scales")
            self.k_scale, self.v_scale = amax[0] / 448.0, amax[1] / 448.0
        self.dtype, self.device = key_states.dtype, key_states.device
        self.shape = (key_states.shape[0], key_states.shape[1], key_states.shape[3])
        empty = key_states[:, :, :0]
        self.k_window, self.v_window = empty, empty.clone()
        self.is_initialized = True

    @property
    def batch_size(self) -> int:
        return self.shape[0] if self.is_initialized else -1

    def _scales(self, role: str):
        s = self.k_scale if role == "k" else self.v_scale
        return None if s is None else s.to(self.device)

    def _decode(self, parts: Parts | None, role: str) -> Tensor:
        if parts is None:
            return self.k_window[:, :, :0].float()
        return self.codec.decode(parts, role, self._scales(role))

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        """key_states, value_states: (B, H_kv, T_new, D) -> all keys and values (B, H_kv, T, D) in
        the input dtype, as the codes decode (KIVI's window in full precision). Everything that can
        be refused is checked before the cache changes: a refused batch leaves it as it was."""
        self.codec.check_input(key_states, "k")
        self.codec.check_input(value_states, "v")
        if key_states.shape != value_states.shape:
            raise ValueError(f"keys {tuple(key_states.shape)} and values "
                             f"{tuple(value_states.shape)} must have one (batch, kv_heads, "
                             "tokens, head_dim) shape")
        shape = (key_states.shape[0], key_states.shape[1], key_states.shape[3])
        if self.is_initialized and shape != self.shape:
            raise ValueError(f"this cache holds (batch, kv_heads, head_dim)={self.shape} but got "
                             f"{shape}; start a new QuantizedKVCache for a different batch or "
                             "model")
        new_len = self.n_tokens + key_states.shape[2]
        if self.max_cache_len is not None and new_len > self.max_cache_len:
            raise ValueError(f"writing {key_states.shape[2]} tokens would take the cache to "
                             f"{new_len} tokens, past its max_cache_len={self.max_cache_len}; "
                             "build the cache "
                             "with a larger max_cache_len or shorten prompt + max_new_tokens")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        saved = (self.k_parts, self.v_parts, self.k_window, self.v_window, self.n_tokens)
        try:
            return self._append(key_states, value_states, new_len)
        except BaseException:  # e.g. out of memory mid-flush: keep the cache consistent
            self.k_parts, self.v_parts, self.k_window, self.v_window, self.n_tokens = saved
            raise

    def _append(self, key_states: Tensor, value_states: Tensor, new_len: int):
        self.k_window = torch.cat([self.k_window, key_states], dim=2)
        self.v_window = torch.cat([self.v_window, value_states], dim=2)
        self.n_tokens = new_len
        if self.codec.residual:  # KIVI: read the window in full precision, then flush it
            keys = torch.cat([self._decode(self.k_parts, "k").to(self.dtype), self.k_window], 2)
            values = torch.cat([self._decode(self.v_parts, "v").to(self.dtype), self.v_window], 2)
            self._flush()
            return keys, values
        self._flush()
        return (self._decode(self.k_parts, "k").to(self.dtype),
                self._decode(self.v_parts, "v").to(self.dtype))

    def _flush(self) -> None:
        """Encode the window's whole blocks of codec.flush_every tokens and append their parts."""
        n = (self.k_window.shape[2] // self.codec.flush_every) * self.codec.flush_every
        if n == 0:
            return
        for role in ("k", "v"):
            window = getattr(self, f"{role}_window")
            new = self.codec.encode(window[:, :, :n], role, self._scales(role))
            old = getattr(self, f"{role}_parts")
            parts = new if old is None else {k: torch.cat([old[k], new[k]], 2) for k in old}
            setattr(self, f"{role}_parts", parts)
            setattr(self, f"{role}_window", window[:, :, n:])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.n_tokens + query_length, 0

    def get_seq_length(self) -> int:
        return self.n_tokens

    def get_max_length(self) -> int:
        return -1 if self.max_cache_len is None else self.max_cache_len

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor this layer holds, by name: what nbytes counts and what state_dict saves."""
        out = {}
        for role in ("k", "v"):
            for name, t in (getattr(self, f"{role}_parts") or {}).items():
                out[f"{role}.{name}"] = t
            if self.is_initialized:
                out[f"{role}.window"] = getattr(self, f"{role}_window")
            if self.codec.static and getattr(self, f"{role}_scale") is not None:
                out[f"{role}.static_scale"] = getattr(self, f"{role}_scale").float()
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def reset(self) -> None:
        self.k_parts = self.v_parts = self.k_window = self.v_window = None
        self.n_tokens = 0
        self.is_initialized = False

    def _select(self, index: Tensor) -> None:
        for role in ("k", "v"):
            parts = getattr(self, f"{role}_parts")
            if parts is not None:
                setattr(self, f"{role}_parts", {k: t[index] for k, t in parts.items()})
            setattr(self, f"{role}_window", getattr(self, f"{role}_window")[index])
        self.shape = (self.k_window.shape[0], *self.shape[1:])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._select(beam_idx.to(self.device))  # codes and per-token scales move with rows

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select(torch.arange(self.shape[0], device=self.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.is_initialized:
            self._select(indices)


class QuantizedKVCache(Cache):
    """A transformers Cache whose layers all store keys and values with one codec.

    codec: preset name (quantlab.kv.CODECS) or KVCodec. config: the model's config (its
    num_hidden_layers), or num_layers. static_scales: [(k_scale, v_scale)] per layer for
    per-tensor codecs (quantlab.studies.kv.calibrate_static_scales); without them each layer
    takes its first batch's amax / 448, as vLLM's calculate_kv_scales does.
    max_cache_len: tokens per sequence past which update() raises.
    """

    def __init__(self, codec: str | KVCodec, config=None, num_layers: int | None = None,
                 static_scales: list[tuple[float, float]] | None = None,
                 max_cache_len: int | None = None):
        self.codec = get_codec(codec)
        if num_layers is None:
            if config is None:
                raise ValueError("give the model's config (or num_layers) so each layer gets "
                                 "a cache")
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
        if static_scales is not None and not self.codec.static:
            raise ValueError(f"{self.codec.name} computes its scales per token; static_scales "
                             "apply only to per-tensor codecs such as fp8_e4m3")
        if static_scales is not None and len(static_scales) != num_layers:
            raise ValueError(f"static_scales has {len(static_scales)} entries for "
                             f"{num_layers} layers")
        scales = static_scales or [(None, None)] * num_layers
        layers = [QuantizedKVLayer(self.codec, ks, vs, max_cache_len) for ks, vs in scales]
        super().__init__(layers=layers)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        """Cache.update, refusing a layer index the cache has no layer for (a negative index
        would silently write to a layer counted from the end)."""
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"layer_idx={layer_idx}, but this cache has {len(self.layers)} "
                             "layers; build it for the model: QuantizedKVCache(codec, "
                             "config=model.config)")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @classmethod
    def from_layers(cls, layers: list[QuantizedKVLayer]) -> QuantizedKVCache:
        """A cache over existing layers, which must share one codec."""
        names = {layer.codec.name for layer in layers}
        if len(names) != 1:
            raise ValueError(f"layers use different codecs {sorted(names)}: one cache holds "
                             "one codec; "
                             "re-encode the others' keys and values with a single codec")
        cache = cls.__new__(cls)
        cache.codec = layers[0].codec
        Cache.__init__(cache, layers=list(layers))
        return cache

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (codes, scales, window): its memory cost."""
        return sum(layer.nbytes() for layer in self.layers)

    def state_dict(self) -> dict[str, Tensor]:
        """Flat {"layers.i.k.codes": tensor, ...}, safetensors-ready; the codec name goes in its
        metadata (see save_metadata)."""
        return {f"layers.{i}.{k}": t.contiguous() for i, layer in enumerate(self.layers)
                for k, t in layer.tensors().items()}

    def save_metadata(self) -> dict[str, str]:
        return {"codec": self.codec.name,
                "n_tokens": ",".join(str(layer.n_tokens) for layer in self.layers)}

    def load_state_dict(self, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
        """Fill an empty cache from state_dict() and save_metadata() of one with the same codec."""
        if metadata.get("codec") != self.codec.name:
            raise ValueError(f"these tensors were written by codec {metadata.get('codec')!r}, this "
                             f"cache uses {self.codec.name!r}: build QuantizedKVCache("
                             f"{metadata.get('codec')!r}, ...) to load them")
        counts = [int(n) for n in metadata["n_tokens"].split(",")]
        for i, (layer, n) in enumerate(zip(self.layers, counts, strict=True)):
            mine = {k[len(f"layers.{i}."):]: t for k, t in tensors.items()
                    if k.startswith(f"layers.{i}.")}
            for role in ("k", "v"):
                parts = {k.split(".", 1)[1]: t for k, t in mine.items()
                         if k.startswith(f"{role}.") and k.split(".", 1)[1] not in
                         ("window", "static_scale")}
                setattr(layer, f"{role}_parts", parts or None)
                setattr(layer, f"{role}_window", mine[f"{role}.window"])
                if f"{role}.static_scale" in mine:
                    setattr(layer, f"{role}_scale", mine[f"{role}.static_scale"])
            w = layer.k_window
            layer.dtype, layer.device = w.dtype, w.device
            layer.shape = (w.shape[0], w.shape[1], w.shape[3])
            layer.n_tokens, layer.is_initialized = n, True
