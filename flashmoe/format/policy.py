"""Which tensors of a model directory are quantised, and how: one policy for every producer (convert, synth,
a GGUF importer), applied by flashmoe.format.writer.

The choices are mlx-lm's convert (`mlx_lm.utils.quantize_model` and the models' `quant_predicate`), so a model
converted here stores what an mlx-community checkpoint of the same model stores:
- 2-D linear and embedding weights, and routed experts, at the requested bits and group size;
- the router (`mlp.gate`) and `mlp.shared_expert_gate` at 8 bits, group 64 (mlx-lm's quant_predicate for the
  Qwen3.5/Next families keeps them there; their logits decide which experts are read);
- everything else float: norms, biases, conv1d, A_log, dt_bias;
- a weight whose input width is not a multiple of its group size float too (as in mlx-lm).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flashmoe.arch.families import PER_HEAD, is_expert_tensor
from flashmoe.format.manifest import QuantSpec
from flashmoe.format.quant import QuantizedTensor, quantize

# Quantisation classes (see quant_class).
QUANT_FLOAT = "float"
QUANT_8BIT = "8bit"
QUANT_DEFAULT = "default"
#: How QUANT_8BIT tensors (router, shared-expert gate) are stored whatever the requested bits.
ROUTER_QUANT = QuantSpec(8, 64)


def quant_class(canonical_name: str, shape: tuple[int, ...]) -> str:
    """How a tensor is stored when quantising: QUANT_FLOAT for everything that is not a 2-D linear/embedding
    weight (or a stacked [E, out, in] expert weight, or MLA's per-head [H, out, in]), and for conv1d; QUANT_8BIT for the router `mlp.gate` and
    `mlp.shared_expert_gate`; QUANT_DEFAULT (the requested bits) otherwise. Whether an input width is divisible
    by the group size is QuantPolicy's check, not decided here."""
    is_matrix = canonical_name.endswith(".weight") and (len(shape) == 2 or (len(shape) == 3 and (
        is_expert_tensor(canonical_name) or PER_HEAD.match(canonical_name) is not None)))
    if not is_matrix or ".conv1d." in canonical_name:
        return QUANT_FLOAT
    if canonical_name.endswith((".mlp.gate.weight", ".mlp.shared_expert_gate.weight")):
        return QUANT_8BIT
    return QUANT_DEFAULT


@dataclass(frozen=True)
class QuantPolicy:
    """How float tensors are stored: `bits` for resident linear and embedding weights, `expert_bits` for routed
    experts (2, 3, 4, 5, 6, 8; None keeps them float in their own dtype), groups of `group_size` (32, 64, 128).
    KEEP stores every float tensor as given (for an already-quantised source)."""

    bits: int | None = 4
    group_size: int = 64
    expert_bits: int | None = 4

    def resident(self, name: str, shape: tuple[int, ...]) -> QuantSpec | None:
        """QuantSpec of the float resident tensor `name` (canonical) of `shape`, None when it stays float."""
        cls = quant_class(name, shape)
        if cls == QUANT_FLOAT or self.bits is None:
            return None
        spec = ROUTER_QUANT if cls == QUANT_8BIT else QuantSpec(self.bits, self.group_size)
        return spec if shape[-1] % spec.group_size == 0 else None

    def expert(self, shape: tuple[int, ...]) -> QuantSpec | None:
        """QuantSpec of a float routed-expert projection of `shape` ([out, in]), None when it stays float."""
        if self.expert_bits is None or shape[-1] % self.group_size:
            return None
        return QuantSpec(self.expert_bits, self.group_size)

    @staticmethod
    def apply(spec: QuantSpec | None, w: np.ndarray) -> QuantizedTensor | np.ndarray:
        """`w` as stored under `spec`: quantised (flashmoe.format.quant.quantize, MLX's arithmetic) or, for None,
        itself as a contiguous array."""
        return np.ascontiguousarray(w) if spec is None else quantize(w, spec.bits, spec.group_size)


#: Every float tensor stored as given.
KEEP = QuantPolicy(bits=None, expert_bits=None)
