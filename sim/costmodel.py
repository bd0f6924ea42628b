"""Cost model: seconds for every GPU op and host-link copy the engine schedules
(docs/architecture.md §4).

One interface (``CostModel``), pure functions of their arguments, memoised per instance:

- ``attention(layer, n_tokens, kv_len)``: one layer's attention block for ``n_tokens`` new tokens
  whose keys end at ``kv_len`` (the context length including those tokens),
- ``router(layer, n_tokens)``, ``dense_ffn(layer, n_tokens)``, ``shared_experts(layer, n_tokens)``,
- ``expert_ffn(layer, n_tokens, dtype=None)``: one routed expert applied to ``n_tokens`` tokens
  (dtype default: the model's expert_dtype; "int4" for the speculative draft's resident experts),
- ``embed_and_head(n_tokens, logits_tokens=None)``: embedding, final norm and lm head,
- ``h2d(nbytes)``, ``d2h(nbytes)``: one copy over the host link,
- ``host_layer(layer, experts, draft=False)``: host overhead of one decoder layer (``HostOverhead``,
  the ``engine`` config group): time the GPU waits for the host to launch that layer's work.

``RooflineCostModel`` prices each op as max(FLOPs / flops_bf16, bytes / hbm_bandwidth) +
launch_overhead_s * kernels (the kernel counts are the ``KERNELS`` table below) and a copy as
copy_latency_s + nbytes / bandwidth(nbytes). ``ProfiledCostModel`` answers from measured tables
where they have data and falls back to another cost model elsewhere, so a measured profile
replaces any term without the engine knowing; ``cost_model_for`` picks the right one for a
HardwareSpec.
"""

from __future__ import annotations

import math
import operator
import statistics
from abc import ABC, abstractmethod
from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from sim.errors import SimError
from sim.hardware import HOST_MEMORY, HardwareSpec
from sim.spec import BF16_BYTES, EXPERT_DTYPES, ModelSpec

OPS = ("attention", "router", "dense_ffn", "shared_experts", "expert_ffn", "embed_and_head", "h2d", "d2h")

# Kernels per op, each paying launch_overhead_s (what an eager/graph-captured bf16 implementation runs):
KERNELS = {
    # input norm, q/k/v projections (3), rotary embedding, KV-cache write, attention core, output
    # projection, residual add; +2 with q/k norms
    "attention_gqa": 9,
    # input norm, q projection (3 with q_lora: q_a, norm, q_b), kv_a projection, kv_a norm, rotary,
    # cache write, kv_b (latent expansion), attention core, output projection, residual add
    "attention_mla": 10,
    "qk_norm": 2,
    "q_lora_extra": 2,
    # post-attention norm, gate GEMM, softmax, top-k
    "router": 4,
    # post-attention norm, gate GEMM, up GEMM, SiLU, multiply, down GEMM, residual add
    "dense_ffn": 7,
    # one shared MLP module (transformers fuses DeepSeek's shared experts into one): gate, up, SiLU,
    # multiply, down; + sigmoid gate (GEMV, sigmoid, multiply) for Qwen; + add into the routed output
    "shared_mlp": 5,
    "shared_gate": 3,
    "shared_add": 1,
    # fused gate_up GEMM, SiLU, multiply, down GEMM, weighted accumulate into the output
    "expert_ffn": 5,
    # embedding gather, final norm, lm head GEMM, argmax
    "embed_and_head": 4,
}
LOGIT_BYTES = 4  # fp32 logits


def causal_pairs(n_tokens: int, kv_len: int, window: int | None = None) -> int:
    """(query, key) pairs of ``n_tokens`` queries at the last positions of a ``kv_len`` context,
    causal, each attending to at most ``window`` keys (itself included)."""
    a, b = kv_len - n_tokens + 1, kv_len  # keys visible to the first and the last query
    if window is None or window >= b:
        return (a + b) * n_tokens // 2
    if a > window:
        return n_tokens * window
    return (a + window) * (window - a + 1) // 2 + (b - window) * window


ENGINE_FIELDS = ("host_per_layer_s", "draft_host_per_layer_s", "host_per_launch_s", "host_per_expert_s")


@dataclass(frozen=True)
class HostOverhead:
    """Host overhead of a decode path (docs/engine.md), added to the GPU time of every decoder layer:
    ``host_per_layer_s`` (target) or ``draft_host_per_layer_s`` (draft) + ``host_per_launch_s`` x
    the layer's kernel launches (the ``KERNELS`` table), before the layer's routing. Additive, not
    overlapped: a layer's dispatch waits for the previous MoE layer's routing on the host, so the
    host cannot run ahead of the GPU across a routing decision. ``host_per_expert_s``: the host's
    time per routed expert a target layer runs, after the routing read (the executor dispatches each
    one), overlapping the experts' kernels (``host_experts``); it grows with top-k and with the
    union of a verify pass. The draft's experts run inside its graph or transformers' loop, priced
    by its per-layer term. ``ideal``: all zero."""

    name: str = "ideal"
    host_per_layer_s: float = 0.0
    draft_host_per_layer_s: float = 0.0
    host_per_launch_s: float = 0.0
    host_per_expert_s: float = 0.0
    source: str = "config"  # config | hardware (values of a measured hardware profile)

    def __post_init__(self) -> None:
        for f in ENGINE_FIELDS:
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or not math.isfinite(v):
                raise SimError(f"engine.{f} must be a number of seconds >= 0, got {v!r}")
            object.__setattr__(self, f, float(v))

    @property
    def zero(self) -> bool:
        return not any(getattr(self, f) for f in ENGINE_FIELDS)

    def columns(self) -> dict[str, Any]:
        """The results columns: ``engine`` and the values in use."""
        return {"engine": self.name, **{f: getattr(self, f) for f in ENGINE_FIELDS}}

    @classmethod
    def from_cfg(cls, cfg: Any, hw: HardwareSpec | None = None) -> "HostOverhead":
        """From a composed ``engine`` node (null: ideal); with ``from_hardware`` the hardware
        profile's ``engine: {NAME: {...}}`` values replace the node's where present."""
        if cfg is None:
            return cls()
        get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
        name = str(get("name", "ideal"))
        vals = {f: get(f, 0.0) for f in ENGINE_FIELDS}
        source = "config"
        measured = hw.engine_values(name) if hw is not None and get("from_hardware", False) else None
        if measured:  # validated by HardwareSpec (known paths and keys, seconds >= 0)
            vals.update(measured)
            source = "hardware"
        return cls(name, source=source, **vals)


class CostModel(ABC):
    """Seconds for each op; subclasses implement the ``_op`` methods, this class memoises and
    checks arguments.

    Memo keys use a layer *class* (``layer_class``): layers whose costs are the same by
    construction share one entry (the roofline prices every MoE layer alike, and attention alike
    except on sliding-window layers), so a long trace computes each distinct cost once."""

    def __init__(self, model: ModelSpec, hw: HardwareSpec, host: HostOverhead | None = None) -> None:
        self.model = model
        self.hw = hw
        self.host = host or HostOverhead()
        self._memo: dict[tuple, float] = {}
        n = model.num_layers
        self._cls_attention = tuple(self.layer_class("attention", i) for i in range(n))
        self._cls_moe = tuple(self.layer_class("moe", i) if model.is_moe_layer(i) else None for i in range(n))
        self._cls_dense = tuple(None if model.is_moe_layer(i) else self.layer_class("dense", i) for i in range(n))

    def layer_class(self, kind: str, layer: int) -> Any:
        """Memo class of ``layer`` for ops of ``kind`` ("attention", "moe" ops, "dense" FFN): layers
        of one class must cost the same. Default: every layer its own class."""
        return layer

    # ---------------------------------------------------------------- checks
    def _cls(self, table: tuple, layer: Any, need: str | None) -> Any:
        """The memo class of a valid layer; a SimError for a bad one."""
        try:
            if layer >= 0:
                c = table[layer]
                if c is not None:
                    return c
        except (IndexError, TypeError):
            pass
        try:
            operator.index(layer)
        except TypeError:
            raise SimError(f"decoder layer must be an integer, got {layer!r}") from None
        self.model.check_layer(layer)
        if need == "moe":
            raise SimError(f"model '{self.model.name}': decoder layer {layer} is dense, it has no router or experts")
        raise SimError(f"model '{self.model.name}': decoder layer {layer} is an MoE layer, it has no dense FFN")

    @staticmethod
    def _tokens(n_tokens: int, kv_len: int | None = None) -> None:
        if int(n_tokens) < 1:
            raise SimError(f"n_tokens must be >= 1, got {n_tokens}")
        if kv_len is not None and int(kv_len) < int(n_tokens):
            raise SimError(f"kv_len ({kv_len}) must be >= n_tokens ({n_tokens}): it counts the new tokens too")

    def _store(self, key: tuple, v: Any) -> float:
        v = float(v)
        if not (v >= 0 and math.isfinite(v)):
            raise SimError(f"cost model {type(self).__name__} gave {v} s for {key}")
        self._memo[key] = v
        return v

    # ---------------------------------------------------------------- interface
    def attention(self, layer: int, n_tokens: int, kv_len: int) -> float:
        key = ("attention", self._cls(self._cls_attention, layer, None), n_tokens, kv_len)
        v = self._memo.get(key)
        if v is None:
            self._tokens(n_tokens, kv_len)
            v = self._store(key, self._attention(int(layer), int(n_tokens), int(kv_len)))
        return v

    def router(self, layer: int, n_tokens: int) -> float:
        key = ("router", self._cls(self._cls_moe, layer, "moe"), n_tokens)
        v = self._memo.get(key)
        if v is None:
            self._tokens(n_tokens)
            v = self._store(key, self._router(int(layer), int(n_tokens)))
        return v

    def dense_ffn(self, layer: int, n_tokens: int) -> float:
        key = ("dense_ffn", self._cls(self._cls_dense, layer, "dense"), n_tokens)
        v = self._memo.get(key)
        if v is None:
            self._tokens(n_tokens)
            v = self._store(key, self._dense_ffn(int(layer), int(n_tokens)))
        return v

    def shared_experts(self, layer: int, n_tokens: int) -> float:
        """Shared experts of an MoE layer (0.0 for a model without them)."""
        key = ("shared_experts", self._cls(self._cls_moe, layer, "moe"), n_tokens)
        v = self._memo.get(key)
        if v is None:
            self._tokens(n_tokens)
            v = 0.0 if self.model.num_shared_experts == 0 else self._shared_experts(int(layer), int(n_tokens))
            v = self._store(key, v)
        return v

    def expert_ffn(self, layer: int, n_tokens: int, dtype: str | None = None) -> float:
        """One routed expert on ``n_tokens`` tokens, its weights stored in ``dtype``."""
        key = ("expert_ffn", self._cls(self._cls_moe, layer, "moe"), n_tokens, dtype)
        v = self._memo.get(key)
        if v is None:
            self._tokens(n_tokens)
            dt = self.model.expert_dtype if dtype is None else dtype
            if dt not in EXPERT_DTYPES:
                raise SimError(f"expert dtype must be one of {list(EXPERT_DTYPES)}, got {dtype!r}")
            v = self._store(key, self._expert_ffn(int(layer), int(n_tokens), dt))
        return v

    def embed_and_head(self, n_tokens: int, logits_tokens: int | None = None) -> float:
        """Embedding of ``n_tokens`` tokens, final norm and lm head on ``logits_tokens`` of them
        (default all; prefill needs 1, a verify pass k+1)."""
        key = ("embed_and_head", n_tokens, logits_tokens)
        v = self._memo.get(key)
        if v is None:
            self._tokens(n_tokens)
            m = int(n_tokens) if logits_tokens is None else int(logits_tokens)
            if not 1 <= m <= int(n_tokens):
                raise SimError(f"logits_tokens must be in [1, n_tokens={n_tokens}], got {logits_tokens}")
            v = self._store(key, self._embed_and_head(int(n_tokens), m))
        return v

    def h2d(self, nbytes: int) -> float:
        """Link time of one host-to-device copy of ``nbytes``."""
        key = ("h2d", nbytes)
        v = self._memo.get(key)
        if v is None:
            if nbytes < 0:
                raise SimError(f"nbytes must be >= 0, got {nbytes}")
            v = self._store(key, self._h2d(int(nbytes)))
        return v

    def d2h(self, nbytes: int) -> float:
        """Link time of one device-to-host copy of ``nbytes``."""
        key = ("d2h", nbytes)
        v = self._memo.get(key)
        if v is None:
            if nbytes < 0:
                raise SimError(f"nbytes must be >= 0, got {nbytes}")
            v = self._store(key, self._d2h(int(nbytes)))
        return v

    # ---------------------------------------------------------------- host overhead
    def layer_launches(self, layer: int, experts: int = 0) -> int:
        """Kernel launches of decoder layer ``layer``: its attention, then its router, ``experts``
        routed experts and its shared experts (MoE), or its dense FFN (the ``KERNELS`` table)."""
        m = self.model
        n = KERNELS["attention_gqa" if m.attention == "gqa" else "attention_mla"]
        if m.attention == "gqa" and m.qk_norm != "none":
            n += KERNELS["qk_norm"]
        if m.attention != "gqa" and m.q_lora_rank:
            n += KERNELS["q_lora_extra"]
        if not m.is_moe_layer(layer):
            return n + KERNELS["dense_ffn"]
        n += KERNELS["router"] + experts * KERNELS["expert_ffn"]
        if m.num_shared_experts:
            n += KERNELS["shared_mlp"] + KERNELS["shared_add"] + (KERNELS["shared_gate"] if m.shared_expert_gate else 0)
        return n

    def host_layer(self, layer: int, experts: int = 0, draft: bool = False) -> float:
        """Host overhead of one decoder layer running ``experts`` routed experts (``HostOverhead``)."""
        h = self.host
        if h.zero:
            return 0.0
        per = h.draft_host_per_layer_s if draft else h.host_per_layer_s
        return per + h.host_per_launch_s * self.layer_launches(layer, experts)

    def decode_experts(self, layer: int, k: int) -> float:
        """GPU time of a one-token decode step's experts at MoE layer ``layer``: ``k`` routed experts
        on one token, then the shared experts."""
        return k * self.expert_ffn(layer, 1) + (self.shared_experts(layer, 1) if self.model.num_shared_experts else 0.0)

    def host_experts(self, layer: int, experts: int) -> float:
        """Host time dispatching ``experts`` routed experts of target MoE layer ``layer`` after its
        routing read (``host_per_expert_s``). The GPU runs each expert as the host launches it, so
        the experts phase lasts the longer of this and the experts' kernels (sim.schedule)."""
        if not experts or not self.model.is_moe_layer(layer):
            return 0.0
        return self.host.host_per_expert_s * experts

    def host_head(self) -> float:
        """Host overhead of the embedding and LM head (their launches; no layer term)."""
        return self.host.host_per_launch_s * KERNELS["embed_and_head"]

    # ---------------------------------------------------------------- conveniences
    def layer_pre_routing(self, layer: int, n_tokens: int, kv_len: int) -> float:
        """What must run before a layer's routing is known: attention, then the router."""
        return self.attention(layer, n_tokens, kv_len) + self.router(layer, n_tokens)

    def expert_h2d(self, dtype: str | None = None) -> float:
        """Link time of one routed expert (default dtype: the model's expert_dtype)."""
        return self.h2d(self.model.bytes_per_expert(dtype))

    def compute_only_step(
        self,
        n_tokens: int,
        kv_len: int,
        expert_tokens: Mapping[int, Sequence[int]] | None = None,
        logits_tokens: int | None = None,
        dtype: str | None = None,
    ) -> float:
        """GPU time of one forward pass with every expert resident (no transfers, no overlap).

        ``expert_tokens[layer]`` lists the token count of each expert used at that MoE layer; by
        default the n_tokens * top_k assignments go to min(n_tokens * top_k, num_experts) distinct
        experts, as evenly as possible."""
        m = self.model
        total = self.embed_and_head(n_tokens, logits_tokens)
        default = None
        if expert_tokens is None:
            pairs = n_tokens * m.top_k
            used = min(pairs, m.num_experts)
            q, r = divmod(pairs, used)
            default = [q + 1] * r + [q] * (used - r)
        for layer in range(m.num_layers):
            total += self.attention(layer, n_tokens, kv_len)
            if not m.is_moe_layer(layer):
                total += self.dense_ffn(layer, n_tokens)
                continue
            total += self.router(layer, n_tokens) + self.shared_experts(layer, n_tokens)
            counts = default if expert_tokens is None else expert_tokens.get(layer, ())
            total += sum(self.expert_ffn(layer, c, dtype) for c in counts if c > 0)
        return total

    # ---------------------------------------------------------------- to implement
    @abstractmethod
    def _attention(self, layer: int, n_tokens: int, kv_len: int) -> float: ...

    @abstractmethod
    def _router(self, layer: int, n_tokens: int) -> float: ...

    @abstractmethod
    def _dense_ffn(self, layer: int, n_tokens: int) -> float: ...

    @abstractmethod
    def _shared_experts(self, layer: int, n_tokens: int) -> float: ...

    @abstractmethod
    def _expert_ffn(self, layer: int, n_tokens: int, dtype: str) -> float: ...

    @abstractmethod
    def _embed_and_head(self, n_tokens: int, logits_tokens: int) -> float: ...

    @abstractmethod
    def _h2d(self, nbytes: int) -> float: ...

    @abstractmethod
    def _d2h(self, nbytes: int) -> float: ...


class RooflineCostModel(CostModel):
    """max(FLOPs / achieved FLOP/s, bytes / achieved HBM bandwidth) + launch_overhead_s * kernels.

    Bytes count the weights read, the KV cache read and written, activations in and out (bf16) and
    fp32 logits. Attention counts causal (query, key) pairs, windowed on sliding layers. MLA is
    priced as transformers 5 runs it, expanding the cached latent through kv_b for every key at
    every step; ``mla_absorbed=True`` prices the absorbed form instead (kv_b folded into q and o).
    INT4/MXFP4 experts read their packed bytes and run at the same FLOP rate as bf16.
    """

    def __init__(self, model: ModelSpec, hw: HardwareSpec, *, mla_absorbed: bool = False,
                 host: HostOverhead | None = None) -> None:
        super().__init__(model, hw, host)
        self.mla_absorbed = bool(mla_absorbed)

    def layer_class(self, kind: str, layer: int) -> Any:
        """Every MoE layer costs the same, every dense FFN too; attention differs only on
        sliding-window layers."""
        return self.model.is_sliding_layer(layer) if kind == "attention" else 0

    def roofline(self, flops: float, nbytes: float, kernels: int) -> float:
        """The roofline time of an op: the slower of compute and memory, plus kernel overheads."""
        hw = self.hw
        return max(flops / hw.flops_bf16, nbytes / hw.hbm_bandwidth) + hw.launch_overhead_s * kernels

    # -- attention
    def attention_terms(self, layer: int, n_tokens: int, kv_len: int) -> tuple[float, float, int]:
        """(FLOPs, bytes, kernels) of one layer's attention block."""
        m = self.model
        h, nh, n = m.hidden_size, m.num_attention_heads, n_tokens
        window = m.sliding_window if m.is_sliding_layer(layer) else None
        pairs = causal_pairs(n, kv_len, window)
        keys = kv_len if window is None else min(kv_len, window + n - 1)  # keys read from the cache
        act = 2 * n * h * BF16_BYTES  # hidden state in and out
        kv_io = (keys + n) * m.kv_bytes_per_token_layer  # cache read + new entries written
        if m.attention == "gqa":
            hd = m.head_dim
            flops = 2 * n * m.attention_params + 4 * pairs * nh * hd
            nbytes = BF16_BYTES * m.attention_params + kv_io + act
            kernels = KERNELS["attention_gqa"] + (KERNELS["qk_norm"] if m.qk_norm != "none" else 0)
            return flops, nbytes, kernels
        nope, rope, v, kvl = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank
        kv_b = kvl * nh * (nope + v)
        other = m.attention_params - kv_b  # every projection but kv_b runs on the n new tokens
        kernels = KERNELS["attention_mla"] + (KERNELS["q_lora_extra"] if m.q_lora_rank else 0)
        if self.mla_absorbed:
            flops = 2 * n * other + 2 * n * nh * (nope * kvl + kvl * v)  # q through W_UK, out through W_UV
            flops += 2 * pairs * nh * (kvl + rope) + 2 * pairs * nh * kvl
            nbytes = BF16_BYTES * m.attention_params + kv_io + act
            return flops, nbytes, kernels - 1
        flops = 2 * n * other + 2 * keys * kv_b  # the latent of every key expanded each step
        flops += 2 * pairs * nh * (nope + rope) + 2 * pairs * nh * v
        expanded = keys * nh * (nope + rope + v) * BF16_BYTES  # K and V written, then read
        nbytes = BF16_BYTES * m.attention_params + kv_io + act + 2 * expanded
        return flops, nbytes, kernels

    def _attention(self, layer: int, n_tokens: int, kv_len: int) -> float:
        return self.roofline(*self.attention_terms(layer, n_tokens, kv_len))

    # -- FFNs and router
    def _router(self, layer: int, n_tokens: int) -> float:
        m = self.model
        flops = 2 * n_tokens * m.num_experts * m.hidden_size
        nbytes = BF16_BYTES * (m.router_params + m.norm_params + n_tokens * m.hidden_size)
        nbytes += n_tokens * m.num_experts * LOGIT_BYTES
        return self.roofline(flops, nbytes, KERNELS["router"])

    def _ffn(self, params: int, n_tokens: int, weight_bytes: int, kernels: int) -> float:
        h = self.model.hidden_size
        flops = 2 * n_tokens * params
        nbytes = weight_bytes + 2 * n_tokens * h * BF16_BYTES
        return self.roofline(flops, nbytes, kernels)

    def _dense_ffn(self, layer: int, n_tokens: int) -> float:
        m = self.model
        p = m.dense_ffn_params
        return self._ffn(p, n_tokens, BF16_BYTES * (p + m.norm_params), KERNELS["dense_ffn"])

    def _shared_experts(self, layer: int, n_tokens: int) -> float:
        m = self.model
        p = m.shared_params
        kernels = KERNELS["shared_mlp"] + KERNELS["shared_add"] + (KERNELS["shared_gate"] if m.shared_expert_gate else 0)
        return self._ffn(p, n_tokens, BF16_BYTES * p, kernels)

    def _expert_ffn(self, layer: int, n_tokens: int, dtype: str) -> float:
        m = self.model
        return self._ffn(m.expert_params, n_tokens, m.bytes_per_expert(dtype), KERNELS["expert_ffn"])

    def _embed_and_head(self, n_tokens: int, logits_tokens: int) -> float:
        m = self.model
        v, h = m.vocab_size, m.hidden_size
        head = v * h + (v if m.lm_head_bias else 0)
        flops = 2 * logits_tokens * head
        nbytes = BF16_BYTES * (head + m.norm_params + n_tokens * h) + logits_tokens * v * LOGIT_BYTES
        return self.roofline(flops, nbytes, KERNELS["embed_and_head"])

    # -- link
    def _h2d(self, nbytes: int) -> float:
        return self.hw.h2d_time(nbytes)

    def _d2h(self, nbytes: int) -> float:
        return self.hw.d2h_time(nbytes)


# ---------------------------------------------------------------------------- measured tables
class ProfileTables:
    """Measured op times, one row per measurement: ``op`` (one of OPS), ``seconds``, and the keys
    ``layer`` (-1 = any layer), ``n_tokens``, ``kv_len`` (attention), ``dtype`` (expert_ffn),
    ``nbytes`` (h2d/d2h), optional ``host_memory`` (h2d/d2h: pinned | pageable) and optional
    ``shape`` (compute ops: ``op_shape(model, op)`` of the shape measured; empty = any model).

    Lookup is exact on the discrete keys (shape, then any shape; layer, then any layer; dtype;
    attention's n_tokens; host_memory, then rows without one) and linear interpolation over the
    size variable (attention: kv_len; h2d/d2h: nbytes; other ops: n_tokens). Repeated measurements
    of one point are reduced to their median. Outside the measured range there is no answer (the
    caller falls back to the roofline)."""

    REQUIRED = ("op", "seconds")

    def __init__(self, rows: Iterable[Mapping[str, Any]], where: str = "profile table") -> None:
        groups: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.where = where
        self.n_rows = 0
        for i, r in enumerate(rows):
            self.n_rows += 1
            for c in self.REQUIRED:
                if _missing(r.get(c)):
                    raise SimError(f"{where}: row {i}: missing column '{c}'")
            op = str(r["op"])
            if op not in OPS:
                raise SimError(f"{where}: row {i}: unknown op {op!r}; known: {', '.join(OPS)}")
            sec = float(r["seconds"])
            if not (sec >= 0 and math.isfinite(sec)):
                raise SimError(f"{where}: row {i}: field 'seconds' must be a finite number >= 0, got {r['seconds']!r}")
            layer = -1 if _missing(r.get("layer")) else int(r["layer"])
            dtype = "" if _missing(r.get("dtype")) else str(r["dtype"])
            mem = "" if _missing(r.get("host_memory")) else str(r["host_memory"])
            shape = "" if _missing(r.get("shape")) else str(r["shape"])
            if op in ("h2d", "d2h"):
                if mem and mem not in HOST_MEMORY:
                    raise SimError(f"{where}: row {i}: host_memory must be one of {list(HOST_MEMORY)}, got {mem!r}")
                key, xcol = (op, -1, "", None, mem, ""), "nbytes"
            elif op == "attention":
                key, xcol = (op, layer, "", _int(r, "n_tokens", where, i), "", shape), "kv_len"
            else:
                if op == "expert_ffn" and dtype and dtype not in EXPERT_DTYPES:
                    raise SimError(f"{where}: row {i}: expert dtype must be one of {list(EXPERT_DTYPES)}, got {dtype!r}")
                key, xcol = (op, layer, dtype, None, "", shape), "n_tokens"
            x = _int(r, xcol, where, i)
            groups[key][float(x)].append(sec)
        self._curves: dict[tuple, tuple[list[float], list[float]]] = {}
        for key, pts in groups.items():
            xs = sorted(pts)
            self._curves[key] = (xs, [statistics.median(pts[x]) for x in xs])

    @classmethod
    def from_frame(cls, df: Any, where: str = "profile table") -> "ProfileTables":
        return cls(df.to_dict("records"), where)

    @classmethod
    def from_parquet(cls, path: str | Path) -> "ProfileTables":
        import pandas as pd

        p = Path(path)
        if not p.is_file():
            raise SimError(f"{p}: measured profile table not found")
        try:
            df = pd.read_parquet(p)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise SimError(f"{p}: not a readable Parquet table: {e}") from None
        return cls.from_frame(df, str(p))

    def ops(self) -> set[str]:
        return {k[0] for k in self._curves}

    def lookup(
        self,
        op: str,
        x: float,
        *,
        layer: int = -1,
        dtype: str = "",
        n_tokens: int | None = None,
        host_memory: str = "",
        shape: str = "",
    ) -> float | None:
        """Measured seconds at size ``x`` (see the class docstring), or None without data."""
        layers = (layer, -1) if layer != -1 else (-1,)
        mems = (host_memory, "") if host_memory else ("",)
        shapes = (shape, "") if shape else ("",)
        for shp in shapes:
            for lay in layers:
                for mem in mems:
                    curve = self._curves.get((op, lay, dtype, n_tokens, mem, shp))
                    if curve is not None:
                        return _interp(curve, x)
        return None

    def has(self, op: str, *, shape: str = "", dtype: str = "", host_memory: str = "") -> bool:
        """Whether any curve of ``op`` matches these keys exactly (tests, profile summaries)."""
        return any(k[0] == op and k[5] == shape and k[2] == dtype and k[4] == host_memory for k in self._curves)


def op_shape(model: ModelSpec, op: str) -> str:
    """The dimensions that decide an op's time, as a key of profile rows: a profile measured on one
    model's shapes serves every model (depth-reduced or not) whose op has the same dimensions."""
    m = model
    if op == "attention":
        if m.attention == "mla":
            dims = f"mla.h{m.hidden_size}.q{m.num_attention_heads}.ql{m.q_lora_rank}.kvl{m.kv_lora_rank}"
            dims += f".n{m.qk_nope_head_dim}.r{m.qk_rope_head_dim}.v{m.v_head_dim}"
        else:
            dims = f"gqa.h{m.hidden_size}.q{m.num_attention_heads}.kv{m.num_key_value_heads}.d{m.head_dim}"
        return dims + ("" if m.qk_norm == "none" else f".qkn-{m.qk_norm}")
    if op == "router":
        return f"h{m.hidden_size}.e{m.num_experts}.k{m.top_k}"
    if op == "dense_ffn":
        return f"h{m.hidden_size}.i{m.dense_intermediate_size}"
    if op == "shared_experts":
        return f"h{m.hidden_size}.i{m.shared_intermediate_size * m.num_shared_experts}" + (".gate" if m.shared_expert_gate else "")
    if op == "expert_ffn":
        return f"h{m.hidden_size}.i{m.expert_intermediate_size}" + (".bias" if m.expert_bias else "")
    if op == "embed_and_head":
        return f"h{m.hidden_size}.v{m.vocab_size}"
    if op in ("h2d", "d2h"):
        return ""
    raise SimError(f"unknown op {op!r}; known: {', '.join(OPS)}")


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _int(r: Mapping[str, Any], col: str, where: str, i: int) -> int:
    v = r.get(col)
    if _missing(v):
        raise SimError(f"{where}: row {i} (op {r.get('op')!r}): missing column '{col}'")
    try:
        return int(v)
    except (TypeError, ValueError):
        raise SimError(f"{where}: row {i}: column '{col}' must be an integer, got {v!r}") from None


def _interp(curve: tuple[list[float], list[float]], x: float) -> float | None:
    xs, ys = curve
    if x < xs[0] or x > xs[-1]:
        return None
    i = bisect_left(xs, x)
    if xs[i] == x:
        return ys[i]
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


class ProfiledCostModel(CostModel):
    """Measured times where ``tables`` has them, ``base`` (e.g. the roofline) elsewhere.

    ``use`` restricts which ops may come from the tables (default: all in OPS). ``hits`` and
    ``fallbacks`` count distinct queries answered by each (memoisation makes them distinct).
    Link pacing (``link_pace_gbps``) still caps measured copies."""

    def __init__(self, base: CostModel, tables: ProfileTables, use: Iterable[str] | None = None) -> None:
        super().__init__(base.model, base.hw, base.host)
        self.base = base
        self.tables = tables
        self.use = set(OPS if use is None else use)
        unknown = self.use - set(OPS)
        if unknown:
            raise SimError(f"ProfiledCostModel: unknown op(s) {sorted(unknown)}; known: {', '.join(OPS)}")
        self.hits = 0
        self.fallbacks = 0
        self._shapes = {op: op_shape(self.model, op) for op in OPS}

    def _from_table(self, op: str, x: float, **keys: Any) -> float | None:
        if op not in self.use:
            return None
        v = self.tables.lookup(op, x, shape=self._shapes[op], **keys)
        if v is None:
            self.fallbacks += 1
        else:
            self.hits += 1
        return v

    def _attention(self, layer: int, n_tokens: int, kv_len: int) -> float:
        m = self.model
        keys = kv_len if not m.is_sliding_layer(layer) else min(kv_len, m.sliding_window + n_tokens - 1)
        v = self._from_table("attention", keys, layer=layer, n_tokens=n_tokens)
        return self.base.attention(layer, n_tokens, kv_len) if v is None else v

    def _router(self, layer: int, n_tokens: int) -> float:
        v = self._from_table("router", n_tokens, layer=layer)
        return self.base.router(layer, n_tokens) if v is None else v

    def _dense_ffn(self, layer: int, n_tokens: int) -> float:
        v = self._from_table("dense_ffn", n_tokens, layer=layer)
        return self.base.dense_ffn(layer, n_tokens) if v is None else v

    def _shared_experts(self, layer: int, n_tokens: int) -> float:
        v = self._from_table("shared_experts", n_tokens, layer=layer)
        return self.base.shared_experts(layer, n_tokens) if v is None else v

    def _expert_ffn(self, layer: int, n_tokens: int, dtype: str) -> float:
        v = self._from_table("expert_ffn", n_tokens, layer=layer, dtype=dtype)
        return self.base.expert_ffn(layer, n_tokens, dtype) if v is None else v

    def _embed_and_head(self, n_tokens: int, logits_tokens: int) -> float:
        v = None
        if logits_tokens == n_tokens:  # measured with logits for every token
            v = self._from_table("embed_and_head", n_tokens)
        return self.base.embed_and_head(n_tokens, logits_tokens) if v is None else v

    def _paced(self, v: float, nbytes: int) -> float:
        pace = self.hw.link_pace_gbps
        return v if pace is None else max(v, self.hw.copy_latency_s + nbytes / (pace * 1e9))

    def _h2d(self, nbytes: int) -> float:
        v = self._from_table("h2d", nbytes, host_memory=self.hw.host_memory)
        return self.base.h2d(nbytes) if v is None else self._paced(v, nbytes)

    def _d2h(self, nbytes: int) -> float:
        v = self._from_table("d2h", nbytes, host_memory=self.hw.host_memory)
        return self.base.d2h(nbytes) if v is None else self._paced(v, nbytes)


def cost_model_for(
    model: ModelSpec,
    hw: HardwareSpec,
    *,
    tables: ProfileTables | None = None,
    mla_absorbed: bool = False,
    host: HostOverhead | None = None,
) -> CostModel:
    """The cost model for a run: the roofline, overridden by measured tables where the hardware
    spec points at a profile table (or ``tables`` is given), with ``host`` overhead (default none)."""
    base = RooflineCostModel(model, hw, mla_absorbed=mla_absorbed, host=host)
    if tables is None and hw.profile_table:
        tables = ProfileTables.from_parquet(hw.profile_table_path())
    return base if tables is None else ProfiledCostModel(base, tables)
