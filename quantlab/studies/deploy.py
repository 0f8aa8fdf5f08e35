"""Shipping on vLLM (chapters 9 and 10). First what vLLM serves on which GPU, and what fits:
GPU generations, the flags and kernels that serve each scheme, memory math for real model shapes,
and the failures chapter 9 demonstrates. Then the choice (chapter 10): accuracy costs measured on
stdlib-llama, and a recommender that picks a weight scheme and --kv-cache-dtype for a GPU, a
model, a context, a batch and an accuracy budget, and says why. quantlab.viz.deploy draws both.

    >>> from quantlab.studies.deploy import MODELS, kv_bytes_per_token, recommend
    >>> kv_bytes_per_token(MODELS["Llama-3-8B"], "auto")      # 2 x 32 x 8 x 128 x 2 bytes
    131072
    >>> r = recommend("H100", "Llama-3-8B", context_len=8192, batch=32, accuracy_budget=1.0,
    ...               costs={"fp8_dynamic": 0.03, "w4a16": 2.1})
    >>> r.weight_scheme, r.kv_cache_dtype
    ('fp8_dynamic', 'auto')

What is verified, and where (vLLM facts; the bracketed tags in the comments below point back
to these):
[hw]    docs.vllm.ai features/quantization, "Supported Hardware": Marlin (GPTQ/AWQ/FP8) on Ampere,
        Ada, Hopper; INT8 W8A8 on Turing to Hopper; FP8 W8A8 on Ada and Hopper, not Ampere.
[fp8]   docs features/quantization/fp8.md: "FP8 computation is supported on NVIDIA GPUs with compute
        capability >= 8.9 (Ada Lovelace, Hopper, Blackwell). FP8 models will run on compute
        capability >= 7.5 (Turing) as weight-only W8A16, utilizing FP8 Marlin." `--quantization fp8`
        quantizes a bf16 checkpoint at load time (its "online dynamic quantization").
[int4]  docs features/quantization/int4.md: INT4 W4A16 on compute capability > 8.0 (Ampere, Ada,
        Hopper, Blackwell).
[fp4]   vllm/model_executor/layers/quantization/utils/marlin_utils_fp4.py: without FP4 tensor
        cores vLLM serves NVFP4 weights through Marlin and warns "Your GPU does not have native
        support for FP4 computation but FP4 quantization is being used. Weight-only FP4
        compression will be used leveraging the Marlin kernel." FP4 tensor cores arrive with
        Blackwell (sm100).
[auto]  vllm/config/model.py, ModelConfig.quantization: "If None, we first check the
        quantization_config attribute in the model config file": a compressed-tensors export needs
        no --quantization flag (passing `compressed-tensors`, the checkpoint's own method, is
        harmless). Other method names: fp8, modelopt, modelopt_fp4, gptq_marlin, awq_marlin, gguf
        (vllm/model_executor/layers/quantization/__init__.py, QuantizationMethods).
[kv]    vllm/config/cache.py, CacheDType and cache_dtype's docstring: "auto" uses the model's
        dtype; "CUDA 11.8+ supports fp8 (=fp8_e4m3) and fp8_e5m2". docs quantized_kvcache.md:
        without calibration the k/v scales are 1.0 ("quantization error can degrade output
        quality"); calculate_kv_scales=True estimates them from one batch; llm-compressor
        calibration is the recommended way. (Recent main also lists int8_per_token_head,
        fp8_per_token_head, nvfp4 and turboquant_* cache dtypes; not used here.)
[marlin-k] vLLM's GPTQ/AWQ Marlin layers raise "Weight input_size_per_partition = 10944 is not
        divisible by min_thread_k = 128. Consider reducing tensor_parallel_size or running with
        --quantization gptq." (quoted in vllm-project/vllm#9913).
[oom]   vLLM's KV-cache check raises "No available memory for the cache blocks. Try increasing
        `gpu_memory_utilization` ..." and "The model's max seq len (X) is larger than the maximum
        number of tokens that can be stored in KV cache (Y). Try increasing
        `gpu_memory_utilization` or decreasing `max_model_len` ...".
[util]  --gpu-memory-utilization: 0.9 was the default (Ray's vLLM docs still quote it); recent
        vllm/config/cache.py says 0.92. We keep 0.9, as quantlab.kv.capacity does; pass
        gpu_util=0.92 to match a recent vLLM.
[marlin] IST-DASLab/marlin README: near-ideal 4x speedups "up to batchsizes of 16-32 tokens".
Rules of thumb (not measurements) are marked as such where they are used.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from quantlab.kv.capacity import capacity, kv_shape
from quantlab.kv.codecs import get_codec
from quantlab.schemes import get_scheme

GB = 1e9

# ------------------------------------------------------------------------------------- GPUs


@dataclass(frozen=True)
class GPU:
    """name; arch: NVIDIA generation; sm: compute capability x 10; memory_gb: the marketed
    memory in 1e9 bytes (nvidia-smi shows slightly different figures)."""

    name: str
    arch: str
    sm: int
    memory_gb: float

    @property
    def fp8(self) -> bool:  # FP8 tensor cores: Ada (sm89) and Hopper (sm90) onwards [fp8]
        return self.sm >= 89

    @property
    def fp4(self) -> bool:  # FP4 (NVFP4 / MXFP4) tensor cores: Blackwell (sm100) [fp4]
        return self.sm >= 100

    @property
    def tensor_formats(self) -> str:
        """The tensor-core input formats that matter for serving, oldest first."""
        return "bf16, fp16, int8" + (", fp8 (e4m3/e5m2)" if self.fp8 else "") + \
            (", fp4 (nvfp4, mxfp4)" if self.fp4 else "")


# Vendor spec sheets. B200: HGX B200 lists 180 GB (launch material said 192 GB).
GPUS: dict[str, GPU] = {g.name: g for g in (
    GPU("A100", "Ampere", 80, 80), GPU("L40S", "Ada", 89, 48), GPU("RTX 4090", "Ada", 89, 24),
    GPU("H100", "Hopper", 90, 80), GPU("H200", "Hopper", 90, 141),
    GPU("B200", "Blackwell", 100, 180))}


def get_gpu(gpu: str | GPU) -> GPU:
    if isinstance(gpu, GPU):
        return gpu
    for name, g in GPUS.items():
        if str(gpu).lower().replace(" ", "") == name.lower().replace(" ", ""):
            return g
    raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}. For another card pass "
                     "quantlab.studies.deploy.GPU(name, arch, sm, memory_gb)")


def get_gpus(gpus=None) -> list[GPU]:
    """gpus: names or GPUs (None: every GPU in GPUS) -> [GPU]."""
    return [get_gpu(g) for g in (gpus or GPUS)]


# ------------------------------------------------------------------------ schemes on vLLM

SCHEMES = ("bf16", "fp8_dynamic", "int8_w8a8", "w4a16", "nvfp4_a16", "nvfp4")
# vLLM --kv-cache-dtype -> the quantlab codec with the same bytes (fp8 = fp8_e4m3 with one scale
# per layer for K and one for V [kv]; fp8_e5m2 stores the same bytes, with less precision).
KV_CODEC = {"auto": "bf16", "fp8": "fp8_e4m3", "fp8_e4m3": "fp8_e4m3", "fp8_e5m2": "fp8_e4m3"}


@dataclass(frozen=True)
class ServingPath:
    """How vLLM runs a scheme on a GPU. ok: it serves it; compute: what the matmul computes in;
    note: why, in a sentence. A quantlab export needs no --quantization flag [auto]."""

    ok: bool
    compute: str
    note: str


def serving_path(scheme: str, gpu: str | GPU) -> ServingPath:
    """scheme: one of SCHEMES. Only what the sources in the module docstring state."""
    g = get_gpu(gpu)
    if scheme == "bf16":
        return ServingPath(True, "bf16 tensor cores", "the unquantized checkpoint")
    if scheme == "fp8_dynamic":
        if g.fp8:
            return ServingPath(True, "FP8 W8A8 tensor cores", "vLLM runs FP8 W8A8 from sm89; "
                               "without a checkpoint, --quantization fp8 quantizes bf16 "
                               "weights at load time")
        return ServingPath(True, "weight-only W8A16 (FP8 Marlin)", "no FP8 tensor cores before "
                           "sm89: vLLM runs FP8 checkpoints weight-only, activations 16-bit")
    if scheme == "int8_w8a8":
        if 75 <= g.sm <= 90:
            return ServingPath(True, "INT8 W8A8 tensor cores", "vLLM's hardware table: Turing "
                               "to Hopper")
        return ServingPath(False, "-", "vLLM's hardware table lists INT8 W8A8 from Turing to "
                           "Hopper and has no Blackwell column: not claimed here")
    if scheme in ("w4a16", "nvfp4_a16"):
        return ServingPath(g.sm >= 80, "weight-only (Marlin)", "vLLM serves 4-bit weights "
                           "through Marlin from sm80: dequantized in registers, 16-bit matmul")
    if scheme == "nvfp4":
        if g.fp4:
            return ServingPath(True, "NVFP4 W4A4 tensor cores", "Blackwell's FP4 tensor cores")
        return ServingPath(True, "weight-only fallback (FP4 Marlin)", "vLLM warns 'Your GPU does "
                           "not have native support for FP4 computation'")
    raise ValueError(f"unknown scheme {scheme!r}; known: {', '.join(SCHEMES)}")


def serving_table() -> list[dict]:
    """One row per (GPU generation, scheme): what vLLM runs, for chapter 9's table."""
    rows, seen = [], set()
    for g in GPUS.values():
        if g.arch in seen:
            continue
        seen.add(g.arch)
        row = {"GPU": f"{g.arch} ({g.name}, sm{g.sm})", "tensor cores": g.tensor_formats}
        for scheme in SCHEMES[1:]:
            p = serving_path(scheme, g)
            row[scheme] = p.compute if p.ok else "not listed"
        rows.append(row)
    return rows


# ---------------------------------------------------------------------- model shapes, memory


@dataclass(frozen=True)
class ModelShape:
    """A Llama-style decoder: the numbers in its config.json. Parameter counts are derived from
    them (Llama-3-8B: 8,030,261,248, its published count)."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(N, K) of every Linear a quantized checkpoint quantizes: q, k, v, o, gate, up, down per
        layer. lm_head stays bf16 (quantlab's and llm-compressor's default ignore list)."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, \
            self.kv_heads * self.head_dim
        return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)] * self.layers

    @property
    def linear_params(self) -> int:
        return sum(n * k for n, k in self.linear_shapes())

    @property
    def n_params(self) -> int:
        embed = self.vocab * self.hidden * (1 if self.tied else 2)  # embeddings (+ lm_head)
        norms = (2 * self.layers + 1) * self.hidden
        return self.linear_params + embed + norms

    @classmethod
    def from_config(cls, config, name: str) -> ModelShape:
        """A transformers LlamaConfig-like config -> ModelShape."""
        c = config.get_text_config(decoder=True)
        layers, kv_heads, head_dim = kv_shape(config)
        return cls(name, layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                   kv_heads, head_dim, c.vocab_size, bool(c.tie_word_embeddings))


# Meta's config.json files: 8B: hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads;
# 70B: 8192, 28672, 80, 64, 8; both head_dim 128, vocab 128256, untied embeddings.
MODELS: dict[str, ModelShape] = {m.name: m for m in (
    ModelShape("Llama-3-8B", 32, 4096, 14336, 32, 8, 128, 128256),
    ModelShape("Llama-3-70B", 80, 8192, 28672, 64, 8, 128, 128256))}


def get_model(model: str | ModelShape) -> ModelShape:
    if isinstance(model, ModelShape):
        return model
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}. For another "
                         "model pass ModelShape.from_config(AutoConfig.from_pretrained(...))")
    return MODELS[model]


def layer_bits(scheme: str, N: int, K: int) -> int:
    """Exact storage bits of one (N, K) weight under a preset: codes, scales, zero points and the
    NVFP4 global scale, what quantize(w, scheme).storage_bits counts, without quantizing."""
    ts = get_scheme(scheme).weights
    if ts.group_size and K % ts.group_size:
        raise ValueError(f"{scheme}: group_size={ts.group_size} does not divide K={K}")
    return ts.storage_bits((N, K))


def weight_bytes(model: str | ModelShape, scheme: str) -> dict[str, float]:
    """{quantized: bytes of the quantized Linears, other: bf16 embeddings, lm_head and norms,
    total, bits_per_weight: over the quantized Linears}. scheme 'bf16': nothing quantized."""
    if scheme != "bf16":
        get_scheme(scheme)  # any preset works; an unknown name raises, listing the presets
    return dict(_weight_bytes(get_model(model), scheme))


@lru_cache(maxsize=256)
def _weight_bytes(m: ModelShape, scheme: str) -> tuple[tuple[str, float], ...]:
    lin = m.linear_params
    qbits = 16 * lin if scheme == "bf16" else sum(layer_bits(scheme, n, k) for n, k in
                                              m.linear_shapes())
    other = 2 * (m.n_params - lin)
    return (("quantized", qbits / 8), ("other", other), ("total", qbits / 8 + other),
            ("bits_per_weight", qbits / lin))


def kv_codec(kv_dtype: str) -> str:
    """A --kv-cache-dtype value -> the quantlab codec with its bytes."""
    if kv_dtype not in KV_CODEC:
        raise ValueError(f"--kv-cache-dtype {kv_dtype!r} is not one of {', '.join(KV_CODEC)}")
    return KV_CODEC[kv_dtype]


def kv_bytes_per_token(model: str | ModelShape, kv_dtype: str = "auto") -> int:
    """KV bytes of one token over all layers: 2 (K, V) x layers x kv_heads x head_dim x bytes."""
    m = get_model(model)
    return int(m.layers * get_codec(kv_codec(kv_dtype)).bytes_per_token(m.kv_heads, m.head_dim))


def fit(gpu: str | GPU, model: str | ModelShape, scheme: str, kv_dtype: str, context_len: int,
        batch: int, gpu_util: float = 0.9) -> dict:
    """Memory of one configuration, vLLM's budget rule (quantlab.kv.capacity): gpu_util x memory
    holds the weights and the KV cache. Returns GB figures, max_context (tokens per sequence
    at this batch), max_batch (sequences of context_len) and fits (max_batch >= batch)."""
    g, m = get_gpu(gpu), get_model(model)
    w = weight_bytes(m, scheme)
    out = {"weights_gb": w["total"] / GB, "budget_gb": gpu_util * g.memory_gb,
           "kv_gb": batch * context_len * kv_bytes_per_token(m, kv_dtype) / GB}
    try:
        c = capacity(m.layers, m.kv_heads, m.head_dim, g.memory_gb * GB, m.n_params,
                     8 * w["total"] / m.n_params, kv_codec(kv_dtype), context_len, gpu_util)
        out.update(max_context=int(c.tokens // batch), max_batch=c.sequences)
    except ValueError:  # the weights alone exceed the budget
        out.update(max_context=0, max_batch=0)
    out["fits"] = out["max_batch"] >= batch
    out["free_gb"] = out["budget_gb"] - out["weights_gb"] - out["kv_gb"]
    return out



# ----------------------------------------------------------------- failures, demonstrated


def marlin_k_check(K: int, tp: int = 1) -> str | None:
    """None if a Marlin W4A16 layer with input size K splits over tp GPUs; else vLLM's refusal
    [marlin-k]. Row-parallel layers (o_proj, down_proj) split K across tensor-parallel ranks."""
    if K % tp:
        return f"K={K} does not split over tensor_parallel_size={tp}"
    k = K // tp
    if k % 128:
        return (f"Weight input_size_per_partition = {k} is not divisible by min_thread_k = 128. "
                "Consider reducing tensor_parallel_size or running with --quantization gptq.")
    return None


def startup_check(gpu, model, scheme: str, kv_dtype: str, max_model_len: int,
                  gpu_util: float = 0.9) -> str:
    """What vLLM says at startup about one sequence of max_model_len tokens [oom], with our
    budget rule (vLLM's own figure also subtracts profiled activation memory). Weights larger
    than the whole GPU fail earlier, in torch, while loading."""
    f = fit(gpu, model, scheme, kv_dtype, max_model_len, 1, gpu_util)
    tokens = f["max_context"]
    if f["weights_gb"] > get_gpu(gpu).memory_gb:
        return (f"torch.OutOfMemoryError: CUDA out of memory (while loading "
                f"{f['weights_gb']:.1f} GB of weights)")
    if tokens <= 0:
        return ("ValueError: No available memory for the cache blocks. Try increasing "
                "`gpu_memory_utilization` when initializing the engine.")
    if tokens < max_model_len:
        return (f"ValueError: The model's max seq len ({max_model_len}) is larger than the "
                f"maximum number of tokens that can be stored in KV cache ({tokens}). Try "
                "increasing `gpu_memory_utilization` or decreasing `max_model_len` when "
                "initializing the engine.")
    return f"ok: KV cache holds {tokens:,} tokens >= max_model_len {max_model_len:,}"


def kv_scale_sweep(x: torch.Tensor, factors: torch.Tensor) -> dict[str, list[float]]:
    """x: real keys or values (any shape). For x * f, f in factors: SQNR (dB) of FP8 storage with
    a calibrated scale (amax / 448), with vLLM's uncalibrated scale 1.0 [kv], and E5M2 at 1.0.
    Returns {"amax": [...], label: [dB, ...]}."""
    from quantlab.eval import sqnr_db
    from quantlab.formats import E4M3, E5M2

    out = {"amax": [], "e4m3, calibrated scale": [], "e4m3, scale 1.0": [],
           "e5m2, scale 1.0": []}
    for f in factors.tolist():
        y = x.float() * f
        s = y.abs().amax() / 448
        out["amax"].append(float(y.abs().amax()))
        out["e4m3, calibrated scale"].append(sqnr_db(y, E4M3.round(y / s) * s))
        out["e4m3, scale 1.0"].append(sqnr_db(y, E4M3.round(y)))
        out["e5m2, scale 1.0"].append(sqnr_db(y, E5M2.round(y)))
    return out


def checkpoint_sizes(path: str | Path) -> dict[str, int]:
    """Bytes of a compressed-tensors model.safetensors by role: packed codes, scales, bf16
    tensors (embeddings, lm_head, norms), from its header."""
    from quantlab.io.safetensors_io import read_safetensors_header

    h = read_safetensors_header(Path(path) / "model.safetensors")
    out: dict[str, int] = {}
    for name, info in h.items():
        if name == "__metadata__":
            continue
        local = name.rsplit(".", 1)[-1]
        if local == "weight_packed" or (local == "weight" and info["dtype"] in ("F8_E4M3", "I8")):
            role = "codes"
        elif "scale" in local or local in ("weight_zero_point", "weight_shape", "weight_g_idx"):
            role = "scales"
        else:  # 16-bit tensors, by what they are
            role = next((r for r in ("embed_tokens", "lm_head", "norm") if r in name), "other")
            role = "norms" if role == "norm" else role
        a, b = info["data_offsets"]
        out[role] = out.get(role, 0) + b - a
    return out


# ---------------------------------------------------------------------------- accuracy costs

NOISE_PCT = 0.25  # perplexity changes below this are noise at 2048 eval tokens. Measured (RTN,
# stdlib-llama) over ATEN_CPU_CAPABILITY default/avx2/avx512 x 1-2 threads x torch 2.11/2.13:
# fp8_dynamic +0.02% to +0.12%, int8_w8a8 -0.05% to +0.05%, the same scheme on the same weights;
# scripts/check_spread.py reruns it.


def measure_costs(schemes=SCHEMES[1:], eval_tokens: int = 2048, calib_tokens: int = 256,
                  log=None) -> dict:
    """Round to nearest on the embedded stdlib-llama, measured as quantlab.compare measures it
    (256-token windows, KL on the first). Returns {baseline perplexity, eval_tokens,
    rows: {scheme: {bits_per_weight, perplexity, ppl_increase_pct, kl}}}."""
    from quantlab import models
    from quantlab.algorithms.calibration import rtn
    from quantlab.eval.lm import mean_nll, next_token_kl, token_windows
    from quantlab.nn import bits_per_weight

    model, tok = models.load_causal_lm()
    windows = token_windows(tok, models.eval_text(), 256, eval_tokens)
    calib = token_windows(tok, models.calib_text(), 256, calib_tokens)
    p = math.exp(mean_nll(model, windows))
    rows = {}
    for scheme in [get_scheme(s) for s in schemes]:
        q = rtn(copy.deepcopy(model), scheme, calib)
        ppl = math.exp(mean_nll(q, windows))
        rows[scheme.name] = {"bits_per_weight": bits_per_weight(q), "perplexity": ppl,
                             "ppl_increase_pct": 100 * (ppl - p) / p,
                             "kl": next_token_kl(model, q, windows[:1])}
        if log:
            log(f"  {scheme.name:<14} ppl {ppl:8.3f}")
    return {"perplexity": p, "eval_tokens": windows.numel(), "rows": rows}


def kv_costs(path: str | Path | None = None) -> dict[str, float]:
    """Perplexity increase (%) per --kv-cache-dtype from the committed KV measurement
    (data/bench/kv-accuracy-stdlib-llama.json; fp8 = static calibrated per-layer E4M3 scales)."""
    from quantlab.models import data_dir

    path = Path(path) if path else data_dir() / "bench" / "kv-accuracy-stdlib-llama.json"
    rows = {r["codec"]: r for r in json.loads(path.read_text())["codecs"]}
    base = rows["bf16"]["perplexity"]
    return {"auto": 0.0, "fp8": 100 * rows["fp8_e4m3"]["perplexity_delta"] / base}


def effective_cost(pct: float) -> float:
    """A measured perplexity increase (%), with changes inside the noise counted as 0."""
    return 0.0 if abs(pct) < NOISE_PCT else pct


# ------------------------------------------------------------------------------ recommending

MEMORY_BOUND_BATCH = 32  # [marlin]: weight-only 4-bit keeps its speedup up to batch 16-32


@dataclass
class Recommendation:
    """weight_scheme / kv_cache_dtype: None when nothing fits. memory: fit() of the choice.
    cost_pct: weight + KV perplexity increase (added: a rule of thumb). options: one row per
    scheme with why it was or was not chosen."""

    gpu: str
    model: str
    context_len: int
    batch: int
    accuracy_budget: float
    weight_scheme: str | None
    kv_cache_dtype: str | None
    memory: dict
    cost_pct: float
    command: str
    reasons: list[str] = field(default_factory=list)
    options: list[dict] = field(default_factory=list)


def preference(gpu: str | GPU, batch: int, costs: dict[str, float] | None = None) -> list[str]:
    """Formats in the order we try them (rule of thumb): native low-bit compute first (NVFP4 W4A4,
    Blackwell only); then, at small batch (decode reads every weight per step: memory-bound) 4-bit
    weights before 8-bit, at large batch (compute-bound) W8A8 before weight-only; bf16 last.
    Within a tier, the lower measured cost (costs: {scheme: %}) comes first."""
    g = get_gpu(gpu)
    w8 = ["fp8_dynamic", "int8_w8a8"] if g.fp8 else ["int8_w8a8", "fp8_dynamic"]
    w4 = ["nvfp4_a16", "w4a16"]
    if costs:  # stable: equal costs keep the order above
        w8, w4 = (sorted(t, key=lambda f: effective_cost(costs.get(f, math.inf)))
                  for t in (w8, w4))
    mid = w4 + w8 if batch <= MEMORY_BOUND_BATCH else w8 + w4
    return ["nvfp4"] + mid + ["bf16"]  # recommend() skips nvfp4 (W4A4) without FP4 cores


def _check(context_len: int, batch: int, accuracy_budget: float, gpu_util: float) -> None:
    for name, v in (("context_len", context_len), ("batch", batch)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive integer (tokens / sequences)")
    if isinstance(accuracy_budget, bool) or not (isinstance(accuracy_budget, int | float)
                                                 and 0 <= accuracy_budget < math.inf):
        raise ValueError(f"accuracy_budget={accuracy_budget!r}: give the perplexity increase "
                         "you accept, in percent (e.g. 1.0), >= 0")
    if not 0 < gpu_util <= 1:
        raise ValueError(f"gpu_util={gpu_util} must be in (0, 1] (vLLM's default is 0.9)")


def serve_command(scheme: str | None, kv: str | None, context_len: int, batch: int) -> str:
    """The export and serve lines for a choice ([auto]: no --quantization for our exports)."""
    if scheme is None:
        return "(nothing fits: see the reasons)"
    serve = "vllm serve ./model" if scheme == "bf16" else \
        f"quantlab export --scheme {scheme} --out ./model-{scheme}\nvllm serve ./model-{scheme}"
    extra = "" if kv == "auto" else f" --kv-cache-dtype {kv}"
    return f"{serve}{extra} --max-model-len {context_len} --max-num-seqs {batch}"


def recommend(gpu: str | GPU, model: str | ModelShape, context_len: int, batch: int = 1,
              accuracy_budget: float = 1.0, *, costs: dict[str, float],
              kv: dict[str, float] | None = None, gpu_util: float = 0.9) -> Recommendation:
    """Weight scheme and --kv-cache-dtype for one GPU, a model, batch sequences of context_len
    tokens and an accuracy budget (perplexity increase in %, on our stdlib-llama proxy).
    costs: {scheme: measured perplexity increase %} (measure_costs); schemes missing from it
    are skipped. kv: {kv dtype: %} (default kv_costs(): the committed KV measurement)."""
    g, m = get_gpu(gpu), get_model(model)
    _check(context_len, batch, accuracy_budget, gpu_util)
    kv = kv_costs() if kv is None else kv
    costs = {"bf16": 0.0, **costs}
    regime = "memory-bound: fewer weight bytes first" if batch <= MEMORY_BOUND_BATCH else \
        "compute-bound: W8A8 tensor-core formats first"
    reasons = [f"{g.name} ({g.arch}, sm{g.sm}, {g.memory_gb:g} GB): tensor cores take "
               f"{g.tensor_formats}.",
               f"batch {batch} ({regime}; rule of thumb: Marlin keeps its 4-bit speedup up to "
               f"batch {MEMORY_BOUND_BATCH}).",
               "Accuracy costs: perplexity increase on the 6.8M-parameter stdlib-llama, weights "
               "and KV added; a rule of thumb says larger models lose less to the same format, "
               "so read them as a ranking."]
    options, choice = [], None
    for scheme in preference(g, batch, costs):
        path = serving_path(scheme, g)
        row = {"format": scheme, "compute": path.compute,  # "format": the table's column label
               "weights GB": weight_bytes(m, scheme)["total"] / GB,
               "cost %": costs.get(scheme, math.nan), "status": ""}
        options.append(row)
        if not path.ok:
            row["status"] = f"not served: {path.note}"
            continue
        if scheme == "nvfp4" and not g.fp4:
            row["status"] = "no FP4 tensor cores: served weight-only, so export nvfp4_a16"
            continue
        if scheme not in costs:
            row["status"] = "no accuracy measurement given"
            continue
        cw = effective_cost(costs[scheme])
        if cw > accuracy_budget:
            row["status"] = f"costs {costs[scheme]:.2f}% > budget {accuracy_budget:g}%"
            continue
        fits = {kvd: fit(g, m, scheme, kvd, context_len, batch, gpu_util)
                for kvd in ("auto", "fp8")}
        allowed = [k for k in fits if cw + effective_cost(kv[k]) <= accuracy_budget]  # auto always
        ok = [k for k in allowed if fits[k]["fits"]]
        if not ok:
            f = fits[allowed[-1]]
            row["status"] = (f"does not fit: {f['weights_gb']:.1f} GB weights + "
                             f"{f['kv_gb']:.1f} GB KV ({allowed[-1]}) > {f['budget_gb']:.1f} GB")
            continue
        row["status"] = f"chosen, --kv-cache-dtype {ok[0]}" if choice is None else "fits"
        if choice is None:
            choice = (scheme, ok[0], fits[ok[0]], cw + effective_cost(kv[ok[0]]))
    if choice is None:
        reasons.append(_nothing_fits(g, m, context_len, batch, accuracy_budget, costs, kv,
                                     gpu_util))
        return Recommendation(g.name, m.name, context_len, batch, accuracy_budget, None, None,
                              {}, math.nan, serve_command(None, None, 0, 0), reasons, options)
    scheme, kvd, f, cost = choice
    reasons += _why(g, m, scheme, kvd, f, cost, costs, kv, context_len, batch, accuracy_budget,
                    gpu_util)
    return Recommendation(g.name, m.name, context_len, batch, accuracy_budget, scheme, kvd, f, cost,
                          serve_command(scheme, kvd, context_len, batch), reasons, options)


def _why(g, m, scheme, kvd, f, cost, costs, kv, context_len, batch, budget, gpu_util) -> list[str]:
    p = serving_path(scheme, g)
    out = [f"Weights: {scheme} ({p.compute}), {f['weights_gb']:.1f} GB; measured cost "
           f"{costs[scheme]:+.2f}%" + (f" (inside the ±{NOISE_PCT}% noise)"
                                        if effective_cost(costs[scheme]) == 0 and scheme != "bf16"
                                        else "")
           + f". {p.note}."]
    kv_line = (f"KV cache: {kvd}, {f['kv_gb']:.1f} GB for {batch} x {context_len} tokens; "
               f"{f['free_gb']:.1f} GB of the {f['budget_gb']:.1f} GB budget "
               f"({gpu_util:g} x memory) left; up to {f['max_context']:,} tokens per sequence "
               "at this batch.")
    if kvd == "auto":
        alt = fit(g, m, scheme, "fp8", context_len, batch, gpu_util)
        kv_line += (f" fp8 would allow {alt['max_context']:,} at a measured "
                    f"{kv['fp8']:.2f}% (static calibrated scales).")
    else:
        auto = fit(g, m, scheme, "auto", context_len, batch, gpu_util)
        kv_line += (f" bf16 KV ({auto['kv_gb']:.1f} GB) does not fit; fp8 halves it at a "
                    f"measured {kv['fp8']:.2f}% with scales calibrated per layer: calibrate "
                    "them (llm-compressor), vLLM's uncalibrated default scale is 1.0.")
        if context_len > 8192:
            kv_line += (" Our KV measurement used 512-token windows; fp8 KV accuracy at long "
                        "context is reported to vary (vllm-project/vllm#23813): check it.")
    out.append(kv_line)
    out.append(f"Total cost {cost:.2f}% <= budget {budget:g}%. vLLM also keeps activation "
               "memory (profiled at startup): leave a few GB of headroom.")
    return out


def _nothing_fits(g, m, context_len, batch, budget, costs, kv, gpu_util) -> str:
    ok = [f for f in preference(g, batch, costs) if serving_path(f, g).ok and f in costs
          and effective_cost(costs[f]) <= budget and not (f == "nvfp4" and not g.fp4)]
    if not ok:
        return f"No format is within the {budget:g}% budget."
    best = max(((f, kvd, fit(g, m, f, kvd, context_len, batch, gpu_util)) for f in ok
                for kvd in ("auto", "fp8")
                if effective_cost(costs[f]) + effective_cost(kv[kvd]) <= budget),
               key=lambda t: (t[2]["max_batch"], -t[2]["weights_gb"]))
    f, kvd, r = best
    if r["max_batch"] == 0:
        return (f"Nothing fits one {g.name} within the {budget:g}% budget: the most compact "
                f"format within it, {f}, needs {r['weights_gb']:.1f} GB for its weights alone, "
                f"more than the {r['budget_gb']:.1f} GB budget. Shard with "
                "--tensor-parallel-size 2 or more, or loosen the budget.")
    return (f"Nothing fits one {g.name} within the {budget:g}% budget. Closest: {f} with {kvd} "
            f"KV holds {r['max_batch']} sequences of {context_len} tokens: lower "
            "--max-num-seqs or --max-model-len, shard with --tensor-parallel-size, or loosen "
            "the budget.")


def recommendation_grid(model, contexts, budget, costs, batch=1, gpus=None) -> list[dict]:
    """recommend() for every GPU x context: rows {gpu, context, format, kv} ('none', '-' when
    nothing fits)."""
    rows, kv = [], kv_costs()
    for g in gpus or list(GPUS):
        for c in contexts:
            r = recommend(g, model, c, batch, budget, costs=costs, kv=kv)
            rows.append({"gpu": g, "context": c, "format": r.weight_scheme or "none",
                         "kv": r.kv_cache_dtype or "-"})
    return rows
