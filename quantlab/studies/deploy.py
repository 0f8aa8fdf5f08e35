"""Shipping on vLLM (chapters 9 and 10). First what vLLM serves on which GPU, and what fits:
GPU generations, the kernels that serve each scheme (natively, or through a fallback vLLM warns
about), memory math for real model shapes, and the failures chapter 9 demonstrates. Then the
choice (chapter 10): accuracy costs measured on a model (the embedded 6.8M-parameter
stdlib-llama by default, a toy), and a recommender that picks a weight scheme and
--kv-cache-dtype for a GPU, a model, a context, a batch and an accuracy budget, and says why.
quantlab.viz.deploy draws both; quantlab.widgets.shipping and .choose are their panels.

    >>> from quantlab.studies.deploy import MODELS, kv_bytes_per_token, recommend
    >>> kv_bytes_per_token(MODELS["Llama-3-8B"], "auto")      # 2 x 32 x 8 x 128 x 2 bytes
    131072
    >>> r = recommend("H100", "Llama-3-8B", context_len=8192, batch=32, accuracy_budget=1.0,
    ...               costs={"fp8_dynamic": 0.03, "w4a16": 2.1})
    >>> r.weight_scheme, r.kv_cache_dtype
    ('fp8_dynamic', 'auto')

What is verified, and where. Every vLLM fact below was read in the vLLM v0.33.0 source release
(PyPI sdist vllm-0.33.0.tar.gz, 2026-11) unless another version is named; the bracketed tags in
the comments point back here.
[gpu]   docs/getting_started/installation/gpu.cuda.inc.md: "GPU: compute capability 7.5 or
        higher" (v0.20.0 on; v0.17.0 still said 7.0 and listed the V100).
[hw]    docs/features/quantization/README.md, "Supported Hardware": Marlin (GPTQ/AWQ/FP8/FP4) on
        Turing (SM 7.5, "*Turing does not support Marlin MXFP4"), Ampere, Ada, Hopper (Turing was
        added to that row in v0.17.0); llm-compressor INT8 W8A8 on Turing to Hopper; FP8 W8A8 on
        Ada and Hopper. The table has no Blackwell column.
[marlin-sm] layers/quantization/utils/marlin_utils.py, query_marlin_supported_quant_types:
        no Marlin type below capability 75; marlin_utils_fp8.is_fp8_marlin_supported and
        marlin_utils_fp4.is_fp4_marlin_supported: has_device_capability(75).
[ct]    layers/quantization/compressed_tensors/: CompressedTensorsW8A8Fp8.get_min_capability 89
        ("lovelace and up"); below it _get_scheme_from_parts serves FP8 checkpoints with
        CompressedTensorsW8A16Fp8 (FP8 Marlin, min capability 75); CompressedTensorsW8A8Int8 75;
        CompressedTensorsWNA16 75; NVFP4 weights, with NVFP4 or no activations, go to
        CompressedTensorsW4A4Fp4 (min capability 75), whose kernel (kernels/linear/__init__.py,
        init_nvfp4_linear_kernel) is native FP4 on Blackwell (a FlashInfer CuTe-DSL W4A16 kernel
        for NVFP4A16 on SM100/103) and FP4 Marlin elsewhere.
[fp4]   kernels/linear/nvfp4/marlin.py, MarlinNvFp4LinearKernel: it always logs "Your GPU does not
        have native support for FP4 computation but FP4 quantization is being used. Weight-only
        FP4 compression will be used leveraging the Marlin kernel. This may degrade performance
        for compute-heavy workloads." (for NVFP4A16 and W4A4 checkpoints alike).
[int8-sm100] csrc/quantization/w8a8/cutlass/scaled_mm_c3x_sm100.cu: "int8 not supported on
        SM100": with no Blackwell column in [hw] either, INT8 W8A8 on Blackwell is not claimed.
[bf16]  platforms/cuda.py supported_dtypes: bf16 from capability 80 only; config/model.py
        _resolve_auto_dtype: a bf16 checkpoint on an older GPU runs in float16 with the warning
        "Your device ... doesn't support torch.bfloat16. Falling back to torch.float16".
[auto]  vllm/config/model.py, ModelConfig.quantization: "If None, we first check the
        quantization_config attribute in the model config file": a compressed-tensors export needs
        no --quantization flag.
[kv]    vllm/config/cache.py CacheDType; cache_dtype: "auto" uses the model's dtype; "CUDA 11.8+
        supports fp8 (=fp8_e4m3) and fp8_e5m2". fp8 keeps one scale per layer for K and one for V:
        1.0 unless the checkpoint carries calibrated k/v scales (docs quantized_kvcache.md; a
        quantlab export writes kv_cache_scheme None, so none). int8_per_token_head and
        fp8_per_token_head (first released in v0.20.0, vllm-project/vllm#38378) compute one fp32
        scale per token and head when the cache is written, no calibration; only the Triton
        attention backend takes them (v1/attention/backends/triton_attn.py,
        supported_kv_cache_dtypes; customize_spec: head_size bytes + one fp32 scale per head).
[marlin-k] vLLM's GPTQ/AWQ Marlin layers raise "Weight input_size_per_partition = 10944 is not
        divisible by min_thread_k = 128. Consider reducing tensor_parallel_size or running with
        --quantization gptq." (marlin_utils.verify_marlin_supports_shape; vllm-project/vllm#9913).
[oom]   vLLM's KV-cache check raises "No available memory for the cache blocks. Try increasing
        `gpu_memory_utilization` ..." and "The model's max seq len (X) is larger than the maximum
        number of tokens that can be stored in KV cache (Y). Try increasing
        `gpu_memory_utilization` or decreasing `max_model_len` ...".
[util]  --gpu-memory-utilization: 0.9 was the default for long; v0.33.0's vllm/config/cache.py
        says 0.92. We keep 0.9, as quantlab.kv.capacity does; pass gpu_util=0.92 to match.
[marlin] IST-DASLab/marlin README: near-ideal 4x speedups "up to batchsizes of 16-32 tokens".
Rules of thumb (not measurements) are marked as such where they are used.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from quantlab.kv.capacity import capacity, kv_shape
from quantlab.kv.codecs import get_codec
from quantlab.schemes import get_scheme

GB = 1e9
VLLM_VERSION = "0.33.0"  # the release every vLLM fact above was checked against
VLLM_MIN_SM = 75  # [gpu]

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
    def fp8(self) -> bool:  # FP8 tensor cores: Ada (sm89) and Hopper (sm90) onwards
        return self.sm >= 89

    @property
    def fp4(self) -> bool:  # FP4 (NVFP4 / MXFP4) tensor cores: Blackwell (sm100)
        return self.sm >= 100

    @property
    def tensor_formats(self) -> str:
        """The tensor-core input formats that matter for serving, oldest first: fp16 (Volta),
        int8 (Turing), bf16 (Ampere), fp8 (Ada, Hopper), fp4 (Blackwell)."""
        fmts = (["bf16"] if self.sm >= 80 else []) + ["fp16"] + (["int8"] if self.sm >= 75 else [])
        return ", ".join(fmts) + (", fp8 (e4m3/e5m2)" if self.fp8 else "") + \
            (", fp4 (nvfp4, mxfp4)" if self.fp4 else "")


# Vendor spec sheets. B200: HGX B200 lists 180 GB (launch material said 192 GB). V100: the 32 GB
# SXM2 part; T4: 16 GB.
GPUS: dict[str, GPU] = {g.name: g for g in (
    GPU("V100", "Volta", 70, 32), GPU("T4", "Turing", 75, 16),
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
# vLLM --kv-cache-dtype -> the quantlab codec with the same bytes [kv] (fp8 = fp8_e4m3 with one
# scale per layer for K and one for V; fp8_e5m2 stores the same bytes, with less precision).
KV_CODEC = {"auto": "bf16", "fp8": "fp8_e4m3", "fp8_e4m3": "fp8_e4m3", "fp8_e5m2": "fp8_e4m3",
            "int8_per_token_head": "int8_per_token_head",
            "fp8_per_token_head": "fp8_per_token_head"}
# The cache dtypes recommend() tries, in order. auto (bf16) first: nothing lost. Then the
# per-token-head codecs, whose dynamic scales need no calibration (a quantlab export carries no
# k/v scales, so fp8 would run at scale 1.0 [kv]); int8 before fp8 per token-head because with a
# per-row absmax scale int8's 7 magnitude bits beat E4M3's 3 mantissa bits (same bytes). Measured
# costs only check the budget; they never reorder this list.
KV_CHOICES = ("auto", "int8_per_token_head", "fp8_per_token_head", "fp8")


@dataclass(frozen=True)
class ServingPath:
    """How vLLM runs a scheme on a GPU. ok: it serves it; native: through the scheme's own
    kernel, not a fallback vLLM warns about (FP8 or FP4 weights through Marlin on a GPU without
    those tensor cores); compute: what the matmul computes in; note: why, in a sentence. A
    quantlab export needs no --quantization flag [auto]."""

    ok: bool
    compute: str
    note: str
    native: bool = True


@dataclass(frozen=True)
class _Rule:
    """One row of SERVING: scheme served on min_sm <= sm <= max_sm."""

    min_sm: int
    max_sm: int
    native: bool
    compute: str
    note: str


_MARLIN_FP4 = ("vLLM warns 'Your GPU does not have native support for FP4 computation': the FP4 "
               "weights run through Marlin, 16-bit activations")  # [fp4]
# scheme -> rules, first match wins; outside every rule the scheme is not served. Data, not code:
# the comment on each row names its sources in the module docstring.
SERVING: dict[str, tuple[_Rule, ...]] = {
    "bf16": (_Rule(80, 999, True, "bf16 tensor cores", "the unquantized checkpoint"),
             _Rule(75, 79, True, "fp16 tensor cores", "no bf16 before sm80: vLLM runs the "
                   "checkpoint in float16 (watch for overflow past 65504)")),  # [bf16]
    "fp8_dynamic": (
        _Rule(89, 999, True, "FP8 W8A8 tensor cores", "FP8 W8A8 from sm89"),  # [hw][ct]
        _Rule(75, 88, False, "weight-only W8A16 (FP8 Marlin)", "no FP8 tensor cores before "
              "sm89: vLLM serves FP8 checkpoints weight-only, activations 16-bit")),  # [ct]
    "int8_w8a8": (_Rule(75, 90, True, "INT8 W8A8 tensor cores", "vLLM's hardware table: "
                        "Turing to Hopper"),),  # [hw][ct]
    "w4a16": (_Rule(75, 999, True, "weight-only (INT4 Marlin)", "vLLM's Marlin kernel from "
                    "sm75: int4 dequantized in registers, 16-bit matmul"),),  # [hw][marlin-sm]
    "nvfp4_a16": (
        _Rule(100, 103, True, "weight-only (FP4, CuTe-DSL W4A16)", "Blackwell: FP4 weights "
              "through FlashInfer's W4A16 kernel, no fallback warning"),  # [ct]
        _Rule(75, 999, False, "weight-only (FP4 Marlin)", _MARLIN_FP4)),  # [marlin-sm][fp4]
    "nvfp4": (_Rule(100, 999, True, "NVFP4 W4A4 tensor cores", "Blackwell's FP4 tensor cores"),
              _Rule(75, 99, False, "weight-only (FP4 Marlin)", _MARLIN_FP4)),  # [ct][fp4]
}


def serving_path(scheme: str, gpu: str | GPU) -> ServingPath:
    """scheme: one of SCHEMES -> how vLLM v0.33 serves it on this GPU (SERVING)."""
    if scheme not in SERVING:
        raise ValueError(f"unknown scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    g = get_gpu(gpu)
    if g.sm < VLLM_MIN_SM:
        return ServingPath(False, "-", f"vLLM 0.20 and later need compute capability 7.5; "
                           f"{g.name} is sm{g.sm}", False)  # [gpu]
    for r in SERVING[scheme]:
        if r.min_sm <= g.sm <= r.max_sm:
            return ServingPath(True, r.compute, r.note, r.native)
    if scheme == "int8_w8a8":
        return ServingPath(False, "-", "vLLM's CUTLASS kernel has no int8 path on SM100 and its "
                           "hardware table no Blackwell column: not claimed here",
                           False)  # [int8-sm100]
    return ServingPath(False, "-", f"no rule in SERVING covers sm{g.sm}", False)


def serving_table() -> list[dict]:
    """One row per (GPU generation, scheme): what vLLM runs, for chapter 9's table."""
    rows, seen = [], set()
    for g in GPUS.values():
        if g.arch in seen:
            continue
        seen.add(g.arch)
        row = {"GPU": f"{g.arch} ({g.name}, sm{g.sm})", "tensor cores": g.tensor_formats}
        for scheme in SCHEMES:
            p = serving_path(scheme, g)
            row[scheme] = (p.compute + ("" if p.native else ", fallback")) if p.ok else \
                "not served"
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


def model_from_dir(path: str | os.PathLike) -> ModelShape:
    """A local Hugging Face directory (its config.json) -> ModelShape named after the folder."""
    from transformers import AutoConfig

    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"{str(path)!r} holds no config.json: pass a local Hugging Face "
                         "model directory")
    return ModelShape.from_config(AutoConfig.from_pretrained(path), Path(path).name)


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
TOY_SOURCE = "the 6.8M-parameter stdlib-llama, a toy model"


def measure_costs(model: str | os.PathLike | None = None, schemes=SCHEMES[1:],
                  eval_tokens: int = 2048, calib_tokens: int = 256, log=None) -> dict:
    """Round to nearest on a causal LM, measured as quantlab.compare measures it (256-token
    windows of the embedded held-out text, KL on the first). model: a local Hugging Face
    directory (safetensors), None for the embedded stdlib-llama. Returns {source: what was
    measured, in words; baseline perplexity; eval_tokens; rows: {scheme: {bits_per_weight,
    perplexity, ppl_increase_pct, kl}}}."""
    from quantlab import models
    from quantlab.algorithms.calibration import rtn
    from quantlab.eval.lm import mean_nll, next_token_kl, token_windows
    from quantlab.nn import bits_per_weight

    if model is not None and not (Path(model) / "config.json").is_file():
        raise ValueError(f"model={str(model)!r} is no local Hugging Face directory (no "
                         "config.json in it): pass the folder holding config.json and the "
                         ".safetensors weights, or None for the embedded stdlib-llama")
    net, tok = models.load_causal_lm(model)
    n_params = sum(p.numel() for p in net.parameters())
    source = TOY_SOURCE if model is None else \
        f"{Path(model).name} ({n_params / 1e6:,.0f}M parameters)"
    windows = token_windows(tok, models.eval_text(), 256, eval_tokens)
    calib = token_windows(tok, models.calib_text(), 256, calib_tokens)
    p = math.exp(mean_nll(net, windows))
    rows = {}
    for scheme in [get_scheme(s) for s in schemes]:
        q = rtn(copy.deepcopy(net), scheme, calib)
        ppl = math.exp(mean_nll(q, windows))
        rows[scheme.name] = {"bits_per_weight": bits_per_weight(q), "perplexity": ppl,
                             "ppl_increase_pct": 100 * (ppl - p) / p,
                             "kl": next_token_kl(net, q, windows[:1])}
        if log:
            log(f"  {scheme.name:<14} ppl {ppl:8.3f}")
    return {"source": source, "n_params": n_params, "perplexity": p,
            "eval_tokens": windows.numel(), "rows": rows}


def kv_costs(path: str | Path | None = None) -> dict[str, float]:
    """Perplexity increase (%) per --kv-cache-dtype in KV_CHOICES, from the committed KV
    measurement on stdlib-llama (data/bench/kv-accuracy-stdlib-llama.json; its fp8 row used
    static calibrated per-layer E4M3 scales)."""
    from quantlab.models import data_dir

    path = Path(path) if path else data_dir() / "bench" / "kv-accuracy-stdlib-llama.json"
    rows = {r["codec"]: r for r in json.loads(path.read_text())["codecs"]}
    base = rows["bf16"]["perplexity"]
    return {kvd: 100 * rows[KV_CODEC[kvd]]["perplexity_delta"] / base for kvd in KV_CHOICES}


def effective_cost(pct: float) -> float:
    """A measured perplexity increase (%), with changes inside the noise counted as 0."""
    return 0.0 if abs(pct) < NOISE_PCT else pct


def within_budget(pct: float, budget: float) -> bool:
    """Whether a measured cost (%) is within the budget (%): it is over only when it exceeds the
    budget by NOISE_PCT or more, so that noise never decides at the edge either."""
    return effective_cost(pct) < budget + NOISE_PCT


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


def preference(gpu: str | GPU, batch: int) -> list[str]:
    """Weight formats in the order recommend() tries them (a rule of thumb), set by the GPU and
    the batch only: (1) served natively before fallbacks vLLM warns about (FP8 or FP4 weights
    through Marlin); (2) by speed: NVFP4 W4A4 first where it is native (Blackwell); at small
    batch (decode reads every weight per step: memory-bound) 4-bit weights before 8-bit, at
    large batch (compute-bound) W8A8 before weight-only; INT4 before FP4 weights and FP8 before
    INT8 where both are native (vLLM's guidance on Hopper); bf16 last. Measured costs never
    reorder it: they only check the budget."""
    g = get_gpu(gpu)
    w4, w8 = ["w4a16", "nvfp4_a16"], ["fp8_dynamic", "int8_w8a8"]
    speed = ["nvfp4"] + (w4 + w8 if batch <= MEMORY_BOUND_BATCH else w8 + w4)
    native = [s for s in speed if serving_path(s, g).native]
    return native + [s for s in speed if s not in native] + ["bf16"]


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


def serve_command(scheme: str | None, kv: str | None, context_len: int, batch: int,
                  model: str = "Llama-3-8B", model_dir: str | None = None) -> str:
    """The export and serve lines for a choice ([auto]: no --quantization for our exports).
    model_dir: the model's local Hugging Face directory; None writes a placeholder the reader
    replaces, <your MODEL dir>."""
    if scheme is None:
        return "(nothing fits: see the reasons)"
    src = model_dir or f"<your {model} dir>"
    out = f"./{Path(model_dir).name if model_dir else model}-{scheme}"
    lines = [] if scheme == "bf16" else \
        [f"quantlab export --model {src} --scheme {scheme} --out {out}"]
    kv_flag = "" if kv in (None, "auto") else f"--kv-cache-dtype {kv} "
    lines.append(f"vllm serve {src if scheme == 'bf16' else out} \\\n  {kv_flag}"
                 f"--max-model-len {context_len} --max-num-seqs {batch}")
    return "\n".join(lines)


def recommend(gpu: str | GPU, model: str | ModelShape, context_len: int, batch: int = 1,
              accuracy_budget: float = 1.0, *, costs: dict[str, float],
              kv: dict[str, float] | None = None, gpu_util: float = 0.9,
              cost_source: str = TOY_SOURCE, model_dir: str | None = None) -> Recommendation:
    """Weight scheme and --kv-cache-dtype for one GPU, a model, batch sequences of context_len
    tokens and an accuracy budget (perplexity increase in %). costs: {scheme: measured
    perplexity increase %} (measure_costs), measured on cost_source; schemes missing from it
    are skipped. kv: {kv dtype: %} (default kv_costs()). Costs only check the budget
    (within_budget: noise never decides); the order is preference()'s. model_dir: the model's
    local HF directory, for the export command (None: a placeholder)."""
    g, m = get_gpu(gpu), get_model(model)
    _check(context_len, batch, accuracy_budget, gpu_util)
    kv = kv_costs() if kv is None else kv
    costs = {"bf16": 0.0, **costs}
    regime = "memory-bound: fewer weight bytes first" if batch <= MEMORY_BOUND_BATCH else \
        "compute-bound: W8A8 tensor-core formats first"
    reasons = [f"{g.name} ({g.arch}, sm{g.sm}, {g.memory_gb:g} GB): tensor cores take "
               f"{g.tensor_formats}; formats vLLM {VLLM_VERSION} serves natively here are "
               "tried before its fallbacks.",
               f"batch {batch} ({regime}; rule of thumb: Marlin keeps its 4-bit speedup up to "
               f"batch {MEMORY_BOUND_BATCH}).",
               f"Accuracy costs: perplexity increase measured on {cost_source}, weights and KV "
               "added. They only check the budget (changes under "
               f"±{NOISE_PCT}% count as 0) and never rank formats: on a larger model the same "
               "format usually costs less (a rule of thumb)."]
    options, choice = [], None
    for scheme in preference(g, batch):
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
        if not within_budget(cw, accuracy_budget):
            row["status"] = (f"costs {costs[scheme]:.2f}% > budget {accuracy_budget:g}% "
                             f"+ {NOISE_PCT}% noise")
            continue
        allowed = [k for k in KV_CHOICES if k in kv  # auto always
                   and within_budget(cw + effective_cost(kv[k]), accuracy_budget)]
        fits = {k: fit(g, m, scheme, k, context_len, batch, gpu_util) for k in allowed}
        ok = [k for k in allowed if fits[k]["fits"]]
        if not ok:
            last = allowed[-1]
            f = fits[last]
            row["status"] = (f"does not fit: {f['weights_gb']:.1f} GB weights + "
                             f"{f['kv_gb']:.1f} GB KV ({last}) > {f['budget_gb']:.1f} GB")
            continue
        row["status"] = f"chosen, --kv-cache-dtype {ok[0]}" if choice is None else "fits"
        if not path.native:
            row["status"] += " (fallback)"
        if choice is None:
            choice = (scheme, ok[0], fits[ok[0]], cw + effective_cost(kv[ok[0]]))
    if choice is None:
        reasons.append(_nothing_fits(g, m, context_len, batch, accuracy_budget, costs, kv,
                                     gpu_util))
        return Recommendation(g.name, m.name, context_len, batch, accuracy_budget, None, None,
                              {}, math.nan, serve_command(None, None, 0, 0), reasons, options)
    scheme, kvd, f, cost = choice
    reasons += _why(g, m, scheme, kvd, f, cost, costs, kv, context_len, batch, accuracy_budget,
                    gpu_util, cost_source)
    return Recommendation(g.name, m.name, context_len, batch, accuracy_budget, scheme, kvd, f, cost,
                          serve_command(scheme, kvd, context_len, batch, m.name, model_dir),
                          reasons, options)


def _why(g, m, scheme, kvd, f, cost, costs, kv, context_len, batch, budget, gpu_util,
         cost_source) -> list[str]:
    p = serving_path(scheme, g)
    noise = " (inside the noise)" if effective_cost(costs[scheme]) == 0 and scheme != "bf16" \
        else ""
    out = [f"Weights: {scheme} ({p.compute}), {f['weights_gb']:.1f} GB; cost "
           f"{costs[scheme]:+.2f}%{noise} on {cost_source}. {p.note}."]
    kv_line = (f"KV cache: {kvd}, {f['kv_gb']:.1f} GB for {batch} x {context_len} tokens; "
               f"{f['free_gb']:.1f} GB of the {f['budget_gb']:.1f} GB budget "
               f"({gpu_util:g} x memory) left; up to {f['max_context']:,} tokens per sequence "
               "at this batch.")
    if kvd == "auto":
        nxt = next((k for k in KV_CHOICES[1:] if k in kv), None)
        if nxt:
            alt = fit(g, m, scheme, nxt, context_len, batch, gpu_util)
            kv_line += (f" {nxt} would allow {alt['max_context']:,} at a measured "
                        f"{kv[nxt]:+.2f}%.")
    else:
        auto = fit(g, m, scheme, "auto", context_len, batch, gpu_util)
        kv_line += (f" bf16 KV ({auto['kv_gb']:.1f} GB) does not fit; {kvd} stores about half "
                    f"of it at a measured {kv[kvd]:+.2f}%.")
        if kvd in ("int8_per_token_head", "fp8_per_token_head"):
            kv_line += (" Its scales are computed per token and head as the cache is written "
                        "(no calibration); it needs vLLM 0.20 or later and runs on the Triton "
                        "attention backend only.")
        else:
            kv_line += (" Calibrate its per-layer scales (llm-compressor): a quantlab export "
                        "carries none, and vLLM's default scale is 1.0.")
        if context_len > 8192:
            kv_line += (" Our KV measurement used 512-token windows; quantized KV accuracy at "
                        "long context is reported to vary (vllm-project/vllm#23813): check it.")
    out.append(kv_line)
    out.append(f"Total cost {cost:.2f}%, within the {budget:g}% budget (over it means by "
               f"{NOISE_PCT}% or more). vLLM also keeps activation memory (profiled at "
               "startup): leave a few GB of headroom.")
    return out


def _nothing_fits(g, m, context_len, batch, budget, costs, kv, gpu_util) -> str:
    ok = [f for f in preference(g, batch) if serving_path(f, g).ok and f in costs
          and within_budget(costs[f], budget) and not (f == "nvfp4" and not g.fp4)]
    if not ok:
        return f"No format vLLM serves on the {g.name} is within the {budget:g}% budget."
    best = max(((f, kvd, fit(g, m, f, kvd, context_len, batch, gpu_util)) for f in ok
                for kvd in KV_CHOICES
                if kvd in kv
                and within_budget(effective_cost(costs[f]) + effective_cost(kv[kvd]), budget)),
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
