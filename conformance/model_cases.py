"""Model-level conformance for ``flashmoe conformance --full``: the engine on a backend vs the reference
forward pass, on tiny synthetic model directories of every supported architecture (flashmoe.convert.synth: random
valid 4-bit weights, no transformers needed).

Per architecture: the logits of a 12-token prompt (batched prefill) and of 64 greedy decode steps must be
within 1e-3 of the reference's scale (max|Δ| / max|reference|), and greedy decoding must choose the same
tokens. The engine runs float activations, the exact path; q8 is checked per operation (op_cases), and by
conformance/test_models.py against the NumPy backend's q8 engine. (conformance/test_models.py runs the
same check on transformers-built checkpoints under pytest.)
"""

from __future__ import annotations

import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

TOLERANCE = 1e-3
PROMPT = 12
DECODE_STEPS = 64

_COMMON = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=4096, rms_norm_eps=1e-6, hidden_act="silu", bos_token_id=1,
               eos_token_id=2, tie_word_embeddings=False)
_HYBRID = dict(_COMMON, head_dim=32, num_hidden_layers=4,
               layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
               full_attention_interval=4, linear_num_key_heads=2, linear_num_value_heads=4,
               linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4, num_experts=16,
               num_experts_per_tok=4, moe_intermediate_size=32, shared_expert_intermediate_size=32,
               rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25))

#: A tiny config.json per supported architecture.
TINY_CONFIGS: dict[str, dict] = {
    "qwen3_5_moe": dict(_HYBRID, model_type="qwen3_5_moe_text"),
    "qwen3_next": dict(_HYBRID, model_type="qwen3_next", norm_topk_prob=True, decoder_sparse_step=1,
                       mlp_only_layers=[]),
    "qwen3_moe": dict(_COMMON, model_type="qwen3_moe", head_dim=16, num_hidden_layers=3, num_experts=16,
                      num_experts_per_tok=8, moe_intermediate_size=32, norm_topk_prob=True,
                      decoder_sparse_step=1, mlp_only_layers=[], rope_theta=1e6),
    "mixtral": dict(_COMMON, model_type="mixtral", num_hidden_layers=3, intermediate_size=32,
                    num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6),
    "olmoe": dict(_COMMON, model_type="olmoe", num_hidden_layers=3, intermediate_size=32, num_experts=16,
                  num_experts_per_tok=8, norm_topk_prob=False, rope_theta=1e4),
    # MLA (absorbed in the engine, expanded in the reference), YaRN, sigmoid routing in 4 groups, a dense layer
    "deepseek_v3": dict(_COMMON, model_type="deepseek_v3", num_key_value_heads=4, num_hidden_layers=3,
                        intermediate_size=64, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4,
                        n_group=4, topk_group=2, routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=32,
                        qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, first_k_dense_replace=1,
                        n_shared_experts=1, rope_scaling=dict(type="yarn", factor=32.0,
                                                              original_max_position_embeddings=128, mscale=1.0,
                                                              mscale_all_dim=1.0), rope_theta=1e4),
    "glm4_moe": dict(_COMMON, model_type="glm4_moe", head_dim=16, num_hidden_layers=3, intermediate_size=64,
                     moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=1, topk_group=1,
                     routed_scaling_factor=2.5, first_k_dense_replace=1, n_shared_experts=1, use_qk_norm=True,
                     attention_bias=True, partial_rotary_factor=0.5, rope_theta=1e6),
    # a sliding window shorter than prompt + decode, YaRN over a short original context
    "gpt_oss": dict(_COMMON, model_type="gpt_oss", head_dim=16, num_hidden_layers=4, intermediate_size=32,
                    num_local_experts=8, num_experts_per_tok=4, sliding_window=8,
                    rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0,
                                         original_max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0,
                                         truncate=False)),
    # partial rotary from rotary_dim, full-projection q/k norm, sigmoid routing with a correction bias
    "minimax_m2": dict(_COMMON, model_type="minimax_m2", head_dim=16, num_hidden_layers=3, intermediate_size=32,
                       num_local_experts=16, num_experts_per_tok=4, rotary_dim=8, rope_theta=5e6),
}


#: How the caller builds the engine under test: ``make_engine(model_dir, backend=name, context=tokens)``
#: returns an object with ``new_state()`` and ``forward(tokens, state, all_logits=...)``.
#: `flashmoe conformance --full` passes flashmoe.runtime.load.load_engine; conformance itself does not import
#: the runtime, which imports conformance for its gate.
EngineFactory = Callable[..., Any]


@dataclass
class ModelResult:
    arch: str
    error: float  # worst max|Δ| / max|reference| over prefill and every decode step (inf: raised)
    tokens_agree: bool
    seconds: float
    exception: str | None = None

    @property
    def passed(self) -> bool:
        return self.exception is None and self.tokens_agree and self.error <= TOLERANCE

    def describe(self) -> str:
        if self.exception is not None:
            return f"model {self.arch}: raised {self.exception}"
        tokens = "same greedy tokens" if self.tokens_agree else "greedy tokens differ"
        return f"model {self.arch}: logits relative error {self.error:.3g} (tolerance {TOLERANCE:.0e}), {tokens}"


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def compare(make_engine: EngineFactory, backend: str, model_dir: Path, arch: str) -> ModelResult:
    """Prefill + greedy decode on the engine (built by make_engine on backend) and the reference; the worst
    error and agreement."""
    from flashmoe.reference import ReferenceModel

    start = time.perf_counter()
    try:
        reference = ReferenceModel.from_dir(model_dir)
        engine = make_engine(model_dir, backend=backend, context=PROMPT + DECODE_STEPS + 1, activations="float")
        prompt = np.random.default_rng(0).integers(3, 256, PROMPT)
        cache, state = reference.new_cache(), engine.new_state()
        want = reference.forward(prompt, cache)
        got = engine.forward(prompt, state, all_logits=True)
        error, agree = _rel(got, want), True
        for _ in range(DECODE_STEPS):
            token = int(np.argmax(want[-1]))
            agree &= int(np.argmax(got[-1])) == token
            want = reference.forward(np.array([token]), cache)
            got = engine.forward(np.array([token]), state)
            error = max(error, _rel(got, want))
        return ModelResult(arch, error, agree and int(np.argmax(got[-1])) == int(np.argmax(want[-1])),
                           time.perf_counter() - start)
    except Exception as e:  # reported as a failing case
        return ModelResult(arch, float("inf"), False, time.perf_counter() - start,
                           f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}")


def run_models(backend: str, make_engine: EngineFactory) -> list[ModelResult]:
    """Every architecture's tiny synthetic model (written to a temporary directory) on ``backend``, each
    engine built by ``make_engine``."""
    from flashmoe.convert.synth import synth_model

    results = []
    with tempfile.TemporaryDirectory(prefix="flashmoe-conformance-") as tmp:
        for arch, config in TINY_CONFIGS.items():
            path = synth_model(Path(tmp) / arch, config, tokenizer=None, bits=4, group_size=32, seed=1)
            results.append(compare(make_engine, backend, path, arch))
    return results
