"""The streaming forward pass: the decoder stack written once against the Backend interface.

The engine owns the loop and the state (KV caches, which the backend keeps in its own memory; GatedDeltaNet
conv and recurrent state; position); the backend owns the arithmetic; the ExpertStore owns the routed
experts, which are never resident.
Per MoE layer and token (docs/design.md, "Data flow"):

    router logits -> top-k -> store.fetch(layer, ids)   (all k reads in flight at once)
                           -> guess the next MoE layer's experts; store.speculate  (when enabled)
                           -> shared expert              (computed while the reads run)
                           -> store.wait -> backend expert FFN -> weighted sum + shared expert

A backend that gains from taking the experts one at a time (Backend.experts_as_read: cuda queues each one's
host -> device copy as soon as it lands) gets each as its read finishes (ExpertStore.as_read) instead of
after store.wait, and the read buffers go back to the store only at the next MoE layer (or the step's end),
so nothing waits for the last copies: the next layer's attention is queued behind them.

Speculation (the store's `guess_slots` > 0) applies the next MoE layer's router to this layer's MoE input, as
pre-gated MoE does (Hwang et al., ISCA 2024), and reads its top experts behind this layer's reads, so the disk
keeps working while this layer's experts and the next layer's attention compute.

A prompt goes through each layer as one matrix (batched prefill); in its MoE layers the tokens are grouped by
expert, so each expert any prompt token routed to is read once and applied to all its tokens as a mat-mat.

The math is the reference's (`flashmoe.reference`), which cites its sources; this module differs from it only
in where weights come from and which arrays hold them.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np

from flashmoe.backends.base import AttentionBlock, Backend, BackendError, ClampedSwiGLU, KVCacheBuffer
from flashmoe.arch.config import ModelConfig
from flashmoe.arch.families import PER_HEAD, family_of
from flashmoe.errors import FlashMoeError
from flashmoe.format.modeldir import ModelDir
from flashmoe.reference.rope import rope_attention_factor
from flashmoe.reference.routing import ROUTERS, route, softmax_topk
from flashmoe.runtime.memory import collect_garbage_once
from flashmoe.runtime.mla import AbsorbedMLA
from flashmoe.runtime.placement import ExpertPlacement
from flashmoe.runtime.stats import Stats
from flashmoe.runtime.store import ExpertStore
from flashmoe.runtime.trace import Tracer


@dataclass
class LinearAttentionBuffer:
    """GatedDeltaNet state of one layer: the last conv_kernel-1 inputs of the causal conv, [K-1, conv_dim],
    and the recurrent state [Hv, Dk, Dv] (Yang et al. 2024, Gated Delta Networks, eq. 10)."""

    conv: np.ndarray
    recurrent: np.ndarray


@dataclass
class State:
    """Everything a sequence carries between forward calls: per-layer caches and the next position."""

    layers: list
    position: int = 0


class Engine:
    """A loaded model: resident weights prepared on a backend, routed experts behind an ExpertStore.

    Args:
        model: an opened (validated) model directory.
        backend: the Backend doing the arithmetic.
        store: the ExpertStore serving this model's expert files.
        stats: where time and I/O are accounted (shared with the store).
        experts_per_token: overrides the model's num_experts_per_tok (Flash-MoE ran the 397B at 4 of 10).
        tracer: records routing, hits, bytes and time per token and MoE layer (flashmoe.runtime.trace.Tracer);
            may also be set later as `engine.tracer`.
        placement: where a decode token's experts that the backend does not hold are computed
            (--expert-device cpu or auto: ExpertPlacement.of); None: on the backend. Its CPU way takes the
            experts the page cache holds as views of the store's mapped files, the other fetches read buffers.

    Raises FormatError/CheckpointError (from the model directory) when a resident tensor is missing.
    """

    def __init__(self, model: ModelDir, backend: Backend, store: ExpertStore, stats: Stats,
                 experts_per_token: int | None = None, tracer: Tracer | None = None,
                 placement: ExpertPlacement | None = None):
        self.model_dir = model
        self.placement = placement
        if placement is not None:  # the store hands out page-cache views only to the CPU way's fetches
            store.in_place = False
        self.tracer = tracer
        self.cfg: ModelConfig = model.config
        self.backend = backend
        self.store = store
        self.stats = stats
        self.k = self.cfg.num_experts_per_tok if experts_per_token is None else experts_per_token
        self._w = {name: backend.prepare(_resident(model, name)) for name in model.resident_names()
                   if not PER_HEAD.match(name)}  # MLA's per-head matrices: prepared head by head (AbsorbedMLA)
        # -exp(A_log) per linear-attention layer, computed once: the decay rate of g = -exp(A_log)·softplus(a + dt_bias)
        self._decay_rate = {
            f"layers.{i}.linear_attn.": backend.asarray(-np.exp(model.tensor(f"layers.{i}.linear_attn.A_log")))
            for i in range(self.cfg.num_hidden_layers) if not self.cfg.is_attention_layer(i)
        }
        # YaRN multiplies cos and sin, so q and k, by its attention factor: folded into the softmax scale, which
        # is exact when RoPE rotates whole heads (partial rotary would leave the pass-through features unscaled)
        yarn_factor = rope_attention_factor(self.cfg.rope_yarn)
        if yarn_factor != 1 and self.cfg.rotary_dim != self.cfg.head_dim:
            raise FlashMoeError(f"{model.path}: YaRN with partial rotary is not supported by the engine")
        self._softmax_scale = self.cfg.head_dim ** -0.5 * yarn_factor ** 2
        self._act = (None if self.cfg.swiglu_limit is None
                     else ClampedSwiGLU(self.cfg.swiglu_limit, self.cfg.swiglu_alpha))  # gpt-oss's experts
        # The backend may route a decode token itself (Backend.routed_experts) only with the router it knows:
        # plain softmax top-k, no router tensors (biases), plain SwiGLU experts.
        self._routes_on_device = (ROUTERS[family_of(self.cfg).router] is softmax_topk and not self.cfg.router_tensors
                                  and self._act is None)
        layers = model.moe_layers
        self._next_moe = dict(zip(layers, layers[1:]))
        # the router's own per-layer tensors (a score-correction bias), on the host with the router
        self._router_tensors = {i: {n: model.tensor(f"layers.{i}.mlp.gate.{n}")
                                    for n in self.cfg.router_tensors} for i in layers}
        self._mla = AbsorbedMLA(self.cfg, backend, lambda i: model.raw(f"layers.{i}.self_attn.embed_q.weight"),
                                lambda i: model.raw(f"layers.{i}.self_attn.unembed_out.weight"),
                                self._linear, self._w.__getitem__) if self.cfg.is_mla else None
        #: the attention layers in Qwen3's form, run as one Backend.attention_block call each
        self._blocks = {i: self._attention_block(i) for i in range(self.cfg.num_hidden_layers)
                        if self._is_plain_attention(i)}
        # A decode step may be replayed from a recording (Backend.capture_decode) only where nothing in it
        # depends on the position on the host: no sliding window, no MLA cache. (Linear attention's state is
        # updated in place by the recording backend, so a replay finds it where the recording left it.)
        self._recordable = not self.cfg.is_mla and all(
            self.cfg.attention_window(i) is None for i in range(self.cfg.num_hidden_layers))
        # (state, recording or None where it failed, the state's linear-attention arrays) of the last recording
        self._recording: tuple | None = None
        # (fetch, ExpertsAsRead) of the last MoE layer staged as its reads landed: released at the next one
        self._unreleased: tuple | None = None
        self._decoded = False  # an eager decode step has run
        #: why decode steps are not replayed from a recording (None while they are or may be)
        self.not_recorded: str | None = None if self._recordable else "the model's decode step depends on " \
            "the position on the host (a sliding window or MLA)"
        if not self.cfg.tie_word_embeddings:
            self._lm_head = self._w["lm_head.weight"]
        else:
            self._lm_head = self._w["embed_tokens.weight"]

    # ---- state ---------------------------------------------------------------------------------

    def new_state(self) -> State:
        """Empty caches for a new sequence."""
        cfg = self.cfg
        layers = []
        for i in range(cfg.num_hidden_layers):
            if self._mla is not None:
                layers.append(self._mla.new_cache())
            elif cfg.is_attention_layer(i):
                layers.append(self.backend.new_kv_cache(cfg.num_key_value_heads, cfg.head_dim))
            else:
                layers.append(LinearAttentionBuffer(
                    conv=np.zeros((cfg.linear_conv_kernel_dim - 1, cfg.linear_conv_dim), np.float32),
                    recurrent=np.zeros((cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                        cfg.linear_value_head_dim), np.float32)))
        return State(layers=layers)

    # ---- forward -------------------------------------------------------------------------------

    def forward(self, token_ids: np.ndarray, state: State, all_logits: bool = False) -> np.ndarray:
        """Run tokens through the model, extending `state`.

        Args:
            token_ids: int [T] — a whole prompt (prefill) or one token (decode).
            state: from new_state(); updated in place.
            all_logits: return logits for every position instead of the last one only.

        Returns float32 [T, vocab_size] (all_logits) or [1, vocab_size]. Raises FlashMoeError when they are
        not all finite (corrupt weights; see check_finite).
        """
        # Damaged weights become NaN or inf on the way; check_finite reports that as one error, so NumPy's
        # warnings about it would only repeat it.
        with np.errstate(all="ignore"):
            logits = self._forward(token_ids, state, all_logits)
        return check_finite(logits, self.model_dir.path, state.position - len(logits))

    def _forward(self, token_ids: np.ndarray, state: State, all_logits: bool) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if len(ids) == 1 and self._recordable and self.tracer is None:
            logits = self._replay(int(ids[0]), state)
            if logits is not None:
                return logits
        try:
            logits = self.backend.to_numpy(self._step(ids, state, all_logits))
        finally:
            self._release_reads()
        if len(ids) == 1 and not self._decoded:  # the decode kernels are compiled now
            collect_garbage_once(self.backend.name)
        self._decoded |= len(ids) == 1
        return logits

    def _replay(self, token: int, state: State) -> np.ndarray | None:
        """One decode token replayed from a recording of the whole step (Backend.capture_decode: one CUDA
        graph instead of ~16 launches per layer through Python), recorded again when the state changed, a KV
        cache is full (it then grows, so moves) or the backend's recording went stale; None when the step
        cannot be recorded (or its recording failed for this state): the caller runs it eagerly."""
        recording = self._recording
        same = (recording is not None and recording[0] is state
                and all(a is b for a, b in zip(recording[2], _linear_arrays(state))))
        if same and recording[1] is None:
            return None
        if not same or not recording[1].valid() or any(cache.capacity <= state.position
                                                       for cache in _kv_caches(state)):
            recording = self._record(token, state)
            if recording is None or recording[1] is None:
                return None
        with self.stats.stage("replay"):
            logits = self.backend.to_numpy(recording[1].replay(token, state.position))
        for cache in _kv_caches(state):
            cache.length += 1
        state.position += 1
        return logits

    def _record(self, token: int, state: State) -> tuple | None:
        """Record the decode step of `token` for `state` once an eager decode step has run (kernels compiled,
        constants on the device); the host-side effects of the recording run (cache lengths, position) are
        undone. A backend that does not record turns recording off for this engine; a step that cannot be
        recorded (it needs the host: a router there, an expert read) runs eagerly for the rest of this state,
        and a new state tries again."""
        if not self._decoded:
            return None
        caches = _kv_caches(state)
        for cache in caches:
            cache.reserve(state.position + 1)
        position, lengths = state.position, [cache.length for cache in caches]
        try:
            graph = self.backend.capture_decode(lambda: self._step(np.array([token]), state, False))
            self.not_recorded = None if graph is not None else f"{self.backend.name} does not record decode steps"
            self._recordable = graph is not None
        except BackendError as e:  # the step needs the host (its router, an expert read): it runs eagerly
            graph, self.not_recorded = None, str(e)
        finally:
            state.position = position
            for cache, n in zip(caches, lengths):
                cache.length = n
        self._recording = (state, graph, _linear_arrays(state)) if self._recordable else None
        return self._recording

    def _step(self, ids: np.ndarray, state: State, all_logits: bool):
        """The forward pass of `ids` (int64 [T]) extending `state`: logits as a backend array."""
        be, cfg = self.backend, self.cfg
        positions = np.arange(state.position, state.position + len(ids))
        if self.tracer is not None:
            self.tracer.begin(ids)
        h = be.embed(ids, self._w["embed_tokens.weight"])  # (T, hidden)
        mlp = None  # the previous layer's MLP/MoE output, added to h together with the next norm
        for i in range(cfg.num_hidden_layers):
            p = f"layers.{i}."
            with self.stats.stage("attention"):
                if mlp is None:
                    x = be.rms_norm(h, self._w[p + "input_layernorm.weight"], cfg.rms_norm_eps)
                else:
                    h, x = be.add_rms_norm(h, mlp, self._w[p + "input_layernorm.weight"], cfg.rms_norm_eps)
                if self._mla is not None:
                    attn = self._mla(i, x, positions, state.layers[i])
                elif cfg.is_attention_layer(i):
                    attn = self._attention(i, x, positions, state.layers[i])
                else:
                    attn = self._linear_attention(p, x, state.layers[i])
                h, x = be.add_rms_norm(h, attn, self._w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
            if cfg.is_moe_layer(i):
                mlp = self._moe(i, x)
            else:
                with self.stats.stage("dense_mlp"):
                    mlp = self._mlp(p + "mlp.", x)
        h = be.add(h, mlp)
        state.position += len(ids)
        if not all_logits:
            h = be.rows(h, len(ids) - 1, len(ids))
        with self.stats.stage("lm_head"):
            h = be.rms_norm(h, self._w["norm.weight"], cfg.rms_norm_eps)
            return be.linear(h, self._lm_head)

    def _linear(self, x, name: str):
        """x @ W.T (+ bias when the checkpoint has one) for the resident linear `name` (without '.weight')."""
        return self._linears(x, [name])[0]

    def _linears(self, x, names: list[str]) -> list:
        """[_linear(x, name) for each name]: resident linears of one input (q/k/v, gate/up) in one backend
        call, which the CPU backends run as one parallel region."""
        ys = self.backend.linears(x, [self._w[name + ".weight"] for name in names])
        biases = [self._w.get(name + ".bias") for name in names]
        return [y if bias is None else self.backend.add(y, bias) for y, bias in zip(ys, biases)]

    def _is_plain_attention(self, i: int) -> bool:
        """Whether layer i's attention is an AttentionBlock (backends/base.py): full attention with per-head q/k
        norms and no output gate, clipping, biases, sliding window or sinks (Qwen3)."""
        cfg, a = self.cfg, f"layers.{i}.self_attn."
        return (self._mla is None and cfg.is_attention_layer(i) and cfg.qk_norm == "head"
                and not cfg.has_attention_output_gate and cfg.clip_qkv is None and cfg.attention_window(i) is None
                and not any(a + name in self._w for name in ("q_proj.bias", "k_proj.bias", "v_proj.bias",
                                                             "o_proj.bias", "sinks")))

    def _attention_block(self, i: int) -> AttentionBlock:
        """Layer i's AttentionBlock: its prepared weights and the config's shapes, eps and RoPE."""
        cfg, w, a = self.cfg, self._w, f"layers.{i}.self_attn."
        return AttentionBlock(*(w[a + name + ".weight"] for name in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "q_norm", "k_norm")),
                              cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps,
                              cfg.rope_theta, cfg.rotary_dim, cfg.rope_yarn, self._softmax_scale)

    def _attention(self, i: int, x, positions: np.ndarray, cache: KVCacheBuffer):
        """Grouped-query attention with RoPE, optional q/k RMSNorm and optional sigmoid output gate; Qwen3's
        form (self._blocks) as one Backend.attention_block call.

        Shapes: x (T, hidden) -> (T, hidden). Source: transformers Qwen3_5MoeAttention, Qwen3MoeAttention,
        OlmoeAttention, MixtralAttention (the differences are flags of ModelConfig).
        """
        be, cfg = self.backend, self.cfg
        if i in self._blocks:
            return be.attention_block(x, self._blocks[i], cache, positions)
        T, H, Hkv, D = x.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        a = f"layers.{i}.self_attn."
        q, k, v = self._linears(x, [a + "q_proj", a + "k_proj", a + "v_proj"])
        gate = None
        if cfg.has_attention_output_gate:
            q, gate = be.split(be.reshape(q, (T, H, 2 * D)), (D, D))  # per head: [query | gate]
            gate = be.reshape(gate, (T, H * D))
        if cfg.qk_norm == "full":
            q = be.rms_norm(be.reshape(q, (T, H * D)), self._w[a + "q_norm.weight"], cfg.rms_norm_eps)
            k = be.rms_norm(k, self._w[a + "k_norm.weight"], cfg.rms_norm_eps)
        if cfg.clip_qkv is not None:
            q, k, v = (be.clip(t, cfg.clip_qkv) for t in (q, k, v))
        q, k, v = be.reshape(q, (T, H, D)), be.reshape(k, (T, Hkv, D)), be.reshape(v, (T, Hkv, D))
        if cfg.qk_norm == "head":
            q, k = be.qk_norm_rope(q, k, self._w[a + "q_norm.weight"], self._w[a + "k_norm.weight"],
                                   cfg.rms_norm_eps, positions, cfg.rope_theta, cfg.rotary_dim, cfg.rope_yarn)
        else:
            q = be.rope(q, positions, cfg.rope_theta, cfg.rotary_dim, cfg.rope_yarn)
            k = be.rope(k, positions, cfg.rope_theta, cfg.rotary_dim, cfg.rope_yarn)
        keys, values = cache.append(k, v)
        out = self._attend(q, keys, values, positions, self._softmax_scale, cfg.attention_window(i),
                           self._w.get(a + "sinks"))
        out = be.reshape(out, (T, H * D))
        if gate is not None:
            out = be.multiply(out, be.sigmoid(gate))
        return self._linear(out, a + "o_proj")

    def _attend(self, q, keys, values, positions: np.ndarray, scale: float, w: int | None, sinks=None):
        """Causal attention of q [T, H, D] over the cache; with a sliding window w, the query at position p sees
        only positions p-w+1 .. p (transformers' sliding-window mask: Mixtral, gpt-oss's sliding layers).
        sinks: gpt-oss's per-head sink logits, or None."""
        be = self.backend
        if w is None or positions[-1] < w:
            return be.attention(q, keys, values, positions, scale, sinks)
        rows = []
        for t, pos in enumerate(positions):  # each query has its own window of the cache
            start = max(0, pos - w + 1)
            rows.append(be.to_numpy(be.attention(be.rows(q, t, t + 1), be.rows(keys, start, pos + 1),
                                                 be.rows(values, start, pos + 1), np.array([pos - start]), scale,
                                                 sinks)))
        return be.asarray(np.concatenate(rows))

    def _linear_attention(self, p: str, x, st: LinearAttentionBuffer):
        """GatedDeltaNet: causal conv, gated delta rule, gated RMSNorm. x (T, hidden) -> (T, hidden).

        Source: Yang et al. 2024 (Gated Delta Networks); transformers Qwen3_5MoeGatedDeltaNet.
        """
        be, cfg = self.backend, self.cfg
        T = x.shape[0]
        Hk, Hv, Dk, Dv = (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                          cfg.linear_value_head_dim)
        a = p + "linear_attn."
        # (T, 2·Hk·Dk + Hv·Dv), (T, Hv·Dv), (T, Hv), (T, Hv)
        qkv, z, b, alpha = self._linears(x, [a + "in_proj_qkv", a + "in_proj_z", a + "in_proj_b", a + "in_proj_a"])
        z = be.reshape(z, (T, Hv, Dv))
        qkv, st.conv = be.causal_conv1d(qkv, st.conv, self._w[a + "conv1d.weight"])
        q, k, v = be.split(qkv, (Hk * Dk, Hk * Dk, Hv * Dv))
        q, k, v = be.reshape(q, (T, Hk, Dk)), be.reshape(k, (T, Hk, Dk)), be.reshape(v, (T, Hv, Dv))
        # q, k L2-normalised, beta = sigmoid(b), log decay g = -exp(A_log)·softplus(alpha + dt_bias) ≤ 0, then
        # the recurrence: o (T, Hv, Dv)
        o, st.recurrent = be.gated_delta_net(q, k, v, b, alpha, self._decay_rate[a], self._w[a + "dt_bias"],
                                             st.recurrent)
        o = be.rms_norm_gated(o, z, self._w[a + "norm.weight"], cfg.rms_norm_eps)
        return self._linear(be.reshape(o, (T, Hv * Dv)), a + "out_proj")

    def _mlp(self, p: str, x):
        """Dense SwiGLU MLP (also the shared expert): down(silu(gate x) * up x)."""
        be = self.backend
        gate, up = self._linears(x, [p + "gate_proj", p + "up_proj"])
        return self._linear(be.silu_mul(gate, up), p + "down_proj")

    def _shared_expert(self, p: str, x) -> tuple | None:
        """The shared expert of x and its gate's logits (None where ungated), or None when the model has
        none; :meth:`_plus_shared` adds it to the routed experts' sum."""
        if not self.cfg.has_shared_expert:
            return None
        gate = self._linear(x, p + "shared_expert_gate") if self.cfg.has_shared_expert_gate else None
        return self._mlp(p + "shared_expert.", x), gate

    def _plus_shared(self, y, shared: tuple | None):
        """y + the shared expert scaled by the sigmoid of its gate (``shared`` from :meth:`_shared_expert`)."""
        if shared is None:
            return y
        out, gate = shared
        return self.backend.add(y, out) if gate is None else self.backend.add_sigmoid_gated(y, gate, out)

    def preload_experts(self, cache_bytes: int) -> bool:
        """Read every routed expert, k at a time, into the backend's own expert cache (Backend.hold_experts)
        when a cache of `cache_bytes` holds them all (each expert's bytes plus 256 of slot alignment), so that
        decode reads nothing and, with softmax top-k routing, routes on the device (Backend.routed_experts).
        Returns whether it did."""
        model = self.model_dir
        per_expert = sum(model.layer_layout(layer).nbytes + 256 for layer in model.moe_layers)
        if cache_bytes < self.cfg.num_experts * per_expert:
            return False
        for layer in self.model_dir.moe_layers:
            layout = self.model_dir.layer_layout(layer)
            for start in range(0, self.cfg.num_experts, self.k):
                ids = np.arange(start, min(start + self.k, self.cfg.num_experts))
                request = self.store.fetch(layer, ids)
                buffers = self.store.wait(request)
                self.backend.hold_experts([layout.view(b) for b in buffers], [(layer, int(e)) for e in ids])
                self.store.release(request)
        return True

    def _moe(self, layer: int, x):
        """Routed experts (from the store) plus the shared expert. x (T, hidden) -> (T, hidden)."""
        be = self.backend
        p = f"layers.{layer}.mlp."
        if x.shape[0] == 1 and self._routes_on_device and self.tracer is None:
            with self.stats.stage("experts"):
                y = be.routed_experts(x, self._w[p + "gate.weight"], layer, self.k, self.cfg.norm_topk_prob)
            if y is not None:  # every expert of the layer is the backend's: nothing read, nothing waited for
                with self.stats.stage("shared_expert"):
                    shared = self._shared_expert(p, x)
                return self._plus_shared(y, shared)
        ids, weights = self._route(layer, x, self.k)  # (T, k) int, (T, k) f32
        if x.shape[0] == 1:
            return self._moe_decode(layer, p, x, ids[0], weights[0])
        return self._moe_prefill(layer, p, x, ids, weights)

    def _route(self, layer: int, x, k: int) -> tuple[np.ndarray, np.ndarray]:
        """MoE layer `layer`'s router on x (T, hidden): its logits routed by the family's rule
        (reference/routing.py). Returns ids (T, k) int64 in decreasing preference and weights (T, k) float32."""
        with self.stats.stage("router"):
            logits = self.backend.to_numpy(self.backend.linear(x, self._w[f"layers.{layer}.mlp.gate.weight"]))
            return route(logits, self.cfg, k, **self._router_tensors[layer])

    def _moe_decode(self, layer: int, p: str, x, ids: np.ndarray, weights: np.ndarray):
        """One token: read its k experts concurrently while the shared expert computes, or, when the page cache
        holds them all, use them in place with no fetch (ExpertStore.resident). Experts the backend already
        holds in its own memory (a GPU expert cache) are not read; they reach it as None. A backend that takes
        them as they land (Backend.experts_as_read) gets each one as its read finishes (_experts_as_read)."""
        be = self.backend
        keys = [(layer, int(e)) for e in ids]
        held = [be.has_expert(key) for key in keys]
        self._release_reads()  # the previous layer's: its copies are done (this layer's router waited for them)
        # --expert-device: the missing experts on the CPU, where numba computes those the page cache holds on
        # the page cache itself (in place: no read into a buffer, the GPU way's largest term)
        placed = self.placement is not None and not all(held)
        on_cpu = placed and self.placement.on_cpu()
        x_host = be.to_numpy(x) if on_cpu else None  # taken before more GPU work is queued
        # each way's time from here (after x_host's wait for the GPU, not the CPU way's cost) to its sum
        timing = (time.perf_counter(), self.stats.totals.disk_bytes) if placed else None
        # every expert in the page cache (a warm token): no fetch to wait for and release
        mapped = self.store.resident(layer, ids, in_place=on_cpu) if self.tracer is None and not any(held) else None
        request = self.store.fetch(layer, ids[np.logical_not(held)], in_place=on_cpu) \
            if not all(held) and mapped is None else None
        if self.store.guess_slots and layer in self._next_moe:
            self._speculate(self._next_moe[layer], x, request)
        shared = None
        if self.cfg.has_shared_expert:  # no stage timer where there is none: 12-48 layers a token
            with self.stats.stage("shared_expert"):
                shared = self._shared_expert(p, x)
        layout = self.model_dir.layer_layout(layer)
        as_read = be.experts_as_read(layout, keys, weights, self._act) if request and x_host is None else None
        if as_read is not None:
            y = self._experts_as_read(as_read, request, x, held)
        else:
            buffers = iter(mapped or (self.store.wait(request) if request else ()))
            with self.stats.stage("experts"):
                packed = [None if h else next(buffers) for h in held]
                y = self._decode_experts(x, x_host, packed, layout, weights, keys)
            if request:
                self.store.release(request)
        if timing is not None:  # reads included: the CPU way in place reads nothing
            started, disk_bytes = timing
            self.placement.measured(on_cpu, (len(held) - sum(held)) * layout.nbytes, time.perf_counter() - started,
                                    from_disk=self.stats.totals.disk_bytes != disk_bytes)
        if self.tracer is not None:
            self.tracer.layer(layer, ids[None], weights[None], [request] if request else [])
        return self._plus_shared(y, shared)

    def _experts_as_read(self, as_read, request, x, held: list[bool]):
        """One token's experts through `as_read` (Backend.experts_as_read): each missing one put as its read
        lands, then their weighted sum [1, hidden]. `request` (the fetch of the missing ones, in order) is
        released at the next MoE layer or the step's end (_release_reads), once the backend is done with its
        buffers."""
        self._unreleased = (request, as_read)
        where: dict[int, list[int]] = {}
        for i, e in zip((i for i, h in enumerate(held) if not h), request.expert_ids):
            where.setdefault(e, []).append(i)
        for e, buf in self.store.as_read(request):
            with self.stats.stage("experts"):
                for i in where[e]:
                    as_read.put(i, buf)
        with self.stats.stage("experts"):
            hidden = self.cfg.hidden_size
            return self.backend.reshape(as_read.finish(self.backend.reshape(x, (hidden,))), (1, hidden))

    def _release_reads(self) -> None:
        """Give the store back the read buffers of the last MoE layer staged as they landed, once the backend
        no longer reads them (ExpertsAsRead.wait: by the next layer's router its copies are long done)."""
        if self._unreleased is not None:
            request, as_read = self._unreleased
            self._unreleased = None
            try:
                as_read.wait()
            finally:
                self.store.release(request)

    def _decode_experts(self, x, x_host, packed: list, layout, weights: np.ndarray, keys: list):
        """One token's k experts' weighted sum [1, hidden] from their packed bytes (None where the backend
        holds the expert; Backend.packed_experts_ffn). With x_host (x on the host: the placement of
        --expert-device chose the CPU), the backend computes the experts it holds while numba computes the
        others from their read buffers or the page cache's mapping; the sums join."""
        be, hidden = self.backend, self.cfg.hidden_size
        x = be.reshape(x, (hidden,))
        if x_host is None:
            return be.reshape(be.packed_experts_ffn(x, packed, layout, weights, keys, act=self._act), (1, hidden))
        missing = [i for i, b in enumerate(packed) if b is not None]
        held = [i for i, b in enumerate(packed) if b is None]
        y = be.packed_experts_ffn(x, [None] * len(held), layout, weights[held], [keys[i] for i in held],
                                  act=self._act) if held else None  # launched: the GPU works on while the CPU does
        y_cpu = be.asarray(self.placement.cpu.packed_experts_ffn(x_host.reshape(hidden), [packed[i] for i in missing],
                                                                  layout, weights[missing], act=self._act))
        return be.reshape(y_cpu if y is None else be.add(y, y_cpu), (1, hidden))

    def _speculate(self, layer: int, x, after):
        """Guess MoE layer `layer`'s experts from the current layer's MoE input x (1, hidden) and its own
        router, and have the store read the top guesses, not already held by the backend, once the reads of
        `after` (the current layer's fetch) are done. The guesses are ranked by the family's routing rule
        (a correction bias and expert groups count as they do when the layer routes), every expert ranked."""
        ids, _ = self._route(layer, x, self.cfg.num_experts)
        ranked = (int(e) for e in ids[0])
        guess = itertools.islice((e for e in ranked if not self.backend.has_expert((layer, e))),
                                 self.store.guess_slots)
        self.store.speculate(layer, list(guess), after)

    def _moe_prefill(self, layer: int, p: str, x, ids: np.ndarray, weights: np.ndarray):
        """T tokens: each expert any token routed to is read once and applied to all of its tokens.

        The unique experts are fetched in batches (prefill_batches: at most store.batch_size of them read, any
        number already in memory); the next batch's reads are in flight while the current batch computes.
        """
        be = self.backend
        layout = self.model_dir.layer_layout(layer)
        unique = np.unique(ids)
        batches = prefill_batches(unique, self.store.in_memory(layer, unique), self.store.batch_size)
        pending = self.store.fetch(layer, batches[0])
        with self.stats.stage("shared_expert"):
            out = self._shared_expert(p, x)
        y = np.zeros((x.shape[0], self.cfg.hidden_size), np.float32)
        fetches = []
        for n, batch in enumerate(batches):
            buffers = self.store.wait(pending)
            current = pending
            fetches.append(current)
            if n + 1 < len(batches):
                pending = self.store.fetch(layer, batches[n + 1])
            with self.stats.stage("experts"):
                routes = [np.nonzero(ids == e) for e in batch]
                be.packed_experts_prefill(x, buffers, layout, [t for t, _ in routes],
                                          [weights[t, s] for t, s in routes], y, act=self._act)
            self.store.release(current)
        if self.tracer is not None:
            self.tracer.layer(layer, ids, weights, fetches)
        return self._plus_shared(be.asarray(y), out)


def prefill_batches(unique: np.ndarray, in_memory: list[int], batch_size: int) -> list[np.ndarray]:
    """A prompt's experts of one layer (`unique`, sorted int64) cut into runs, in order, each holding at most
    `batch_size` experts not `in_memory` (those take a read buffer each; two batches are alive at a time) and
    any number in memory. A layer whose experts are all in memory is one batch, which the numba backend runs
    in four parallel regions (64 per layer in batches of 8 at 16 threads, most of them waiting on the batch's
    largest expert). Runs in order keep each output's sum over the experts in expert order, so the logits do
    not depend on what was in memory."""
    resident = set(in_memory)
    batches, start, misses = [], 0, 0
    for i, e in enumerate(unique.tolist()):
        if e in resident:
            continue
        if misses == batch_size:
            batches.append(unique[start:i])
            start, misses = i, 0
        misses += 1
    if start < len(unique):
        batches.append(unique[start:])
    return batches


def _kv_caches(state: State) -> list[KVCacheBuffer]:
    return [layer for layer in state.layers if isinstance(layer, KVCacheBuffer)]


def _linear_arrays(state: State) -> list:
    """The linear-attention layers' state arrays (a replay updates them where they were recorded)."""
    return [a for layer in state.layers if isinstance(layer, LinearAttentionBuffer)
            for a in (layer.conv, layer.recurrent)]


def check_finite(logits: np.ndarray, model_dir, first_position: int) -> np.ndarray:
    """`logits` [T, vocab] unchanged, or FlashMoeError naming the first position whose logits are NaN or
    infinite. Two causes give that: damaged weights (often an expert file whose size still checks out;
    `flashmoe verify` finds which), or intact weights whose activations overflow float32 on this input (a
    checkpoint whose values exceed float32's range once multiplied out); the message names both."""
    bad = ~np.isfinite(logits).all(axis=-1)
    if bad.any():
        raise FlashMoeError(
            f"{model_dir}: non-finite logits at position {first_position + int(np.argmax(bad))}. Either the "
            f"weights are damaged (`flashmoe verify {model_dir}` checks every file against its checksum) or "
            "they are intact but their activations overflow float32 on this input (when verify finds every "
            "file intact: the checkpoint's values are too large for float32 arithmetic)"
        )
    return logits


def _resident(model: ModelDir, name: str):
    """A resident tensor as the backend takes it: the depthwise conv kernel [C, 1, K] loses its unit axis."""
    t = model.raw(name)
    if name.endswith("conv1d.weight"):
        return t.reshape(t.shape[0], t.shape[-1])
    return t
