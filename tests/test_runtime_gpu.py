"""Capture, the INT4 draft's fast kernel and training on a CUDA GPU (bf16). Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from runtime import quant  # noqa: E402
from runtime.capture import CaptureSettings, capture  # noqa: E402
from runtime.models import FAMILIES, load_model  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("fam", sorted(FAMILIES))
def test_capture_on_cuda_bf16(fam):
    lm = load_model(f"tiny-{fam}", device="cuda")
    assert lm.dtype == torch.bfloat16 and lm.device.type == "cuda"
    s = CaptureSettings(max_new_tokens=6, batch_size=2, lookahead=2, draft=True, draft_kernel="auto", progress=False)
    tr = capture(lm, ["hello world", "the quick brown fox", "x"], s)
    assert tr.num_requests == 3 and tr.draft is not None
    d16 = capture(lm, ["hello world", "the quick brown fox"], CaptureSettings(max_new_tokens=6, draft=True, draft_bits=16, progress=False))
    assert np.array_equal(d16.draft, d16.expert_ids)
    assert tr.meta["capture"]["host_copies"] == tr.meta["capture"]["steps"]


@pytest.mark.parametrize("fam", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_fast_draft_kernel_agrees_with_reference_on_cuda(fam):
    over = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=256)
    if not fam.startswith("deepseek"):
        over["head_dim"] = 32  # MLA models keep their own head dims
    lm = load_model(f"tiny-{fam}", device="cuda", config_overrides=over)
    prompts = ["hello world", "the quick brown fox jumps over", "def f(x):\n    return x"]
    runs = {k: capture(lm, prompts, CaptureSettings(max_new_tokens=8, draft=True, draft_kernel=k, progress=False))
            for k in ("reference", "fast")}
    v = runs["fast"].valid_mask()
    a, b = runs["reference"].draft[v], runs["fast"].draft[v]
    agree = (a[..., :, None] == b[..., None, :]).any(-1).mean()
    assert agree > 0.95, agree


def test_train_smoke_on_cuda(tmp_path):
    from runtime import train_small_moe as tsm

    s = tsm.smoke_settings(str(tmp_path))
    s.device = "cuda"
    log = tsm.train(s)
    assert np.isfinite(log["final_heldout_loss"]) and log["device"].startswith("cuda")
