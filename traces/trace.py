"""The dense in-memory trace: numpy arrays indexed by (request, token, MoE layer).

The simulator replays this form directly, so its hot loop never touches pandas or Arrow.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from traces.errors import TraceError
from traces.shape import ModelShape

PREFILL, DECODE, PAD = 0, 1, -1
PHASES = ("prefill", "decode")


@dataclass(eq=False)
class Trace:
    """A routing trace.

    Axes: ``R`` requests, ``T`` = longest request in tokens, ``M`` = MoE layers (ordinal; the
    decoder index is ``shape.moe_layers[m]``), ``k`` = top-k. Token slots past a request's
    length are padding: ids -1, weights NaN, position/step/phase -1.

    ``lookahead[d][r, t, m]`` holds, on the row of source layer ``moe_layers[m]``, the experts
    that layer ``moe_layers[m] + d``'s router picks from this layer's post-attention residual
    stream; -1 where that layer is dense or past the end (docs/architecture.md, Trace).
    """

    shape: ModelShape
    request_ids: np.ndarray  # (R,) int64
    lengths: np.ndarray  # (R,) int32
    position: np.ndarray  # (R, T) int32
    step: np.ndarray  # (R, T) int32
    phase: np.ndarray  # (R, T) int8
    expert_ids: np.ndarray  # (R, T, M, k) int16
    gate_weights: np.ndarray | None = None  # (R, T, M, k) float32
    lookahead: dict[int, np.ndarray] = field(default_factory=dict)  # d -> (R, T, M, k) int16
    draft: np.ndarray | None = None  # (R, T, M, k) int16
    draft_match: np.ndarray | None = None  # (R, T) bool
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.check_shapes()

    # ------------------------------------------------------------------ sizes
    @property
    def num_requests(self) -> int:
        return int(self.request_ids.shape[0])

    @property
    def max_tokens(self) -> int:
        return int(self.position.shape[1])

    @property
    def num_rows(self) -> int:
        return int(self.lengths.sum()) * self.shape.num_moe_layers

    @property
    def lookahead_depths(self) -> list[int]:
        return sorted(self.lookahead)

    def valid_mask(self) -> np.ndarray:
        """(R, T) bool: token slots that hold a real token."""
        return np.arange(self.max_tokens)[None, :] < self.lengths[:, None]

    def prefill_lengths(self) -> np.ndarray:
        """(R,) number of prefill tokens per request."""
        return ((self.phase == PREFILL) & self.valid_mask()).sum(axis=1).astype(np.int32)

    def decode_tokens(self) -> int:
        return int(((self.phase == DECODE) & self.valid_mask()).sum())

    # ------------------------------------------------------------- structure
    def check_shapes(self) -> None:
        """Array shapes and dtypes agree with each other and with ``shape``."""
        R = self.request_ids.shape[0]
        M, k = self.shape.num_moe_layers, self.shape.top_k
        if self.lengths.shape != (R,):
            raise TraceError(f"Trace.lengths has shape {self.lengths.shape}, expected ({R},)")
        T = self.position.shape[1] if self.position.ndim == 2 else -1
        for name in ("position", "step", "phase"):
            a = getattr(self, name)
            if a.shape != (R, T):
                raise TraceError(f"Trace.{name} has shape {a.shape}, expected ({R}, {T})")
        if R and int(self.lengths.max(initial=0)) > T:
            raise TraceError(f"Trace.lengths max {int(self.lengths.max())} exceeds token axis {T}")
        want = (R, T, M, k)
        for name in ("expert_ids", "gate_weights", "draft"):
            a = getattr(self, name)
            if a is not None and a.shape != want:
                raise TraceError(f"Trace.{name} has shape {a.shape}, expected {want} (R, T, M, k)")
        for d, a in self.lookahead.items():
            if int(d) < 1:
                raise TraceError(f"Trace.lookahead depth must be >= 1, got {d}")
            if a.shape != want:
                raise TraceError(f"Trace.lookahead[{d}] has shape {a.shape}, expected {want} (R, T, M, k)")
        if self.draft_match is not None and self.draft_match.shape != (R, T):
            raise TraceError(f"Trace.draft_match has shape {self.draft_match.shape}, expected ({R}, {T})")
        if (self.draft is None) != (self.draft_match is None):
            raise TraceError("Trace.draft and Trace.draft_match must be given together")

    def select_requests(self, idx: np.ndarray | list[int]) -> "Trace":
        """A new trace with the requests at positions ``idx`` (copies)."""
        idx = np.asarray(idx, dtype=np.int64)
        T = int(self.lengths[idx].max(initial=0))

        def take(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[idx, :T].copy()

        return Trace(
            shape=self.shape,
            request_ids=self.request_ids[idx].copy(),
            lengths=self.lengths[idx].copy(),
            position=take(self.position),
            step=take(self.step),
            phase=take(self.phase),
            expert_ids=take(self.expert_ids),
            gate_weights=take(self.gate_weights),
            lookahead={d: take(a) for d, a in self.lookahead.items()},
            draft=take(self.draft),
            draft_match=take(self.draft_match),
            meta=copy.deepcopy(self.meta),
        )

    def lookahead_target(self, d: int) -> np.ndarray:
        """(M,) MoE ordinal of the layer that ``lookahead_<d>`` on each source layer predicts, -1 if none."""
        out = np.full(self.shape.num_moe_layers, -1, dtype=np.int64)
        moe = self.shape.moe_layers
        pos = {layer: i for i, layer in enumerate(moe)}
        for m, layer in enumerate(moe):
            out[m] = pos.get(layer + d, -1)
        return out

    def equals(self, other: "Trace") -> bool:
        """Bit-identical arrays, shape and metadata."""
        if self.shape != other.shape or self.meta != other.meta:
            return False
        if sorted(self.lookahead) != sorted(other.lookahead):
            return False
        pairs = [
            (self.request_ids, other.request_ids),
            (self.lengths, other.lengths),
            (self.position, other.position),
            (self.step, other.step),
            (self.phase, other.phase),
            (self.expert_ids, other.expert_ids),
            (self.gate_weights, other.gate_weights),
            (self.draft, other.draft),
            (self.draft_match, other.draft_match),
        ] + [(self.lookahead[d], other.lookahead[d]) for d in self.lookahead]
        for a, b in pairs:
            if (a is None) != (b is None):
                return False
            if a is not None and not (a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")):
                return False
        return True


def empty_arrays(R: int, T: int, M: int, k: int) -> dict[str, np.ndarray]:
    """Padded arrays for building a trace of R requests x T tokens."""
    return {
        "position": np.full((R, T), -1, dtype=np.int32),
        "step": np.full((R, T), -1, dtype=np.int32),
        "phase": np.full((R, T), PAD, dtype=np.int8),
        "expert_ids": np.full((R, T, M, k), -1, dtype=np.int16),
    }
