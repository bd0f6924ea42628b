"""Weight-only symmetric group quantization (INT4 by default) for routed experts.

MoE-SpeQ's draft is the target model with its routed experts quantized to INT4 (weight-only,
symmetric, one scale per ``group_size`` weights along the reduction axis) while gates,
attention, norms, embeddings and shared experts stay in 16 bits. This module is that
quantizer, used by trace capture (the ``draft`` columns) and by the GPU runtime's draft.

Two execution paths:

- **reference** (everywhere): dequantize to the model's dtype and run the model's own experts
  implementation on the dequantized weights. At ``bits=16`` nothing is quantized, so a "draft"
  reproduces the target bit for bit (a test relies on that).
- **fast** (chosen at run time): PyTorch's built-in int4 weight-packed matmuls, the tinygemm
  kernel on CUDA (``aten._weight_int4pack_mm``, bf16 activations) and its CPU counterpart
  (``aten._weight_int4pack_mm_for_cpu``) where the running torch has them and the shapes fit;
  otherwise it falls back to the reference path for that matrix.

Storage format (``QuantizedWeight``): the weight is viewed as ``[..., N, K]`` with K the
reduction (input) axis, whatever its layout in the model (GPT-OSS stores experts transposed).
Values ``q`` in [-2^(b-1), 2^(b-1)-1] per element, ``w ~= q * scale``; for 4 bits, two values
per byte, the even element in the high nibble, stored as ``q + 8`` (the layout tinygemm's
packer takes on CUDA). Scales are rounded *up* to their storage dtype so that
``|w| <= qmax * scale`` holds after rounding: the per-element error is then at most
``scale / 2`` (plus the rounding of the dequantized value to the model dtype).
A reduction axis that is not a multiple of ``group_size`` gets a shorter last group.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

SUPPORTED_BITS = (4, 8, 16)
DRAFT_IMPLEMENTATION = "moe_draft"


def _round_up_to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast ``x`` (float32) to ``dtype`` rounding towards +inf (x >= 0), so scales never shrink."""
    y = x.to(dtype)
    if dtype == torch.float32:
        return y
    low = y.float() < x
    if low.any():
        bumped = torch.nextafter(y.float(), torch.full_like(x, float("inf"))).to(dtype)
        # nextafter in float32 may round back down when cast; step in the target dtype instead
        fix = bumped.float() < x
        if fix.any():
            bumped = torch.where(fix, torch.nextafter(y, torch.full_like(y, float("inf"))), bumped)
        y = torch.where(low, bumped, y)
    return y


@dataclass
class QuantizedWeight:
    """One quantized weight tensor (any leading dims, e.g. experts), see the module docstring."""

    qdata: torch.Tensor  # 4 bits: uint8 [..., N, ceil(Kp/2)]; 8 bits: int8 [..., N, Kp]
    scales: torch.Tensor  # [..., N, G] in scale_dtype
    shape: tuple[int, ...]  # original shape
    dtype: torch.dtype  # original dtype
    k_axis: int  # reduction axis in the original layout (-1 or -2)
    group_size: int
    bits: int
    _fast: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def k(self) -> int:
        return self.shape[self.k_axis]

    @property
    def n(self) -> int:
        return self.shape[-2] if self.k_axis == -1 else self.shape[-1]

    @property
    def nbytes(self) -> int:
        """Bytes held (packed values + scales): what an expert costs as resident draft weights."""
        return self.qdata.numel() * self.qdata.element_size() + self.scales.numel() * self.scales.element_size()

    def int_values(self) -> torch.Tensor:
        """Signed integer values, ``[..., N, K]`` (int8)."""
        if self.bits == 4:
            hi = (self.qdata >> 4).to(torch.int8) - 8
            lo = (self.qdata & 0xF).to(torch.int8) - 8
            q = torch.stack([hi, lo], dim=-1).flatten(-2)
        else:
            q = self.qdata
        return q[..., : self.k]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The reference path: the weight in its original layout and dtype (or ``dtype``)."""
        q = self.int_values().to(torch.float32)
        *lead, n, k = q.shape
        g = self.group_size
        G = self.scales.shape[-1]
        kp = G * g
        if kp != k:
            q = F.pad(q, (0, kp - k))
        w = (q.view(*lead, n, G, g) * self.scales.float().unsqueeze(-1)).view(*lead, n, kp)[..., :k]
        if self.k_axis == -2:
            w = w.transpose(-1, -2)
        return w.to(dtype or self.dtype).contiguous()

    def select(self, index: int) -> "QuantizedWeight":
        """The slice of leading index ``index`` (one expert)."""
        return QuantizedWeight(
            self.qdata[index], self.scales[index], tuple(self.shape[1:]), self.dtype, self.k_axis,
            self.group_size, self.bits,
        )


def quantize(
    w: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    k_axis: int = -1,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> QuantizedWeight:
    """Symmetric weight-only group quantization of ``w`` along its reduction axis ``k_axis``."""
    if bits not in (4, 8):
        raise ValueError(f"quantize: bits must be 4 or 8 (16 means unquantized), got {bits}")
    if group_size < 1:
        raise ValueError(f"quantize: group_size must be >= 1, got {group_size}")
    if k_axis not in (-1, -2) or w.dim() < 2:
        raise ValueError(f"quantize: need a >= 2-D weight and k_axis -1 or -2, got {tuple(w.shape)}, {k_axis}")
    shape, dtype = tuple(w.shape), w.dtype
    x = w.detach().to(torch.float32)
    if k_axis == -2:
        x = x.transpose(-1, -2)
    *lead, n, k = x.shape
    g = group_size
    G = -(-k // g)
    kp = G * g
    if kp != k:
        x = F.pad(x, (0, kp - k))
    xg = x.reshape(*lead, n, G, g)
    qmax = 2 ** (bits - 1) - 1
    amax = xg.abs().amax(dim=-1)
    scales = _round_up_to_dtype(amax / qmax, scale_dtype)
    s = scales.float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(xg / s.unsqueeze(-1)).clamp_(-qmax - 1, qmax).to(torch.int8).reshape(*lead, n, kp)
    if bits == 4:
        if kp % 2:
            q = F.pad(q, (0, 1))
        u = (q + 8).to(torch.uint8)
        qdata = (u[..., 0::2] << 4) | u[..., 1::2]
    else:
        qdata = q
    return QuantizedWeight(qdata.contiguous(), scales.contiguous(), shape, dtype, k_axis, g, bits)


# ----------------------------------------------------------------------------- fast path
def _tinygemm_ok(qw: QuantizedWeight, x: torch.Tensor) -> bool:
    return (
        qw.bits == 4
        and qw.qdata.dim() == 2
        and qw.k % qw.group_size == 0
        and qw.group_size in (32, 64, 128, 256)
        and qw.k % 64 == 0
        and qw.n % 8 == 0
        and x.device == qw.qdata.device
    )


def fast_path_available(device: torch.device | str) -> bool:
    """Whether this torch has an int4 packed matmul for ``device`` (CUDA tinygemm or the CPU one)."""
    device = torch.device(device)
    aten = torch.ops.aten
    if device.type == "cuda":
        return hasattr(aten, "_weight_int4pack_mm") and hasattr(aten, "_convert_weight_to_int4pack")
    if device.type == "cpu":
        return hasattr(aten, "_weight_int4pack_mm_for_cpu") and hasattr(aten, "_convert_weight_to_int4pack_for_cpu")
    return False


def _fast_operands(qw: QuantizedWeight, device: torch.device, act_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    key = (device.type, act_dtype)
    if key not in qw._fast:
        aten = torch.ops.aten
        sz = torch.stack([qw.scales.float().t(), torch.zeros_like(qw.scales.float().t())], dim=-1)
        sz = sz.to(act_dtype).contiguous()  # [K/g, N, 2]: w = (u - 8) * scale + 0
        if device.type == "cuda":
            packed = aten._convert_weight_to_int4pack(qw.qdata.contiguous(), 8 if qw.k % 256 == 0 else 4)
        else:
            u = (qw.int_values().to(torch.int32) + 8).contiguous()
            packed = aten._convert_weight_to_int4pack_for_cpu(u, 2)
        qw._fast[key] = (packed, sz)
    return qw._fast[key]


def linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None, kernel: str = "auto") -> torch.Tensor:
    """``x @ W^T (+ bias)`` for a 2-D quantized weight (in ``[N, K]`` orientation).

    ``kernel``: "reference" (dequantize, then ``F.linear``), "fast" (packed int4 matmul; raises
    if impossible) or "auto" (fast where the device and shapes allow it).
    """
    use_fast = False
    if kernel != "reference":
        dev = x.device
        ok = fast_path_available(dev) and _tinygemm_ok(qw, x)
        if dev.type == "cuda":
            ok = ok and x.dtype == torch.bfloat16
        else:
            ok = ok and x.dtype in (torch.float32, torch.bfloat16)
        if kernel == "fast" and not ok:
            raise RuntimeError(
                f"quant.linear: no fast int4 kernel for device={dev}, dtype={x.dtype}, bits={qw.bits}, "
                f"N={qw.n}, K={qw.k}, group={qw.group_size}"
            )
        use_fast = ok
    if use_fast:
        packed, sz = _fast_operands(qw, x.device, x.dtype)
        x2 = x.reshape(-1, qw.k).contiguous()
        if x.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2, packed, qw.group_size, sz)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, qw.group_size, sz)
        y = y.reshape(*x.shape[:-1], qw.n)
        return y if bias is None else y + bias
    w = qw.dequantize(x.dtype)
    if qw.k_axis == -2:
        w = w.t()
    return F.linear(x, w, bias)


# ----------------------------------------------------------------------------- experts
EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")


def _k_axis(module: torch.nn.Module) -> int:
    return -2 if getattr(module, "is_transposed", False) else -1


@dataclass
class QuantizedExperts:
    """The quantized routed-expert weights of one fused experts module (transformers 5.x)."""

    weights: dict[str, QuantizedWeight]
    bits: int
    group_size: int
    _dequant: dict[str, torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        return sum(q.nbytes for q in self.weights.values())

    def dequantized(self, cache: bool) -> dict[str, torch.Tensor]:
        if self._dequant is not None:
            return self._dequant
        d = {name: q.dequantize() for name, q in self.weights.items()}
        if cache:
            self._dequant = d
        return d


def quantize_experts(
    module: torch.nn.Module, bits: int = 4, group_size: int = 128, scale_dtype: torch.dtype = torch.bfloat16
) -> QuantizedExperts:
    """Quantize a fused experts module's weight matrices (biases stay unquantized)."""
    names = [n for n in EXPERT_WEIGHTS if isinstance(getattr(module, n, None), torch.Tensor)]
    if not names:
        raise TypeError(f"quantize_experts: {type(module).__name__} has none of {EXPERT_WEIGHTS} (not a fused experts module)")
    ka = _k_axis(module)
    w = {n: quantize(getattr(module, n), bits, group_size, k_axis=ka, scale_dtype=scale_dtype) for n in names}
    return QuantizedExperts(w, bits, group_size)


@contextlib.contextmanager
def _swapped(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    saved = {}
    try:
        for name, t in tensors.items():
            p = getattr(module, name)
            saved[name] = p.data
            p.data = t.to(device=p.device)
        yield
    finally:
        for name, data in saved.items():
            getattr(module, name).data = data


def _base_forward(module: torch.nn.Module, implementation: str | None) -> Callable[..., torch.Tensor]:
    """The experts forward the target uses (an ExpertsInterface entry, or the class's eager loop)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if implementation and implementation != "eager" and implementation in ALL_EXPERTS_FUNCTIONS:
        return ALL_EXPERTS_FUNCTIONS[implementation]
    fwd = type(module).forward
    return getattr(fwd, "__wrapped__", fwd)


def _fast_experts_forward(
    module: torch.nn.Module, q: QuantizedExperts, hidden: torch.Tensor, top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor, kernel: str,
) -> torch.Tensor:
    """Eager loop over the hit experts with packed int4 matmuls (the GPU draft's path)."""
    out = torch.zeros_like(hidden)
    has_gate = "gate_up_proj" in q.weights
    up_name = "gate_up_proj" if has_gate else "up_proj"
    has_bias = bool(getattr(module, "has_bias", False))
    n_exp = int(getattr(module, "num_experts"))
    flat = top_k_index.reshape(-1)
    hit = torch.unique(flat[(flat >= 0) & (flat < n_exp)]).tolist()
    for e in hit:
        token_idx, pos = torch.where(top_k_index == e)
        x = hidden[token_idx]
        b_up = getattr(module, up_name + "_bias")[e] if has_bias else None
        h = linear(x, q.weights[up_name].select(e), b_up, kernel)
        if has_gate:
            h = module._apply_gate(h) if hasattr(module, "_apply_gate") else _default_gate(module, h)
        else:
            h = module.act_fn(h)
        b_dn = module.down_proj_bias[e] if has_bias else None
        y = linear(h, q.weights["down_proj"].select(e), b_dn, kernel)
        y = y * top_k_weights[token_idx, pos, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


def _default_gate(module: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return module.act_fn(gate) * up


def _draft_experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    state: DraftState = self._moe_draft
    base = _base_forward(self, state.base_implementation)
    if state.bits == 16:
        return base(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
    q = state.quantized(self)
    if state.kernel in ("fast", "auto") and fast_path_available(hidden_states.device) and (
        state.kernel == "fast" or hidden_states.device.type == "cuda"
    ):
        return _fast_experts_forward(self, q, hidden_states, top_k_index, top_k_weights, state.kernel)
    with _swapped(self, q.dequantized(state.cache_dequantized)):
        return base(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs)


@dataclass
class DraftState:
    """Per-experts-module draft settings and its lazily quantized weights.

    Quantization is lazy (first draft forward of the layer) so that it also works when the
    weights only exist inside the forward (accelerate disk/CPU offload).
    """

    bits: int
    group_size: int
    kernel: str
    base_implementation: str | None
    cache_dequantized: bool = True
    scale_dtype: torch.dtype = torch.bfloat16
    q: QuantizedExperts | None = None

    def quantized(self, module: torch.nn.Module) -> QuantizedExperts:
        if self.q is None:
            self.q = quantize_experts(module, self.bits, self.group_size, self.scale_dtype)
        return self.q


def register_draft_implementation() -> None:
    """Register the draft experts forward in transformers' ExpertsInterface (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    if DRAFT_IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(DRAFT_IMPLEMENTATION, _draft_experts_forward)


class Draft:
    """The INT4 draft of a transformers MoE model: same modules, routed experts quantized.

    ``with draft.active(): model(...)`` runs the draft; outside it the model is the target.
    Only the experts modules' forward changes (through the experts-implementation seam), so
    gates, attention, norms, embeddings and shared experts are the target's own.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        experts_modules: list[torch.nn.Module],
        bits: int = 4,
        group_size: int = 128,
        kernel: str = "reference",
        cache_dequantized: bool = True,
        scale_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"draft bits must be one of {SUPPORTED_BITS}, got {bits}")
        if kernel not in ("reference", "fast", "auto"):
            raise ValueError(f"draft kernel must be reference, fast or auto, got {kernel!r}")
        register_draft_implementation()
        self.model = model
        self.bits, self.group_size, self.kernel = bits, group_size, kernel
        self.base_implementation = getattr(model.config, "_experts_implementation", None)
        self.modules = experts_modules
        for m in experts_modules:
            m._moe_draft = DraftState(bits, group_size, kernel, self.base_implementation, cache_dequantized, scale_dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized experts created so far."""
        return sum(m._moe_draft.q.nbytes for m in self.modules if m._moe_draft.q is not None)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        cfgs = {id(m.config): m.config for m in self.modules}
        cfgs.setdefault(id(self.model.config), self.model.config)
        saved = {k: c._experts_implementation for k, c in cfgs.items()}
        try:
            for c in cfgs.values():
                c._experts_implementation = DRAFT_IMPLEMENTATION
            yield
        finally:
            for k, c in cfgs.items():
                c._experts_implementation = saved[k]

    def remove(self) -> None:
        for m in self.modules:
            if hasattr(m, "_moe_draft"):
                del m._moe_draft
