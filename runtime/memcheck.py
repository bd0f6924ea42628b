"""Will the run fit? Host and GPU memory of ``python -m runtime`` estimated from the config before
anything is built, so that a run that cannot fit is refused with the numbers instead of being
killed by the OS minutes later.

What the runtime holds (runtime.models.load_model, runtime.executor.OffloadedModel):

- building: the whole model at the run's weight dtype on the compute device (random weights are
  created there; a checkpoint is loaded there with ``device_map``);
- then the routed experts are copied into the host store (pinned beside a GPU) and the module
  copies freed: the host peak is the store, plus the whole model when the compute device is the CPU;
- on the GPU afterwards: the simulator's memory plan (non-expert weights, KV cache, workspace, slots).

The estimate counts weights and the store exactly from the model spec; activations and the
framework's own memory are covered by a margin (``HEADROOM``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import MemoryCheckError

GB = 1e9
HEADROOM = 1.10  # activations, allocator slack, the framework's own buffers
BASE_HOST_BYTES = int(1.5e9)  # the Python process with torch and transformers imported
WEIGHT_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes the run needs, and what each peak is made of (for the refusal's message)."""

    host_bytes: int
    gpu_bytes: int
    host_parts: dict[str, int]
    gpu_parts: dict[str, int]


def weight_bytes(dtype: str, device: str, random_weights: bool, checkpoint_dtype: str | None = None) -> int:
    """Bytes per weight of the run's dtype, resolved as runtime.models.resolve_dtype does."""
    if dtype in (None, "auto"):
        if not random_weights and checkpoint_dtype in WEIGHT_BYTES:
            return WEIGHT_BYTES[checkpoint_dtype]
        return 2 if device == "cuda" else 4
    if dtype not in WEIGHT_BYTES:
        raise MemoryCheckError(f"dtype={dtype!r}: use one of auto, {sorted(WEIGHT_BYTES)}")
    return WEIGHT_BYTES[dtype]


def estimate(spec: Any, *, device: str, wbytes: int, gpu_plan_bytes: int = 0) -> MemoryEstimate:
    """Peak host and GPU bytes of a run of ``spec`` (sim.spec.ModelSpec) at ``wbytes`` per weight.

    ``gpu_plan_bytes``: the steady-state GPU use of the simulator's memory plan (non-expert weights,
    KV cache, workspace and slots) when the device is a GPU."""
    expert_params = spec.num_routed_experts_total * (spec.expert_params + spec.expert_bias_params)
    model = wbytes * (spec.non_expert_params + expert_params)
    store = wbytes * expert_params
    host = {"process": BASE_HOST_BYTES, "expert store": store}
    gpu: dict[str, int] = {}
    if device == "cuda":
        gpu = {"whole model while it is built": model}
        if gpu_plan_bytes > model:
            gpu = {"memory plan (weights, KV, workspace, slots)": gpu_plan_bytes}
    else:
        host["whole model while it is built"] = model
    return MemoryEstimate(int(HEADROOM * sum(host.values())), int(HEADROOM * sum(gpu.values())), host, gpu)


def available_host_bytes() -> int | None:
    """MemAvailable, or the cgroup's remaining limit when that is lower (containers, SLURM)."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            left = int(limit) - used
            avail = left if avail is None else min(avail, left)
    except (OSError, ValueError):
        pass
    return avail


def available_gpu_bytes(device: str) -> int | None:
    try:
        import torch

        if device == "cuda" and torch.cuda.is_available():
            return int(torch.cuda.mem_get_info()[0])
    except Exception:  # noqa: BLE001 - no driver: nothing to check against
        return None
    return None


def _gb(n: int) -> str:
    return f"{n / GB:.1f} GB"


def _parts(parts: dict[str, int]) -> str:
    return " + ".join(f"{k} {_gb(v)}" for k, v in parts.items())


def check(est: MemoryEstimate, *, host_available: int | None, gpu_available: int | None, what: str) -> None:
    """Refuse (MemoryCheckError) when a peak exceeds what is available, with both numbers."""
    if host_available is not None and est.host_bytes > host_available:
        raise MemoryCheckError(
            f"{what} needs about {_gb(est.host_bytes)} of host memory ({_parts(est.host_parts)}, +"
            f"{round((HEADROOM - 1) * 100)}% margin) but {_gb(host_available)} is available "
            f"(short by {_gb(est.host_bytes - host_available)}); use a smaller model or model.layers=N")
    if gpu_available is not None and est.gpu_bytes > gpu_available:
        raise MemoryCheckError(
            f"{what} needs about {_gb(est.gpu_bytes)} of GPU memory ({_parts(est.gpu_parts)}, +"
            f"{round((HEADROOM - 1) * 100)}% margin) but {_gb(gpu_available)} is free "
            f"(short by {_gb(est.gpu_bytes - gpu_available)}); use model.layers=N or a smaller budget")


def spec_of(cfg: Any) -> tuple[Any, bool, str | None]:
    """(ModelSpec, random weights?, checkpoint dtype) of the run's model, without loading it; None
    for the spec where the model's shape is not known before it is built (tiny-<family>)."""
    from sim.spec import ModelSpec

    source = cfg.get("source")
    if not source:
        return ModelSpec.from_cfg(cfg.model), True, None
    path = Path(str(source))
    cfg_json = path / "config.json" if path.is_dir() else path if path.suffix == ".json" else None
    if cfg_json is None or not cfg_json.is_file():
        return None, True, None  # tiny-<family> (small), or a source load_model will name as missing
    try:
        d = json.loads(cfg_json.read_text())
        spec = ModelSpec.from_hf_config(d, name=path.name)
    except (OSError, ValueError):
        return None, True, None  # load_model gives the precise error
    if cfg.get("layers") is not None:
        spec = spec.with_layers(int(cfg.layers))
    return spec, not path.is_dir(), str(d.get("torch_dtype") or d.get("dtype") or "") or None


def steady_gpu_bytes(cfg: Any, wbytes: int) -> int:
    """The GPU bytes of the config's largest feasible memory plan at the run's weight dtype
    (the plan counts weights in bf16): non-expert weights, slots, draft, KV cache, workspace."""
    from sim.run import policy_plan, policy_presets, prepare
    from traces.errors import MoeOffloadError

    if cfg.get("source") or cfg.get("mode", "replay") != "replay":
        return 0
    try:
        prep = prepare(cfg)
    except MoeOffloadError:
        return 0
    out = 0
    for p in policy_presets(cfg.policy):
        try:
            plan = policy_plan(prep, p)
        except MoeOffloadError:
            continue
        weights = plan.non_expert_bytes + plan.slots_bytes + plan.draft_bytes
        out = max(out, weights * wbytes // 2 + plan.kv_bytes + plan.workspace_bytes)
    return out


def check_run(cfg: Any) -> MemoryEstimate | None:
    """The pre-check of ``python -m runtime``: estimate, compare with what this machine has, refuse."""
    from runtime.models import resolve_device

    spec, random_weights, ckpt_dtype = spec_of(cfg)
    if spec is None:
        return None
    device = resolve_device(cfg.get("device", "auto")).type
    wbytes = weight_bytes(str(cfg.get("dtype", "auto")), device, random_weights, ckpt_dtype)
    plan_bytes = steady_gpu_bytes(cfg, wbytes) if device == "cuda" else 0
    est = estimate(spec, device=device, wbytes=wbytes, gpu_plan_bytes=plan_bytes)
    limit = os.environ.get("MOE_OFFLOAD_HOST_BYTES")  # tests and shared machines: a stricter cap
    host = available_host_bytes()
    if limit:
        host = min(int(float(limit)), host) if host is not None else int(float(limit))
    check(est, host_available=host, gpu_available=available_gpu_bytes(device),
          what=f"model '{spec.name}' ({wbytes * 8}-bit weights on {device})")
    return est
