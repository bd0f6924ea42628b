"""Measured runs in the simulator's terms: a ``runtime.executor.Run``'s marks (CUDA event timestamps
on the GPU, host clocks on the CPU) become a ``sim.runlog.RunLog``, and ``sim.metrics.results_row``
turns it into the same results row as a simulated run (docs/metrics.md), with ``source = measured``.

How each RunLog field is measured:

- ``request_start``: a mark on the compute stream before the request's first forward;
  ``token_times``: a mark after each step's LM head (a multi-token verify step's tokens share its
  time equally, as in the simulator).
- ``stall`` per MoE layer: from the mark recorded when the layer's routing is known on the GPU to the
  mark after the compute stream's waits for its experts, minus the hardware spec's
  ``decision_delay_s`` (the simulator counts that delay as compute, and so does this); between two
  waves of one layer: from the end of the first to the waits of the next. ``decision_gap_ms`` (an
  extra column) keeps the raw gaps, host decisions included.
- ``hits``/``late``/``misses``, useful and wasted prefetches, evictions, coverage: counted by the
  host controller exactly as the simulator counts them (same cache class, same classification).
- ``link_busy``: the sum over copies of (end - start) on the copy stream (the start mark follows the
  copy's wait for its slot, so waiting is not counted); ``bytes_moved`` = copies x packed expert size.
- timeline: compute spans ``attn+router``, ``stall``, ``experts`` per layer and ``head``, copy spans
  per expert (demand or prefetch), cache occupancy: the simulator's Chrome trace format.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
from typing import Any

import numpy as np

from runtime.executor import Run
from runtime.offloaded import OffloadedModel
from sim.runlog import RunLog
from sim.metrics import results_row
from sim.timeline import chrome_trace


def _transfer_s(schedule: Any, hw: Any, prefetch: Any) -> float:
    """One expert's copy time in the copy stream model, as the simulator times it for this policy
    (a policy that copies from its own host memory, e.g. pageable streaming, uses that bandwidth)."""
    if schedule is None:
        return 0.0
    cost = schedule.cost
    host_memory = getattr(prefetch, "host_memory", None)
    if host_memory and host_memory != hw.host_memory:
        from dataclasses import replace

        from sim.costmodel import cost_model_for

        cost = cost_model_for(schedule.model, replace(hw, host_memory=host_memory))
    return cost.h2d(schedule.model.bytes_per_expert())


def run_log(run: Run, *, timeline: bool = True) -> RunLog:
    """The RunLog of a finished run (all marks complete)."""
    if not run.finished:
        run.finish()
    be = run.backend
    sec = be.seconds
    dd = float(run.rc.decision_delay_s)
    om = run.om
    log = RunLog()
    steps = run.steps
    for start, idx in run.requests:
        t0 = sec(start)
        log.request_start.append(t0)
        times = [t0]
        for i in idx:
            st = steps[i]
            end = sec(st.token)
            prev, n = times[-1], max(1, int(st.emitted))
            times.extend(prev + (end - prev) * (j + 1) / n for j in range(n - 1))
            times.append(end)
        log.token_times.append(times[1:])
        log.coverage.extend(steps[i].coverage for i in idx)
    log.run_time = sec(run.end_mark) if getattr(run, "end_mark", None) is not None else (
        max((t[-1] for t in log.token_times if t), default=0.0))
    log.hits, log.late, log.misses = run.hits, run.late, run.misses
    stall_layer = np.zeros(run.M)
    late_wait = 0.0
    gaps = 0.0
    spans: list[tuple[float, float, str]] | None = [] if timeline else None
    names = [f"L{x}" for x in om.loaded.shape.moe_layers]
    step_of_g = {}
    for si, st in enumerate(steps):
        for m in range(run.M):
            step_of_g[st.g0 + m] = si
    prev_end: dict[int, float] = {}
    for lr in run.layers:
        si = step_of_g.get(lr.g)
        st = steps[si]
        tr = sec(lr.routed)
        start_prev = prev_end.get(si, sec(st.start))
        kind = "verify " if st.emitted > 1 else ""
        w0 = sec(lr.waves[0][0])
        gap = max(0.0, w0 - tr)
        gaps += gap
        s = max(0.0, gap - dd)
        if spans is not None:
            spans.append((start_prev, min(tr + dd, w0) if w0 > tr else tr, f"{kind}attn+router {names[lr.m]}"))
            if s > 0:
                spans.append((tr + dd, w0, f"stall {names[lr.m]}"))
        for i, (waited, done) in enumerate(lr.waves):
            tw, td = sec(waited), sec(done)
            if i > 0:
                ps = max(0.0, tw - sec(lr.waves[i - 1][1]))
                s += ps
                if spans is not None and ps > 0:
                    spans.append((sec(lr.waves[i - 1][1]), tw, f"stall {names[lr.m]}"))
            if spans is not None:
                spans.append((tw, td, f"{kind}experts {names[lr.m]}"))
        stall_layer[lr.m] += s
        for mk in lr.late:
            late_wait += max(0.0, sec(mk) - (tr + dd))
        prev_end[si] = sec(lr.waves[-1][1])
    if spans is not None:
        for si, st in enumerate(steps):
            if si in prev_end and st.token is not None:
                spans.append((prev_end[si], sec(st.token), "head"))
    log.stall_per_layer = stall_layer
    log.stall = float(stall_layer.sum())
    log.late_wait = late_wait
    log.copies = run.copies
    log.bytes_moved = run.copies * om.nbytes
    copy_spans = [(sec(a), sec(b), key, pf) for a, b, key, pf in run.copy_log]
    log.link_busy = float(sum(b - a for a, b, _, _ in copy_spans))
    log.useful_prefetch_bytes = run.useful * om.nbytes
    log.wasted_prefetch_bytes = (run.cache.wasted_prefetches + sum(run.cache.prefetched)) * om.nbytes
    log.evictions = run.cache.evictions
    hlog = run.log  # the host controller's counts: layer coverage of decode passes, prefill copies
    log.coverage_ready_sum, log.coverage_requested_sum = hlog.coverage_ready_sum, hlog.coverage_requested_sum
    log.coverage_layers, log.prefill_copies = hlog.coverage_layers, hlog.prefill_copies
    if timeline:
        log.compute_spans = sorted(spans or [], key=lambda x: x[0])
        log.copy_spans = copy_spans
        log.occupancy = sorted(((sec(mk), n) for mk, n in run.occupancy), key=lambda x: x[0])
    log.decision_gap_s = gaps  # type: ignore[attr-defined]
    return log


def measured_row(log: RunLog, bound: Any, om: OffloadedModel, run: Run) -> dict[str, Any]:
    """The results row of a measured run (sim.metrics.results_row) plus measurement columns."""
    row = results_row(log, bound, om.nbytes, om.M)
    busy = log.link_busy
    row.update({
        "decision_gap_ms": float(getattr(log, "decision_gap_s", 0.0)) * 1e3,
        # the CPU's inline copy stream is instantaneous (virtual copy times): no bandwidth to report
        "copy_gbps": log.bytes_moved / busy / 1e9 if busy > 0 and om.backend.name != "cpu-sync" else float("nan"),
        "expert_bytes": om.nbytes,
        "slots": run.cache.total_slots,
        "layout": "per_layer" if run.cache.per_layer is not None else "global",
    })
    return row


def environment(om: OffloadedModel | None = None) -> dict[str, Any]:
    """Machine and versions, for the results row (measured runs say where they ran)."""
    import torch
    import transformers

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "host": platform.node()}
    if om is not None:
        env["backend"] = om.backend.name
        env["host_memory_kind"] = om.store.host_memory
        env["pinned_by"] = om.store.pinned or None
        env["setup_s"] = om.setup_s
        if om.device.type == "cuda":
            env["gpu"] = torch.cuda.get_device_name(om.device)
            env["peak_gpu_gb"] = torch.cuda.max_memory_allocated(om.device) / 1e9
    env["peak_host_gb"] = peak_host_bytes() / 1e9
    return env


def peak_host_bytes() -> int:
    """Peak resident set size of this process (bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def timeline_json(log: RunLog, om: OffloadedModel) -> dict:
    """The run's Chrome/Perfetto trace (the simulator's format, ``source = measured``)."""
    shape = om.loaded.shape
    return chrome_trace(log.compute_spans or [], log.copy_spans or [], log.occupancy or [],
                        num_experts=shape.num_experts, moe_layers=tuple(shape.moe_layers), source="measured")


# =============================================================================== configs -> rows
LIVE_ONLY_TRACE = ("belady",)  # eviction policies that read the future
FUTURE_PREFETCH = ("oracle",)
FUTURE_PREDICTORS = ("oracle", "noisy")


def apply_overrides(cfg: Any) -> None:
    """Top-level ``host_memory=`` and ``link_pace_gbps=`` set the hardware's keys (so the config id,
    the simulator's prediction and the run all see them)."""
    from omegaconf import open_dict

    with open_dict(cfg):
        if cfg.get("host_memory"):
            cfg.hardware.host_memory = cfg.host_memory
        if cfg.get("link_pace_gbps") is not None:
            cfg.hardware.link_pace_gbps = float(cfg.link_pace_gbps)


def model_source(cfg: Any) -> tuple[str, int | None]:
    """What ``load_model`` builds for this config: a checkpoint/config/tiny source, or a preset's
    shipped config.json (random weights), depth-reduced by ``model.layers``."""
    from sim.presets import conf_dir

    if cfg.get("source"):
        return str(cfg.source), cfg.get("layers")
    m = cfg.get("model")
    if m is None:
        raise ExecutorError_("no model: pass model=PRESET, model=CHECKPOINT_DIR or model=tiny-<family>")
    if not m.get("hf_config"):
        raise ExecutorError_(f"model preset {m.get('name')!r} has no hf_config (no transformers config to build)")
    return str(conf_dir() / "model" / m.hf_config), m.get("layers")


def model_overrides(cfg: Any) -> dict[str, Any]:
    """transformers config values a preset's ``model.*`` overrides change in the built model (random
    weights only): ``model.top_k`` -> ``num_experts_per_tok``, so ``model.top_k=2`` runs a top-8
    preset's shape at top-2 on both sides. A checkpoint (``source=``) keeps its own routing."""
    m = cfg.get("model")
    if cfg.get("source") or m is None or not m.get("hf_config") or m.get("top_k") is None:
        return {}
    return {"num_experts_per_tok": int(m.top_k)}


def ExecutorError_(msg: str):  # noqa: N802 - a constructor-like helper
    from runtime.errors import ExecutorError

    return ExecutorError(msg)


def engine_name(cfg: Any) -> str | None:
    """The config's ``engine`` as a name (a plain value, or a group node with a ``name``); None: auto."""
    e = cfg.get("engine")
    if e is not None and not isinstance(e, str):
        e = e.get("name")
    return e


def resolved_engine(cfg: Any) -> str:
    """``graphed`` or ``eager`` for this config on its device (null: graphed on a GPU, eager on the CPU)."""
    from runtime.lean import LeanError, resolve_engine
    from runtime.models import resolve_device

    try:
        return resolve_engine(engine_name(cfg), resolve_device(cfg.get("device", "auto")))
    except LeanError as e:
        raise ExecutorError_(str(e)) from None


def check_config(cfg: Any) -> None:
    """Errors a config can be refused for before any model is built."""
    apply_overrides(cfg)
    resolved_engine(cfg)
    mode = cfg.get("mode", "replay")
    if mode not in ("replay", "live"):
        raise ExecutorError_(f"mode={mode!r}: use replay or live")
    if mode == "live" and cfg.trace.get("path"):
        raise ExecutorError_("mode=live decodes its own prompts (trace.requests, trace.prompt_tokens, "
                             "trace.decode_tokens); trace.path is for mode=replay")
    if int(cfg.get("repetitions", 1)) < 1:
        raise ExecutorError_(f"repetitions={cfg.repetitions}: must be >= 1")
    if int(cfg.get("warmup_steps", -1)) < -1:
        raise ExecutorError_(f"warmup_steps={cfg.warmup_steps}: must be -1 (one pass over the trace), 0 (none) "
                             "or a number of steps")


class Session:
    """One model (one shape per process) made offloaded once, and measured runs of configs on it.

    ``max_slots``: the slot pool's size (default: what the config's policies need at its budget)."""

    def __init__(self, cfg: Any, *, max_slots: int | None = None) -> None:
        import time

        from omegaconf import OmegaConf, open_dict

        from runtime.offloaded import OffloadedModel
        from runtime.models import load_model

        t0 = time.perf_counter()
        check_config(cfg)
        source, layers = model_source(cfg)
        self.loaded = load_model(source, layers=layers, dtype=cfg.get("dtype", "auto"), device=cfg.get("device", "auto"),
                                 seed=int(cfg.seed), config_overrides=model_overrides(cfg))
        if cfg.get("source"):
            spec = self.loaded.spec
            with open_dict(cfg):
                cfg.model = OmegaConf.create({**spec.to_dict(), "layers": None, "hf_config": None})
        # the dtype the model was built in is the run's: in config_id and in the prediction's bytes
        import torch

        names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        built = names.get(next(self.loaded.model.parameters()).dtype)
        if built is not None:
            with open_dict(cfg):
                cfg.dtype = built
        from sim.run import model_for

        self.spec = model_for(cfg)
        sh = self.loaded.shape
        for f in ("moe_layers", "num_experts", "top_k"):
            if tuple(np.atleast_1d(getattr(sh, f))) != tuple(np.atleast_1d(getattr(self.spec, f))):
                raise ExecutorError_(f"model '{self.spec.name}': the built transformers model has {f}={getattr(sh, f)}, "
                                     f"the preset says {getattr(self.spec, f)}")
        self.load_s = time.perf_counter() - t0
        total = self.spec.num_routed_experts_total
        if max_slots is None:
            max_slots = max([p.slots for p in self.plans(cfg) if p is not None] or [sh.top_k])
        # the INT4 draft of speculative policies, quantized while the experts are still resident
        self.draft = None
        from sim.run import policy_presets

        if any(p.decoding == "speculative" for p in policy_presets(cfg.policy)):
            from runtime.speculate import draft_experts

            self.draft = draft_experts([h.experts for h in self.loaded.moe_handles])
        self._spec_engine = None
        self.om = OffloadedModel(self.loaded, max_slots=min(int(max_slots), total),
                                 host_memory=str(cfg.hardware.host_memory), cpu_backend=str(cfg.get("cpu_backend", "sync")),
                                 record_routing=cfg.get("mode", "replay") == "live")
        self.engine = resolved_engine(cfg)
        if self.engine == "graphed":
            from runtime.lean import ExecutorExperts, LeanModel

            ex = ExecutorExperts(self.om)
            # on the CPU the segments run uncaptured (the same static-KV path, no graphs)
            self.om.stepper = LeanModel(self.loaded, max_len=self.context_tokens(cfg), experts=ex,
                                        layer_start=ex.layer_start)
        self.h2d_gbps = float("nan")
        if self.om.device.type == "cuda":
            self.h2d_gbps = self.om.measure_copy() / 1e9
            if cfg.hardware.get("link_pace_gbps"):
                self.om.backend.calibrate_sleep()
        self.setup_s = time.perf_counter() - t0
        self.warm = False

    # ------------------------------------------------------------------ helpers
    def context_tokens(self, cfg: Any) -> int:
        """The longest context a run of ``cfg`` reaches (the lean path's static KV length)."""
        if cfg.get("mode", "replay") == "live":
            n = int(cfg.trace.prompt_tokens) + int(cfg.trace.decode_tokens)
        else:
            n = int(self.prepare(cfg).trace.position.max()) + 1
        return max(n, int(cfg.cache.max_context_tokens or 0))

    def plans(self, cfg: Any) -> list[Any]:
        """Memory plan of each policy preset (None where infeasible)."""
        from sim.errors import InfeasibleError
        from sim.run import policy_presets

        out = []
        for p in policy_presets(cfg.policy):
            try:
                out.append(self.plan(cfg, p))
            except InfeasibleError:
                out.append(None)
        return out

    def plan(self, cfg: Any, pcfg: Any) -> Any:
        from sim.memory import plan_memory

        hw = self.hardware(cfg)
        if cfg.get("mode", "replay") == "replay":
            prep = self.prepare(cfg)
            from sim.run import policy_plan

            return policy_plan(prep, pcfg)
        ctx = int(cfg.cache.max_context_tokens or int(cfg.trace.prompt_tokens) + int(cfg.trace.decode_tokens))
        return plan_memory(self.spec, hw, max_context_tokens=ctx, slots=cfg.cache.slots, per_layer=cfg.cache.per_layer,
                           draft_resident=pcfg.decoding == "speculative")

    def prepare(self, cfg: Any, trace: Any = None) -> Any:
        """sim.run.prepare of this config (replay: its trace; live: the executed trace), memoised,
        with the resolved decode path's host overhead (conf/engine, or the measured profile's
        values): the row it joins by config_id ran that path."""
        from sim.run import prepare, with_engine

        key = (id(cfg), id(trace))
        cached = getattr(self, "_prep", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        prep = with_engine(prepare(cfg, trace=trace), resolved_engine(cfg))
        self._prep = (key, prep)
        return prep

    def hardware(self, cfg: Any) -> Any:
        """The hardware spec of ``cfg``, built once (in replay: the prepared config's)."""
        if cfg.get("mode", "replay") == "replay":
            return self.prepare(cfg).hw
        cached = getattr(self, "_hw", None)
        if cached is None or cached[0] != id(cfg):
            from sim.hardware import HardwareSpec

            self._hw = (id(cfg), HardwareSpec.from_cfg(cfg.hardware))
        return self._hw[1]

    def run_config(self, cfg: Any, pcfg: Any, plan: Any, *, schedule: Any = None, trace: Any = None,
                   prompts: Any = None, timeline: bool = False, exec_log: bool = False,
                   decisions: bool = False) -> Any:
        """One measured run of one policy; returns the finished executor Run."""
        from runtime.executor import LiveGatePredictor, RunConfig
        from runtime.replay import live, replay
        from sim.policies import EVICTION, PREDICTORS, PREFETCH

        hw = self.hardware(cfg)
        mode = cfg.get("mode", "replay")
        eviction = EVICTION.create(pcfg.eviction, **dict(pcfg.eviction_args))
        prefetch = PREFETCH.create(pcfg.prefetch, **dict(pcfg.prefetch_args))
        predictor = None
        depth = int(pcfg.prefetch_args.get("depth", 1))
        if pcfg.predictor:
            if mode == "live":
                if pcfg.predictor != "recorded":
                    raise ExecutorError_(f"policy '{pcfg.name}': predictor '{pcfg.predictor}' needs a trace (mode=replay); "
                                         "live runs compute the gate lookahead ('recorded') from the hidden state")
                predictor = LiveGatePredictor(depth)
                predictor.attach_live(self.loaded)
            else:
                predictor = PREDICTORS.create(pcfg.predictor, **dict(pcfg.predictor_args))
                predictor.attach(trace, schedule.layer_steps(), tuple(range(1, depth + 1)), int(cfg.seed))
        if mode == "replay" and pcfg.decoding == "speculative":
            # speculative replay: target passes are cycles, planned as they are decided (as the simulator)
            from sim.schedule import Schedule

            schedule = Schedule(schedule.trace, schedule.model, schedule.cost, build=False)
        rc = RunConfig(
            eviction=eviction, prefetch=prefetch, predictor=predictor,
            slots=None if plan.per_layer else plan.slots, per_layer=plan.per_layer,
            copies_in_flight=int(hw.copies_in_flight), decision_delay_s=float(hw.decision_delay_s),
            schedule=schedule if mode == "replay" else None, seed=int(cfg.seed),
            link_pace_gbps=hw.link_pace_gbps, timeline=timeline, exec_log=exec_log,
            issue_overhead_s=float(hw.copy_issue_overhead_s),
            transfer_s=_transfer_s(schedule, hw, prefetch), admission=bool(pcfg.get("admission", True)),
            reset=str(cfg.cache.get("reset", "never")), record_decisions=decisions,
        )
        run = self.om.start_run(rc)
        try:
            if pcfg.decoding == "speculative":
                from sim.run import policy_governor

                run.spec = self.speculative(cfg, run, hw, governor=policy_governor(cfg, pcfg))
                if mode == "replay":  # the simulator's draft columns: the trace's own, or its stand-in
                    from sim.run import speculative_trace
                    from sim.speculative import DraftSource

                    dtr = speculative_trace(self.prepare(cfg), cfg.trace)
                    run.spec.replay(dtr, DraftSource(dtr), seed=int(cfg.seed))
                else:
                    run.live_out = {"tokens": run.spec.generate(prompts, int(cfg.trace.decode_tokens))}
            elif mode == "replay":
                replay(self.om, run, trace, schedule, seed=int(cfg.seed))
            else:
                run.live_out = live(self.om, run, prompts, int(cfg.trace.decode_tokens))
        finally:
            self.om.end_run()
            if isinstance(predictor, LiveGatePredictor):
                predictor.close()
        return run

    def speculative(self, cfg: Any, run: Any, hw: Any, governor: Any = None) -> Any:
        """The speculative decoder of one run (runtime.speculate): the session's INT4 draft on its
        engine, the config's governor (or ``governor``), costs measured as the run goes (the link's
        per-expert time measured at the session's start on a GPU, the hardware spec's elsewhere;
        on the virtual-time backend the cost model's prices, as the simulator's host has them)."""
        from runtime.speculate import HFEngine, LeanEngine, MeasuredCosts, ModelledCosts, SpeculativeDecoder
        from sim.governor import build_governor

        if self.draft is None:
            raise ExecutorError_("the session was built without a speculative policy (no INT4 draft)")
        if self._spec_engine is None:
            fn = self.draft[0]
            self._spec_engine = (LeanEngine(self.om.stepper, fn) if self.engine == "graphed"
                                 else HFEngine(self.om.model, self.om.modules, fn))
        xfer = self.om.copy_s if self.om.copy_s else hw.h2d_time(self.om.nbytes)
        if run.virtual:
            costs = ModelledCosts(run.rc.schedule, float(hw.decision_delay_s), run.rc.transfer_s, float(hw.copy_latency_s))
        else:
            costs = MeasuredCosts(xfer, copy_latency_s=float(hw.copy_latency_s) + float(hw.decision_delay_s))
        return SpeculativeDecoder(self._spec_engine, build_governor(governor or cfg.governor), num_experts=self.om.E,
                                  top_k=self.om.top_k, run=run, costs=costs, expert_bytes=self.om.nbytes)

    def warmup(self, cfg: Any, steps: int) -> None:
        """An unmeasured run first, once per session (kernels and their autotuned variants for every
        shape the trace brings, allocator, cuBLAS handles): ``steps < 0`` replays the whole trace
        (live: decodes every prompt) at the smallest slot count of the config's policies, so the
        waves of long prefills are warmed too; ``steps > 0`` only the first steps of request 0."""
        if self.warm or steps == 0:
            return
        from runtime.executor import RunConfig
        from runtime.replay import live, prompt_tokens, replay
        from sim.policies import EVICTION, PREFETCH

        k = self.spec.top_k
        plans = [p for p in self.plans(cfg) if p is not None and p.per_layer is None]
        slots = min([p.slots for p in plans] or [self.spec.num_experts])
        rc = RunConfig(eviction=EVICTION.create("lru"), prefetch=PREFETCH.create("none"),
                       slots=max(k, min(self.om.num_slots, slots)), timeline=False)
        if cfg.get("mode", "replay") == "replay":
            prep = self.prepare(cfg)
            rc.schedule = prep.schedule
            run = self.om.start_run(rc)
            try:
                if steps < 0:
                    replay(self.om, run, prep.trace, prep.schedule, seed=int(cfg.seed))
                else:
                    replay(self.om, run, prep.trace, prep.schedule, seed=int(cfg.seed), requests=[0], max_steps=steps)
            finally:
                self.om.end_run()
        else:
            R, P, D = int(cfg.trace.requests), int(cfg.trace.prompt_tokens), int(cfg.trace.decode_tokens)
            prompts = prompt_tokens(int(self.spec.vocab_size), [P] * (R if steps < 0 else 1), int(cfg.seed) + 1)
            run = self.om.start_run(rc)
            try:
                live(self.om, run, prompts, D if steps < 0 else steps)
            finally:
                self.om.end_run()
        if self.draft is not None:  # the draft's graphs and every verify width up to k_max + 1
            g = cfg.governor
            kw = max(int(g.get("k") or 1), int(g.get("k_max") or 1))
            rc.eviction, rc.prefetch, rc.schedule = EVICTION.create("lru"), PREFETCH.create("none"), None
            run = self.om.start_run(rc)
            try:
                dec = self.speculative(cfg, run, self.hardware(cfg), governor={"name": "fixed", "k": kw})
                lean = getattr(self.om, "stepper", None)
                room = (lean.S if lean is not None else 1 << 20) - 8 - kw - 1  # static KV positions left
                dec.generate(prompt_tokens(int(self.spec.vocab_size), [8], int(cfg.seed) + 1),
                             max(2, min(room, 3 * (kw + 1) if steps < 0 else steps)))
            finally:
                self.om.end_run()
        self.warm = True

    # ------------------------------------------------------------------ the config's rows
    def measure(self, cfg: Any, *, on_run: Any = None, deadline: float | None = None,
                timeline: bool | None = None, decisions: bool = False) -> list[dict[str, Any]]:
        """Measured rows (``source = measured``, one per policy and repetition) and, with
        ``predict``, the simulator's row of each config (``source = sim``); infeasible budgets and
        failed runs are rows with their status and reason. ``deadline`` (time.monotonic()): runs
        not started by then are rows with status ``skipped``. ``timeline``: keep the spans of the
        last repetition (default: when ``timeline_out`` is set). ``decisions``: record each run's
        decisions (``run.recorder``, for ``on_run``: validation level replayed)."""
        import time

        from runtime.replay import executed_trace, prompt_tokens
        from sim.errors import InfeasibleError
        from sim.run import base_keys, bound_for, config_id, load_plugins, policy_governor, policy_presets, run_policy
        from traces.errors import MoeOffloadError

        check_config(cfg)
        load_plugins(cfg.get("plugins") or [])
        mode = cfg.get("mode", "replay")
        keys = {**base_keys(cfg), "engine": self.engine}  # the resolved engine (null -> graphed/eager)
        prompts = None
        if mode == "live":
            R, P, D = int(cfg.trace.requests), int(cfg.trace.prompt_tokens), int(cfg.trace.decode_tokens)
            keys["trace"] = f"live:{self.spec.name}:{R}x{P}+{D}:{int(cfg.seed)}"
            prompts = prompt_tokens(int(self.spec.vocab_size), [P] * R, int(cfg.seed))
        else:
            prep = self.prepare(cfg)
        env = environment(self.om)
        env.update({"mode": mode, "h2d_gbps_measured": self.h2d_gbps, "load_s": self.load_s,
                    "session_setup_s": self.setup_s})
        self.warmup(cfg, int(cfg.get("warmup_steps", -1)))
        rows: list[dict[str, Any]] = []
        reps = int(cfg.get("repetitions", 1))
        for p in policy_presets(cfg.policy):
            k = {**keys, "policy": p.name, "eviction": p.eviction, "prefetch": p.prefetch, "predictor": p.predictor}
            if p.decoding == "speculative":
                gov = policy_governor(cfg, p)
                k["governor"] = gov.get("name")
                k["governor_k"] = gov.get("k")
            cid = config_id(k)
            base = {**k, "config_id": cid}
            try:
                plan = self.plan(cfg, p)
            except InfeasibleError as e:
                rows.append({**base, "source": "measured", "status": "infeasible", "reason": e.reason, "repetition": 0})
                continue
            reason, status = None, "unsupported"
            if mode == "live" and (p.eviction in LIVE_ONLY_TRACE or p.prefetch in FUTURE_PREFETCH
                                     or (p.predictor in FUTURE_PREDICTORS)):
                reason = f"policy '{p.name}' reads the trace's future or truth: it needs mode=replay"
            elif self.engine == "graphed" and mode == "live" and p.predictor:
                reason = (f"policy '{p.name}': the live gate predictor hooks the post-attention norms, which run "
                          "inside CUDA graphs with engine=graphed (use engine=eager, or mode=replay)")
            elif plan.slots > self.om.num_slots:
                reason, status = f"the plan needs {plan.slots} slots, the session's pool has {self.om.num_slots}", "failed"
            if reason:
                rows.append({**base, "source": "measured", "status": status, "reason": reason, "repetition": 0})
                continue
            last = None
            if mode == "live":
                prep = None  # per policy: the executed routing (with this policy's live predictions)
            keep = bool(cfg.get("timeline_out")) if timeline is None else timeline
            for rep in range(reps):
                if deadline is not None and time.monotonic() > deadline:
                    rows.append({**base, "source": "measured", "status": "skipped", "reason": "time budget spent",
                                 "repetition": rep})
                    break
                t0 = time.perf_counter()
                try:
                    run = self.run_config(cfg, p, plan, schedule=prep.schedule if prep else None,
                                          trace=prep.trace if prep else None, prompts=prompts,
                                          timeline=keep and rep == reps - 1, decisions=decisions)
                except (MoeOffloadError, RuntimeError) as e:  # ours, or the device's (CUDA out of memory)
                    rows.append({**base, "source": "measured", "status": getattr(e, "status", "failed"),
                                 "reason": f"{type(e).__name__}: {e}",
                                 "repetition": rep})
                    break
                wall = time.perf_counter() - t0
                spec = getattr(run, "spec", None)
                if prep is None:  # live: the executed routing is the trace of the bound and the prediction
                    meta = {"tool": "runtime.measure", "mode": "live", "prompts": keys["trace"], "policy": p.name}
                    if spec is not None:
                        from runtime.speculate import executed_spec_trace

                        tr = executed_spec_trace(spec, self.spec.shape_only(), meta)
                    else:
                        tr = executed_trace(run, self.spec.shape_only(), prompts, meta, predictor=run.rc.predictor)
                    prep = self.prepare(cfg, tr)
                    self.live_trace = tr  # this policy's executed routing (a later resimulation replays it)
                    if getattr(self, "executed", None) is None or tr.lookahead_depths:
                        self.executed = tr
                log = run_log(run, timeline=keep and rep == reps - 1)
                if spec is not None:
                    log.cycles = spec.sim_cycles()
                # speculative replay: the bound of the cycles the run executed (its realized schedule), as the simulator's
                sched = run.rc.schedule if spec is not None and run.rc.schedule is not None else prep.schedule
                bound = bound_for(prep, sched, run.cache.pool_of, run.cache.capacity)
                row = {**base, "source": "measured", "status": "ok", "reason": "", "repetition": rep,
                       **measured_row(log, bound, self.om, run), "wall_s": wall, **env,
                       "peak_host_gb": peak_host_bytes() / 1e9}
                if spec is not None:
                    sm = spec.summary()
                    row.update({"decoding": "speculative", "tokens_per_cycle": sm.get("tokens_per_cycle"),
                                "draft_kind": self.draft[1], "draft_bytes": self.draft[2],
                                "draft_agreement": sm.get("draft_agreement"),
                                "acceptance_by_position": json.dumps(sm.get("acceptance_by_position", []))})
                rows.append(row)
                last = (run, log)
                if on_run is not None:
                    on_run(p, run, log, row)
            if cfg.get("predict", True) and last is not None:
                try:
                    srow, _ = run_policy(prep, p, int(cfg.seed), timeline=False, governor_cfg=policy_governor(cfg, p),
                                         trace_cfg=cfg.trace, plan=plan)
                    rows.append({**base, "source": "sim", "status": "ok", "reason": "", "repetition": 0, **srow})
                except MoeOffloadError as e:  # a refused prediction must not lose the measurement (a bug still raises)
                    rows.append({**base, "source": "sim", "status": e.status, "reason": f"{type(e).__name__}: {e}",
                                 "repetition": 0})
        return rows

    def cycle_records(self, policy: str, row: dict[str, Any], log: Any) -> list[dict[str, Any]]:
        """A measured speculative run's cycles as the simulator writes them (cycles.parquet: the
        governor's predicted cycle time beside the observed one), with the link measured at start."""
        link = float(self.h2d_gbps) * 1e9
        rep = int(row.get("repetition", 0))
        return [{"policy": policy, "repetition": rep, "link_bytes_per_s": link, **c} for c in log.cycles]

    def close(self) -> None:
        self.om.close()
