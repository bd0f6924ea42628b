"""The offloading executor on a CUDA GPU (bf16): pinned store, copy stream, events. Skipped without CUDA."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from runtime.backends import CudaBackend  # noqa: E402
from runtime.executor import LiveGatePredictor, RunConfig  # noqa: E402
from runtime.offloaded import OffloadedModel  # noqa: E402
from runtime.models import FAMILIES, load_model  # noqa: E402
from runtime.replay import live, reference_decode  # noqa: E402
from sim.policies import EVICTION, PREFETCH  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
PROMPTS = [[5, 9, 17, 33, 2, 8, 11, 40, 3], [40, 41, 7]]


@pytest.mark.parametrize("fam", sorted(FAMILIES))
def test_bf16_offloaded_logits_on_cuda(fam):
    """Offloaded (slots = top_k: every step copies) vs the same model resident with the eager experts
    loop: the same kernels on the same data, so the logits are expected equal; the stated tolerance
    for bf16 is |diff| <= 2e-2 + 2e-2 |logit|, and tokens may differ only after a near tie."""
    ref = reference_decode(load_model(f"tiny-{fam}", device="cuda", experts_implementation="eager").model, PROMPTS, 6)
    lm = load_model(f"tiny-{fam}", device="cuda", experts_implementation="eager")
    M, E, k = lm.shape.num_moe_layers, lm.shape.num_experts, lm.shape.top_k
    om = OffloadedModel(lm, max_slots=M * E, host_memory="pinned")
    assert isinstance(om.backend, CudaBackend) and om.store.pinned
    assert om.measure_copy() > 0
    run = om.start_run(RunConfig(eviction=EVICTION.create("lru"), prefetch=PREFETCH.create("none"), slots=k))
    out = live(om, run, PROMPTS, 6, keep_logits=True)
    om.end_run()
    om.close()
    for la, lb in zip(out["logits"], ref["logits"]):
        for a, b in zip(la, lb):
            assert torch.allclose(a, b, atol=2e-2, rtol=2e-2)
    assert out["tokens"] == ref["tokens"]
    assert run.copies == run.misses > 0


def test_prefetch_with_the_live_gate_on_cuda():
    lm = load_model("tiny-qwen3_moe", device="cuda")
    M, E = lm.shape.num_moe_layers, lm.shape.num_experts
    om = OffloadedModel(lm, max_slots=M * E)
    pred = LiveGatePredictor(2)
    pred.attach_live(lm)
    run = om.start_run(RunConfig(eviction=EVICTION.create("lru"), prefetch=PREFETCH.create("lookahead", depth=2),
                                 predictor=pred, slots=E))
    live(om, run, PROMPTS, 8)
    om.end_run()
    om.close()
    assert any(pf for *_, pf in run.copy_log) and run.useful > 0
    from runtime.measure import run_log

    log = run_log(run)
    assert log.link_busy > 0 and all(b >= a for a, b, _, _ in log.copy_spans)
