"""The offloaded model: a transformers MoE model whose routed experts live in a host store and run
from device slots, installed through the experts-implementation seam
(``ExpertsInterface.register`` + ``config._experts_implementation``), so every family of
``runtime.models.FAMILIES`` runs offloaded. It owns the host store and slots across runs
(repetitions, policies, budgets); each run is a ``runtime.executor.Run``.

The experts computation is the transformers eager loop re-done on slot tensors: experts in
ascending id order, the same tensor operations on the same token rows, accumulation with
``index_add_`` in the same order. So offloaded logits equal the non-offloaded eager model's bit for
bit in fp32 on the CPU (tests/test_runtime_executor.py checks every family), and on the GPU in bf16
within rounding of kernel choice (the same kernels in practice).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from runtime.backends import Backend, CudaBackend, make_backend
from runtime.errors import ExecutorError
from runtime.executor import Run, RunConfig
from runtime.models import LoadedModel
from runtime.routing import experts_call_args
from runtime.store import HostStore, view_part
from sim.cache import ABSENT, RESIDENT

IMPLEMENTATION = "moe_offload"


class _LayerHandle:
    """Attached to each experts module: routes its forward to the active run."""

    def __init__(self, om: "OffloadedModel", m: int) -> None:
        self.om, self.m = om, m

    def forward(self, module, hidden, idx, w):
        run = self.om.run
        if run is None:
            raise ExecutorError("offloaded experts called with no active run (OffloadedModel.start_run first)")
        return run.layer_forward(self.m, module, hidden, idx, w)


def _offload_experts_forward(self, *args, **kwargs):
    """The experts forward registered as ``moe_offload`` in transformers' ExpertsInterface."""
    hidden, idx, w = experts_call_args(args, kwargs)
    h = getattr(self, "_moe_offload", None)
    if h is None:
        raise ExecutorError(f"{type(self).__name__}: experts implementation '{IMPLEMENTATION}' without an executor attached")
    return h.forward(self, hidden, idx, w)


def register_implementation() -> None:
    """Register the offloading experts forward (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(IMPLEMENTATION, _offload_experts_forward)


_SUPPORTED_LAYOUTS = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "deepseek_v2", "deepseek_v3", "gpt_oss"}


class OffloadedModel:
    """A transformers MoE model whose routed experts live in a host store and run from GPU slots.

    Built from a ``LoadedModel`` (its experts still in place, on the device or the CPU): the experts
    are packed into the host store, the module parameters are replaced by meta tensors (freeing
    their memory) and the experts implementation is switched to ``moe_offload``. ``max_slots`` sizes
    the device slot pool once; each run uses any number of slots up to it.
    """

    def __init__(self, loaded: LoadedModel, *, max_slots: int, host_memory: str = "pinned",
                 backend: Backend | None = None, cpu_backend: str = "sync", record_routing: bool = False) -> None:
        t0 = time.perf_counter()
        self.loaded = loaded
        fam = loaded.family.model_type
        if fam not in _SUPPORTED_LAYOUTS:
            raise ExecutorError(f"family {fam!r}: the executor's experts loop supports {sorted(_SUPPORTED_LAYOUTS)}")
        self.model = loaded.model
        self.device = loaded.device
        self.handles = loaded.moe_handles
        self.modules = [h.experts for h in self.handles]
        self.M = len(self.modules)
        self.E = int(loaded.shape.num_experts)
        self.top_k = int(loaded.shape.top_k)
        self.backend = backend or make_backend(self.device, cpu_backend)
        self.record_routing = record_routing
        mod0 = self.modules[0]
        self.transposed = bool(getattr(mod0, "is_transposed", False))
        self.has_bias = bool(getattr(mod0, "has_bias", False))
        if not getattr(mod0, "has_gate", True):
            raise ExecutorError(f"{type(mod0).__name__}: experts without a gate projection are not supported")
        self.store = HostStore(self.modules, host_memory, self.device)
        self.parts = self.store.parts
        self.nbytes = self.store.nbytes
        self.names = [p.name for p in self.parts]
        self.num_slots = int(max_slots)
        if self.num_slots < self.top_k:
            raise ExecutorError(f"max_slots={max_slots} is fewer than top_k={self.top_k}")
        self.pool = self.backend.alloc((self.num_slots, self.nbytes))
        self.slot_bytes = [self.pool[s] for s in range(self.num_slots)]
        self.slot_views = [{p.name: view_part(self.pool[s], p) for p in self.parts} for s in range(self.num_slots)]
        # free the module parameters (meta tensors keep shape and dtype for anything that asks)
        for mod in self.modules:
            for p in self.parts:
                old = getattr(mod, p.name)
                setattr(mod, p.name, nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device="meta"), requires_grad=False))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        register_implementation()
        self._saved_impl: dict[int, tuple[Any, Any]] = {}
        for m, mod in enumerate(self.modules):
            mod._moe_offload = _LayerHandle(self, m)
            cfg = mod.config
            if id(cfg) not in self._saved_impl:
                self._saved_impl[id(cfg)] = (cfg, cfg._experts_implementation)
                cfg._experts_implementation = IMPLEMENTATION
        mc = self.model.config
        if id(mc) not in self._saved_impl:
            self._saved_impl[id(mc)] = (mc, mc._experts_implementation)
            mc._experts_implementation = IMPLEMENTATION
        self._hooks = [h.layer.register_forward_pre_hook(self._layer_pre(m)) for m, h in enumerate(self.handles)]
        self.run: Run | None = None
        self.copy_s: float | None = None  # measured time of one expert copy (CUDA; pacing reference)
        self.setup_s = time.perf_counter() - t0

    # ------------------------------------------------------------------ runs
    def _layer_pre(self, m: int):
        def hook(module, args, *rest):
            if self.run is not None:
                self.run.layer_start(m)
            return None

        return hook

    def start_run(self, rc: RunConfig) -> Run:
        if self.run is not None and not self.run.finished:
            raise ExecutorError("a run is still active")
        self.run = Run(self, rc)
        return self.run

    def end_run(self) -> Run:
        run = self.run
        if run is None:
            raise ExecutorError("no active run")
        if not run.finished:
            run.finish()
        self.run = None
        return run

    def close(self) -> None:
        """Detach from the model (experts implementation restored, hooks removed, host memory unpinned).
        The experts' parameters stay meta: the model cannot compute its experts afterwards."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for mod in self.modules:
            if hasattr(mod, "_moe_offload"):
                del mod._moe_offload
        for cfg, impl in self._saved_impl.values():
            cfg._experts_implementation = impl
        self._saved_impl = {}
        self.store.close()
        self.backend.close()

    def restore_experts(self, device: torch.device | str | None = None) -> None:
        """Put the experts back into the modules as ordinary parameters (on ``device``, default the
        model's), e.g. for a resident reference run after the offloaded ones."""
        dev = torch.device(device) if device is not None else self.device
        for m, mod in enumerate(self.modules):
            for p in self.parts:
                t = torch.empty((self.E, *p.shape), dtype=p.dtype, device=dev)
                for e in range(self.E):
                    t[e].copy_(self.store.tensor(m * self.E + e, p))
                setattr(mod, p.name, nn.Parameter(t, requires_grad=False))

    def measure_copy(self, reps: int = 8) -> float:
        """Bytes/s of one expert's host-to-device copy on the copy stream (median of ``reps``
        back-to-back copies, CUDA events); sets ``copy_s``, the pacing reference."""
        be = self.backend
        if not isinstance(be, CudaBackend):
            return float("nan")
        times = []
        for i in range(reps + 2):
            s, e = be.copy(self.slot_bytes[0], self.store.expert(i % (self.M * self.E)), None, 0.0)
            e.synchronize()
            if i >= 2:
                times.append(s.elapsed_time(e) / 1e3)
        times.sort()
        self.copy_s = times[len(times) // 2]
        return self.nbytes / self.copy_s

    def preload(self, run: Run, keys: Sequence[int]) -> None:
        """Make ``keys`` resident before measuring (not counted: a warm cache)."""
        cache = run.cache
        for key in keys:
            if cache.state[key] == ABSENT:
                if not cache.load(key, 0.0, 0):
                    raise ExecutorError(f"no free slot to preload key {key}")
                self.backend.copy(self.slot_bytes[cache.slot_of[key]], self.store.expert(key), None, 0.0, (0.0, 0.0, 0.0))
                cache.state[key] = RESIDENT
        self.backend.synchronize()

    # ------------------------------------------------------------------ experts computation
    def compute(self, module: nn.Module, hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                ids: list[list[int]], rows: dict[int, tuple[list[int], list[int]]] | None,
                experts: list[int], slots: dict[int, int], out: torch.Tensor) -> torch.Tensor:
        """The eager experts loop on slot tensors, for ``experts`` (ascending), accumulated into ``out``."""
        gu_name, d_name = "gate_up_proj", "down_proj"
        tr, bias = self.transposed, self.has_bias
        apply_gate = getattr(module, "_apply_gate", None)
        act = getattr(module, "act_fn", None)
        if len(ids) == 1:
            row = ids[0]
            for e in experts:
                v = self.slot_views[slots[e]]
                pos = row.index(e)
                cur = hidden
                gu = cur @ v[gu_name] if tr else F.linear(cur, v[gu_name])
                if bias:
                    gu = gu + v[gu_name + "_bias"]
                h = apply_gate(gu) if apply_gate is not None else _gate(act, gu)
                o = h @ v[d_name] if tr else F.linear(h, v[d_name])
                if bias:
                    o = o + v[d_name + "_bias"]
                o = o * w[:, pos:pos + 1]
                out.add_(o.to(out.dtype))
            return out
        assert rows is not None
        tok_all: list[int] = []
        pos_all: list[int] = []
        spans = []
        for e in experts:
            t, p = rows[e]
            spans.append((e, len(tok_all), len(t)))
            tok_all += t
            pos_all += p
        both = torch.tensor(tok_all + pos_all, dtype=torch.long).to(hidden.device, non_blocking=True)
        n = len(tok_all)
        for e, a, c in spans:
            v = self.slot_views[slots[e]]
            token_idx, top_k_pos = both[a:a + c], both[n + a:n + a + c]
            cur = hidden[token_idx]
            gu = cur @ v[gu_name] if tr else F.linear(cur, v[gu_name])
            if bias:
                gu = gu + v[gu_name + "_bias"]
            h = apply_gate(gu) if apply_gate is not None else _gate(act, gu)
            o = h @ v[d_name] if tr else F.linear(h, v[d_name])
            if bias:
                o = o + v[d_name + "_bias"]
            o = o * w[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, o.to(out.dtype))
        return out


def _gate(act, gu: torch.Tensor) -> torch.Tensor:
    gate, up = gu.chunk(2, dim=-1)
    return act(gate) * up
