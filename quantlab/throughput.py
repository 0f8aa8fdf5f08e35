"""Tokens per second of a (quantized) Llama model: prefill, then greedy decode from a static KV
cache, each decode step replayed from one CUDA graph (gpt-fast style), so the host does not hide
the kernels.

    rows = throughput("8b", schemes=("bf16", "w4a16"), batches=(1, 16))   # Python API
    quantlab throughput --model 8b --schemes bf16,w4a16,fp8_dynamic       # CLI

The decode loop (`forward`) runs the Hugging Face model's own modules (embedding, norms,
projections, which are QuantLinear after quantize_model, MLP, rotary embedding) but keeps the KV
cache in preallocated tensors (B, kv_heads, max_len, head_dim) per layer and writes the step's
keys and values at its position with index_copy_: no shapes or Python branches change between
steps, so one captured graph replays every step. Grouped-query heads share K/V without copying
it: the query heads of a group are folded into the query length.

Per (scheme, batch) a row holds decode tokens/s, time per step, peak GPU memory and the byte
floor: weights read once per step (every linear layer's stored bytes, the norms and lm_head) plus
the KV cache up to the context length, over the measured copy bandwidth. Prefill rows hold
prefill tokens/s at batch 1 and the time to first token (the prefill of the prompt). On a CPU the
reference backend runs eagerly and the rows say device "cpu": CPU numbers, not a GPU's.

Models: "stdlib" (the embedded stdlib-llama), "8b" and "70b" (Llama-3 shapes from a LlamaConfig,
random weights). A model too large for the GPU runs with fewer layers (`layers=`); its times are
then scaled by (model layers / layers run) and the row says so (`layers_run`, `scaled`). This
scales lm_head with the layers too, in the time and in the floor's bytes alike: for 70B at 10 of
80 layers the scaled step reads 154 GB instead of 141 GB, so tokens/s are about 9% low while
the fraction of the floor is unaffected.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BATCHES = (1, 4, 16, 64, 256)
MODELS = {  # Llama-3 shapes; vocab 128256, rope theta 500000
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8),
}


KV_DTYPES = {"bf16": None, "int8": torch.int8, "fp8": torch.float8_e4m3fn}


@dataclass
class StaticCache:
    """Preallocated keys and values, one (B, kv_heads, max_len, head_dim) pair per layer: bf16,
    or int8 / E4M3 codes with one fp32 scale per (token, head) in ks, vs (B, kv_heads, max_len):
    the int8_per_token_head / fp8_per_token_head codecs of quantlab.kv, stored as the decode
    attention kernel (quantlab.kv.attention) reads them."""

    k: list[Tensor]
    v: list[Tensor]
    ks: list[Tensor] | None = None
    vs: list[Tensor] | None = None
    kv: str = "bf16"

    @classmethod
    def empty(cls, model: nn.Module, batch: int, max_len: int, dtype: torch.dtype,
              kv: str = "bf16") -> StaticCache:
        if kv not in KV_DTYPES:
            raise ValueError(f"kv={kv!r}; use one of {tuple(KV_DTYPES)}")
        cfg = model.config
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (batch, cfg.num_key_value_heads, max_len, d)
        dev = model.lm_head.weight.device
        n = len(model.model.layers)
        cdt = KV_DTYPES[kv] or dtype
        new = lambda sh, dt: [torch.zeros(sh, dtype=dt, device=dev) for _ in range(n)]  # noqa: E731
        if kv == "bf16":
            return cls(new(shape, cdt), new(shape, cdt))
        return cls(new(shape, cdt), new(shape, cdt), new(shape[:3], torch.float32),
                   new(shape[:3], torch.float32), kv)

    @property
    def nbytes_per_token(self) -> int:
        """KV bytes per position per sequence, all layers, scales included."""
        per = [t[0, :, 0] for t in self.k + self.v] + [t[0, :, :1] for t in (self.ks or []) +
                                                       (self.vs or [])]
        return sum(t.numel() * t.element_size() for t in per)

    def write(self, i: int, pos: Tensor, k: Tensor, v: Tensor) -> None:
        """Store layer i's k, v (B, kv_heads, T, D) at positions pos (T,), encoding them per
        (token, head) as PerTokenHeadCodec does (quantlab.kv.write: one kernel launch per
        tensor where kernels run, its reference elsewhere; a CUDA graph can capture it)."""
        from quantlab.kernels._runtime import interpreted
        from quantlab.kv.write import write_per_token_head, write_per_token_head_ref

        element = "int8" if self.kv == "int8" else "e4m3"
        for codes, scales, x in ((self.k, self.ks, k), (self.v, self.vs, v)):
            if scales is None:
                codes[i].index_copy_(2, pos, x.to(codes[i].dtype))
            elif x.is_cuda or interpreted():
                write_per_token_head(x, codes[i], scales[i], pos, element)
            else:
                write_per_token_head_ref(x, codes[i], scales[i], pos, element)

    def read(self, i: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Layer i's whole cache as (keys, values) in dtype (decoded when quantized)."""
        if self.ks is None:
            return self.k[i], self.v[i]
        return ((self.k[i].float() * self.ks[i][..., None]).to(dtype),
                (self.v[i].float() * self.vs[i][..., None]).to(dtype))


def _decode_attention(q: Tensor, cache: StaticCache, i: int, lens: Tensor, scale: float) -> Tensor:
    """One query per sequence, q (B, H, D), over layer i of the cache -> (B, H, D): the
    Triton kernel where kernels run (CUDA, or TRITON_INTERPRET=1), its reference elsewhere."""
    from quantlab.kernels._runtime import interpreted
    from quantlab.kv.attention import decode_attention, decode_attention_ref

    fn = decode_attention if q.is_cuda or interpreted() else decode_attention_ref
    ks, vs = (cache.ks[i], cache.vs[i]) if cache.ks is not None else (None, None)
    out = fn(q, cache.k[i], cache.v[i], ks, vs, lens, sm_scale=scale)
    return out.to(q.dtype)


def fuse_projections(model: nn.Module) -> nn.Module:
    """Merge each layer's q, k, v projections into one `qkv_proj` and gate, up into one
    `gate_up_proj` (nn.Linear, weights concatenated along the outputs), as vLLM serves Llama
    (QKVParallelLinear, MergedColumnParallelLinear): two matmuls fewer per layer, and wider ones.
    Call before quantize_model: a scheme with one scale per tensor (fp8_per_tensor, NVFP4's
    global scale) then shares one scale over the merged weight, as vLLM's loader does when it
    merges per-tensor scales (it keeps their max). In place; returns model."""
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        if hasattr(a, "qkv_proj"):
            continue
        for owner, names, fused in ((a, ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
                                    (m, ("gate_proj", "up_proj"), "gate_up_proj")):
            parts = [getattr(owner, n) for n in names]
            if not all(type(p) is nn.Linear for p in parts):
                raise TypeError(f"fuse_projections needs nn.Linear {names} (fuse before "
                                f"quantize_model), got {[type(p).__name__ for p in parts]}")
            w = parts[0].weight
            lin = nn.Linear(w.shape[1], sum(p.out_features for p in parts),
                            bias=parts[0].bias is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                lin.weight.copy_(torch.cat([p.weight for p in parts]))
                if lin.bias is not None:
                    lin.bias.copy_(torch.cat([p.bias for p in parts]))
            setattr(owner, fused, lin)
            owner.split_sizes = [p.out_features for p in parts]
            for n in names:
                delattr(owner, n)
    return model


def _rms(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """LlamaRMSNorm's arithmetic exactly: in float32, scaled by w after rounding back."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _add_rms(h: Tensor, r: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The residual add and the next norm: (h + r, rms(h + r))."""
    h = h + r
    return h, _rms(h, w, eps)


def _rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """transformers' apply_rotary_pos_emb (Llama): x cos + rotate_half(x) sin, cos and sin
    (B, T, D) broadcast over the heads of q, k (B, H, T, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rot(x):
        x1, x2 = x.chunk(2, -1)
        return torch.cat((-x2, x1), -1)

    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def _silu_mul(gu: Tensor) -> Tensor:
    g, u = gu.chunk(2, -1)
    return F.silu(g) * u


_PIECES = {"rms": _rms, "add_rms": _add_rms, "rope": _rope, "silu_mul": _silu_mul}
_COMPILED: dict[str, object] = {}


def _piece(name: str, x: Tensor):
    """The elementwise pieces between the matmuls, each one fused kernel through torch.compile on
    a GPU (a few launches per layer instead of ~50 small ones); plain torch on a CPU, where the
    same arithmetic runs eagerly."""
    if not x.is_cuda:
        return _PIECES[name]
    if name not in _COMPILED:
        import torch._dynamo.config as dc

        # one compiled kernel per shape (batch sizes, prefill): more than Dynamo's default 8
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(dc, knob):
                setattr(dc, knob, max(getattr(dc, knob), 256))
        _COMPILED[name] = torch.compile(_PIECES[name], dynamic=False, fullgraph=True)
    return _COMPILED[name]


def _qkv(a: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if hasattr(a, "qkv_proj"):
        return a.qkv_proj(x).split(a.split_sizes, -1)
    return a.q_proj(x), a.k_proj(x), a.v_proj(x)


def _mlp(m: nn.Module, x: Tensor) -> Tensor:
    if hasattr(m, "gate_up_proj"):
        return m.down_proj(_piece("silu_mul", x)(m.gate_up_proj(x)))
    return m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x))


def forward(model: nn.Module, cache: StaticCache, ids: Tensor, pos: Tensor) -> Tensor:
    """ids (B, T) at positions pos (T,) long -> logits (B, V) of the last position, float32.
    Writes the T positions' keys and values into cache; attends to positions <= each one.
    Decode steps (T = 1) over an int8 / fp8 cache go through the decode-attention kernel.
    Projections merged by fuse_projections are used when present; the norms, rotary, residual
    adds and SiLU x up run as fused pieces (_piece) with LlamaRMSNorm's arithmetic."""
    B, T = ids.shape
    h = model.model.embed_tokens(ids)
    cos, sin = model.model.rotary_emb(h, pos[None])
    L = cache.k[0].shape[2]
    mask = pos[:, None] >= torch.arange(L, device=ids.device)[None]          # (T, L)
    # decode steps through the decode-attention kernel: always for int8 / fp8 codes, and for a
    # bf16 cache on a GPU (SDPA with a mask over the whole static cache took 41 ms per 8B step
    # at 32k context and batch 1 on an H200, 7x the kernel's whole step)
    kernel = T == 1 and (cache.ks is not None or ids.is_cuda)
    lens = (pos[-1:] + 1).to(torch.int32).repeat(B) if kernel else None
    rms, add_rms, rope = (_piece(n, h) for n in ("rms", "add_rms", "rope"))
    masks = {}  # by query heads per KV head
    res = None  # the previous layer's MLP output, added with the next norm
    for i, layer in enumerate(model.model.layers):
        a, ln = layer.self_attn, layer.input_layernorm
        if res is None:
            x = rms(h, ln.weight, ln.variance_epsilon)
        else:
            h, x = add_rms(h, res, ln.weight, ln.variance_epsilon)
        q, k, v = _qkv(a, x)
        q = q.view(B, T, -1, a.head_dim).transpose(1, 2)                     # (B, H, T, D)
        k = k.view(B, T, -1, a.head_dim).transpose(1, 2)                     # (B, Hkv, T, D)
        v = v.view(B, T, -1, a.head_dim).transpose(1, 2)
        q, k = rope(q, k, cos, sin)
        cache.write(i, pos, k, v)
        if kernel:
            o = _decode_attention(q[:, :, 0].contiguous(), cache, i, lens, a.scaling)
            o = o.reshape(B, 1, -1)
        else:
            hkv = k.shape[1]
            g = q.shape[1] // hkv  # query heads per KV head, folded into the query length
            if g not in masks:
                masks[g] = mask.repeat(g, 1)
            qg = q.reshape(B, hkv, g * T, a.head_dim)
            kc, vc = cache.read(i, q.dtype)
            o = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=masks[g], scale=a.scaling)
            o = o.reshape(B, -1, T, a.head_dim).transpose(1, 2).reshape(B, T, -1)
        pn = layer.post_attention_layernorm
        h, x = add_rms(h, a.o_proj(o), pn.weight, pn.variance_epsilon)
        res = _mlp(layer.mlp, x)
    h = h + res
    n = model.model.norm
    return model.lm_head(rms(h[:, -1], n.weight, n.variance_epsilon)).float()


@torch.no_grad()
def static_act_scales(model: nn.Module, scheme, calib: Tensor) -> dict[str, Tensor]:
    """algorithms.calibration.static_act_scales through this module's forward, so a model with
    merged projections (fuse_projections, which transformers' own forward cannot run) is
    calibrated too: {linear name: amax of its inputs / element max}, lm_head left out; {} for a
    scheme with dynamic or no activation quantization. calib (B, T) token ids."""
    from quantlab.algorithms.calibration import input_hooks
    from quantlab.formats import get_format

    act = scheme.activations
    if act is None or act.dynamic:
        return {}
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n != "lm_head"}
    amax: dict[str, Tensor] = {}

    def seen(name, x):
        amax[name] = torch.maximum(amax.get(name, torch.zeros(())), x.abs().amax().float().cpu())

    B, T = calib.shape
    cache = StaticCache.empty(model, B, T, model.lm_head.weight.dtype)
    with input_hooks(linears, seen):
        forward(model, cache, calib, torch.arange(T, device=calib.device))
    fmax = get_format(act.format).max
    return {n: (a / fmax).clamp(min=1e-12) for n, a in amax.items()}


@torch.no_grad()
def generate(model: nn.Module, prompt: Tensor, steps: int, kv: str = "bf16") -> Tensor:
    """Greedy tokens (B, steps) after prompt (B, P), eagerly through forward (the reference for
    the graphed decode and for transformers' generate)."""
    B, P = prompt.shape
    cache = StaticCache.empty(model, B, P + steps, model.lm_head.weight.dtype, kv)
    tok = forward(model, cache, prompt, torch.arange(P, device=prompt.device)).argmax(-1)
    out = [tok]
    for t in range(P, P + steps - 1):
        tok = forward(model, cache, tok[:, None], torch.tensor([t], device=prompt.device))
        tok = tok.argmax(-1)
        out.append(tok)
    return torch.stack(out, 1)


def build_model(name: str, layers: int | None = None, device: str = "cuda",
                dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> nn.Module:
    """"stdlib" (embedded) or a Llama-3-shaped model ("8b", "70b") with random N(0, 0.02)
    weights, truncated to `layers` decoder layers when given."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if name == "stdlib":
        from quantlab.models import load_causal_lm

        model, _ = load_causal_lm(dtype=dtype, device=device)
    elif name in MODELS:
        shape = dict(MODELS[name], num_hidden_layers=layers or MODELS[name]["num_hidden_layers"])
        cfg = LlamaConfig(vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                          **shape)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in dtype: a 70B layer stack in fp32 would not fit
        try:
            with torch.device(device):
                model = LlamaForCausalLM(cfg).eval()
        finally:
            torch.set_default_dtype(default)
    else:
        raise ValueError(f"model {name!r}: use 'stdlib', '8b' or '70b'")
    model.full_layers = MODELS[name]["num_hidden_layers"] if name in MODELS \
        else len(model.model.layers)  # what times are scaled to
    if layers is not None and layers < len(model.model.layers):
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes a decode step reads for weights: QuantLinear layers at their stored bits (the
    reference backend keeps a float copy too, which a serving engine would not read), every
    other parameter and buffer as stored, but the embedding table (one row per token) and the
    rotary tables."""
    from quantlab.nn import QuantLinear

    total, counted = 0, set()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += math.ceil(m.storage_bits / 8)
            counted.update(id(t) for t in list(m.parameters()) + list(m.buffers()))
    skip = counted | {id(t) for t in model.model.embed_tokens.parameters()}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) not in skip and "rotary" not in name:
            total += t.numel() * t.element_size()
            skip.add(id(t))
    return total


def _timer(device: torch.device):
    """fn, n -> median seconds of one call (CUDA events on a GPU, perf_counter on a CPU)."""
    def run(fn, n: int = 3) -> float:
        times = []
        for _ in range(n):
            if device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]
    return run


def decode_step_time(model: nn.Module, batch: int, context: int, steps: int,
                     graphs: bool = True, kv: str = "bf16") -> float:
    """Seconds per greedy decode step at `batch` sequences with `context` cached positions
    (cache filled with random values: attention costs the same), median over `steps` steps
    replayed from one CUDA graph (graphs=True on a GPU) or run eagerly."""
    dev = model.lm_head.weight.device
    dtype = model.lm_head.weight.dtype
    cache = StaticCache.empty(model, batch, context + steps + 8, dtype, kv)
    for t in cache.k + cache.v:  # random codes / values; scales stay 0 (same bytes, same time)
        t[:, :, :context].copy_(torch.randn(t[:, :, :context].shape, device=dev)
                                .mul(1 if kv == "bf16" else 40))
    tok = torch.randint(0, model.config.vocab_size, (batch, 1), device=dev)
    pos = torch.tensor([context], device=dev)

    def step():
        nxt = forward(model, cache, tok, pos).argmax(-1)
        tok.copy_(nxt[:, None])
        pos.add_(1)

    timer = _timer(dev)
    step()  # configs picked and kernels compiled outside any capture
    if dev.type != "cuda" or not graphs:
        return timer(step, n=steps)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as torch.cuda.graph wants
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    pos.fill_(context)
    g.replay()
    return timer(g.replay, n=steps)


def prefill_time(model: nn.Module, tokens: int) -> float:
    """Seconds to prefill one sequence of `tokens` (eager: large launches), median of 3."""
    dev = model.lm_head.weight.device
    cache = StaticCache.empty(model, 1, tokens, model.lm_head.weight.dtype)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=dev)
    pos = torch.arange(tokens, device=dev)
    forward(model, cache, ids, pos)
    return _timer(dev)(lambda: forward(model, cache, ids, pos), n=3)


@dataclass
class Row:
    model: str
    scheme: str
    kv: str
    kind: str                  # "decode" or "prefill"
    batch: int
    context: int               # cached positions (decode) or prompt tokens (prefill)
    tokens_per_s: float
    ms: float                  # per decode step, or the prefill (= time to first token)
    floor_tokens_per_s: float | None   # decode: bytes read per step / copy bandwidth
    weight_gb: float
    kv_gb: float               # KV read per step (decode) / written (prefill)
    peak_gb: float | None
    layers_run: int
    scaled: bool
    backend: str
    device: str
    bandwidth_gbs: float | None  # measured copy bandwidth the floor divides by
    graphed: bool              # decode step replayed from a CUDA graph
    fused: bool = False        # q/k/v and gate/up merged (fuse_projections)


@torch.no_grad()
def throughput(model_name: str = "stdlib", schemes: tuple[str, ...] = ("bf16", "w4a16"),
               batches: tuple[int, ...] = BATCHES, context: int = 512, prompt: int = 512,
               steps: int = 20, layers: int | None = None, backend: str = "auto",
               device: str | None = None, bandwidth: float | None = None,
               log=print, json_path=None, kvs: tuple[str, ...] = ("bf16",),
               fuse: bool = True) -> list[Row]:
    """Rows for each scheme ("bf16" = unquantized), KV dtype (kvs: "bf16", "int8", "fp8") and
    batch; see the module doc. json_path: rewritten after every row, so a run cut short keeps
    what it measured. The prefill row is measured with a bf16 cache. fuse: merge the q/k/v and
    gate/up projections first (fuse_projections), as vLLM does."""
    from quantlab.nn import QuantLinear, quantize_model
    from quantlab.schemes import get_scheme

    for s in schemes:  # unknown names fail before any work
        if s != "bf16":
            get_scheme(s)

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if bandwidth is None and cuda:
        from quantlab.kernels.bench import copy_bandwidth

        bandwidth = copy_bandwidth()
    dtype = torch.bfloat16  # on a CPU too: same model, slower numbers
    base = build_model(model_name, layers, device, dtype)
    if fuse:
        fuse_projections(base)
    n_model = base.full_layers
    n_run = len(base.model.layers)
    scale = n_model / n_run
    rows: list[Row] = []
    for scheme in schemes:
        if scheme == "bf16":
            model = base
        else:  # static activation scales (fp8_per_tensor) from one random batch; {} otherwise
            calib = torch.randint(0, base.config.vocab_size, (1, 64), device=dev)
            scales = static_act_scales(base, get_scheme(scheme), calib)
            model = quantize_model(copy.deepcopy(base), scheme, act_scales=scales,
                                   backend=backend)
        backends = sorted({m.backend for m in model.modules() if isinstance(m, QuantLinear)})
        wbytes = weight_bytes(model) * scale
        common = dict(model=model_name, scheme=scheme,
                      weight_gb=wbytes / 1e9, layers_run=n_run, scaled=n_run != n_model,
                      backend="+".join(backends) or "torch", device=_device_name(dev),
                      bandwidth_gbs=bandwidth / 1e9 if bandwidth else None, fused=fuse)
        for kv_name in kvs:
            kv_tok = StaticCache.empty(model, 1, 1, dtype, kv_name).nbytes_per_token * scale
            for b in batches:
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                graphed = cuda
                try:
                    try:
                        sec = decode_step_time(model, b, context, steps, cuda, kv_name) * scale
                    except RuntimeError as err:  # a capture that fails: timed eagerly, and said so
                        if not cuda or isinstance(err, torch.OutOfMemoryError):
                            raise
                        log(f"{scheme} batch {b}: CUDA graph capture failed ({err}); eager timing")
                        graphed = False
                        sec = decode_step_time(model, b, context, steps, False, kv_name) * scale
                except torch.OutOfMemoryError:
                    log(f"{scheme} batch {b}: out of GPU memory, skipped")
                    continue
                kv = b * context * kv_tok
                floor = b / ((wbytes + kv) / bandwidth) if bandwidth else None
                rows.append(Row(kind="decode", batch=b, context=context, tokens_per_s=b / sec,
                                ms=sec * 1e3, floor_tokens_per_s=floor, kv_gb=kv / 1e9,
                                peak_gb=_peak(cuda), graphed=graphed, kv=kv_name,
                                **common))
                log(_fmt(rows[-1]))
                if json_path:
                    save(rows, json_path)
        if prompt:
            kv_tok = StaticCache.empty(model, 1, 1, dtype).nbytes_per_token * scale
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            sec = prefill_time(model, prompt) * scale
            rows.append(Row(kind="prefill", batch=1, context=prompt, tokens_per_s=prompt / sec,
                            ms=sec * 1e3, floor_tokens_per_s=None,
                            kv_gb=prompt * kv_tok / 1e9, peak_gb=_peak(cuda), graphed=False,
                            kv="bf16", **common))
            log(_fmt(rows[-1]))
            if json_path:
                save(rows, json_path)
        del model
    return rows


def _peak(cuda: bool) -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if cuda else None


def _device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


HEADER = ("model", "scheme", "kv", "kind", "batch", "ctx", "tok/s", "ms", "floor tok/s", "% floor",
          "peak GB", "backend")


def _fmt(r: Row) -> str:
    pct = f"{100 * r.tokens_per_s / r.floor_tokens_per_s:.0f}" if r.floor_tokens_per_s else "-"
    floor = f"{r.floor_tokens_per_s:.1f}" if r.floor_tokens_per_s else "-"
    peak = f"{r.peak_gb:.2f}" if r.peak_gb is not None else "-"
    return " | ".join((r.model + ("*" if r.scaled else ""), r.scheme, r.kv, r.kind, str(r.batch),
                       str(r.context), f"{r.tokens_per_s:.1f}", f"{r.ms:.3f}", floor, pct, peak,
                       r.backend))


def table(rows: list[Row]) -> str:
    """Markdown table; * after the model: times scaled from fewer layers (module doc)."""
    lines = [" | ".join(HEADER), " | ".join("---" for _ in HEADER)]
    return "\n".join(lines + [_fmt(r) for r in rows])


def to_json(rows: list[Row]) -> dict:
    """{device, torch, triton, date, bandwidth, rows}: what data/bench/e2e-<device>.json holds."""
    import triton

    dev = rows[0].device if rows else "cpu"
    return {"device": dev, "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(),
            "copy_bandwidth_gbs": rows[0].bandwidth_gbs if rows else None,
            "cpu_numbers": dev == "cpu",
            "rows": [asdict(r) for r in rows]}


def save(rows: list[Row], path) -> None:
    with open(path, "w") as f:
        json.dump(to_json(rows), f, indent=1)


def add_parser(sub) -> None:
    """The `quantlab throughput` subcommand (registered by quantlab.cli)."""
    t = sub.add_parser("throughput", help="tokens/s of quantized models through the kernels: "
                       "prefill, decode at several batches, the byte floor")
    t.add_argument("--model", default="stdlib", choices=("stdlib", *MODELS))
    t.add_argument("--schemes", default="bf16,w4a16",
                   help="comma-separated: bf16 (unquantized) and scheme presets")
    t.add_argument("--batches", default=",".join(map(str, BATCHES)))
    t.add_argument("--context", type=int, default=512, help="cached positions while decoding")
    t.add_argument("--prompt", type=int, default=512, help="prefill tokens (0: no prefill)")
    t.add_argument("--steps", type=int, default=20, help="timed decode steps per batch")
    t.add_argument("--layers", type=int, help="decoder layers to build (times scaled up)")
    t.add_argument("--backend", default="auto", choices=("auto", "reference", "triton"))
    t.add_argument("--kv", default="bf16", help="comma-separated KV cache dtypes: bf16, int8, "
                   "fp8 (per token-head scales; decode steps through the decode-attention kernel)")
    t.add_argument("--no-fuse", dest="fuse", action="store_false",
                   help="keep q, k, v and gate, up as separate matmuls (default: merged, as vLLM)")
    t.add_argument("--json", help="write {device, torch, triton, date, rows} to this file")
    t.set_defaults(func=cmd_throughput)


def cmd_throughput(args) -> int:
    rows = throughput(args.model, tuple(args.schemes.split(",")),
                      tuple(int(b) for b in args.batches.split(",")), args.context, args.prompt,
                      args.steps, args.layers, args.backend,
                      log=lambda m: print(m, file=sys.stderr, flush=True), json_path=args.json,
                      kvs=tuple(args.kv.split(",")), fuse=args.fuse)
    if rows and rows[0].device == "cpu":
        print("CPU numbers (no CUDA GPU here): the reference backend, eager, bf16 on the CPU; "
              "not what a GPU does")
    print(table(rows))
    return 0
