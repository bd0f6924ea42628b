"""The lean decode path (runtime/lean.py): static KV cache and segments between MoE layers.

CPU: the static-KV path equals transformers' dynamic-KV forward bit for bit (fp32, every supported
family, both attention implementations, the project's small-moe checkpoint); the masked whole-window
form the graphs use equals it within fp32 rounding; the grouped experts kernel and the INT4 draft's
kernel path against their references. GPU-marked: graphed logits equal eager logits (bf16).
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from runtime.lean import (  # noqa: E402
    LEAN_FAMILIES,
    UNSUPPORTED,
    GroupedExperts,
    Int4Experts,
    LeanError,
    LeanModel,
    int4_reference,
    resolve_engine,
)
from runtime.models import load_model  # noqa: E402
from runtime.replay import reference_decode  # noqa: E402

PROMPT = [5, 9, 17, 33, 2, 8, 11, 40, 3]
SMALL_MOE = Path(__file__).resolve().parents[1] / "models" / "small-moe"


def lean_decode(lean: LeanModel, prompt: list[int], new_tokens: int, *, whole_window: bool = False,
                graphed: bool = False) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding through the lean model: prefill, then one token per step."""
    toks = torch.tensor([prompt], device=lean.device)
    start, out, lg = 0, [], []
    with torch.inference_mode():
        for _ in range(new_tokens):
            T = toks.shape[1]
            if graphed and T == 1:
                logits = lean.forward_graphed(toks, start)
            else:
                logits = lean.forward_eager(toks, start, None if (whole_window and T == 1) else start + T)
            lg.append(logits.float().cpu())
            nxt = logits.argmax(-1).reshape(1, 1)
            out.append(int(nxt))
            start += T
            toks = nxt
    return out, lg


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("fam", LEAN_FAMILIES)
def test_static_kv_equals_dynamic_kv_exactly(fam, attn):
    """Same modules, same weights: the static cache read over its written prefix computes exactly what
    transformers' DynamicCache computes, prefill and every decode step, bit for bit in fp32."""
    torch.manual_seed(0)
    lm = load_model(f"tiny-{fam}", device="cpu", attn_implementation=attn)
    ref = reference_decode(lm.model, [PROMPT], 6)
    toks, logits = lean_decode(LeanModel(lm, max_len=32), PROMPT, 6)
    assert toks == ref["tokens"][0]
    for a, b in zip(logits, ref["logits"][0]):
        assert torch.equal(a, b)


def test_small_moe_checkpoint_static_equals_dynamic():
    lm = load_model(SMALL_MOE, device="cpu", dtype="float32")
    ref = reference_decode(lm.model, [PROMPT], 5)
    toks, logits = lean_decode(LeanModel(lm, max_len=64), PROMPT, 5)
    assert toks == ref["tokens"][0]
    assert all(torch.equal(a, b) for a, b in zip(logits, ref["logits"][0]))


@pytest.mark.parametrize("fam", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_whole_window_mask_matches_prefix_within_fp32_rounding(fam):
    """The graphs' form (all max_len keys, a mask built from the position) differs from the prefix
    only in reduction order over the masked keys."""
    lm = load_model(f"tiny-{fam}", device="cpu")
    a_t, a = lean_decode(LeanModel(lm, max_len=48), PROMPT, 6)
    b_t, b = lean_decode(LeanModel(lm, max_len=48), PROMPT, 6, whole_window=True)
    assert a_t == b_t
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fam", ["mixtral", "qwen3_moe", "olmoe"])
def test_grouped_experts_match_module_loop(fam):
    """One grouped GEMM per projection over all experts (device-side sort and offsets) computes the
    eager loop's rows: several tokens, repeated experts across tokens."""
    lm = load_model(f"tiny-{fam}", device="cpu")
    mods = [h.experts for h in lm.moe_handles]
    g = GroupedExperts(mods)
    gen = torch.Generator().manual_seed(1)
    for m, mod in enumerate(mods):
        h = torch.randn(5, lm.config.hidden_size, generator=gen)
        idx = torch.stack([torch.randperm(int(mod.num_experts), generator=gen)[: lm.shape.top_k] for _ in range(5)])
        w = torch.rand(5, lm.shape.top_k, generator=gen)
        with torch.inference_mode():
            assert torch.allclose(g(m, h, idx, w), mod(h, idx, w), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fam", ["mixtral", "qwen3_moe"])
def test_int4_kernel_path_matches_dequantising_reference(fam):
    """torch's packed int4 kernel (CPU variant) on the gathered experts vs the same quantized weights
    dequantized and run by the module's loop (the labelled reference)."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch has no CPU int4 kernel")
    over = dict(hidden_size=128, intermediate_size=128)
    if fam == "qwen3_moe":
        over["moe_intermediate_size"] = 128
    lm = load_model(f"tiny-{fam}", device="cpu", config_overrides=over)
    mods = [h.experts for h in lm.moe_handles]
    fast, ref = Int4Experts(mods, group_size=64), int4_reference(mods, group_size=64)
    gen = torch.Generator().manual_seed(2)
    for m in range(len(mods)):
        h = torch.randn(3, 128, generator=gen)
        idx = torch.stack([torch.randperm(int(mods[m].num_experts), generator=gen)[:2] for _ in range(3)])
        w = torch.rand(3, 2, generator=gen)
        with torch.inference_mode():
            a, b = fast(m, h, idx, w), ref(m, h, idx, w)
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
        # and the quantization is real: far from the unquantized experts
        with torch.inference_mode():
            assert not torch.allclose(a, mods[m](h, idx, w), atol=1e-5)


@pytest.mark.parametrize("fam", sorted(UNSUPPORTED))
def test_unsupported_families_are_refused(fam):
    lm = load_model(f"tiny-{fam}", device="cpu")
    with pytest.raises(LeanError, match="not supported"):
        LeanModel(lm, max_len=16)


def test_settings_refused_clearly():
    lm = load_model("tiny-mixtral", device="cpu")
    with pytest.raises(LeanError, match="max_len"):
        LeanModel(lm, max_len=10_000)
    with pytest.raises(LeanError, match="CUDA"):
        LeanModel(lm, max_len=16, graphs=True)
    assert resolve_engine(None, "cpu") == "eager" and resolve_engine("auto", "cuda") == "graphed"
    with pytest.raises(LeanError, match="engine"):
        resolve_engine("fast", "cpu")


# ------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fam", LEAN_FAMILIES)
@pytest.mark.parametrize("grouped", [False, True])
def test_graphed_logits_equal_eager_on_cuda(fam, grouped):
    """bf16 on the GPU: decode steps through the captured graphs (whole window, mask on the device,
    routing via pinned memory) vs transformers' eager forward of the same model."""
    lm = load_model(f"tiny-{fam}", device="cuda", dtype="bfloat16")
    ref = reference_decode(lm.model, [PROMPT], 6)
    mods = [h.experts for h in lm.moe_handles]
    lean = LeanModel(lm, max_len=32, experts=GroupedExperts(mods) if grouped else None)
    toks, logits = lean_decode(lean, PROMPT, 6, graphed=True)
    for a, b in zip(logits, ref["logits"][0]):
        assert torch.allclose(a, b, atol=2e-2, rtol=2e-2)
    assert toks == ref["tokens"][0]
    ids, w = lean.routing(0)
    assert ids.shape == (1, lm.shape.top_k) and (ids >= 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("grouped", [False, True])
def test_verify_pass_graphs_equal_eager_on_cuda(grouped):
    """A (k + 1)-token step (the speculative verify pass) through the graphs captured for its length
    gives the eager segments' logits at every position; one-token graphs still follow it."""
    lm = load_model("tiny-qwen3_moe", device="cuda", dtype="bfloat16")
    mods = [h.experts for h in lm.moe_handles]
    make = (lambda: GroupedExperts(mods)) if grouped else (lambda: None)
    lean, ref = LeanModel(lm, max_len=32, experts=make()), LeanModel(lm, max_len=32, experts=make(), graphs=False)
    ids = torch.tensor([[4, 21, 7, 13]], device="cuda")
    with torch.inference_mode():
        p = torch.tensor([PROMPT], device="cuda")
        lean.forward_eager(p, 0, len(PROMPT))
        ref.forward_eager(p, 0, len(PROMPT))
        a = lean.forward_graphed(ids, len(PROMPT)).float().clone()
        ref.all_logits = True
        b = ref.forward_eager(ids, len(PROMPT), None).float()  # the masked whole window, as the graphs
        ref.all_logits = False
        assert a.shape == b.shape == (4, lm.config.vocab_size)
        assert torch.allclose(a, b, atol=2e-2, rtol=2e-2)
        nxt = torch.tensor([[9]], device="cuda")
        c = lean.forward_graphed(nxt, len(PROMPT) + 4).float().clone()
        d = ref.forward_eager(nxt, len(PROMPT) + 4, None).float()
        assert torch.allclose(c, d, atol=2e-2, rtol=2e-2)
        assert sorted(lean._sets) == [1, 4]


# ------------------------------------------------------------------------------ the runtime's engine switch
def _run_cfg(*overrides: str):
    from hydra import compose, initialize_config_dir

    from runtime.__main__ import register_configs, rewrite_args
    from sim.presets import conf_dir

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="run", overrides=rewrite_args(["device=cpu", "repetitions=1", "predict=false", *overrides]))


@pytest.mark.parametrize("mode", ["live", "replay"])
def test_engine_switch_same_decisions_and_tokens_on_cpu(mode):
    """engine=graphed on the CPU runs the lean segments uncaptured with the executor's experts: the
    host controller sees the same routing, so every count and the generated tokens equal
    engine=eager's; the engine is a column and part of config_id."""
    from runtime.measure import Session

    over = ["model=tiny", "trace.requests=2", "trace.prompt_tokens=6", "trace.decode_tokens=8", "cache.slots=5",
            "policy=lru", f"mode={mode}"]
    rows = {}
    for engine in ("eager", "graphed"):
        cfg = _run_cfg(*over, f"engine={engine}")
        sess = Session(cfg)
        try:
            rows[engine] = sess.measure(cfg)[0]
            if mode == "live":
                rows[engine]["tokens"] = sess.executed.expert_ids.tolist()
        finally:
            sess.close()
    a, b = rows["eager"], rows["graphed"]
    assert a["status"] == b["status"] == "ok"
    assert (a["engine"], b["engine"]) == ("eager", "graphed") and a["config_id"] != b["config_id"]
    for col in ("hits", "misses", "late", "copies", "gb_moved", "hit_rate"):
        if col in a:
            assert a[col] == b[col], col
    if mode == "live":
        assert a["tokens"] == b["tokens"]  # the executed routing, token by token


def test_engine_refused_before_building():
    from runtime.executor import ExecutorError
    from runtime.measure import check_config

    from hydra.errors import ConfigCompositionException

    with pytest.raises(ExecutorError, match="engine='ideal'"):  # a simulator-only path
        check_config(_run_cfg("engine=ideal"))
    with pytest.raises(ConfigCompositionException, match="engine/fast"):  # engine= is the conf/engine group
        _run_cfg("engine=fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_graph_step_and_int4_draft_on_cuda():
    """The whole-step graph gives the per-layer graphs' logits; the INT4 draft's tinygemm path equals
    its dequantising reference within bf16 rounding, and its routing lands in the pinned ELB row."""
    over = dict(hidden_size=128, intermediate_size=128)
    lm = load_model("tiny-mixtral", device="cuda", dtype="bfloat16", config_overrides=over)
    mods = [h.experts for h in lm.moe_handles]
    lean = LeanModel(lm, max_len=32, experts=GroupedExperts(mods))
    with torch.inference_mode():
        lean.forward_eager(torch.tensor([PROMPT], device="cuda"), 0, len(PROMPT))
        tok = torch.tensor([[7]], device="cuda")
        a = lean.forward_graphed(tok, len(PROMPT)).float().clone()
        lean.capture_step()
        lean.tok.copy_(tok)
        b = lean.step_one_graph(len(PROMPT), feed_back=False).float()
        torch.cuda.synchronize()
    assert torch.allclose(a, b, atol=2e-2, rtol=2e-2)
    q, ref = Int4Experts(mods, group_size=64), int4_reference(mods, group_size=64)
    h = torch.randn(1, 128, dtype=torch.bfloat16, device="cuda")
    idx = torch.tensor([[0, 3]], device="cuda")
    w = torch.tensor([[0.7, 0.3]], dtype=torch.bfloat16, device="cuda")
    with torch.inference_mode():
        x, y = q(0, h, idx, w).float(), ref(0, h, idx, w).float()
    assert (x - y).norm() / y.norm() < 2e-2
    draft = LeanModel(lm, max_len=32, experts=q)
    elb = torch.full((lm.shape.num_moe_layers, 2 * lm.shape.top_k), -1.0, pin_memory=True)
    with torch.inference_mode():
        draft.forward_eager(torch.tensor([PROMPT], device="cuda"), 0, len(PROMPT))
        draft.step_one_graph(len(PROMPT), elb)
        draft.step_event.synchronize()
    ids = elb[:, : lm.shape.top_k]
    assert ((ids >= 0) & (ids < lm.shape.num_experts)).all()
