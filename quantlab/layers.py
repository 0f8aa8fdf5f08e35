"""Which layers a name pattern picks: the one rule quantize_model's ignore/overrides, the
calibrated algorithms and the compressed-tensors reader share."""

from __future__ import annotations

import re
from fnmatch import fnmatch


def matches(name: str, pattern: str, loose: bool = True) -> bool:
    """Whether module `name` ("model.layers.0.mlp.down_proj") matches `pattern`.

    "re:<regex>" matches from the start of the name (compressed-tensors' and vLLM's targets);
    any other pattern matches the name itself, and with loose=True (quantize_model's rule) also
    as a glob ("*.down_proj") or as a dotted suffix ("lm_head" matches "model.lm_head").
    loose=False is compressed-tensors' own rule: a checkpoint's ignore list names modules exactly.
    """
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or (loose and (fnmatch(name, pattern) or name.endswith("." + pattern)))


def matches_any(name: str, patterns) -> bool:
    """matches(name, p) for some p in patterns (loose: quantize_model's ignore rule)."""
    return any(matches(name, p) for p in patterns)
