"""Granularities: which elements of a tensor share one scale, as small frozen objects.

A (..., K) tensor shares a scale over the whole tensor, each row (an output channel of a weight,
a token of an activation), `size` consecutive elements along K, or (rows, cols) tiles of a 2-D
tensor (edge tiles may be partial, as DeepSeek-V3 checkpoints have them). Each object knows the
(..., n_groups, group_elems) view a scale rule reduces over, the scale tensor's shape for a tensor
shape, and how scales broadcast back over the elements on decode.

`get_granularity` resolves TensorScheme's spelling ("tensor", "channel", "token", "group" with
group_size, "block" with block). An object equals its name (`PerToken() == "token"`), so code
written against the strings keeps working.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

GRANULARITIES = ("tensor", "channel", "token", "group", "block")


@dataclass(frozen=True, eq=False)
class Granularity:
    """Base: one scale per row of the (..., n_groups, group_elems) view `groups` returns."""

    name: ClassVar[str]
    # Every row of a (..., K) tensor owns its scales: stacking rows of several tensors and
    # quantizing them together gives each one's scales unchanged.
    per_row: ClassVar[bool] = True
    group_size: ClassVar[int | None] = None  # TensorScheme's spelled fields
    block: ClassVar[tuple[int, int] | None] = None

    def __eq__(self, other) -> bool:
        if isinstance(other, str):
            return other == self.name
        return type(other) is type(self) and vars(other) == vars(self)

    def __hash__(self) -> int:
        return hash(self.name)

    def __str__(self) -> str:
        return self.name

    def check(self, shape: torch.Size) -> None:
        """Raise ValueError, saying what to do, when a tensor of `shape` cannot be cut this way."""

    def groups(self, x: Tensor) -> Tensor:
        """x (..., K) -> (..., n_groups, group_elems) view whose last dim shares one scale."""
        raise NotImplementedError

    def ungroup(self, g: Tensor, shape: torch.Size) -> Tensor:
        """Inverse of groups: (..., n_groups, group_elems) -> shape."""
        return g.reshape(shape)

    def scale_shape(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        """The stored scale tensor's shape for a tensor of `shape`."""
        raise NotImplementedError

    def n_scales(self, shape: torch.Size | tuple[int, ...]) -> int:
        return math.prod(self.scale_shape(shape))

    def expand(self, s: Tensor, shape: torch.Size) -> Tensor:
        """Scales (or zero points) of scale_shape(shape) -> a tensor that broadcasts over shape."""
        return s

    def width(self, K: int) -> int:
        """Columns of a (N, K) weight that share one scale along K."""
        return K

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class PerTensor(Granularity):
    """One scale for the whole tensor: scale shape ()."""

    name: ClassVar[str] = "tensor"
    per_row: ClassVar[bool] = False

    def groups(self, x: Tensor) -> Tensor:
        return x.reshape(1, -1)

    def scale_shape(self, shape) -> tuple[int, ...]:
        return ()

    def describe(self) -> str:
        return "per tensor"


@dataclass(frozen=True, eq=False)
class PerRow(Granularity):
    """One scale per row of a (..., K) tensor: scale shape (..., 1)."""

    def groups(self, x: Tensor) -> Tensor:
        return x.unsqueeze(-2)

    def scale_shape(self, shape) -> tuple[int, ...]:
        return (*shape[:-1], 1)

    def describe(self) -> str:
        return f"per {self.name}"


@dataclass(frozen=True, eq=False)
class PerChannel(PerRow):
    """A weight's output channels (its rows)."""

    name: ClassVar[str] = "channel"


@dataclass(frozen=True, eq=False)
class PerToken(PerRow):
    """An activation's tokens (its rows)."""

    name: ClassVar[str] = "token"


@dataclass(frozen=True, eq=False)
class Group(Granularity):
    """`size` consecutive elements along the last dim: scale shape (..., K // size)."""

    size: int
    name: ClassVar[str] = "group"

    @property
    def group_size(self) -> int:
        return self.size

    def check(self, shape) -> None:
        K = shape[-1]
        if K % self.size:
            divisors = [d for d in range(1, K + 1) if K % d == 0 and d <= 256][-4:]
            raise ValueError(
                f"group_size={self.size} does not divide the last dimension K={K}; pad K to "
                f"{-(-K // self.size) * self.size} or pick a group size in {tuple(divisors)}")

    def groups(self, x: Tensor) -> Tensor:
        return x.reshape(*x.shape[:-1], x.shape[-1] // self.size, self.size)

    def scale_shape(self, shape) -> tuple[int, ...]:
        return (*shape[:-1], shape[-1] // self.size)

    def expand(self, s: Tensor, shape: torch.Size) -> Tensor:
        return s.repeat_interleave(self.size, -1)

    def width(self, K: int) -> int:
        return self.size

    def describe(self) -> str:
        return f"groups of {self.size}"


@dataclass(frozen=True, eq=False)
class Block(Granularity):
    """(rows, cols) tiles of a 2-D tensor, edge tiles partial: scale shape (ceil(N / rows),
    ceil(K / cols))."""

    rows: int
    cols: int
    name: ClassVar[str] = "block"
    per_row: ClassVar[bool] = False

    @property
    def block(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    def check(self, shape) -> None:
        if len(shape) != 2:
            raise ValueError(
                f"2-D block quantization needs a 2-D tensor, got shape {tuple(shape)}")

    def groups(self, x: Tensor) -> Tensor:
        bn, bk = self.block
        N, K = x.shape
        nb, kb = -(-N // bn), -(-K // bk)
        xp = torch.nn.functional.pad(x, (0, kb * bk - K, 0, nb * bn - N))  # zeros: amax unchanged
        return xp.reshape(nb, bn, kb, bk).permute(0, 2, 1, 3).reshape(nb, kb, bn * bk)

    def ungroup(self, g: Tensor, shape: torch.Size) -> Tensor:
        bn, bk = self.block
        nb, kb = g.shape[:2]
        full = g.reshape(nb, kb, bn, bk).permute(0, 2, 1, 3).reshape(nb * bn, kb * bk)
        return full[: shape[0], : shape[1]]

    def scale_shape(self, shape) -> tuple[int, ...]:
        return tuple(-(-n // b) for n, b in zip(shape, self.block, strict=True))

    def expand(self, s: Tensor, shape: torch.Size) -> Tensor:
        return (s.repeat_interleave(self.rows, 0)[: shape[0]]
                .repeat_interleave(self.cols, 1)[:, : shape[1]])

    def width(self, K: int) -> int:
        return self.cols

    def describe(self) -> str:
        return f"{self.block} blocks"


PER_TENSOR, PER_CHANNEL, PER_TOKEN = PerTensor(), PerChannel(), PerToken()
_UNSIZED = {g.name: g for g in (PER_TENSOR, PER_CHANNEL, PER_TOKEN)}


def get_granularity(spec: str | Granularity, group_size: int | None = None,
                    block: tuple[int, int] | None = None) -> Granularity:
    """TensorScheme's spelling -> its object. group_size is given exactly for "group", block
    exactly for "block"; given with an object (dataclasses.replace), they win over its own."""
    if isinstance(spec, Granularity):
        group_size = spec.group_size if group_size is None else group_size
        block = spec.block if block is None else block
        name = spec.name
    else:
        name = spec
    if name not in GRANULARITIES:
        raise ValueError(f"granularity={spec!r}; use one of {GRANULARITIES}")
    if (name == "group") != (group_size is not None):
        raise ValueError("group_size is set exactly when granularity='group'")
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size={group_size} must be positive")
    if (name == "block") != (block is not None):
        raise ValueError("block=(rows, cols) is set exactly when granularity='block'")
    if name == "group":
        return Group(group_size)
    if name == "block":
        return Block(*block)
    return _UNSIZED[name]
