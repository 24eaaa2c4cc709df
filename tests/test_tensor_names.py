"""resident_shapes (flashmoe/arch/tensors.py) is the one table of canonical tensor names: the reference forward
pass of every family reads exactly the tensors it lists, with the shapes it gives, plus the routed experts."""

from __future__ import annotations

import numpy as np
import pytest

from flashmoe.arch.config import ModelConfig
from flashmoe.arch.tensors import EXPERT_PROJS, DictWeights, resident_shapes, stacked_expert_name
from flashmoe.conformance.model_cases import TINY_CONFIGS
from flashmoe.reference.model import ReferenceModel


class _Recording(DictWeights):
    def __init__(self, tensors):
        super().__init__(tensors)
        self.read: set[str] = set()

    def tensor(self, name):
        self.read.add(name)
        return super().tensor(name)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_the_reference_reads_every_tensor_of_the_table_and_no_other(family):
    cfg = ModelConfig.from_dict(TINY_CONFIGS[family])
    rng = np.random.default_rng(0)
    table = resident_shapes(cfg)
    tensors = {name: rng.normal(0, 0.1, shape).astype(np.float32) for name, shape in table.items()}
    sizes = {"gate_proj": (cfg.moe_intermediate_size, cfg.hidden_size),
             "up_proj": (cfg.moe_intermediate_size, cfg.hidden_size),
             "down_proj": (cfg.hidden_size, cfg.moe_intermediate_size)}
    for layer in cfg.moe_layers:
        for proj in EXPERT_PROJS:
            tensors[stacked_expert_name(layer, proj)] = rng.normal(0, 0.1, (cfg.num_experts, *sizes[proj]))
    weights = _Recording(tensors)
    logits = ReferenceModel(cfg, weights).forward(np.arange(6) % cfg.vocab_size)
    assert np.isfinite(logits).all()
    assert weights.read == set(table)
