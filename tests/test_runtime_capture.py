"""Routing capture on tiny random models of every supported family (CPU, fp32).

The references here are independent of runtime.capture's bookkeeping: routing is recomputed from
the routers' own logits with each family's published rule, and lookahead from the residual
stream recorded by the test's own hooks.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from runtime.capture import CaptureSettings, capture  # noqa: E402
from runtime.models import FAMILIES, load_model  # noqa: E402
from traces import read_trace, write_trace  # noqa: E402
from traces.trace import DECODE, PREFILL  # noqa: E402


def load_cpu(*args, **kwargs):
    """Tests compare fp32 results on the CPU, also on a machine with a GPU."""
    return load_model(*args, device="cpu", **kwargs)

FAMS = sorted(FAMILIES)
PROMPTS = ["hello world", "a b", "the quick brown fox jumps", "x"]
CREATED = "2026-01-01T00:00:00+00:00"


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(fam):
        if fam not in cache:
            lm = load_cpu(f"tiny-{fam}", seed=0)
            if fam == "deepseek_v3":  # make the correction bias matter in the reference test
                g = torch.Generator().manual_seed(1)
                for h in lm.moe_handles:
                    h.router.e_score_correction_bias.copy_(torch.rand(h.router.num_experts, generator=g) * 0.2)
            cache[fam] = lm
        return cache[fam]

    return get


def settings(**kw):
    base = dict(max_new_tokens=5, batch_size=4, lookahead=0, draft=False, progress=False)
    base.update(kw)
    return CaptureSettings(**base)


# ------------------------------------------------------------------ reference routing rules
def _topk_desc(w, ids):
    w, order = torch.sort(w, dim=-1, descending=True, stable=True)
    return w, torch.gather(ids, -1, order)


def reference_route(fam: str, router, logits: torch.Tensor):
    """Each family's routing rule, written from the model descriptions, applied to router logits."""
    x = logits.float()
    k = router.top_k
    if fam == "mixtral":
        w, i = torch.topk(x.softmax(-1), k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
    elif fam in ("qwen2_moe", "qwen3_moe", "olmoe"):
        w, i = torch.topk(x.softmax(-1), k, dim=-1)
        if router.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
    elif fam == "phimoe":
        eps = router.router_jitter_noise
        thr1, i1 = x.max(-1, keepdim=True)
        m1 = x.masked_fill((thr1 - x) / x.abs().clamp(min=thr1) > 2 * eps, float("-inf"))
        w1 = m1.softmax(-1).gather(-1, i1)
        x2 = x.scatter(-1, i1, float("-inf"))
        thr2, i2 = x2.max(-1, keepdim=True)
        m2 = x2.masked_fill((thr2 - x) / x.abs().clamp(min=thr2) > 2 * eps, float("-inf"))
        w2 = m2.softmax(-1).gather(-1, i2)
        w, i = torch.cat([w1, w2], -1), torch.cat([i1, i2], -1)
    elif fam == "deepseek_v2":
        p = x.softmax(-1)
        if router.topk_method == "group_limited_greedy":
            G = router.num_group
            gs = p.view(-1, G, p.shape[-1] // G).amax(-1)
            keep = torch.zeros_like(gs).scatter(1, torch.topk(gs, router.topk_group, dim=-1).indices, 1.0)
            p = p * keep.repeat_interleave(p.shape[-1] // G, dim=-1)
        w, i = torch.topk(p, k, dim=-1)
        w = w * router.routed_scaling_factor
    elif fam == "deepseek_v3":
        s = x.sigmoid()
        c = s + router.e_score_correction_bias.float()
        G = router.num_group
        E = s.shape[-1]
        gs = c.view(-1, G, E // G).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(gs).scatter(1, torch.topk(gs, router.topk_group, dim=-1).indices, 1.0)
        c = c.masked_fill(keep.repeat_interleave(E // G, dim=-1) == 0, float("-inf"))
        i = torch.topk(c, k, dim=-1).indices
        w = s.gather(-1, i)
        if router.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        w = w * router.routed_scaling_factor
    elif fam == "gpt_oss":
        v, i = torch.topk(x, k, dim=-1)
        w = v.softmax(-1)
    else:  # pragma: no cover
        raise AssertionError(fam)
    return _topk_desc(w, i)


@pytest.mark.parametrize("fam", FAMS)
def test_capture_matches_reference_routing(models, fam):
    lm = models(fam)
    logs: dict[int, list[torch.Tensor]] = {h.index: [] for h in lm.moe_handles}
    hooks = [
        h.router.register_forward_hook(lambda m, a, out, i=h.index: logs[i].append(out[0].detach().clone()))
        for h in lm.moe_handles
    ]
    prompt = "the quick brown fox jumps"
    try:
        tr = capture(lm, [prompt], settings(batch_size=1, max_new_tokens=6, stop_at_eos=False))
    finally:
        for hk in hooks:
            hk.remove()
    P = len(prompt.encode())
    n_tok = P + 5
    assert tr.lengths.tolist() == [n_tok]
    assert tr.position[0, :n_tok].tolist() == list(range(n_tok))
    assert tr.step[0, :n_tok].tolist() == [0] * P + [1, 2, 3, 4, 5]
    assert tr.phase[0, :n_tok].tolist() == [PREFILL] * P + [DECODE] * 5
    for m, layer in enumerate(lm.shape.moe_layers):
        calls = logs[layer]
        assert len(calls) == 6  # prefill + 5 decode steps
        logits = torch.cat(calls)  # (n_tok, E)
        router = lm.handles[layer].router
        w, ids = reference_route(fam, router, logits)
        assert np.array_equal(tr.expert_ids[0, :n_tok, m], ids.numpy()), (fam, layer)
        np.testing.assert_allclose(tr.gate_weights[0, :n_tok, m], w.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fam", FAMS)
def test_batch_with_padding_equals_one_by_one(models, fam):
    lm = models(fam)
    kw = dict(max_new_tokens=6, lookahead=2, draft=True)
    batched = capture(lm, PROMPTS, settings(batch_size=4, **kw), created=CREATED)
    single = capture(lm, PROMPTS, settings(batch_size=1, **kw), created=CREATED)
    assert np.array_equal(batched.lengths, single.lengths)
    for name in ("position", "step", "phase", "expert_ids", "draft", "draft_match"):
        assert np.array_equal(getattr(batched, name), getattr(single, name)), name
    for d in (1, 2):
        assert np.array_equal(batched.lookahead[d], single.lookahead[d])
    np.testing.assert_allclose(batched.gate_weights, single.gate_weights, rtol=1e-5, atol=1e-6)
    # padding rows dropped: exactly prompt + generated-but-processed tokens per request
    assert batched.lengths.tolist() == [len(p.encode()) + 5 for p in PROMPTS]


@pytest.mark.parametrize("fam", FAMS)
def test_lookahead_equals_later_router_on_normalised_residual(models, fam):
    lm = models(fam)
    D = 2
    resid: dict[int, list[torch.Tensor]] = {h.index: [] for h in lm.handles}
    hooks = [h.post_norm.register_forward_pre_hook(lambda m, a, i=h.index: resid[i].append(a[0].detach().clone()))
             for h in lm.handles]
    try:
        plain = capture(lm, ["abc de"], settings(batch_size=1, max_new_tokens=4, stop_at_eos=False), created=CREATED)
    finally:
        for hk in hooks:
            hk.remove()
    tr = capture(lm, ["abc de"], settings(batch_size=1, max_new_tokens=4, stop_at_eos=False, lookahead=D), created=CREATED)
    assert np.array_equal(plain.expert_ids, tr.expert_ids)
    moe = list(lm.shape.moe_layers)
    n = int(tr.lengths[0])
    for m, src in enumerate(moe):
        r = torch.cat([x.reshape(-1, x.shape[-1]) for x in resid[src]])  # (n, H), all steps
        assert r.shape[0] == n
        for d in range(1, D + 1):
            got = tr.lookahead[d][0, :n, m]
            if src + d not in moe:
                assert (got == -1).all(), (src, d)
                continue
            tgt = lm.handles[src + d]
            _, w, ids = tgt.router(tgt.post_norm(r))
            w, ids = _topk_desc(w.float(), ids)
            assert np.array_equal(got, ids.numpy()), (fam, src, d)


@pytest.mark.parametrize("fam", FAMS)
def test_draft_at_16_bits_reproduces_target(models, fam):
    lm = models(fam)
    tr = capture(lm, PROMPTS[:2], settings(max_new_tokens=5, draft=True, draft_bits=16))
    assert np.array_equal(tr.draft, tr.expert_ids)
    # decode rows: the draft's greedy token is the target's next token
    dec = (tr.phase == DECODE) & tr.valid_mask()
    assert tr.draft_match[dec].all()


def test_sparse_layouts_keyed_by_decoder_index(models):
    assert models("qwen2_moe").shape.moe_layers == (0, 2)  # mlp_only_layers=[1]
    assert models("qwen3_moe").shape.moe_layers == (1, 3)  # decoder_sparse_step=2
    assert models("deepseek_v2").shape.moe_layers == (1, 2)  # first_k_dense_replace=1
    assert models("qwen2_moe").shape.num_shared_experts == 1
    assert models("deepseek_v3").shape.num_shared_experts == 1
    tr = capture(models("qwen3_moe"), ["hi"], settings(max_new_tokens=2, lookahead=2))
    # layer 1 -> 3 exists at d=2, nothing at d=1
    assert (tr.lookahead[1][tr.valid_mask()] == -1).all()
    assert (tr.lookahead[2][..., 0, :][tr.valid_mask()] >= 0).all()
    assert (tr.lookahead[2][..., 1, :][tr.valid_mask()] == -1).all()


def test_trace_file_roundtrip_and_metadata(models, tmp_path):
    lm = models("mixtral")
    tr = capture(lm, PROMPTS, settings(lookahead=2, draft=True), prompts_origin={"origin": "test"})
    path = write_trace(tr, tmp_path / "t.parquet")
    back = read_trace(path)
    assert back.equals(tr)
    meta = back.meta
    assert meta["model"]["source"] == "tiny-mixtral" and meta["model"]["weights"] == "random"
    assert meta["prompts"]["origin"] == "test" and "bytes" in meta["prompts"]["tokenizer"]
    assert meta["capture"]["lookahead"] == 2 and meta["capture"]["draft"] is True
    assert meta["capture"]["draft_bits"] == 4 and meta["capture"]["draft_group_size"] == 128
    for key in ("torch", "transformers", "python"):
        assert key in meta["versions"]
    assert meta["created"]
    assert meta["requests"]["prompt_tokens"] == [len(p.encode()) for p in PROMPTS]
    assert back.shape == lm.shape


def test_one_host_copy_per_step(models):
    lm = models("olmoe")
    tr = capture(lm, PROMPTS, settings(batch_size=2, max_new_tokens=4, lookahead=1, draft=True, stop_at_eos=False))
    cap = tr.meta["capture"]
    assert cap["host_copies"] == cap["steps"] == 2 * 4  # two batches, prefill + 3 decode steps each


def test_deterministic(models):
    lm = models("deepseek_v2")
    a = capture(lm, PROMPTS, settings(lookahead=1, draft=True), created=CREATED)
    b = capture(load_cpu("tiny-deepseek_v2", seed=0), PROMPTS, settings(lookahead=1, draft=True), created=CREATED)
    assert a.equals(b)


def test_stop_at_eos_and_zero_new_tokens(models):
    lm = models("mixtral")
    tr = capture(lm, ["hello"], settings(max_new_tokens=0))
    assert tr.lengths.tolist() == [5] and (tr.phase[0, :5] == PREFILL).all()
    eos = int(lm.model.generation_config.eos_token_id)
    # force an EOS as the first generated token: the request stops after prefill
    bias = torch.zeros(lm.config.vocab_size)
    bias[eos] = 1e4
    head = lm.model.get_output_embeddings()
    old = head.bias
    head.bias = torch.nn.Parameter(bias, requires_grad=False)
    try:
        tr = capture(lm, ["hello", "hi"], settings(max_new_tokens=5))
        assert tr.lengths.tolist() == [5, 2]
        assert tr.meta["requests"]["new_tokens"] == [1, 1]
        tr = capture(lm, ["hello"], settings(max_new_tokens=3, stop_at_eos=False))
        assert tr.lengths.tolist() == [7]
    finally:
        head.bias = old


def test_token_id_prompts_and_empty_prompt_error(models):
    from runtime.capture import CaptureError

    lm = models("mixtral")
    tr = capture(lm, [[5, 6, 7], [9]], settings(max_new_tokens=2))
    assert tr.lengths.tolist() == [4, 2]
    with pytest.raises(CaptureError, match="prompt 1"):
        capture(lm, ["ok", ""], settings())
    with pytest.raises(CaptureError, match="no prompts"):
        capture(lm, [], settings())
    with pytest.raises(CaptureError, match="batch_size"):
        capture(lm, ["ok"], settings(batch_size=0))
