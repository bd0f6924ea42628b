"""The lean decode path: a static KV cache, and CUDA graphs for each layer's non-expert work.

Why: with transformers' eager forward the host spends 1-3 ms per MoE layer launching attention,
norm and router kernels one by one between two routing reads (benchmarks/gpu_runtime.md), so a
measured run validates Python overhead, not a policy. This module runs the same model (the HF
modules' own weights and sub-modules: norms, attention, routers, embedding, head) in a form whose
host cost per layer is one graph launch and one routing read.

How a decode step runs (``LeanModel``). The decoder is cut at its MoE layers into ``M + 1``
segments: segment ``s`` finishes MoE layer ``s - 1`` (adds its experts' output to the residual
stream), runs the dense layers in between, then layer ``s``'s input norm, attention (keys and
values written into ``StaticKV`` at the step's position), residual add, post-attention norm and
router; the last segment finishes the last MoE layer and runs the final norm, the LM head and the
greedy argmax. Between segments ``s`` and ``s + 1`` the MoE layer's experts run through a callback
``experts(m, hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> out [T, H]``:

- ``GroupedExperts``: every expert resident, one grouped GEMM per projection over the expert pool
  (``torch._grouped_mm``: tokens sorted by expert on the device, group offsets from a scatter-add,
  no host sync), so top-8 models run one kernel chain per layer; capturable.
- ``Int4Experts``: the INT4 draft's experts (all resident): the routed experts' packed int4 weights
  gathered on the device and multiplied with torch's int4 kernels (tinygemm on CUDA,
  ``_weight_int4pack_mm_for_cpu`` on the CPU); capturable.
- anything else (the offloading executor's ``Run.layer_forward``): called eagerly between graphs.

On a CUDA device (``graphs=True``) each segment is one CUDA graph (decode, one token), capturable
experts are one more graph per layer, and ``capture_step()`` captures a whole step as one graph
(the kernels' own floor, and the draft's one-graph-per-token step). Each segment copies its
layer's routing (ids and weights) into pinned host memory inside the graph and an event is
recorded after it: ``routing(m)`` waits for that event and reads the pinned buffer (the one host
synchronisation a host-side policy needs; no ``.item()``/``.tolist()`` on the compute stream).

Attention windows. The graphs attend over the whole static buffer with a mask built on the device
from the position (shapes are fixed). Eager steps (prefill, the CPU) attend over the written
prefix ``[:n]`` only (the host knows ``n``), which computes exactly what transformers' dynamic
cache computes: on the CPU in fp32 the lean eager path's logits equal transformers' bit for bit
(tests/test_runtime_lean.py, every supported family). The masked full-window form differs from it
by reduction order only (softmax and the value product over padded, masked keys: ~1e-7 in fp32).

Families: mixtral, phimoe (the project's small-moe), qwen3_moe, qwen2_moe (gated shared expert),
olmoe. Not supported: deepseek_v2/v3 (MLA attention and shared experts, untested here) and gpt_oss
(sliding-window layers and attention sinks need windowed masks that the static window does not
build): ``LeanModel`` refuses them with a clear error.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runtime.models import LoadedModel
from runtime.routing import base_model

ENGINES = ("graphed", "eager")
LEAN_FAMILIES = ("mixtral", "phimoe", "qwen3_moe", "qwen2_moe", "olmoe")
UNSUPPORTED = {
    "deepseek_v2": "MLA attention and shared experts are not wired into the lean path (untested)",
    "deepseek_v3": "MLA attention and shared experts are not wired into the lean path (untested)",
    "gpt_oss": "sliding-window layers and attention sinks need windowed masks the static KV window does not build",
}

ExpertsFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class LeanError(ValueError):
    """A model or setting the lean path cannot run (clear message, never a silent fallback)."""


def resolve_engine(engine: str | None, device: torch.device | str) -> str:
    """``graphed`` or ``eager``; None/``auto``: graphed on a CUDA device, eager elsewhere."""
    dev = torch.device(device)
    if engine in (None, "auto"):
        return "graphed" if dev.type == "cuda" else "eager"
    if engine not in ENGINES:
        raise LeanError(f"engine={engine!r}: use one of {list(ENGINES)}")
    return engine


# =============================================================================== KV cache
class StaticKV:
    """Per-layer key/value buffers ``[1, kv_heads, max_len, head_dim]``, allocated at a layer's first
    write, written at the step's positions (``index_copy_`` with a device index: capturable).

    It is handed to the HF attention modules as their cache (they call ``update``). ``n``: the
    number of valid positions for an eager step (the prefix window); None: the whole buffer
    (graphs; the mask hides what is not written yet)."""

    def __init__(self, max_len: int) -> None:
        self.max_len = int(max_len)
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.write_pos: torch.Tensor | None = None
        self.n: int | None = None

    def _buf(self, store: dict[int, torch.Tensor], layer: int, x: torch.Tensor) -> torch.Tensor:
        b = store.get(layer)
        if b is None:
            b = store[layer] = torch.zeros((x.shape[0], x.shape[1], self.max_len, x.shape[3]), dtype=x.dtype, device=x.device)
        return b

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        k = self._buf(self.k, layer_idx, key_states)
        v = self._buf(self.v, layer_idx, value_states)
        k.index_copy_(2, self.write_pos, key_states)
        v.index_copy_(2, self.write_pos, value_states)
        if self.n is None:
            return k, v
        return k[:, :, : self.n], v[:, :, : self.n]

    # what some attention code asks of a cache
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.n or 0)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.k, self.v) for t in d.values())


# =============================================================================== experts
def _gate(module: nn.Module, gu: torch.Tensor) -> torch.Tensor:
    ap = getattr(module, "_apply_gate", None)
    if ap is not None:
        return ap(gu)
    g, u = gu.chunk(2, dim=-1)
    return module.act_fn(g) * u


def _check_layout(module: nn.Module) -> None:
    if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False) or not getattr(module, "has_gate", True):
        raise LeanError(f"{type(module).__name__}: only gated, untransposed experts without biases have a grouped kernel here")
    for n in ("gate_up_proj", "down_proj"):
        if not isinstance(getattr(module, n, None), torch.Tensor) or getattr(module, n).device.type == "meta":
            raise LeanError(f"{type(module).__name__}.{n}: no resident weights (offloaded modules use the executor's callback)")


class ModuleExperts:
    """The HF experts modules' own forward (their configured experts implementation): the exact
    reference, and the eager path on the CPU."""

    capturable = False

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.modules = list(modules)

    def __call__(self, m: int, hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.modules[m](hidden, idx, w)


class GroupedExperts:
    """Every routed expert resident; per MoE layer one grouped GEMM per projection over the pool.

    ``kernel="grouped_mm"``: the (token, expert) pairs are sorted by expert on the device, group
    offsets come from a scatter-add (no host sync), and ``torch._grouped_mm`` multiplies each pair
    with its expert's weights in one launch. ``kernel="gather_bmm"`` (what transformers'
    ``batched_mm`` does): the routed experts' weights are gathered (a device copy) and multiplied
    with one batched GEMM. Either way the gate is the module's own and the weighted rows are summed
    back per token: the eager loop's arithmetic per row (bf16 GEMMs, the router's weights), other
    GEMM kernels, so equal within bf16 rounding."""

    capturable = True
    KERNELS = ("grouped_mm", "gather_bmm")

    def __init__(self, modules: Sequence[nn.Module], kernel: str = "grouped_mm") -> None:
        if kernel not in self.KERNELS:
            raise LeanError(f"grouped experts kernel {kernel!r}: use one of {list(self.KERNELS)}")
        if kernel == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
            raise LeanError(f"torch {torch.__version__} has no _grouped_mm")
        for mod in modules:
            _check_layout(mod)
        self.kernel = kernel
        self.modules = list(modules)
        self.E = int(modules[0].num_experts)
        # B operands [E, K, N] as transposed views of the [E, N, K] parameters (no copy)
        self.gu = [mod.gate_up_proj.detach().transpose(1, 2) for mod in modules]
        self.dn = [mod.down_proj.detach().transpose(1, 2) for mod in modules]

    def __call__(self, m: int, hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        T, k = idx.shape
        flat = idx.reshape(-1)
        if self.kernel == "gather_bmm":
            x = hidden.repeat_interleave(k, dim=0).unsqueeze(1)  # [T*k, 1, H], pair order (token, slot)
            h = _gate(self.modules[m], torch.bmm(x, self.gu[m].index_select(0, flat)))
            o = torch.bmm(h, self.dn[m].index_select(0, flat)).squeeze(1)
            o = o * w.reshape(-1, 1)
            return o.reshape(T, k, -1).sum(dim=1).to(hidden.dtype)
        order = torch.argsort(flat, stable=True)
        tok = torch.div(order, k, rounding_mode="floor")
        x = hidden.index_select(0, tok)
        counts = torch.zeros(self.E, dtype=torch.int32, device=hidden.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        h = _gate(self.modules[m], torch._grouped_mm(x, self.gu[m], offs=offs))
        o = torch._grouped_mm(h, self.dn[m], offs=offs)
        o = o * w.reshape(-1).index_select(0, order).unsqueeze(-1)
        out = torch.zeros_like(hidden)
        return out.index_add_(0, tok, o.to(out.dtype))


class ExecutorExperts:
    """The offloading executor's experts (``runtime.executor.Run.layer_forward`` of the active run):
    host policy, copies into slots, the eager experts loop over slot tensors. Runs between graphs."""

    capturable = False

    def __init__(self, om: Any) -> None:
        self.om = om

    def _run(self) -> Any:
        run = self.om.run
        if run is None:
            raise LeanError("offloaded experts called with no active run (OffloadedModel.start_run first)")
        return run

    def __call__(self, m: int, hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self._run().layer_forward(m, self.om.modules[m], hidden, idx, w)

    def layer_start(self, m: int) -> None:
        if self.om.run is not None:
            self.om.run.layer_start(m)


class Int4Experts:
    """The INT4 draft's routed experts, all resident: weight-only symmetric group quantization
    (runtime.quant), packed for torch's int4 kernels (tinygemm ``_weight_int4pack_mm`` on CUDA with
    bf16 activations, ``_weight_int4pack_mm_for_cpu`` on the CPU). The routed experts' packed weights
    and scales are gathered on the device (``index_select`` by the router's ids: no host sync), then
    one int4 GEMM per (token, expert) pair and projection."""

    capturable = True

    def __init__(self, modules: Sequence[nn.Module], group_size: int = 128) -> None:
        from runtime.quant import _fast_operands, fast_path_available, quantize_experts

        for mod in modules:
            _check_layout(mod)
        dev = modules[0].gate_up_proj.device
        if not fast_path_available(dev):
            raise LeanError(f"torch {torch.__version__} has no int4 packed matmul for {dev.type}")
        self.modules = list(modules)
        self.group_size = int(group_size)
        self.act_dtype = modules[0].gate_up_proj.dtype
        if dev.type == "cuda" and self.act_dtype != torch.bfloat16:
            raise LeanError("the CUDA int4 kernel (tinygemm) takes bf16 activations: load the model in bf16")
        self.cuda = dev.type == "cuda"
        self.packed: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        self.nbytes = 0
        for mod in modules:
            q = quantize_experts(mod, 4, self.group_size)
            self.nbytes += q.nbytes
            layer = {}
            for name, qw in q.weights.items():
                ops = [_fast_operands(qw.select(e), dev, self.act_dtype) for e in range(qw.qdata.shape[0])]
                layer[name] = (torch.stack([p for p, _ in ops]), torch.stack([s for _, s in ops]))
            self.packed.append(layer)
            self._check_shapes(q)

    def _check_shapes(self, q: Any) -> None:
        from runtime.quant import _tinygemm_ok

        for name, qw in q.weights.items():
            probe = torch.empty(1, qw.k, dtype=self.act_dtype, device=qw.qdata.device)
            if not _tinygemm_ok(qw.select(0), probe):
                raise LeanError(f"{name}: N={qw.n}, K={qw.k}, group {qw.group_size} do not fit the int4 kernel")

    def _mm(self, x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
        if self.cuda:
            return torch.ops.aten._weight_int4pack_mm(x, packed, self.group_size, sz)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, self.group_size, sz)

    def __call__(self, m: int, hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        T, k = idx.shape
        flat = idx.reshape(-1)
        gu_p, gu_s = self.packed[m]["gate_up_proj"]
        dn_p, dn_s = self.packed[m]["down_proj"]
        gp, gs = gu_p.index_select(0, flat), gu_s.index_select(0, flat)
        dp, ds = dn_p.index_select(0, flat), dn_s.index_select(0, flat)
        x = hidden.to(self.act_dtype)
        mod = self.modules[m]
        out = torch.zeros_like(hidden)
        wf = w.reshape(-1)
        for j in range(T * k):
            t = j // k
            h = _gate(mod, self._mm(x[t:t + 1], gp[j], gs[j]))
            o = self._mm(h, dp[j], ds[j]) * wf[j:j + 1]
            out[t:t + 1] += o.to(out.dtype)
        return out


def int4_reference(modules: Sequence[nn.Module], group_size: int = 128) -> ModuleExperts:
    """The labelled reference of ``Int4Experts``: the same quantized weights dequantized to the
    model's dtype, run by the HF modules' own loop (copies of the modules; never on a measured path)."""
    import copy

    from runtime.quant import quantize_experts

    ref = []
    for mod in modules:
        q = quantize_experts(mod, 4, group_size)
        c = copy.deepcopy(mod)
        for name, qw in q.weights.items():
            getattr(c, name).data = qw.dequantize()
        ref.append(c)
    return ModuleExperts(ref)


# =============================================================================== the model
@dataclass
class _Seg:
    """Outputs of one segment (static tensors once captured)."""

    resid: torch.Tensor | None = None  # residual stream after attention of the MoE layer [1, T, H]
    x: torch.Tensor | None = None  # experts' input (post-attention norm) [T, H]
    idx: torch.Tensor | None = None
    w: torch.Tensor | None = None
    shared: torch.Tensor | None = None  # gated shared expert output [T, H] (qwen2_moe)
    logits: torch.Tensor | None = None  # last segment: [1, V]
    next_tok: torch.Tensor | None = None  # last segment: [1, 1]


@dataclass
class _GraphSet:
    """The captured graphs of one step length T and their static inputs and outputs."""

    graphs: list  # M + 1 segment graphs
    egraphs: list  # per MoE layer: the experts graph, or None (experts called between graphs)
    segs: list  # each segment's static outputs (_Seg)
    outs: list  # each MoE layer's experts output as the next segment reads it
    tok: torch.Tensor  # [1, T] token ids
    pos: torch.Tensor  # [1, T] positions
    out_in: list  # [T, H] per MoE layer: where eager experts' outputs are copied for the next graph


class LeanModel:
    """A loaded HF MoE model run as segments between MoE layers (see the module docstring).

    ``experts``: the callback (default: the HF modules' own forward). ``graphs``: capture CUDA
    graphs for decode steps (CUDA only). ``max_len``: the static KV length (positions 0..max_len-1).
    ``layer_start(m)``: called before MoE layer m's segment (the executor's policy hook).
    ``read_routing``: wait for each MoE layer's routing on the host (what host policies need);
    False: the routing still lands in pinned memory, read after the step (``routing``).
    """

    def __init__(self, loaded: LoadedModel, *, max_len: int, experts: Any = None, graphs: bool | None = None,
                 layer_start: Callable[[int], None] | None = None, read_routing: bool = True) -> None:
        fam = loaded.family.model_type
        if fam in UNSUPPORTED:
            raise LeanError(f"family {fam!r}: not supported by the lean path ({UNSUPPORTED[fam]})")
        if fam not in LEAN_FAMILIES:
            raise LeanError(f"family {fam!r}: the lean path supports {list(LEAN_FAMILIES)}")
        self.loaded = loaded
        self.model = loaded.model
        self.base = base_model(self.model)
        self.device = loaded.device
        self.graphs = (self.device.type == "cuda") if graphs is None else bool(graphs)
        if self.graphs and self.device.type != "cuda":
            raise LeanError("graphs=True needs a CUDA device")
        self.handles = loaded.handles
        self.moe = [h.index for h in self.handles if h.is_moe]
        self.M = len(self.moe)
        self.k = int(loaded.shape.top_k)
        self.H = int(self.model.config.hidden_size)
        self.experts = experts if experts is not None else ModuleExperts([self.handles[l].experts for l in self.moe])
        self.layer_start = layer_start
        self.read_routing = read_routing
        cfg = self.model.config
        self.attn_impl = getattr(cfg, "_attn_implementation", None) or "eager"
        if self.attn_impl not in ("eager", "sdpa"):
            raise LeanError(f"attention implementation {self.attn_impl!r}: the lean path builds masks for eager and sdpa")
        max_pos = int(getattr(cfg, "max_position_embeddings", max_len) or max_len)
        rp = getattr(cfg, "rope_parameters", None) or {}
        orig = rp.get("original_max_position_embeddings") if isinstance(rp, dict) else None
        if int(max_len) > max_pos or (orig and int(max_len) > int(orig)):
            raise LeanError(f"max_len={max_len} exceeds the model's positions ({max_pos}"
                            f"{f', long-RoPE switch at {orig}' if orig else ''})")
        self.S = int(max_len)
        self.kv = StaticKV(self.S)
        params = inspect.signature(type(self.handles[0].layer.self_attn).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.dtype = loaded.dtype
        # RoPE for every position once (the rotary module's own arithmetic; long-RoPE picks its
        # factors from the largest position, so the table stays below the switch, checked above)
        with torch.inference_mode():
            pos_all = torch.arange(self.S, device=self.device).reshape(1, -1)
            probe = torch.zeros(1, 1, 1, dtype=self.dtype, device=self.device)
            cos, sin = self.base.rotary_emb(probe, position_ids=pos_all)
        self.cos, self.sin = cos, sin
        self._ar = torch.arange(self.S, device=self.device)
        self._neg = torch.finfo(self.dtype).min
        # routing to the host: ids then weights, float32, per MoE layer
        pin = self.device.type == "cuda"
        self.route_host = torch.zeros((self.M, 2 * self.k), dtype=torch.float32, pin_memory=pin)
        self.route_np = self.route_host.numpy()
        self.events = [torch.cuda.Event() for _ in range(self.M)] if pin else None
        self.step_event = torch.cuda.Event() if pin else None
        self.route_dev = torch.zeros((self.M, 2 * self.k), dtype=torch.float32, device=self.device)
        self._route_on_device = False  # the whole-step graph keeps routing on the device (ELB copies)
        self.tok = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self.pos = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self.out_in = [torch.zeros((1, self.H), dtype=self.dtype, device=self.device) for _ in range(self.M)]
        self._sets: dict[int, _GraphSet] = {}  # captured graphs per step length T
        self._graphs: list[torch.cuda.CUDAGraph] | None = None
        self._egraphs: list[torch.cuda.CUDAGraph | None] = []
        self.step_graph: torch.cuda.CUDAGraph | None = None
        self._step_out: _Seg | None = None
        self.all_logits = False  # eager steps return every position's logits [T, V] (speculative verify)

    # ------------------------------------------------------------------ pieces
    def _mask(self, T: int, pos_ids: torch.Tensor) -> torch.Tensor | None:
        n = self.kv.n
        if n is None:  # whole window: keys 0..pos of each query row
            valid = self._ar.reshape(1, -1) <= pos_ids.reshape(-1, 1)
        else:
            if self.attn_impl == "sdpa" and (T == 1 or n == T):
                return None  # transformers passes no mask here either (sdpa: is_causal for a full prefill)
            valid = self._ar[:n].reshape(1, -1) <= pos_ids.reshape(-1, 1)
        valid = valid.reshape(1, 1, T, -1)
        if self.attn_impl == "sdpa":
            return valid
        return torch.where(valid, torch.zeros((), dtype=self.dtype, device=self.device),
                           torch.full((), self._neg, dtype=self.dtype, device=self.device))

    def _attention(self, l: int, h: torch.Tensor, pe: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
        layer = self.handles[l].layer
        x = layer.input_layernorm(h)
        a, _ = layer.self_attn(hidden_states=x, position_embeddings=pe, attention_mask=mask, **{self._cache_kw: self.kv})
        return h + a

    def _dense(self, l: int, h: torch.Tensor) -> torch.Tensor:
        hd = self.handles[l]
        return h + hd.block(hd.post_norm(h))

    def _segment(self, s: int, tok: torch.Tensor, pos_ids: torch.Tensor, prev: _Seg | None, prev_out: torch.Tensor | None) -> _Seg:
        """Segment ``s``: finish MoE layer s-1 (or embed), dense layers, then MoE layer s up to its
        router (s < M), or the final norm, head and argmax (s == M)."""
        T = tok.shape[1]
        self.kv.write_pos = pos_ids.reshape(-1)
        pe = (self.cos.index_select(1, pos_ids.reshape(-1)), self.sin.index_select(1, pos_ids.reshape(-1)))
        mask = self._mask(T, pos_ids)
        if s == 0:
            h = self.base.embed_tokens(tok)
            first = 0
        else:
            out = prev_out if prev.shared is None else prev_out + prev.shared
            h = prev.resid + out.reshape(prev.resid.shape)
            first = self.moe[s - 1] + 1
        last = self.moe[s] if s < self.M else len(self.handles)
        for l in range(first, last):
            h = self._dense(l, self._attention(l, h, pe, mask))
        if s == self.M:
            h = self.base.norm(h)
            if self.all_logits and T > 1:
                logits = self.model.lm_head(h)[0]
                return _Seg(logits=logits, next_tok=logits.argmax(-1).reshape(1, -1))
            logits = self.model.lm_head(h[:, -1:, :])[:, -1, :]
            return _Seg(logits=logits, next_tok=logits.argmax(-1).reshape(1, 1))
        l = self.moe[s]
        hd = self.handles[l]
        h = self._attention(l, h, pe, mask)
        x = hd.post_norm(h).reshape(-1, self.H)
        _, w, idx = hd.router(x)
        shared = None
        if getattr(hd.block, "shared_expert", None) is not None:
            shared = F.sigmoid(hd.block.shared_expert_gate(x)) * hd.block.shared_expert(x)
        seg = _Seg(resid=h, x=x, idx=idx, w=w, shared=shared)
        if T == 1:
            r = torch.cat([idx.reshape(-1).float(), w.reshape(-1).float()])
            if self._route_on_device:
                self.route_dev[s].copy_(r)
            else:
                self.route_host[s].copy_(r, non_blocking=True)
        return seg

    # ------------------------------------------------------------------ eager steps
    def reset(self) -> None:
        """A new request: nothing to clear (positions restart at 0; the prefix window and the mask
        never read what a previous request wrote beyond the current position)."""

    def _set_pos(self, start: int, T: int) -> torch.Tensor:
        if T == 1:
            self.pos.fill_(start)  # the value travels as a kernel argument: no host buffer to race on
            return self.pos
        return torch.arange(start, start + T, device=self.device).reshape(1, T)

    def forward_eager(self, ids: torch.Tensor, start: int, n: int | None) -> torch.Tensor:
        """One step over ``ids`` [1, T] at positions start..start+T-1, attending over the first ``n``
        cached positions (n = start + T), or (None) over the whole masked window as the graphs do.
        Returns the last position's logits [1, V] (every position's [T, V] with ``all_logits``)."""
        T = ids.shape[1]
        pos_ids = self._set_pos(start, T)
        self.kv.n = None if n is None else int(n)
        prev, prev_out = None, None
        for s in range(self.M + 1):
            if s < self.M and self.layer_start is not None:
                self.layer_start(s)
            seg = self._segment(s, ids, pos_ids, prev, prev_out)
            if s == self.M:
                return seg.logits
            if T == 1 and self.events is not None:
                self.events[s].record()
            prev_out = self.experts(s, seg.x, seg.idx, seg.w)
            prev = seg
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ graphs
    def _capture(self, T: int) -> _GraphSet:
        """Capture the M + 1 segment graphs (and one graph per layer for capturable experts) of a
        T-token step (T = 1: decode; T = k + 1: a speculative verify pass), after one warm-up pass
        on a side stream (cuBLAS handles, autotuned kernels). The warm-up writes positions
        max_len - T .. max_len - 1 of the cache: masked until a step reaches them, then overwritten
        by that step. Each T has its own memory pool: its graphs share one and are always replayed
        together in capture order (a graph's scratch may hold a later graph's input between their
        replays), while sets of different T interleave freely."""
        dev = self.device
        tok = self.tok if T == 1 else torch.zeros((1, T), dtype=torch.long, device=dev)
        pos = self.pos if T == 1 else torch.zeros((1, T), dtype=torch.long, device=dev)
        out_in = self.out_in if T == 1 else [torch.zeros((T, self.H), dtype=self.dtype, device=dev) for _ in range(self.M)]
        pool = torch.cuda.graph_pool_handle()
        self.kv.n = None
        pos.copy_(self._ar[self.S - T:].reshape(1, T))
        all_logits, self.all_logits = self.all_logits, T > 1  # a verify pass needs every position's logits
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        try:
            with torch.cuda.stream(side):
                for _ in range(2):
                    prev, prev_out = None, None
                    for s in range(self.M + 1):
                        seg = self._segment(s, tok, pos, prev, prev_out)
                        if s < self.M:
                            prev_out = self.experts(s, seg.x, seg.idx, seg.w) if self.experts.capturable else out_in[s]
                            prev = seg
            torch.cuda.current_stream(dev).wait_stream(side)
            torch.cuda.synchronize(dev)
            graphs, egraphs, segs, outs = [], [], [], []
            prev, prev_out = None, None
            for s in range(self.M + 1):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    seg = self._segment(s, tok, pos, prev, prev_out)
                graphs.append(g)
                segs.append(seg)
                if s == self.M:
                    break
                if self.experts.capturable:
                    eg = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(eg, pool=pool):
                        prev_out = self.experts(s, seg.x, seg.idx, seg.w)
                    egraphs.append(eg)
                else:
                    egraphs.append(None)
                    prev_out = out_in[s]
                outs.append(prev_out)
                prev = seg
        finally:
            self.all_logits = all_logits
        torch.cuda.synchronize(dev)
        return _GraphSet(graphs, egraphs, segs, outs, tok, pos, out_in)

    def _warm_and_capture(self) -> None:
        """The one-token decode graphs (``_graphs``, ``_egraphs``: the kernel-floor and
        profile code reads them)."""
        gs = self._capture(1)
        self._sets[1] = gs
        self._graphs, self._egraphs = gs.graphs, gs.egraphs

    def forward_graphed(self, ids: torch.Tensor | None, position: int) -> torch.Tensor:
        """One step of ``ids`` [1, T] at positions position..position+T-1 through the captured graphs
        of that T (captured at first use; ``ids`` None: one token, the previous step's argmax).
        Returns the last position's logits [1, V] (T = 1) or every position's [T, V]."""
        T = 1 if ids is None else int(ids.shape[1])
        if T == 1 and self._graphs is None:
            self._warm_and_capture()
        gs = self._sets.get(T)
        if gs is None:
            gs = self._sets[T] = self._capture(T)
        if ids is not None:
            gs.tok.copy_(ids.reshape(1, T), non_blocking=True)
        else:
            gs.tok.copy_(gs.segs[-1].next_tok)
        if T == 1:
            gs.pos.fill_(position)
        else:
            torch.add(self._ar[:T], int(position), out=gs.pos[0])
        for s in range(self.M):
            if self.layer_start is not None:
                self.layer_start(s)
            gs.graphs[s].replay()
            self.events[s].record()
            seg = gs.segs[s]
            eg = gs.egraphs[s]
            if eg is not None:
                if self.read_routing and T == 1:
                    self.events[s].synchronize()
                eg.replay()
            else:
                out = self.experts(s, seg.x, seg.idx, seg.w)
                gs.out_in[s].copy_(out)
        gs.graphs[self.M].replay()
        return gs.segs[self.M].logits

    def capture_step(self) -> None:
        """Capture a whole one-token decode step (every segment and capturable experts) as ONE graph:
        no host work between layers at all (the kernel floor; the draft's per-token graph). Its
        routing stays on the device (``route_dev``); ``step_one_graph`` copies it to the host."""
        if not self.experts.capturable:
            raise LeanError("capture_step needs capturable experts (GroupedExperts, Int4Experts)")
        if self._graphs is None:
            self._warm_and_capture()  # warm-up and allocation of the cache
        g = torch.cuda.CUDAGraph()
        self.kv.n = None
        self._route_on_device = True
        try:
            with torch.cuda.graph(g, pool=torch.cuda.graph_pool_handle()):
                prev, prev_out = None, None
                for s in range(self.M + 1):
                    seg = self._segment(s, self.tok, self.pos, prev, prev_out)
                    if s < self.M:
                        prev_out = self.experts(s, seg.x, seg.idx, seg.w)
                        prev = seg
        finally:
            self._route_on_device = False
        self.step_graph, self._step_out = g, seg
        torch.cuda.synchronize(self.device)

    def step_one_graph(self, position: int, elb: torch.Tensor | None = None, feed_back: bool = True) -> torch.Tensor:
        """One token through the whole-step graph. ``elb``: a pinned [M, 2k] host row that receives
        this token's routing of every MoE layer (asynchronously; read it after ``step_event``).
        ``feed_back``: the token is the previous step's argmax (a device-side copy)."""
        if self.step_graph is None:
            self.capture_step()
        if feed_back:
            self.tok.copy_(self._step_out.next_tok)
        self.pos.fill_(position)
        self.step_graph.replay()
        if elb is not None:
            elb.copy_(self.route_dev, non_blocking=True)
        self.step_event.record()
        return self._step_out.logits

    # ------------------------------------------------------------------ the driver's interface
    def forward(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Logits [1, V] of the last of ``ids`` [1, T] placed at positions start..start+T-1: one-token
        steps through the graphs when ``graphs``, everything else (prefill, the CPU) eagerly
        (``forward_graphed`` takes T > 1 too: the speculative verify pass)."""
        if self.graphs and ids.shape[1] == 1:
            return self.forward_graphed(ids, int(start))
        return self.forward_eager(ids, int(start), int(start) + ids.shape[1])

    def routing(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """MoE layer m's routing of the last one-token step (ids [1, k] int64, weights [1, k]) from
        pinned memory, after waiting for that layer's event (host only; no stream sync)."""
        if self.events is not None:
            self.events[m].synchronize()
        r = self.route_np[m]
        return r[: self.k].astype(np.int64).reshape(1, -1), r[self.k:].reshape(1, -1).copy()
