"""The GPU memory budget: the one definition the simulator and the runtime share.

    budget (hardware.memory_gb, GB = 1e9 bytes)
        = non-expert weights (bf16) + KV cache of the longest request + workspace + X

X is what is left for experts. An autoregressive policy spends all of X on expert slots (one slot
holds one routed expert at the model's expert dtype); speculative decoding with a resident draft
(``draft_resident=True``) first spends X on every routed expert in INT4, then the rest on slots.
Slots form one global pool, or per-layer partitions of ``per_layer`` slots in every MoE layer.
A budget that cannot run raises ``InfeasibleError`` whose message says what is short and by how much.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from sim.errors import InfeasibleError, SimError
from sim.hardware import HardwareSpec
from sim.spec import ModelSpec

LAYOUTS = ("global", "per_layer")


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB"


@dataclass(frozen=True)
class MemoryPlan:
    """Where the budget goes. Bytes are exact integers; ``slots`` is the total over all pools."""

    budget_bytes: int
    non_expert_bytes: int
    kv_bytes: int
    workspace_bytes: int
    draft_bytes: int  # resident INT4 draft experts (0 without a resident draft)
    expert_budget_bytes: int  # X = budget - non-expert - KV - workspace (the draft comes out of it)
    slot_bytes: int  # one slot = one routed expert at the model's expert dtype
    slots: int
    per_layer: int | None  # slots in each MoE layer's partition; None = one global pool
    layout: str  # "global" | "per_layer"
    all_resident: bool  # every routed expert has a slot: no transfers after warm-up
    max_context_tokens: int = 0
    resident_layers: int | None = None  # whole-layer streaming: MoE layers kept on the GPU (None: not streaming)

    @property
    def slot_budget_bytes(self) -> int:
        """What is left for slots after the draft."""
        return self.expert_budget_bytes - self.draft_bytes

    @property
    def slots_bytes(self) -> int:
        return self.slots * self.slot_bytes

    @property
    def unused_bytes(self) -> int:
        return self.slot_budget_bytes - self.slots_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        pool = f"{self.per_layer} per layer" if self.layout == "per_layer" else "one global pool"
        draft = f", INT4 draft {_gb(self.draft_bytes)}" if self.draft_bytes else ""
        return (
            f"budget {_gb(self.budget_bytes)} = non-expert {_gb(self.non_expert_bytes)} + KV {_gb(self.kv_bytes)}"
            f" ({self.max_context_tokens} tokens) + workspace {_gb(self.workspace_bytes)} + experts "
            f"{_gb(self.expert_budget_bytes)}{draft}: {self.slots} slots of {self.slot_bytes / 2**20:.2f} MiB ({pool})"
            + (", all experts resident" if self.all_resident else "")
            + (f", {self.resident_layers} whole layers resident, the rest streamed through one layer's slots"
               if self.resident_layers is not None and not self.all_resident else "")
        )


def plan_memory(
    model: ModelSpec,
    hw: HardwareSpec,
    *,
    max_context_tokens: int,
    slots: int | None = None,
    per_layer: int | None = None,
    draft_resident: bool = False,
    streaming: bool = False,
) -> MemoryPlan:
    """Split ``hw.memory_gb`` (GB = 1e9 bytes) into non-expert weights, the KV cache of a request
    of ``max_context_tokens`` tokens, the workspace and X for experts (see the module docstring).

    Slots: by default as many as fit in X (after the draft), one global pool capped at all routed
    experts; ``slots=N`` sets one global pool of N (capped at all routed experts) and ``per_layer=N``
    a partition of N slots (N <= num_experts) in each MoE layer; both are checked against X.
    Raises InfeasibleError if the non-expert weights alone exceed the budget, if nothing is left
    for experts, if the draft does not fit or leaves no slot, if a pool holds fewer slots than
    top_k (a token's experts at a layer are in use together), or if the slots asked for do not fit.

    ``streaming`` (whole-layer streaming, accelerate's offload): one global pool holds as many whole
    MoE layers as fit beside one layer's worth of slots for the streamed layers
    (``resident_layers``); ``slots`` counts only the slots it uses. Fewer slots than one layer's
    experts is infeasible.
    """
    if slots is not None and per_layer is not None:
        raise SimError("set either cache.slots (one global pool) or cache.per_layer (per-layer partitions), not both")
    try:
        ctx = int(max_context_tokens)
    except (TypeError, ValueError):
        raise SimError(f"max_context_tokens must be an integer, got {max_context_tokens!r}") from None
    if ctx < 1:
        raise SimError(f"max_context_tokens must be >= 1, got {max_context_tokens}")
    name = f"{model.name} on {hw.name} (hardware.memory_gb={hw.memory_gb:g})"
    split = _split_budget(model, hw, ctx, draft_resident, name)
    slot = model.bytes_per_expert()
    fixed = (split.budget, split.non_expert, split.kv, split.work, split.draft, split.x, slot)
    what = "after the INT4 draft" if draft_resident else "for experts"
    if per_layer is not None:
        n = _per_layer_slots(model, per_layer, split.avail, name, what)
        return MemoryPlan(*fixed, n * model.num_moe_layers, n, "per_layer", n == model.num_experts, ctx)
    n = _global_slots(model, slots, split, name, what, draft_resident)
    if streaming:
        n, layers = _streamed_slots(model, n, name)
        return MemoryPlan(*fixed, n, None, "global", layers == model.num_moe_layers, ctx, layers)
    return MemoryPlan(*fixed, n, None, "global", n >= model.num_routed_experts_total, ctx)


def budget_for_slots(model: ModelSpec, hw: HardwareSpec, *, max_context_tokens: int, slots: int,
                     draft_resident: bool = True) -> int:
    """The budget in bytes at which ``plan_memory`` gives exactly ``slots`` slots in one global pool:
    non-expert weights + KV cache + workspace (``hw``'s) + the INT4 draft (when resident) + the slots,
    nothing left over. The inverse of ``plan_memory``, so that a measured run's cache size (a
    speculative policy's slots) becomes a GPU memory every other policy can be given; at that budget
    an autoregressive policy gets ``slots + draft bytes // slot bytes`` slots (capped at every routed
    expert). A SimError for a slot count outside [top_k, every routed expert]."""
    n, k, total = int(slots), model.top_k, model.num_routed_experts_total
    if not k <= n <= total:
        raise SimError(f"{model.name}: a budget of {slots} slots must be in [top_k={k}, every routed expert={total}]")
    draft = model.routed_expert_bytes_total("int4") if draft_resident else 0
    return (model.non_expert_bytes + model.kv_bytes(int(max_context_tokens)) + hw.workspace_bytes + draft
            + n * model.bytes_per_expert())


class _Split(NamedTuple):
    budget: int
    non_expert: int
    kv: int
    work: int
    x: int  # left for experts
    draft: int  # of x, the resident INT4 draft

    @property
    def avail(self) -> int:
        """Left for slots."""
        return self.x - self.draft


def _split_budget(model: ModelSpec, hw: HardwareSpec, ctx: int, draft_resident: bool, name: str) -> _Split:
    """Budget = non-expert + KV + workspace + X, and the draft out of X; infeasible if X is gone."""
    budget = hw.memory_bytes
    non_expert = model.non_expert_bytes
    kv = model.kv_bytes(ctx)
    work = hw.workspace_bytes
    if non_expert > budget:
        raise InfeasibleError(
            f"{name}: the non-expert weights alone ({_gb(non_expert)}) exceed the budget of {_gb(budget)} "
            f"(short by {_gb(non_expert - budget)})",
            non_expert - budget,
        )
    x = budget - non_expert - kv - work
    if x <= 0:
        raise InfeasibleError(
            f"{name}: non-expert weights {_gb(non_expert)} + KV cache {_gb(kv)} ({ctx} tokens) + workspace "
            f"{_gb(work)} = {_gb(non_expert + kv + work)} leave no room for experts in the budget of {_gb(budget)} "
            f"(short by {_gb(-x)} before a single expert slot)",
            -x,
        )
    draft = model.routed_expert_bytes_total("int4") if draft_resident else 0
    if draft > x:
        raise InfeasibleError(
            f"{name}: the resident INT4 draft experts need {_gb(draft)} but only {_gb(x)} is left for experts "
            f"after non-expert weights, KV cache and workspace (short by {_gb(draft - x)})",
            draft - x,
        )
    return _Split(budget, non_expert, kv, work, x, draft)


def _per_layer_slots(model: ModelSpec, per_layer: int, avail: int, name: str, what: str) -> int:
    """``cache.per_layer``: N slots (top_k <= N <= num_experts) in every MoE layer, if they fit."""
    n, k = int(per_layer), model.top_k
    if not 1 <= n <= model.num_experts:
        raise SimError(f"cache.per_layer={per_layer} must be in [1, num_experts={model.num_experts}]")
    if n < k:
        raise InfeasibleError(
            f"{name}: cache.per_layer={n} is fewer slots than top_k={k} in each layer's partition: "
            f"a token's {k} experts at a layer must be resident together",
        )
    total = n * model.num_moe_layers
    need = total * model.bytes_per_expert()
    if need > avail:
        raise InfeasibleError(
            f"{name}: cache.per_layer={n} needs {total} slots = {_gb(need)} but only {_gb(avail)} is left "
            f"{what} (short by {_gb(need - avail)})",
            need - avail,
        )
    return n


def _global_slots(model: ModelSpec, slots: int | None, split: _Split, name: str, what: str,
                  draft_resident: bool) -> int:
    """One global pool: ``cache.slots`` if it fits, else as many as the budget holds; capped at
    every routed expert and at least top_k."""
    slot, k, avail = model.bytes_per_expert(), model.top_k, split.avail
    total_experts = model.num_routed_experts_total
    if slots is not None:
        n = int(slots)
        if n < 1:
            raise SimError(f"cache.slots must be >= 1, got {slots}")
        if n < k:
            raise InfeasibleError(
                f"{name}: cache.slots={n} is fewer than top_k={k}: a token's {k} experts at a layer must be "
                "resident together",
            )
        n = min(n, total_experts)
        need = n * slot
        if need > avail:
            raise InfeasibleError(
                f"{name}: cache.slots={slots} needs {_gb(need)} but only {_gb(avail)} is left {what} "
                f"(short by {_gb(need - avail)})",
                need - avail,
            )
        return n
    n = min(avail // slot, total_experts)
    if n < k:
        short = k * slot - avail
        if draft_resident and n < 1:
            why = f"the resident INT4 draft ({_gb(split.draft)}) leaves {_gb(avail)}, not one slot of {slot / 2**20:.1f} MiB"
        else:
            why = f"the {_gb(avail)} left {what} holds {n} slot(s) of {slot / 2**20:.1f} MiB, fewer than top_k={k}"
        raise InfeasibleError(f"{name}: {why} (short by {_gb(short)} for {k} slots)", short)
    return int(n)


def _streamed_slots(model: ModelSpec, n: int, name: str) -> tuple[int, int]:
    """Whole-layer streaming in a pool of n slots: the slots it uses and the layers it keeps."""
    from sim.policies.prefetch import streamed_resident_layers

    E, M, slot = model.num_experts, model.num_moe_layers, model.bytes_per_expert()
    if n < E:
        raise InfeasibleError(
            f"{name}: whole-layer streaming needs one MoE layer's {E} experts on the GPU at once "
            f"({_gb(E * slot)}) but {n} slot(s) fit (short by {_gb((E - n) * slot)})",
            (E - n) * slot,
        )
    layers = streamed_resident_layers(n, E, M)
    return (model.num_routed_experts_total if layers == M else (layers + 1) * E), layers
