"""How many tokens and concurrent sequences fit in a GPU's memory, for a model and a KV codec.

    >>> from quantlab.kv.capacity import capacity
    >>> c = capacity(n_layers=32, n_kv_heads=8, head_dim=128, gpu_bytes=80e9, n_params=8.03e9,
    ...              weight_bits=16, codec="fp8_e4m3", seq_len=8192)
    >>> c.tokens, c.sequences
    (853576, 104)

The rule vLLM applies: gpu_util * gpu_bytes is the budget (its --gpu-memory-utilization, 0.9),
weights and a reserve for activations come off it, and the rest holds KV blocks. We count bytes
exactly per codec (scales included, KIVI's full-precision window per sequence); vLLM's own
figure also rounds to whole pages of 16 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantlab.kv.codecs import KVCodec, get_codec


@dataclass(frozen=True)
class Capacity:
    """weight_bytes, kv_budget_bytes: bytes; bytes_per_token: KV bytes of one token over all
    layers (steady state, no window); tokens: tokens that fit at that rate; bytes_per_sequence:
    KV bytes of one seq_len sequence over all layers (window included); sequences: how many fit."""

    weight_bytes: int
    kv_budget_bytes: int
    bytes_per_token: float
    tokens: int
    bytes_per_sequence: int
    sequences: int


def kv_shape(config) -> tuple[int, int, int]:
    """A transformers config -> (n_layers, n_kv_heads, head_dim)."""
    c = config.get_text_config(decoder=True)
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return c.num_hidden_layers, getattr(c, "num_key_value_heads", None) or heads, head_dim


def capacity(n_layers: int, n_kv_heads: int, head_dim: int, gpu_bytes: float, n_params: float,
             weight_bits: float, codec: str | KVCodec, seq_len: int, gpu_util: float = 0.9,
             reserve_bytes: float = 0, full_bytes: int = 2) -> Capacity:
    """gpu_bytes: device memory in bytes; n_params: weight count; weight_bits: stored bits per
    weight, scales included (16 for bf16, 8.0x for fp8, 4.125 for int4 g128: see
    QuantizedTensor.bits_per_weight); seq_len: tokens per sequence (prompt + generated);
    reserve_bytes: kept for activations and workspace; full_bytes: bytes per element of the
    full-precision window (bf16: 2)."""
    codec = get_codec(codec)
    codec.check_head_dim(head_dim)
    if min(n_layers, n_kv_heads, head_dim, seq_len) < 1 or not 0 < gpu_util <= 1:
        raise ValueError("n_layers, n_kv_heads, head_dim and seq_len must be >= 1 and gpu_util "
                         "in (0, 1]")
    weight_bytes = int(n_params * weight_bits / 8)
    budget = int(gpu_bytes * gpu_util - weight_bytes - reserve_bytes) - n_layers * codec.fixed_bytes
    if budget <= 0:
        raise ValueError(f"the weights ({weight_bytes / 1e9:.2f} GB) and reserve leave no memory "
                         "for "
                         f"the KV cache in {gpu_util} x {gpu_bytes / 1e9:.1f} GB: quantize the "
                         "weights to fewer bits, use a larger GPU or shard the model")
    per_token = n_layers * codec.bytes_per_token(n_kv_heads, head_dim)
    per_seq = n_layers * codec.bytes_for(seq_len, n_kv_heads, head_dim, full_bytes)
    return Capacity(weight_bytes, budget, per_token, int(budget // per_token), per_seq,
                    int(budget // per_seq))
