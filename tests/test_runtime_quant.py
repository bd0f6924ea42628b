"""The INT4 (and INT8) weight-only symmetric group quantizer and the draft built on it."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from runtime import quant  # noqa: E402
from runtime.capture import CaptureSettings, capture  # noqa: E402
from runtime.models import load_model  # noqa: E402


def load_cpu(*args, **kwargs):
    """Tests compare fp32 results on the CPU, also on a machine with a GPU."""
    return load_model(*args, device="cpu", **kwargs)


def _expanded_scales(qw: quant.QuantizedWeight) -> torch.Tensor:
    """Per-element scale in the original layout."""
    s = qw.scales.float().repeat_interleave(qw.group_size, dim=-1)[..., : qw.k]
    return s.transpose(-1, -2) if qw.k_axis == -2 else s


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [256, 100, 32])
@pytest.mark.parametrize("k_axis", [-1, -2])
def test_error_within_half_a_step(bits, k, k_axis):
    g = torch.Generator().manual_seed(k + bits)
    shape = (3, 24, k) if k_axis == -1 else (3, k, 24)
    w = torch.randn(shape, generator=g) * torch.rand(shape[:-1] + (1,), generator=g) * 3
    w[0, 0] = 0.0  # an all-zero group
    qw = quant.quantize(w, bits=bits, group_size=128, k_axis=k_axis)
    deq = qw.dequantize()
    assert deq.shape == w.shape and deq.dtype == w.dtype
    s = _expanded_scales(qw)
    err = (deq - w).abs()
    assert (err <= s / 2 * (1 + 1e-6) + 1e-12).all()
    qmax = 2 ** (bits - 1) - 1
    q = qw.int_values()
    assert int(q.min()) >= -qmax - 1 and int(q.max()) <= qmax
    # scales were rounded up to bf16: no value was clamped
    assert qw.scales.dtype == torch.bfloat16
    if k_axis == -1:  # an all-zero group dequantizes to zeros (scale 0 is not a division by zero)
        assert torch.equal(deq[0, 0], torch.zeros_like(deq[0, 0]))


def test_bf16_weights_bound_includes_output_rounding():
    w = (torch.randn(8, 64, 256, generator=torch.Generator().manual_seed(0)) * 0.05).to(torch.bfloat16)
    qw = quant.quantize(w, bits=4, group_size=128)
    deq = qw.dequantize()
    assert deq.dtype == torch.bfloat16
    s = _expanded_scales(qw)
    err = (deq.float() - w.float()).abs()
    assert (err <= s / 2 + deq.float().abs() * 2**-8 + 1e-12).all()


def test_int4_storage_size_and_layout():
    w = torch.randn(4, 16, 256)
    qw = quant.quantize(w, bits=4, group_size=128)
    assert qw.qdata.dtype == torch.uint8 and qw.qdata.shape == (4, 16, 128)
    assert qw.scales.shape == (4, 16, 2)
    assert qw.nbytes == 4 * 16 * 128 + 4 * 16 * 2 * 2  # half a byte per weight + one bf16 scale per 128
    # even element in the high nibble, stored as q + 8
    q = qw.int_values()
    assert torch.equal(((q[..., 0::2] + 8).to(torch.uint8) << 4) | (q[..., 1::2] + 8).to(torch.uint8), qw.qdata)
    one = qw.select(2)
    assert torch.equal(one.dequantize(), qw.dequantize()[2])


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        quant.quantize(torch.randn(4, 4), bits=3)
    with pytest.raises(ValueError, match="group_size"):
        quant.quantize(torch.randn(4, 4), group_size=0)
    with pytest.raises(ValueError, match="k_axis"):
        quant.quantize(torch.randn(4), k_axis=-1)


@pytest.mark.skipif(not quant.fast_path_available("cpu"), reason="this torch has no CPU int4 matmul")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_fast_path_matches_reference(dtype):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 256, generator=g)
    x = torch.randn(5, 256, generator=g).to(dtype)
    qw = quant.quantize(w, bits=4, group_size=128)
    ref = quant.linear(x, qw, kernel="reference").float()
    fast = quant.linear(x, qw, kernel="fast").float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert (fast - ref).abs().max() <= tol * ref.abs().max()
    with pytest.raises(RuntimeError, match="no fast int4 kernel"):
        quant.linear(x[:, :100], quant.quantize(w[:, :100]), kernel="fast")


@pytest.mark.skipif(not quant.fast_path_available("cpu"), reason="this torch has no CPU int4 matmul")
@pytest.mark.parametrize("fam", ["mixtral", "gpt_oss"])
def test_fast_experts_forward_matches_fake_quant_reference(fam):
    lm = load_cpu(f"tiny-{fam}", config_overrides=dict(hidden_size=64, intermediate_size=128, head_dim=16))
    h = lm.moe_handles[0]
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(0))
    _, w, ids = h.router(x)
    outs = {}
    for kernel in ("reference", "fast"):
        d = quant.Draft(lm.model, [h.experts], bits=4, group_size=64, kernel=kernel)
        with d.active():
            outs[kernel] = h.experts(x, ids, w)
        d.remove()
    target = h.experts(x, ids, w)
    assert not torch.equal(outs["reference"], target)  # quantization changed something
    torch.testing.assert_close(outs["fast"], outs["reference"], rtol=1e-4, atol=1e-5)


def test_draft_leaves_shared_and_non_expert_weights_alone():
    lm = load_cpu("tiny-qwen2_moe")
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    tr = capture(lm, ["abc"], CaptureSettings(max_new_tokens=3, draft=True, progress=False))
    assert tr.draft is not None
    for n, p in lm.model.named_parameters():
        assert torch.equal(before[n], p), n
    assert lm.config._experts_implementation != quant.DRAFT_IMPLEMENTATION
    assert not any(hasattr(h.experts, "_moe_draft") for h in lm.moe_handles)


@pytest.mark.parametrize("fam", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_int4_draft_mostly_agrees_with_target(fam):
    lm = load_cpu(f"tiny-{fam}")
    tr = capture(lm, ["hello world", "the quick brown fox"], CaptureSettings(max_new_tokens=6, draft=True, progress=False))
    v = tr.valid_mask()
    a, b = tr.expert_ids[v], tr.draft[v]
    agree = np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a.reshape(-1, a.shape[-1]).tolist(), b.reshape(-1, b.shape[-1]).tolist())])
    assert agree > 0.9
    assert tr.meta["capture"]["draft_bits"] == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tinygemm_matches_reference():
    assert quant.fast_path_available("cuda")
    g = torch.Generator().manual_seed(5)
    w = torch.randn(512, 1024, generator=g)
    x = torch.randn(9, 1024, generator=g).to("cuda", torch.bfloat16)
    qw = quant.quantize(w.cuda(), bits=4, group_size=128)
    ref = quant.linear(x, qw, kernel="reference").float()
    fast = quant.linear(x, qw, kernel="fast").float()
    assert (fast - ref).abs().max() <= 2e-2 * ref.abs().max()
