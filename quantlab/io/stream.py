"""Lazy reads and streaming writes of sharded safetensors checkpoints: the two ends of the
layer-sequential exporter (quantlab.sequential), so that neither holds a whole model.

`LazyCheckpoint` maps tensor names to shards (from model.safetensors.index.json, or from the
shards' checked headers) and reads a few tensors at a time through `safetensors.safe_open`
(memory-mapped), closing the shard again so its pages leave the process. `ShardWriter` buffers
finished tensors up to a shard size, saves each shard as it fills, and at the end names them
model-0000i-of-0000N.safetensors beside a model.safetensors.index.json, as transformers does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from quantlab.io.safetensors_io import read_safetensors_header

INDEX = "model.safetensors.index.json"


class LazyCheckpoint:
    """A safetensors checkpoint directory (one file or shards), or one .safetensors file, read
    tensor by tensor. `get(name)` is a dict's: the tensor, or None when there is none."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_file() and self.path.suffix == ".safetensors":
            self.headers = {self.path.name: read_safetensors_header(self.path)}
            self.path = self.path.parent
            self._map_names()
            return
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path} is not a directory; the layer-sequential path "
                                    "reads a Hugging Face model directory (config.json and "
                                    "*.safetensors)")
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{index} is not a safetensors index (a JSON object with a "
                                 f"weight_map): {err}; re-download or rewrite it") from err
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.path / f).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{self.path}: {len(missing)} of the {len(files)} shards {INDEX} lists are "
                    f"missing: {missing[:4]}{' ...' if len(missing) > 4 else ''}; the download "
                    "or copy is incomplete: fetch those files again")
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not files:
                pickles = [p.name for p in self.path.glob("*") if p.suffix in (".bin", ".pt")]
                hint = (f" It holds {pickles}: pickle files, which quantlab never loads; "
                        "convert them to safetensors first.") if pickles else ""
                raise FileNotFoundError(f"{self.path} holds no .safetensors file.{hint}")
            weight_map = {}
        self.headers = {f: read_safetensors_header(self.path / f) for f in files}
        self._map_names()
        for name, f in weight_map.items():
            if self.file_of.get(name) != f:
                raise ValueError(f"{index}: maps {name!r} to {f}, which does not hold it; the "
                                 "index and the shards disagree (re-download them together)")

    def _map_names(self) -> None:
        self.file_of: dict[str, str] = {}
        for f, header in self.headers.items():
            for name in header:
                if name == "__metadata__":
                    continue
                if name in self.file_of:
                    raise ValueError(f"{self.path}: tensor {name!r} is in both {self.file_of[name]}"
                                     f" and {f}; remove the stray shard")
                self.file_of[name] = f

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def __iter__(self):
        return iter(self.file_of)

    def get(self, name: str, default=None) -> Tensor | None:
        return self.load([name])[name] if name in self.file_of else default

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.headers[self.file_of[name]][name]["shape"])

    def nbytes(self, name: str) -> int:
        start, end = self.headers[self.file_of[name]][name]["data_offsets"]
        return end - start

    def load(self, names: Iterable[str], device: str | torch.device = "cpu") -> dict[str, Tensor]:
        """{name: tensor} for the given names, each shard opened once and closed after."""
        from safetensors import safe_open

        names = list(names)
        absent = [n for n in names if n not in self.file_of]
        if absent:
            raise KeyError(f"{self.path}: the checkpoint has no tensor {absent[0]!r} (and "
                           f"{len(absent) - 1} more missing) that the model's config needs; is "
                           "it the checkpoint this config.json belongs to?")
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.file_of[n], []).append(n)
        out = {}
        for f, group in by_file.items():
            with safe_open(str(self.path / f), framework="pt", device="cpu") as handle:
                for n in group:
                    out[n] = handle.get_tensor(n).to(device)
        return out


def _size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for u, m in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * m)
    return int(t)


class ShardWriter:
    """Buffer tensors up to max_shard_bytes, save each full shard at once; `close()` names the
    shards model-0000i-of-0000N.safetensors and writes the index (a full disk is reported by
    safetensors_io.atomic_output, inside which the exporter writes)."""

    def __init__(self, folder: Path, max_shard_bytes: int | str = "1GB", progress=None):
        self.folder = Path(folder)
        self.max = _size(max_shard_bytes)
        self.buf: dict[str, Tensor] = {}
        self.buf_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []
        self.total = 0
        self.progress = progress

    def add(self, name: str, t: Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        n = t.numel() * t.element_size()
        if self.buf and self.buf_bytes + n > self.max:
            self.flush()
        if any(t.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
               for b in self.buf.values()):
            t = t.clone()  # safetensors refuses tensors that share memory (a shared scale)
        self.buf[name] = t
        self.buf_bytes += n
        self.total += n

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buf:
            return
        name = f"shard-{len(self.shards):05d}.partial"
        save_file(self.buf, str(self.folder / name), metadata={"format": "pt"})
        self.shards.append((name, list(self.buf)))
        self.buf, self.buf_bytes = {}, 0
        if self.progress is not None:
            self.progress.update(1)

    def close(self) -> list[Path]:
        """Save the last shard, rename all shards to their final names, write the index."""
        self.flush()
        n = len(self.shards)
        weight_map, files = {}, []
        for i, (tmp, names) in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / tmp).rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
            files.append(self.folder / final)
        index = {"metadata": {"total_size": self.total},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return files
