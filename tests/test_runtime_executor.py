"""The offloading executor on the CPU: exact logits for every family, the simulator's policies hosted
unchanged (same decisions as in the simulator), the host copy queue, and slot reuse under delays."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hydra import compose, initialize_config_dir  # noqa: E402

from runtime.backends import ThreadBackend  # noqa: E402
from runtime.errors import ExecutorError  # noqa: E402
from runtime.executor import LiveGatePredictor, RunConfig, SlotCache  # noqa: E402
from runtime.offloaded import OffloadedModel  # noqa: E402
from runtime.store import view_part  # noqa: E402
from runtime.models import FAMILIES, load_model  # noqa: E402
from runtime.replay import live, reference_decode  # noqa: E402
from sim.cache import ABSENT, RESIDENT  # noqa: E402
from sim.policies import EVICTION, PREFETCH, Cancel, Fetch  # noqa: E402

PROMPTS = [[5, 9, 17, 33, 2, 8, 11, 40, 3], [40, 41, 7]]
NEW = 6


@pytest.fixture(autouse=True)
def _cpu_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(fam: str, **kw):
    return load_model(f"tiny-{fam}", device="cpu", experts_implementation="eager", **kw)


def policy(ev: str = "lru", pf: str = "none", **pf_args):
    return EVICTION.create(ev), PREFETCH.create(pf, **pf_args)


def equal_logits(a, b) -> bool:
    return all(torch.equal(x, y) for la, lb in zip(a, b) for x, y in zip(la, lb))


# ------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("fam", sorted(FAMILIES))
def test_offloaded_logits_equal_the_reference_exactly(fam):
    """fp32 on the CPU: bit-identical logits and tokens to the eager non-offloaded model, with a
    cache of top_k slots (prefill in waves, every step evicting) and with half the experts."""
    ref = reference_decode(tiny(fam).model, PROMPTS, NEW)
    lm = tiny(fam)
    M, E, k = lm.shape.num_moe_layers, lm.shape.num_experts, lm.shape.top_k
    om = OffloadedModel(lm, max_slots=M * E)
    try:
        for slots in (k, max(k, M * E // 2)):
            ev, pf = policy()
            run = om.start_run(RunConfig(eviction=ev, prefetch=pf, slots=slots))
            out = live(om, run, PROMPTS, NEW, keep_logits=True)
            om.end_run()
            assert out["tokens"] == ref["tokens"], (fam, slots)
            assert equal_logits(out["logits"], ref["logits"]), (fam, slots)
            assert run.misses > 0 and run.copies == run.misses
            run.cache.check()
    finally:
        om.close()


@pytest.mark.parametrize("fam,name,pf,args", [
    ("mixtral", "lookahead", "lookahead", {"depth": 1}),
    ("qwen3_moe", "lookahead", "lookahead", {"depth": 2}),
    ("olmoe", "history", "history", {"layers_ahead": 2}),
    ("deepseek_v2", "lookahead", "lookahead", {"depth": 1}),
])
def test_live_policies_prefetch_and_stay_exact(fam, name, pf, args):
    """The simulator's prefetch policies drive a live run (the gate lookahead predicted from the
    hidden state on the device, history matching online): prefetches happen, output is unchanged."""
    ref = reference_decode(tiny(fam).model, PROMPTS, NEW)
    lm = tiny(fam)
    M, E, k = lm.shape.num_moe_layers, lm.shape.num_experts, lm.shape.top_k
    om = OffloadedModel(lm, max_slots=M * E)
    pred = None
    if pf == "lookahead":
        pred = LiveGatePredictor(args["depth"])
        pred.attach_live(lm)
    ev, pol = policy("lru", pf, **args)
    # every prediction goes out (the admission rule off): the prefetched experts' data path is what
    # is tested; with the rule on, the measured link and layer times decide
    for admission in (False, True):
        run = om.start_run(RunConfig(eviction=ev, prefetch=pol, predictor=pred, slots=max(2 * k, E),
                                     admission=admission))
        out = live(om, run, PROMPTS, NEW, keep_logits=True)
        om.end_run()
        assert out["tokens"] == ref["tokens"] and equal_logits(out["logits"], ref["logits"])
        prefetched = [c for c in run.copy_log if c[3]]
        if not admission:
            assert prefetched, "the policy prefetched nothing"
            assert run.useful > 0 and run.link.refused == 0
        else:  # the policy's predictions reached the host's rule: issued or refused
            assert prefetched or run.link.refused > 0
            assert run.link.copies_measured > 0 and run.link.duration > 0  # the link was measured
    om.close()


def test_live_gate_predictor_equals_the_captured_lookahead():
    """The live next-layer gate predictor names the same experts as capture's lookahead columns
    (the same seam: layer l+d's norm and router on layer l's post-attention residual)."""
    from runtime.capture import CaptureSettings, capture

    tr = capture(tiny("mixtral"), [PROMPTS[1]], CaptureSettings(max_new_tokens=NEW, lookahead=2, progress=False,
                                                                stop_at_eos=False))
    lm = tiny("mixtral")
    M, E = lm.shape.num_moe_layers, lm.shape.num_experts
    om = OffloadedModel(lm, max_slots=M * E)
    pred = LiveGatePredictor(2, record=True)
    pred.attach_live(lm)
    ev, pf = policy("lru", "lookahead", depth=2)
    run = om.start_run(RunConfig(eviction=ev, prefetch=pf, predictor=pred, slots=M * E))
    live(om, run, [PROMPTS[1]], NEW)
    om.end_run()
    om.close()
    P = len(PROMPTS[1])
    checked = 0
    for g, d, keys in pred.history:
        st = run.steps[g // M]
        m = g % M
        col = tr.lookahead[d][0]
        if st.step == 0:
            want = sorted({int(tm) for t in range(P) for tm in col[t, m] if tm >= 0})
            got = sorted(key % E for key in keys)
        else:
            t = P + st.step - 1
            want = [int(x) for x in col[t, m] if x >= 0]
            got = [key % E for key in keys]
        assert got == want, (g, d)
        checked += 1
    assert checked == sum(1 for m in range(M) for d in (1, 2) if m + d < M) * len(run.steps)


# ------------------------------------------------------------------------------ the host queue
def _queue_run(copy_delay: float = 0.05, cap: int = 2, slots: int = 8):
    lm = tiny("mixtral")
    om = OffloadedModel(lm, max_slots=slots, backend=ThreadBackend(copy_delay_s=copy_delay))
    ev, pf = policy()
    run = om.start_run(RunConfig(eviction=ev, prefetch=pf, slots=slots, copies_in_flight=cap))
    return om, run


def test_queue_demand_first_fifo_within_priority_and_bounded_in_flight():
    om, run = _queue_run()
    try:
        run.apply([Fetch(5, 2), Fetch(1, 1), Fetch(6, 2), Fetch(2, 1)])
        run.request(7, 0)  # demand
        run.try_issue()
        assert len(run.in_flight) == 2  # copies_in_flight bounds the stream
        assert [k for _, _, k, _ in run.copy_log] == [7, 1]
        order = []
        while run.queue or run.in_flight:
            run.ensure_issued({k for k in (1, 2, 5, 6, 7)})
            order = [k for _, _, k, _ in run.copy_log]
            assert len(run.in_flight) <= 2
        assert order == [7, 1, 2, 5, 6]  # demand, then priority 1 in FIFO order, then priority 2
        assert [pf for *_, pf in run.copy_log] == [False, True, True, True, True]
        om.end_run()
        assert all(run.cache.state[k] == RESIDENT for k in order)
    finally:
        om.close()


def test_queue_cancellation_and_promotion():
    om, run = _queue_run()
    try:
        run.request(0, 0)
        run.request(1, 0)
        run.try_issue()  # 0 and 1 fill the stream
        run.apply([Fetch(7, 1), Fetch(8, 1), Fetch(9, 2)])
        run.apply([Cancel(8), Cancel(0)])  # a queued prefetch goes; cancelling an issued copy is a no-op
        run.request(9, 0)  # promotion: the queued prefetch of 9 becomes a demand, ahead of 7
        run.apply([Fetch(6, 1), Cancel(9)])  # a demand is never cancelled
        assert 8 not in run.queue and 9 in run.queue and run.queue.priority(9) == 0
        run.ensure_issued({7, 9, 6})
        om.end_run()
        issued = [k for _, _, k, _ in run.copy_log]
        assert issued == [0, 1, 9, 7, 6]
        assert run.cache.state[8] == ABSENT
        assert [pf for *_, pf in run.copy_log] == [False, False, False, True, True]
    finally:
        om.close()


def test_blocked_queue_with_nothing_in_flight_is_a_clear_error():
    lm = tiny("mixtral")
    om = OffloadedModel(lm, max_slots=2)
    ev, pf = policy()
    run = om.start_run(RunConfig(eviction=ev, prefetch=pf, slots=2))
    try:
        for key in (0, 1, 2):
            run.cache.in_use[key] += 1
        run.request(0, 0)
        run.request(1, 0)
        run.ensure_issued({0, 1})
        run.request(2, 0)
        with pytest.raises(ExecutorError, match="can never arrive"):
            run.ensure_issued({2})
    finally:
        om.close()


# ------------------------------------------------------------------------------ slot reuse
def _eager_expert_out(om, m, hidden, ids, w):
    """Reference output of one MoE layer computed from the host store (eager formula)."""
    E = om.E
    out = torch.zeros_like(hidden)
    parts = {p.name: p for p in om.parts}
    for e in sorted({int(x) for row in ids for x in row}):
        key = m * E + e
        gu = om.store.tensor(key, parts["gate_up_proj"])
        dn = om.store.tensor(key, parts["down_proj"])
        for t, row in enumerate(ids):
            if e in row:
                pos = row.index(e)
                g, u = torch.nn.functional.linear(hidden[t:t + 1], gu).chunk(2, dim=-1)
                o = torch.nn.functional.linear(om.modules[m].act_fn(g) * u, dn) * w[t, pos]
                out[t] += o[0]
    return out


@pytest.mark.parametrize("unsafe", [False, True])
def test_slot_reuse_never_overlaps_a_pending_read(unsafe):
    """Copies and computations on two asynchronous CPU streams with artificial delays: every slot
    is rewritten only after the computations reading it ended, so every layer's output is right.
    The ablation without the guards (unsafe) shows the test detects the race."""
    lm = tiny("mixtral")
    be = ThreadBackend(copy_delay_s=0.004, compute_delay_s=0.01, async_compute=True)
    M, E, k = lm.shape.num_moe_layers, lm.shape.num_experts, lm.shape.top_k
    om = OffloadedModel(lm, max_slots=k + 1, backend=be)
    reads: list[tuple[int, float, float]] = []
    real = om.compute

    def logged(module, hidden, idx, w, ids, rows, experts, slots, out):
        import time as _t
        t0 = _t.perf_counter()
        r = real(module, hidden, idx, w, ids, rows, experts, slots, out)
        _t.sleep(0.003)  # the read is "in progress" a little longer
        for s in slots.values():
            reads.append((s, t0, _t.perf_counter()))
        return r

    om.compute = logged
    ev, pf = policy()
    run = om.start_run(RunConfig(eviction=ev, prefetch=pf, slots=k + 1, copies_in_flight=2))
    run._unsafe_no_guard = unsafe
    rng = np.random.default_rng(0)
    H = lm.model.config.hidden_size
    outs = []
    run.request_start(0)
    for step in range(6):
        run.begin_step(0, step, 1)
        for m in range(M):
            ids = [rng.choice(E, size=k, replace=False).tolist()]
            hidden = torch.randn(1, H)
            w = torch.rand(1, k)
            idx = torch.tensor(ids)
            out = run.layer_forward(m, om.modules[m], hidden, idx, w)
            outs.append((m, hidden, ids, w, out))
        run.end_step()
    run.request_end(0)
    om.end_run()
    ptr = {om.slot_bytes[s].data_ptr(): s for s in range(om.num_slots)}
    writes = [(ptr[p], a, b) for p, a, b in be.write_log]
    overlaps = [(s, w0, w1) for s, w0, w1 in writes for r, r0, r1 in reads if r == s and w0 < r1 and r0 < w1]
    wrong = sum(not torch.equal(out, _eager_expert_out(om, m, h, ids, w)) for m, h, ids, w, out in outs)
    om.close()
    if unsafe:
        assert overlaps or wrong, "the ablation should expose the race"
    else:
        assert not overlaps and wrong == 0


# ------------------------------------------------------------------------------ same decisions
ZERO_LINK = ["hardware.h2d_gbps=1e9", "hardware.pageable_h2d_gbps=1e9", "hardware.copy_latency_s=0",
             "hardware.copy_issue_overhead_s=0", "hardware.decision_delay_s=0"]


def _run_cfg(*overrides):
    from runtime.__main__ import register_configs
    from sim.presets import conf_dir

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="run", overrides=["device=cpu", *overrides])


@pytest.mark.parametrize("layout", ["cache.slots=6", "cache.per_layer=3"])
def test_same_policy_objects_same_decisions_in_simulator_and_runtime(layout):
    """Replaying one trace, each policy class makes the same decisions hosted by the simulator (a
    zero-time link) and by the runtime (the CPU's inline copy stream): the same copies in the same
    order, demand or prefetch, the same hits, misses and evictions."""
    from runtime.measure import Session
    from sim.run import load_policy, run_policy

    cfg = _run_cfg("model=tiny", "trace.requests=2", "trace.prompt_tokens=6", "trace.decode_tokens=16", layout,
                   "policy=baselines", *ZERO_LINK)
    sess = Session(cfg, max_slots=10**6)  # the pool: every expert (stream needs a whole layer)
    prep = sess.prepare(cfg)
    names = ["lru", "lfu", "fifo", "belady", "lookahead", "history", "oracle"]
    if layout == "cache.slots=6":
        names.append("stream")
    try:
        for name in names:
            p = load_policy(name)
            # the admission rule weighs time: the CPU's measured clock is not the zero-time link's,
            # so both hosts issue every prefetch here (the virtual-time test below keeps the rule)
            p.admission = False
            if name == "stream":  # a whole layer's slots (the plan of a caching policy, resized)
                from dataclasses import replace
                plan = replace(sess.plan(cfg, load_policy("lru")), slots=prep.model.num_experts)
            else:
                plan = sess.plan(cfg, p)
            run = sess.run_config(cfg, p, plan, schedule=prep.schedule, trace=prep.trace)
            _, (sim, log) = run_policy(prep, p, 0, timeline=True, plan=plan)
            got = [(k, pf) for _, _, k, pf in run.copy_log]
            want = [(k, pf) for _, _, k, pf in log.copy_spans]
            assert got == want, name
            assert (run.hits, run.late, run.misses, run.cache.evictions) == (log.hits, log.late, log.misses, log.evictions), name
            assert run.useful == log.useful_prefetch_bytes // prep.model.bytes_per_expert(), name
    finally:
        sess.close()


@pytest.mark.parametrize("memory", ["pinned", "pageable"])
@pytest.mark.parametrize("layout", ["cache.slots=6", "cache.per_layer=3"])
def test_virtual_time_runtime_makes_exactly_the_simulators_decisions(layout, memory):
    """With non-zero copy and compute times (the tiny preset's link, the cost model's durations),
    the runtime on the deterministic virtual-time backend and the simulator make the same decisions
    for every autoregressive policy: the same copies in the same order, demand or prefetch, the
    same hits, late experts, misses, evictions and useful prefetches; and the same token times
    (within floating-point rounding: the two sum the same durations in a different order). Also
    with copies from pageable host memory, which hold the host until they land (the runtime's
    backend blocks on each, the simulator's host keeps the time it is held)."""
    from runtime.measure import Session, run_log
    from sim.run import load_policy, run_policy

    cfg = _run_cfg("model=tiny", "trace.requests=2", "trace.prompt_tokens=6", "trace.decode_tokens=16", layout,
                   "policy=baselines", "cpu_backend=virtual", "hardware.decision_delay_s=2e-5",
                   f"hardware.host_memory={memory}")
    sess = Session(cfg, max_slots=10**6)
    prep = sess.prepare(cfg)
    names = ["lru", "lfu", "fifo", "belady", "lookahead", "history", "oracle"]
    if layout == "cache.slots=6":
        names.append("stream")
    stall = 0.0
    try:
        for name in names:
            p = load_policy(name)
            if name == "stream":  # a whole layer's slots (the plan of a caching policy, resized)
                from dataclasses import replace
                plan = replace(sess.plan(cfg, load_policy("lru")), slots=prep.model.num_experts)
            else:
                plan = sess.plan(cfg, p)
            run = sess.run_config(cfg, p, plan, schedule=prep.schedule, trace=prep.trace)
            _, (sim, log) = run_policy(prep, p, 0, timeline=True, plan=plan)
            got = [(k, pf) for _, _, k, pf in run.copy_log]
            want = [(k, pf) for _, _, k, pf in log.copy_spans]
            assert got == want, name
            assert (run.hits, run.late, run.misses, run.cache.evictions) == (log.hits, log.late, log.misses, log.evictions), name
            assert run.useful == log.useful_prefetch_bytes // prep.model.bytes_per_expert(), name
            rl = run_log(run)
            assert np.allclose(np.concatenate(rl.token_times), np.concatenate(log.token_times), rtol=1e-9, atol=0), name
            sec = run.backend.seconds
            assert np.allclose([sec(b) for _, b, _, _ in run.copy_log], [b for _, b, _, _ in log.copy_spans],
                               rtol=1e-9, atol=0), name
            assert rl.coverage == pytest.approx(log.coverage, rel=1e-12), name
            # the layer coverage of decode passes and the prefill's copies, counted by the same host
            assert (rl.coverage_layers, rl.prefill_copies) == (log.coverage_layers, log.prefill_copies), name
            assert (rl.coverage_ready_sum, rl.coverage_requested_sum) == pytest.approx(
                (log.coverage_ready_sum, log.coverage_requested_sum), rel=1e-12), name
            stall += log.stall
    finally:
        sess.close()
    assert stall > 0  # the compute stream waits for copies: the copy times matter in this setup


@pytest.mark.parametrize("layout", ["cache.slots=6", "cache.per_layer=3"])
def test_the_runtimes_logged_decisions_replayed_by_the_simulator_give_its_token_times(layout, tmp_path):
    """Validation level replayed on the virtual-time backend (both sides the same model): the
    decisions the runtime logged (the prefetches it issued where they were decided, its evictions),
    written to a decisions file and read back, make the simulator's replay reproduce the runtime's
    token times (floating-point rounding apart), its copies and its evictions."""
    from runtime.measure import Session, run_log
    from sim.decisions import DecisionLog
    from sim.run import load_policy, run_policy

    cfg = _run_cfg("model=tiny", "trace.requests=3", "trace.prompt_tokens=6", "trace.decode_tokens=16", layout,
                   "policy=baselines", "cpu_backend=virtual", "hardware.decision_delay_s=2e-5")
    sess = Session(cfg, max_slots=10**6)
    prep = sess.prepare(cfg)
    try:
        for name in ["lru", "lookahead", "history"]:
            p = load_policy(name)
            p.admission = name != "history"  # the tiny preset's link: the admission rule refuses every history guess
            plan = sess.plan(cfg, p)
            run = sess.run_config(cfg, p, plan, schedule=prep.schedule, trace=prep.trace, decisions=True)
            rl = run_log(run)
            path = run.recorder.decisions(rl.cycles, policy=name).save(tmp_path / f"{name}.parquet")
            d = DecisionLog.load(path)
            assert bool(d.prefetches) == (name != "lru"), name
            assert [x.key for x in d.prefetches] == [k for _, _, k, pf in run.copy_log if pf], name
            srow, (sim, log) = run_policy(prep, p, 0, timeline=True, plan=plan, decisions=d)
            assert np.allclose(np.concatenate(rl.token_times), np.concatenate(log.token_times), rtol=1e-9, atol=0), name
            assert [(k, pf) for _, _, k, pf in run.copy_log] == [(k, pf) for _, _, k, pf in log.copy_spans], name
            assert run.cache.evictions == log.evictions == len(d.evictions), name
            assert srow["replay_unreached"] == 0 and srow["replayed_prefetches"] == len(d.prefetches), name
    finally:
        sess.close()


def test_a_speculative_runs_logged_k_and_elb_prefetches_replay_in_the_simulator():
    """Speculative replay (mode=replay, the CPU's inline backend, the roofline governor choosing k
    from measured costs): the run logs the k of each cycle and the ELB policy's prefetches at their
    draft tokens; the simulator's replay plays the same k back (so the same cycles and acceptance),
    reaches every logged decision point, and replays MoE-SpeQ's lookahead-aware victims."""
    from runtime.measure import Session
    from sim.run import load_policy, run_policy

    cfg = _run_cfg("model=tiny", "policy.suite=[speq,spmoe]", "policy.name=s", "repetitions=1", "warmup_steps=0",
                   "trace.requests=2", "trace.prompt_tokens=5", "trace.decode_tokens=24", "governor=roofline",
                   "governor.k_max=5", "governor.warmup_cycles=1", "cache.slots=12", "predict=false")
    sess = Session(cfg)
    got = {}
    try:
        sess.measure(cfg, decisions=True,
                     on_run=lambda p, run, lg, row: got.__setitem__(p.name, (run.recorder.decisions(lg.cycles), lg)))
        prep = sess.prepare(cfg)
    finally:
        sess.close()
    assert set(got) == {"speq", "spmoe"}
    for name, (d, lg) in got.items():
        assert d.ks() == [c["k"] for c in lg.cycles] and len(set(d.ks())) > 1, name  # the governor varied k
        assert any(p.point.hook == "draft_token" for p in d.prefetches), name
        srow, (_, log) = run_policy(prep, load_policy(name), 0, trace_cfg=cfg.trace, decisions=d)
        assert [c["k"] for c in log.cycles] == d.ks(), name
        assert [c["accepted"] for c in log.cycles] == [c["accepted"] for c in lg.cycles], name
        assert srow["replay_unreached"] == srow["replay_k_capped"] == srow["replay_cycles_unreached"] == 0, name
        if name == "speq":  # its eviction follows the ELB: the recorded victims, every one evictable in the replay
            assert d.evictions and srow["replay_eviction_fallbacks"] == 0


def test_slot_cache_reuses_the_victims_slot():
    ev = EVICTION.create("lru")
    from sim.policies import PolicyContext

    ctx = PolicyContext(1, 4, 1, lambda g: (), 0, lambda k, g: 0, lambda k: 0, lambda g: None)
    ev.attach(ctx, 1)
    c = SlotCache(1, 4, ev, slots=2)
    assert c.load(0, 0, 0) and c.load(1, 0, 0)
    c.state[0] = c.state[1] = RESIDENT
    s0 = c.slot_of[0]
    assert c.load(2, 0, 1) and c.slot_of[2] == s0 and 0 not in c.slot_of
    assert sorted(c.slot_of.values()) == [0, 1]


def test_host_store_packs_each_expert_once():
    lm = tiny("gpt_oss")
    mods = [h.experts for h in lm.moe_handles]
    want = {(m, e, n): getattr(mod, n).detach()[e].clone() for m, mod in enumerate(mods)
            for e in range(lm.shape.num_experts) for n in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")}
    om = OffloadedModel(lm, max_slots=2)
    E = lm.shape.num_experts
    assert om.store.total_bytes == om.M * E * om.nbytes
    for (m, e, n), t in want.items():
        part = next(p for p in om.parts if p.name == n)
        assert torch.equal(view_part(om.store.expert(m * E + e), part), t)
    assert all(getattr(mod, "gate_up_proj").device.type == "meta" for mod in mods)
    om.close()


def test_cuda_backend_control_path_with_a_stand_in_for_cuda(monkeypatch):
    """The CudaBackend's own code (streams, timing events, waits, elapsed times, the copy-bandwidth
    probe, pacing) runs on the CPU against a stand-in for torch.cuda's stream and event objects:
    no GPU semantics are tested here (tests/test_runtime_executor_gpu.py does that on a GPU), only
    that the executor drives them correctly end to end."""
    import contextlib
    import time as _time

    from runtime import backends as ex

    class Ev:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self, stream=None):
            self.t = _time.perf_counter()

        def query(self):
            return self.t is not None

        def synchronize(self):
            assert self.t is not None, "synchronize on an event never recorded"

        def elapsed_time(self, other):
            assert self.t is not None and other.t is not None
            return (other.t - self.t) * 1e3

    class St:
        waited = 0

        def __init__(self, device=None):
            pass

        def wait_event(self, e):
            assert e.t is not None
            St.waited += 1

    slept = []
    monkeypatch.setattr(torch.cuda, "Event", Ev)
    monkeypatch.setattr(torch.cuda, "Stream", St)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: St())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: slept.append(cycles))
    be = ex.CudaBackend(torch.device("cpu"))
    ref = reference_decode(tiny("phimoe").model, PROMPTS, NEW)
    lm = tiny("phimoe")
    M, E, k = lm.shape.num_moe_layers, lm.shape.num_experts, lm.shape.top_k
    om = OffloadedModel(lm, max_slots=M * E, backend=be)
    assert om.measure_copy() > 0 and om.copy_s > 0
    assert be.calibrate_sleep() > 0
    ev, pf = policy("lru", "history")
    run = om.start_run(RunConfig(eviction=ev, prefetch=pf, slots=k + 1, link_pace_gbps=1e-3))
    out = live(om, run, PROMPTS, NEW, keep_logits=True)
    om.end_run()
    from runtime.measure import run_log

    log = run_log(run)
    om.close()
    assert out["tokens"] == ref["tokens"] and equal_logits(out["logits"], ref["logits"])
    assert run.copies > 0 and len(slept) >= run.copies and St.waited > 0
    assert log.run_time > 0 and len(log.copy_spans) == run.copies and log.compute_spans


def test_cache_reset_request_same_decisions_in_both_hosts():
    """cache.reset=request on the virtual-time backend: at each request the cache and the policies
    start afresh in the runtime exactly as in the simulator (copies, hits, misses, evictions)."""
    from runtime.measure import Session
    from sim.run import load_policy, run_policy

    cfg = _run_cfg("model=tiny", "trace.requests=3", "trace.prompt_tokens=4", "trace.decode_tokens=12", "cache.slots=6",
                   "cache.reset=request", "policy=baselines", "cpu_backend=virtual", "hardware.decision_delay_s=2e-5")
    sess = Session(cfg, max_slots=10**6)
    prep = sess.prepare(cfg)
    assert prep.reset == "request"
    try:
        for name in ["lru", "lfu", "belady", "lookahead", "history"]:
            p = load_policy(name)
            plan = sess.plan(cfg, p)
            run = sess.run_config(cfg, p, plan, schedule=prep.schedule, trace=prep.trace)
            _, (sim, log) = run_policy(prep, p, 0, timeline=True, plan=plan)
            assert [(k, pf) for _, _, k, pf in run.copy_log] == [(k, pf) for _, _, k, pf in log.copy_spans], name
            assert (run.hits, run.late, run.misses, run.cache.evictions) == (log.hits, log.late, log.misses, log.evictions), name
    finally:
        sess.close()
