"""The host store: every routed expert once, packed in one contiguous byte range (all its tensors,
e.g. gate_up_proj[e] and down_proj[e]), inside one host buffer that is pinned once at start
(``cudaHostRegister``, no per-copy pinning) or left pageable (``host_memory=pageable``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from runtime.errors import ExecutorError

_ALIGN = 256  # bytes: every tensor of a packed expert starts on this boundary


@dataclass(frozen=True)
class Part:
    """One tensor of an expert inside its packed bytes."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    nbytes: int


def expert_parts(module: nn.Module) -> tuple[list[Part], int]:
    """The per-expert tensors of a fused experts module (every parameter whose leading dimension is
    the expert count) and the packed size of one expert."""
    E = int(module.num_experts)
    parts, off = [], 0
    for name, p in module.named_parameters(recurse=False):
        if p.dim() >= 1 and p.shape[0] == E:
            nb = p[0].numel() * p.element_size()
            parts.append(Part(name, tuple(p.shape[1:]), p.dtype, off, nb))
            off += -(-nb // _ALIGN) * _ALIGN
    if not parts:
        raise ExecutorError(f"{type(module).__name__}: no per-expert parameters (leading dimension {E})")
    return parts, off


def _pin(buf: torch.Tensor) -> str:
    """Page-lock ``buf`` once (cudaHostRegister: exact size, no copy); returns how."""
    try:
        rt = torch.cuda.cudart()
        err = rt.cudaHostRegister(buf.data_ptr(), buf.numel(), 0)
        if int(getattr(err, "value", err)) == 0:
            return "registered"
    except Exception:  # noqa: BLE001 - fall back to the caching host allocator
        pass
    return ""


class HostStore:
    """Every routed expert of every MoE layer once, packed, in one host buffer.

    ``pinned`` (CUDA only): page-locked once here, so copies are asynchronous DMA at the link's
    pinned bandwidth; ``pageable``: ordinary memory (copies are staged by the driver and slow)."""

    def __init__(self, modules: Sequence[nn.Module], host_memory: str, device: torch.device) -> None:
        if host_memory not in ("pinned", "pageable"):
            raise ExecutorError(f"host_memory={host_memory!r}: use pinned or pageable")
        self.parts, self.nbytes = expert_parts(modules[0])
        for i, m in enumerate(modules[1:], 1):
            p, nb = expert_parts(m)
            if p != self.parts:
                raise ExecutorError(f"MoE layer ordinal {i}: experts differ in shape from layer 0 ({p} vs {self.parts})")
        self.E = int(modules[0].num_experts)
        self.M = len(modules)
        n = self.M * self.E * self.nbytes
        self.host_memory = host_memory
        self.pinned = ""
        self.buf: torch.Tensor
        if host_memory == "pinned" and device.type == "cuda":
            buf = torch.empty(n, dtype=torch.uint8)
            how = _pin(buf)
            if not how:
                buf = torch.empty(n, dtype=torch.uint8, pin_memory=True)
                how = "pin_memory"
            self.buf, self.pinned = buf, how
        else:
            self.buf = torch.empty(n, dtype=torch.uint8)
        self._views = self.buf.view(self.M * self.E, self.nbytes)
        for m, mod in enumerate(modules):
            for part in self.parts:
                p = getattr(mod, part.name)
                for e in range(self.E):
                    self.tensor(m * self.E + e, part).copy_(p.detach()[e])
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @property
    def total_bytes(self) -> int:
        return int(self.buf.numel())

    def expert(self, key: int) -> torch.Tensor:
        """The packed bytes of expert ``key`` (a contiguous uint8 view)."""
        return self._views[key]

    def tensor(self, key: int, part: Part) -> torch.Tensor:
        return view_part(self._views[key], part)

    def close(self) -> None:
        if self.pinned == "registered":
            try:
                torch.cuda.cudart().cudaHostUnregister(self.buf.data_ptr())
            except Exception:  # noqa: BLE001
                pass
            self.pinned = ""


def view_part(packed: torch.Tensor, part: Part) -> torch.Tensor:
    """Typed view of one tensor inside an expert's packed bytes (no copy)."""
    return packed[part.offset:part.offset + part.nbytes].view(part.dtype).view(part.shape)
