"""The weight-source protocol the reference model reads, and an in-memory implementation.

Tensor names are the canonical names of docs/formats.md. A source returns float arrays (dequantised
when stored quantised); routed experts are fetched one at a time through `expert(layer, e)`, so a
source backed by disk reads only the experts a token routes to.
"""

from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable

import numpy as np

from flashmoe.errors import CheckpointError

EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


def expert_tensor_name(layer: int, expert: int, proj: str) -> str:
    """Canonical name of one routed expert's projection: `layers.{i}.mlp.experts.{e}.{proj}.weight`."""
    return f"layers.{layer}.mlp.experts.{expert}.{proj}.weight"


@runtime_checkable
class WeightSource(Protocol):
    """What the reference (and backends' loaders) read weights through."""

    def tensor(self, name: str) -> np.ndarray:
        """The float (dequantised) tensor with canonical `name`; raises CheckpointError if absent."""
        ...

    def has(self, name: str) -> bool:
        """True when a non-expert tensor `name` exists."""
        ...

    def expert(self, layer: int, e: int) -> dict[str, np.ndarray]:
        """Routed expert e of decoder layer `layer`: float [out, in] arrays under keys
        'gate_proj' [I, H], 'up_proj' [I, H], 'down_proj' [H, I]."""
        ...


class DictWeights:
    """A WeightSource over an in-memory dict of canonical float tensors.

    Experts may be given per expert (`layers.{i}.mlp.experts.{e}.{proj}.weight`, [out, in]) or stacked
    (`layers.{i}.mlp.experts.{proj}.weight`, [E, out, in]); `expert()` reads either.
    """

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self._t = dict(tensors)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor `name` as stored; raises CheckpointError naming it when absent."""
        try:
            return self._t[name]
        except KeyError:
            raise CheckpointError(f"missing tensor {name!r}") from None

    def has(self, name: str) -> bool:
        """True when `name` is present."""
        return name in self._t

    def expert(self, layer: int, e: int) -> dict[str, np.ndarray]:
        """Expert e of `layer` as {'gate_proj', 'up_proj', 'down_proj'} -> [out, in]; CheckpointError if absent."""
        out = {}
        for proj in EXPERT_PROJS:
            name = expert_tensor_name(layer, e, proj)
            if name in self._t:
                out[proj] = self._t[name]
                continue
            stacked = f"layers.{layer}.mlp.experts.{proj}.weight"
            if stacked not in self._t:
                raise CheckpointError(f"missing tensor {name!r} (nor stacked {stacked!r})")
            out[proj] = self._t[stacked][e]
        return out

    def names(self) -> list[str]:
        """All tensor names held."""
        return list(self._t)
