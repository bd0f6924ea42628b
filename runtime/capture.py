"""Capture routing traces (and predictor columns) from live transformers MoE models.

From Python::

    from runtime.capture import CaptureSettings, capture
    from runtime.models import load_model
    loaded = load_model("tiny-mixtral")                      # or a checkpoint dir / preset id
    trace = capture(loaded, ["Hello there", "def f(x):"], CaptureSettings(max_new_tokens=8, lookahead=2, draft=True))
    traces.write_trace(trace, "out.parquet")

From the command line (Hydra, conf/capture.yaml)::

    python -m runtime.capture model=PATH_or_preset out=trace.parquet max_new_tokens=32 lookahead=2 draft.enabled=true

How it works: a greedy decoding loop of its own (prefill = step 0, then one token per step),
batched with left padding (padding rows dropped), drives the model's decoder stack. Hooks record,
per MoE layer, the ids and weights passed to the experts (what the model actually used),
ordered by weight; a pre-hook on ``post_attention_layernorm`` keeps each layer's post-attention
residual so that layer ``l+d``'s norm and router give ``lookahead_<d>`` for layer ``l``. All of a
step's captured tensors go to the host in one copy after the step. The draft (routed experts
quantized, runtime.quant) runs teacher-forced in lockstep on the target's tokens with its own
KV cache, giving the ``draft`` ids and ``draft_match`` (its greedy next token equals the
sequence's next token).
"""

from __future__ import annotations

import datetime as _dt
import inspect
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from runtime.errors import CaptureError
from runtime.models import LoadedModel
from runtime.routing import base_model, experts_call_args, lookahead_route, sort_by_weight
from sim.presets import setting
from traces.cli import hydra_task
from traces.io import Rows, trace_from_rows
from traces.provenance import git_sha, project_version
from traces.trace import DECODE, PREFILL, Trace


@dataclass
class CaptureSettings:
    """What to capture. Greedy decoding, batch with left padding."""

    max_new_tokens: int = 32
    batch_size: int = 8
    lookahead: int = 0  # D: record lookahead_1..lookahead_D
    draft: bool = False
    draft_bits: int = 4  # 4 (INT4), 8, or 16 (unquantized: reproduces the target)
    draft_group_size: int = 128
    draft_kernel: str = "reference"  # reference | auto | fast (see runtime.quant)
    stop_at_eos: bool = True
    max_prompt_tokens: int | None = None  # truncate longer prompts (keep the first tokens)
    progress: bool | None = None  # None: a bar only on a terminal
    lm_head_chunk: int = 256  # positions per lm_head call when the draft scores a prefill

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise CaptureError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise CaptureError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.lookahead < 0:
            raise CaptureError(f"lookahead must be >= 0, got {self.lookahead}")
        if self.draft and self.draft_bits not in (4, 8, 16):
            raise CaptureError(f"draft bits must be 4, 8 or 16, got {self.draft_bits}")
        if self.draft and self.draft_group_size < 1:
            raise CaptureError(f"draft group_size must be >= 1, got {self.draft_group_size}")
        if self.draft_kernel not in ("reference", "auto", "fast"):
            raise CaptureError(f"draft kernel must be reference, auto or fast, got {self.draft_kernel!r}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise CaptureError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")


# --------------------------------------------------------------------------- tokens
def byte_tokens(text: str, vocab_size: int) -> list[int]:
    """Fallback tokenizer for checkpoints without one (random presets): UTF-8 bytes folded into
    the vocabulary above the first 3 (special) ids. Deterministic; documented in the metadata."""
    span = max(vocab_size - 3, 1)
    return [3 + (b % span) for b in text.encode("utf-8")]


def encode_prompts(loaded: LoadedModel, texts: Sequence[str], max_prompt_tokens: int | None = None) -> tuple[list[list[int]], str]:
    """Token ids per prompt and the tokenizer's description."""
    tok = loaded.tokenizer
    vocab = int(loaded.config.vocab_size)
    out = []
    for i, t in enumerate(texts):
        if tok is not None:
            ids = list(tok(t, add_special_tokens=True)["input_ids"])
        else:
            ids = byte_tokens(t, vocab)
        if max_prompt_tokens:
            ids = ids[:max_prompt_tokens]
        if not ids:
            raise CaptureError(f"prompt {i} encodes to no tokens: {t!r}")
        bad = [x for x in ids if not 0 <= x < vocab]
        if bad:
            raise CaptureError(f"prompt {i}: token ids {bad[:5]} outside the model's vocabulary of {vocab}")
        out.append(ids)
    desc = f"{type(tok).__name__} (checkpoint)" if tok is not None else "bytes-mod-vocab (no tokenizer in the model)"
    return out, desc


# --------------------------------------------------------------------------- hooks
class _Recorder:
    """Hooks that record a forward step's routing (and lookahead) on the device."""

    def __init__(self, loaded: LoadedModel, depth: int) -> None:
        self.loaded = loaded
        self.moe = [h.index for h in loaded.moe_handles]
        self.moe_set = set(self.moe)
        self.depth = depth
        self.mode = "target"
        self._busy = False
        self.ids: dict[int, torch.Tensor] = {}
        self.w: dict[int, torch.Tensor] = {}
        self.resid: dict[int, torch.Tensor] = {}
        self.look: dict[tuple[int, int], torch.Tensor] = {}
        self._hooks = []
        self.sources = {l for l in self.moe if any((l + d) in self.moe_set for d in range(1, depth + 1))}
        self.targets = {j for j in self.moe if any((j - d) in self.sources for d in range(1, depth + 1))}
        for h in loaded.moe_handles:
            self._hooks.append(h.experts.register_forward_pre_hook(self._experts_hook(h.index), with_kwargs=True))
        for h in loaded.handles:
            if h.index in self.sources or h.index in self.targets:
                self._hooks.append(h.post_norm.register_forward_pre_hook(self._norm_hook(h.index)))

    def remove(self) -> None:
        for hk in self._hooks:
            hk.remove()
        self._hooks.clear()

    def reset(self) -> None:
        self.ids.clear()
        self.w.clear()
        self.resid.clear()
        self.look.clear()

    def _experts_hook(self, layer: int):
        def hook(module, args, kwargs):
            if self._busy:
                return None
            _, idx, w = experts_call_args(args, kwargs)
            ws, ids = sort_by_weight(w.detach(), idx.detach())
            self.ids[layer] = ids
            self.w[layer] = ws
            return None

        return hook

    def _norm_hook(self, layer: int):
        def hook(module, args):
            if self._busy or self.mode != "target":
                return None
            resid = args[0].detach()
            if layer in self.targets:
                self._busy = True
                try:
                    tgt = self.loaded.handles[layer]
                    for d in range(1, self.depth + 1):
                        src = layer - d
                        if src in self.resid:
                            _, ids = lookahead_route(tgt, self.resid[src])
                            self.look[(src, d)] = ids
                finally:
                    self._busy = False
            if layer in self.sources:
                self.resid[layer] = resid
            return None

        return hook

    def pack(self, n: int, k: int, with_lookahead: bool) -> list[torch.Tensor]:
        """This step's tensors as float32 pieces (ids, weights, lookahead) to copy to the host together."""
        missing = [l for l in self.moe if l not in self.ids]
        if missing:
            raise RuntimeError(f"no routing recorded for MoE layer(s) {missing} in this step")
        parts = [torch.stack([self.ids[l] for l in self.moe]).float(), torch.stack([self.w[l] for l in self.moe]).float()]
        if with_lookahead and self.depth:
            dev = parts[0].device
            la = torch.full((self.depth, len(self.moe), n, k), -1.0, device=dev)
            for (src, d), ids in self.look.items():
                la[d - 1, self.moe.index(src)] = ids.to(dev).float()
            parts.append(la)
        return parts


# --------------------------------------------------------------------------- capture
def _cache_kwarg(base: torch.nn.Module) -> str:
    params = inspect.signature(type(base).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _eos_ids(model: torch.nn.Module) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = getattr(model.config, "eos_token_id", None)
    if ids is None:
        return set()
    return {int(x) for x in (ids if isinstance(ids, (list, tuple)) else [ids])}


@dataclass
class _Req:
    rid: int
    prompt: list[int]
    gen: list[int] = field(default_factory=list)
    chunks: list[dict[str, np.ndarray]] = field(default_factory=list)
    active: bool = True


class _Engine:
    pbar: Any = None

    def __init__(self, loaded: LoadedModel, s: CaptureSettings) -> None:
        self.loaded = loaded
        self.s = s
        self.model = loaded.model
        self.base = base_model(self.model)
        self.lm_head = self.model.get_output_embeddings()
        self.cache_kw = _cache_kwarg(self.base)
        self.device = loaded.device
        self.k = loaded.shape.top_k
        self.M = loaded.shape.num_moe_layers
        self.D = s.lookahead
        self.eos = _eos_ids(self.model) if s.stop_at_eos else set()
        self.rec = _Recorder(loaded, s.lookahead)
        self.draft = None
        if s.draft:
            from runtime.quant import Draft

            self.draft = Draft(self.model, [h.experts for h in loaded.moe_handles], s.draft_bits, s.draft_group_size,
                               s.draft_kernel)
        self.host_copies = 0

    def close(self) -> None:
        self.rec.remove()
        if self.draft is not None:
            self.draft.remove()

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _forward(self, ids, mask, pos, cache) -> torch.Tensor:
        out = self.base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{self.cache_kw: cache})
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def _argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        """Greedy tokens for every position of ``hidden`` [B, S, H], lm_head in chunks of positions."""
        outs = [self.lm_head(hidden[:, i : i + self.s.lm_head_chunk]).argmax(-1) for i in range(0, hidden.shape[1], self.s.lm_head_chunk)]
        return torch.cat(outs, dim=1)

    @torch.no_grad()
    def run_batch(self, reqs: list[_Req]) -> int:
        """Prefill then greedy decode a batch; returns the number of forward steps."""
        B = len(reqs)
        P = [len(r.prompt) for r in reqs]
        ids, mask, pos = self._left_padded(reqs)
        S = ids.shape[1]
        dev = self.device
        cache = self._new_cache()
        dcache = self._new_cache() if self.draft is not None else None
        step = 0
        while True:
            out = self._step(ids, mask, pos, cache, dcache)
            g = out["next"]
            processed = 0
            for b, r in enumerate(reqs):
                if not r.active:
                    continue
                if step == 0:
                    cols = np.arange(S - P[b], S)
                    positions = np.arange(P[b])
                    following = np.array(r.prompt[1:] + [int(g[b])], dtype=np.int64)
                else:
                    cols = np.array([0])
                    positions = np.array([P[b] + step - 1])
                    following = np.array([int(g[b])], dtype=np.int64)
                r.chunks.append(self._chunk(out, b, cols, positions, following, step))
                processed += len(cols)
            for b, r in enumerate(reqs):
                if not r.active:
                    continue
                r.gen.append(int(g[b]))
                if len(r.gen) >= self.s.max_new_tokens or int(g[b]) in self.eos:
                    r.active = False
            if self.pbar is not None:
                self.pbar.update(processed)
            if not any(r.active for r in reqs):
                return step + 1
            step += 1
            ids = torch.tensor([r.gen[-1] for r in reqs], dtype=torch.long, device=dev).reshape(B, 1)
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], dim=1)
            pos = pos[:, -1:] + 1

    def _left_padded(self, reqs: list[_Req]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's prompts left-padded: input ids, attention mask and positions, on the device."""
        P = [len(r.prompt) for r in reqs]
        B, S = len(reqs), max(P)
        pad = self.model.config.pad_token_id
        pad = int(pad) if isinstance(pad, int) else 0
        ids = torch.full((B, S), pad, dtype=torch.long)
        mask = torch.zeros((B, S), dtype=torch.long)
        for b, r in enumerate(reqs):
            ids[b, S - P[b]:] = torch.tensor(r.prompt, dtype=torch.long)
            mask[b, S - P[b]:] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        dev = self.device
        return ids.to(dev), mask.to(dev), pos.to(dev)

    def _step(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any, dcache: Any) -> dict[str, Any]:
        """One forward step of the target (and the draft, teacher-forced), its recorded routing
        brought to the host in one copy: ids, w (M, B, cols, k), look (D, M, B, cols, k), next (B,),
        and with a draft d_ids and d_arg (B, cols)."""
        B, n_cols = ids.shape
        N = B * n_cols
        k, M, D = self.k, self.M, self.D
        self.rec.reset()
        self.rec.mode = "target"
        hidden = self._forward(ids, mask, pos, cache)
        nxt = self.lm_head(hidden[:, -1:]).argmax(-1).reshape(B)
        parts = self.rec.pack(N, k, True)
        parts.append(nxt.float())
        if self.draft is not None:
            self.rec.reset()
            self.rec.mode = "draft"
            with self.draft.active():
                dh = self._forward(ids, mask, pos, dcache)
            dparts = self.rec.pack(N, k, False)
            parts.append(dparts[0])
            parts.append(self._argmax(dh).reshape(-1).float())
            self.rec.mode = "target"
        flat = torch.cat([p.reshape(-1) for p in parts]).cpu().numpy()  # the one host copy of this step
        self.host_copies += 1
        off = 0

        def take(shape: tuple[int, ...]) -> np.ndarray:
            nonlocal off
            size = int(np.prod(shape))
            a = flat[off : off + size].reshape(shape)
            off += size
            return a

        out: dict[str, Any] = {"ids": take((M, B, n_cols, k)).astype(np.int64),
                               "w": take((M, B, n_cols, k)).astype(np.float32)}
        out["look"] = take((D, M, B, n_cols, k)).astype(np.int64) if D else None
        out["next"] = take((B,)).astype(np.int64)
        if self.draft is not None:
            out["d_ids"] = take((M, B, n_cols, k)).astype(np.int64)
            out["d_arg"] = take((B, n_cols)).astype(np.int64)
        return out

    def _chunk(self, out: dict[str, Any], b: int, cols: np.ndarray, positions: np.ndarray, following: np.ndarray,
               step: int) -> dict[str, np.ndarray]:
        """Request ``b``'s rows of one step (its columns ``cols``) as per-token arrays."""
        ch = {
            "position": positions.astype(np.int64),
            "step": np.full(len(cols), step, dtype=np.int64),
            "ids": out["ids"][:, b, cols].transpose(1, 0, 2),  # (n, M, k)
            "w": out["w"][:, b, cols].transpose(1, 0, 2),
        }
        if self.D:
            ch["look"] = out["look"][:, :, b, cols].transpose(2, 0, 1, 3)  # (n, D, M, k)
        if self.draft is not None:
            ch["draft"] = out["d_ids"][:, b, cols].transpose(1, 0, 2)
            ch["match"] = out["d_arg"][b, cols] == following
        return ch


def _rows(reqs: list[_Req], loaded: LoadedModel, D: int, draft: bool) -> Rows:
    moe = loaded.shape.moe_layers
    M, k = len(moe), loaded.shape.top_k
    moe_set = set(moe)
    cols: dict[str, list[np.ndarray]] = {x: [] for x in ("rid", "pos", "step", "ids", "w", "look", "draft", "match")}
    for r in reqs:
        for ch in r.chunks:
            n = len(ch["position"])
            cols["rid"].append(np.repeat(np.full(n, r.rid, dtype=np.int64), M))
            cols["pos"].append(np.repeat(ch["position"], M))
            cols["step"].append(np.repeat(ch["step"], M))
            cols["ids"].append(ch["ids"].reshape(n * M, k))
            cols["w"].append(ch["w"].reshape(n * M, k))
            if D:
                cols["look"].append(ch["look"].transpose(0, 2, 1, 3).reshape(n * M, D, k))
            if draft:
                cols["draft"].append(ch["draft"].reshape(n * M, k))
                cols["match"].append(np.repeat(ch["match"], M))
    step = np.concatenate(cols["step"])
    n_rows = len(step)
    rows = Rows(
        request_id=np.concatenate(cols["rid"]),
        position=np.concatenate(cols["pos"]),
        step=step,
        phase=np.where(step == 0, PREFILL, DECODE).astype(np.int8),
        layer=np.tile(np.asarray(moe, dtype=np.int64), n_rows // M),
        expert_ids=np.concatenate(cols["ids"]),
        gate_weights=np.concatenate(cols["w"]).astype(np.float32),
    )
    if D:
        look = np.concatenate(cols["look"])
        rows.lookahead, rows.lookahead_null = {}, {}
        layer = rows.layer
        for d in range(1, D + 1):
            null = ~np.isin(layer + d, list(moe_set))
            a = look[:, d - 1].copy()
            a[null] = -1
            rows.lookahead[d] = a
            rows.lookahead_null[d] = null
    if draft:
        rows.draft = np.concatenate(cols["draft"])
        rows.draft_match = np.concatenate(cols["match"]).astype(bool)
    return rows


def versions() -> dict[str, Any]:
    import transformers

    v: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "numpy": np.__version__}
    try:
        import accelerate

        v["accelerate"] = accelerate.__version__
    except ImportError:
        pass
    v["project"] = project_version()
    sha = git_sha()
    if sha:
        v["git"] = sha
    return v


def capture(
    loaded: LoadedModel,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    settings: CaptureSettings | None = None,
    *,
    prompts_origin: dict[str, Any] | None = None,
    created: str | None = None,
) -> Trace:
    """Run greedy generation over ``prompts`` (texts or token-id lists) and return the validated trace.

    Requests are numbered by their index in ``prompts``. ``created`` (ISO-8601) defaults to now;
    pass a fixed value for byte-identical reruns.
    """
    s = settings or CaptureSettings()
    s.validate()
    if not prompts:
        raise CaptureError("no prompts to capture")
    if isinstance(prompts[0], str):
        tokens, tok_desc = encode_prompts(loaded, prompts, s.max_prompt_tokens)  # type: ignore[arg-type]
    else:
        tokens = [list(map(int, p))[: s.max_prompt_tokens] if s.max_prompt_tokens else list(map(int, p)) for p in prompts]
        tok_desc = "token ids given"
        for i, t in enumerate(tokens):
            if not t:
                raise CaptureError(f"prompt {i} has no tokens")
    reqs = [_Req(i, t) for i, t in enumerate(tokens)]
    eng = _Engine(loaded, s)
    total = sum(len(t) for t in tokens) + len(tokens) * max(s.max_new_tokens - 1, 0)
    try:
        from tqdm.auto import tqdm

        disable = None if s.progress is None else (not s.progress)
        eng.pbar = tqdm(total=total, unit="tok", desc="capture", disable=disable, leave=False, file=sys.stderr)
    except ImportError:
        eng.pbar = None
    steps = 0
    try:
        for i in range(0, len(reqs), s.batch_size):
            steps += eng.run_batch(reqs[i : i + s.batch_size])
    finally:
        eng.close()
        if eng.pbar is not None:
            eng.pbar.close()
    rows = _rows(reqs, loaded, s.lookahead, s.draft)
    meta = {
        "created": created or _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "tool": "runtime.capture",
        "model": loaded.provenance,
        "prompts": {**(prompts_origin or {"origin": "python"}), "tokenizer": tok_desc},
        "capture": {
            **asdict(s),
            "device": str(loaded.device),
            "decoding": "greedy",
            "steps": steps,
            "host_copies": eng.host_copies,
            "draft_kv": "own cache, teacher-forced on the target's tokens" if s.draft else None,
        },
        "requests": {"prompt_tokens": [len(r.prompt) for r in reqs], "new_tokens": [len(r.gen) for r in reqs]},
        "versions": versions(),
    }
    meta["capture"].pop("progress", None)
    spec = _model_spec_dict(loaded)
    if spec is not None:
        meta["model_spec"] = spec
    return trace_from_rows(rows, loaded.shape, meta, where=f"capture of {loaded.provenance.get('source')}")


def _model_spec_dict(loaded: LoadedModel) -> dict[str, Any] | None:
    spec = loaded.spec
    if spec is None or not hasattr(spec, "to_dict"):
        return None
    return spec.to_dict()


# =========================================================================== Hydra app
@dataclass
class PromptsConf:
    path: Optional[str] = setting(None, "text file (one prompt per line) or .jsonl; null: runtime.prompts.BUILTIN_PROMPTS")
    field: str = setting("text", "the JSONL field holding the prompt")
    limit: Optional[int] = setting(None, "the first N prompts")
    max_tokens: Optional[int] = setting(None, "truncate longer prompts")


@dataclass
class DraftConf:
    enabled: bool = setting(False, "record draft + draft_match (routed experts quantized, teacher-forced)")
    bits: int = setting(4, "4, 8, or 16 (unquantized)")
    group_size: int = setting(128, "weights per quantization scale")
    kernel: str = setting("reference", "reference (dequantize) | auto | fast (packed int4 matmul)")


@dataclass
class CaptureConf:
    """Structured config of `python -m runtime.capture` (ConfigStore name ``capture_schema``)."""

    model: Any = setting(None, "a conf/model preset (random weights built from its config.json)")
    source: Optional[str] = setting(None, "checkpoint dir, config.json, cached hub name or tiny-<family>")
    layers: Optional[int] = setting(None, "depth reduction for `source` (presets: model.layers)")
    dtype: str = setting("auto", "auto: a checkpoint's own dtype; random weights bf16 on a GPU, fp32 on the CPU")
    device: str = setting("auto", "auto: cuda if present, else cpu")
    seed: int = setting(0, "seed of random weights")
    revision: Optional[str] = setting(None, "checkpoint revision (hub cache)")
    experts_implementation: Optional[str] = setting(
        None, "transformers experts backend (eager, batched_mm, grouped_mm); null: the model's default")
    max_memory: Optional[str] = setting(
        None, "e.g. 4GiB: cap the compute device's weights, offload the rest with accelerate")
    offload_folder: Optional[str] = setting(
        None, "disk offload directory when the compute device is the CPU (default: a temp dir)")
    prompts: PromptsConf = setting(PromptsConf(), "where the prompts come from")
    max_new_tokens: int = setting(32, "greedy decode length")
    batch_size: int = setting(8, "left padding; padding rows are dropped")
    lookahead: int = setting(2, "record lookahead_1..lookahead_D")
    draft: DraftConf = setting(DraftConf(), "the INT4 draft's routing")
    stop_at_eos: bool = setting(True, "stop a request at its end-of-sequence token")
    out: str = setting("trace.parquet", "the trace file written")
    progress: Optional[bool] = setting(None, "null: a bar only on a terminal")
    created: Optional[str] = setting(None, "fixed ISO date for byte-identical reruns; null: now")
    deterministic: bool = setting(True, "torch deterministic algorithms (warn-only)")


def register_configs() -> None:
    """Idempotent: the capture schema plus the group schemas the presets pull in."""
    from hydra.core.config_store import ConfigStore

    from sim.config import register_configs as register_sim

    register_sim()
    ConfigStore.instance().store(name="capture_schema", node=CaptureConf)


def _is_preset(value: str) -> bool:
    from sim.presets import conf_dir

    return bool(value) and "/" not in value and (conf_dir() / "model" / f"{value}.yaml").is_file()


def rewrite_model_args(argv: list[str]) -> list[str]:
    """``model=X`` where X is not a conf/model preset (a directory, a config.json, a cached hub name,
    tiny-<family>) becomes ``~model source=X``, and ``model.layers=N`` then becomes ``layers=N``:
    resolved before composition."""
    out: list[str] = []
    source = False
    for a in argv:
        if a.startswith("model=") and "," not in a:
            v = a.split("=", 1)[1]
            if not _is_preset(v):
                out += ["~model", f"source={v}"]
                source = True
                continue
        out.append(a)
    if source:
        out = [f"layers={a.split('=', 1)[1]}" if a.startswith(("model.layers=", "+model.layers=")) else a for a in out]
    return out


def run_capture(cfg: Any) -> Path:
    """Load, capture, write; ``cfg`` is the composed capture config. Returns the trace path."""
    from omegaconf import OmegaConf

    from runtime.models import load_model
    from sim.presets import conf_dir
    from runtime.prompts import load_prompts
    from traces.atomic import check_output_file
    from traces.io import write_trace

    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    check_output_file(cfg.out, "out")  # before the model loads: not a directory, a folder we can write
    prompts = load_prompts(cfg.prompts.path, cfg.prompts.field, cfg.prompts.limit)
    if cfg.source:
        source, layers = cfg.source, cfg.layers
    elif cfg.get("model") is not None:
        m = cfg.model
        if not m.get("hf_config"):
            raise CaptureError(f"model preset {m.get('name')!r} has no hf_config (no transformers config to build)")
        source, layers = str(conf_dir() / "model" / m.hf_config), m.get("layers")
    else:
        raise CaptureError("no model: pass model=PRESET or model=CHECKPOINT_DIR")
    loaded = load_model(
        source, layers=layers, dtype=cfg.dtype, device=cfg.device, seed=cfg.seed, revision=cfg.revision,
        max_memory=cfg.max_memory, offload_folder=cfg.offload_folder,
        experts_implementation=cfg.experts_implementation,
    )
    if not cfg.source:
        loaded.provenance["preset"] = cfg.model.name
        loaded.provenance["source"] = f"conf/model/{cfg.model.hf_config}"
        loaded.shape = type(loaded.shape)(**{**loaded.shape.to_dict(), "name": cfg.model.name})
    s = CaptureSettings(
        max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, lookahead=cfg.lookahead,
        draft=cfg.draft.enabled, draft_bits=cfg.draft.bits, draft_group_size=cfg.draft.group_size,
        draft_kernel=cfg.draft.kernel, stop_at_eos=cfg.stop_at_eos, max_prompt_tokens=cfg.prompts.max_tokens,
        progress=cfg.progress,
    )
    trace = capture(loaded, prompts.texts, s, prompts_origin=prompts.origin, created=cfg.created)
    trace.meta["config"] = OmegaConf.to_container(cfg, resolve=True)
    return write_trace(trace, Path(cfg.out))


@hydra_task
def _app(cfg: Any) -> None:
    print(f"trace: {run_capture(cfg)}")


def main(argv: list[str] | None = None) -> int:
    """Exit code of `python -m runtime.capture key=value ...` (also the moe-capture console script)."""
    import hydra

    from traces.cli import run_cli

    register_configs()
    sys.argv = [sys.argv[0]] + rewrite_model_args(list(sys.argv[1:] if argv is None else argv))
    return run_cli(hydra.main(version_base="1.3", config_path="pkg://conf", config_name="capture")(_app))


if __name__ == "__main__":
    sys.exit(main())
