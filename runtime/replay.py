"""Drivers of the offloading executor: ``replay`` a trace's routing, or decode ``live``.

Replay (``mode=replay``) runs the model's real shapes (random weights are fine) but makes every MoE
layer compute exactly the experts the trace names, token by token, with the trace's gate weights,
in the trace's order of requests and steps: prefill (all prompt tokens in one pass, trace step 0),
then one decode step per token. The layer-steps are those of the simulator's ``sim.schedule.Schedule``
of the same trace, so the simulator and the hardware run the same expert sequence, and the policies
get the same context (future, next use, predictors attached to the trace). The router still runs
and its choice still travels to the host (the one sync per layer a live run has): only its
result is replaced.

Live (``mode=live``): greedy decoding of token prompts with the model's own routing; the executed
routing is recorded and becomes a trace (``executed_trace``), so the simulator can replay exactly
what ran and the bound is computed on it.

Both drive a ``runtime.executor.Run`` through ``request_start``/``begin_step``/forward/``end_step``;
a speculative driver (draft k tokens, verify k + 1 in one pass) uses the same calls with
multi-token verify steps (``emitted`` = accepted + 1).
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import numpy as np
import torch

from runtime.errors import ExecutorError
from runtime.executor import Run
from runtime.offloaded import OffloadedModel
from traces.io import Rows, trace_from_rows
from traces.trace import DECODE, PREFILL, Trace


def new_cache(model: torch.nn.Module):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _forward_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    """Keyword names this transformers version takes: ``cache`` (newer) or ``past_key_values``, and
    ``logits_to_keep`` (LM head on the last position only)."""
    params = inspect.signature(type(model).forward).parameters
    kw: dict[str, Any] = {"_cache": "cache" if "cache" in params else "past_key_values"}
    if "logits_to_keep" in params:
        kw["logits_to_keep"] = 1
    return kw


def forward_step(model: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor, cache: Any,
                 extra: dict[str, Any]) -> torch.Tensor:
    """One causal-LM pass over ``ids`` [1, n] at ``positions``; logits of the last position [1, V]."""
    kw = {k: v for k, v in extra.items() if k != "_cache"}
    kw[extra.get("_cache", "past_key_values")] = cache
    out = model(input_ids=ids, position_ids=positions, use_cache=True, **kw)
    return out.logits[:, -1, :]


def stepper(om: OffloadedModel):
    """``(new_request, step)``: the model's forward for one request, ``step(ids [1, n], start)`` ->
    last logits [1, V]. With ``om.stepper`` (engine=graphed: runtime.lean.LeanModel) its static-KV
    path; otherwise transformers' forward with a dynamic cache."""
    lean = getattr(om, "stepper", None)
    if lean is not None:
        return lean.reset, lean.forward
    model, dev = om.model, om.device
    extra = _forward_kwargs(model)
    box: list[Any] = [None]

    def new_request() -> None:
        box[0] = new_cache(model)

    def step(ids: torch.Tensor, start: int) -> torch.Tensor:
        pos = torch.arange(start, start + ids.shape[1], device=dev).reshape(1, -1)
        return forward_step(model, ids, pos, box[0], extra)

    return new_request, step


def prompt_tokens(vocab: int, lengths: Sequence[int], seed: int) -> list[list[int]]:
    """Deterministic random prompts (token ids above the 3 special ids) of the given lengths."""
    rng = np.random.default_rng([seed, 4242])
    return [rng.integers(3, max(vocab, 4), size=int(n)).tolist() for n in lengths]


# ------------------------------------------------------------------------------ replay
def replay(om: OffloadedModel, run: Run, trace: Trace, schedule: Any, *, seed: int = 0,
           requests: Sequence[int] | None = None, max_steps: int | None = None) -> None:
    """Execute the trace's routing (every step of ``schedule``, or the first ``max_steps`` steps of
    the given ``requests`` for warm-up) through the offloaded model."""
    model, dev = om.model, om.device
    new_request, step = stepper(om)
    M, k = om.M, om.top_k
    w_all = trace.gate_weights
    vocab = int(model.config.vocab_size)
    rng = np.random.default_rng([seed, 77])
    reqs = range(trace.num_requests) if requests is None else requests
    with torch.inference_mode():
        for r in reqs:
            s_first, s_end = schedule.request_steps[r]
            if max_steps is not None:
                s_end = min(s_end, s_first + max_steps)
            run.request_start(r)
            new_request()
            nxt = None
            for s_idx in range(s_first, s_end):
                st = schedule.steps[s_idx]
                a, b = st.t0, st.t1
                n = b - a
                ids_np = trace.expert_ids[r, a:b].astype(np.int64)  # (n, M, k)
                if w_all is not None:
                    w_np = w_all[r, a:b].astype(np.float32)
                    bad = ~np.isfinite(w_np)
                    if bad.any():
                        w_np = np.where(bad, 1.0 / k, w_np)
                else:
                    w_np = np.full(ids_np.shape, 1.0 / k, dtype=np.float32)
                ids_host = ids_np.transpose(1, 0, 2).tolist()  # (M, n, k)
                ov_ids = torch.from_numpy(np.ascontiguousarray(ids_np.transpose(1, 0, 2))).to(dev, non_blocking=True)
                ov_w = torch.from_numpy(np.ascontiguousarray(w_np.transpose(1, 0, 2))).to(dev, non_blocking=True)
                start = int(trace.position[r, a])
                if nxt is None or n > 1:
                    toks = torch.from_numpy(rng.integers(3, max(vocab, 4), size=n)).reshape(1, n).to(dev)
                else:
                    toks = nxt
                needed = [schedule.needed[g] for g in range(st.g0, st.g0 + M)]
                run.begin_step(r, st.step, n, needed=needed, override=(ov_ids, ov_w, ids_host), emitted=st.emitted)
                logits = step(toks, start)
                nxt = logits.argmax(-1).reshape(1, 1)
                run.end_step()
            run.request_end(r)


# ------------------------------------------------------------------------------ live
def live(om: OffloadedModel, run: Run, prompts: Sequence[Sequence[int]], new_tokens: int, *,
         keep_logits: bool = False, stop_ids: set[int] | None = None) -> dict[str, Any]:
    """Greedy decoding of each prompt (batch 1): prefill, then ``new_tokens - 1`` decode steps (the
    prefill emits the first token). Returns the generated tokens (and logits per step)."""
    dev = om.device
    new_request, step = stepper(om)
    gen: list[list[int]] = []
    logits_all: list[list[torch.Tensor]] = []
    with torch.inference_mode():
        for r, prompt in enumerate(prompts):
            run.request_start(r)
            new_request()
            toks = torch.tensor([list(prompt)], dtype=torch.long, device=dev)
            start = 0
            out_tok: list[torch.Tensor] = []
            lg: list[torch.Tensor] = []
            for i in range(max(1, new_tokens)):
                run.begin_step(r, i, toks.shape[1])
                logits = step(toks, start)
                nxt = logits.argmax(-1).reshape(1, 1)
                run.end_step()
                out_tok.append(nxt)
                if keep_logits:
                    lg.append(logits.float().cpu())
                start += toks.shape[1]
                toks = nxt
            run.request_end(r)
            gen.append(torch.cat(out_tok, dim=1).reshape(-1).tolist())
            logits_all.append(lg)
    return {"tokens": gen, "logits": logits_all}


def reference_decode(model: torch.nn.Module, prompts: Sequence[Sequence[int]], new_tokens: int) -> dict[str, Any]:
    """The same greedy loop on a model that is not offloaded (the exactness reference)."""
    dev = next(p.device for p in model.parameters() if p.device.type != "meta")
    extra = _forward_kwargs(model)
    gen, logits_all = [], []
    with torch.inference_mode():
        for prompt in prompts:
            cache = new_cache(model)
            toks = torch.tensor([list(prompt)], dtype=torch.long, device=dev)
            pos = torch.arange(len(prompt), device=dev).reshape(1, -1)
            out, lg = [], []
            for i in range(max(1, new_tokens)):
                logits = forward_step(model, toks, pos, cache, extra)
                nxt = logits.argmax(-1).reshape(1, 1)
                out.append(int(nxt))
                lg.append(logits.float().cpu())
                toks = nxt
                pos = torch.tensor([[len(prompt) + i]], device=dev)
            gen.append(out)
            logits_all.append(lg)
    return {"tokens": gen, "logits": logits_all}


def executed_trace(run: Run, shape: Any, prompts: Sequence[Sequence[int]], meta: dict[str, Any],
                   predictor: Any = None) -> Trace:
    """The routing a live run executed, as a validated trace (weight order, gate weights), with the
    live gate predictor's ``lookahead_<d>`` columns when the run had one (``predictor``)."""
    if not run.routing_log:
        raise ExecutorError("the run recorded no routing (OffloadedModel(record_routing=True))")
    M, k = shape.num_moe_layers, shape.top_k
    by_g = {g: (ids, w) for g, m, ids, w in run.routing_log}
    cols: dict[str, list] = {x: [] for x in ("rid", "pos", "step", "phase", "layer", "ids", "w")}
    depth = int(getattr(predictor, "depth", 0) or 0)
    look: dict[int, list] = {d: [] for d in range(1, depth + 1)}
    moe = list(shape.moe_layers)
    for st in run.steps:
        n = st.n_tokens
        p0 = 0 if st.step == 0 else len(prompts[st.request]) + st.step - 1
        per = [by_g[st.g0 + m] for m in range(M)]
        for t in range(n):
            for m in range(M):
                ids, w = per[m]
                cols["rid"].append(st.request)
                cols["pos"].append(p0 + t)
                cols["step"].append(st.step)
                cols["phase"].append(PREFILL if st.step == 0 else DECODE)
                cols["layer"].append(moe[m])
                cols["ids"].append(ids[t])
                cols["w"].append(w[t])
                for d in look:
                    pr = predictor.rows.get((st.g0 + m, d))
                    look[d].append(list(pr[t]) if pr is not None else [-1] * k)
    rows = Rows(
        request_id=np.asarray(cols["rid"], dtype=np.int64), position=np.asarray(cols["pos"], dtype=np.int64),
        step=np.asarray(cols["step"], dtype=np.int64), phase=np.asarray(cols["phase"], dtype=np.int8),
        layer=np.asarray(cols["layer"], dtype=np.int64), expert_ids=np.asarray(cols["ids"], dtype=np.int64).reshape(-1, k),
        gate_weights=np.asarray(cols["w"], dtype=np.float32).reshape(-1, k),
    )
    if look:
        rows.lookahead, rows.lookahead_null = {}, {}
        moe_set = set(moe)
        for d, vals in look.items():
            a = np.asarray(vals, dtype=np.int64).reshape(-1, k)
            null = ~np.isin(rows.layer + d, list(moe_set))
            a[null] = -1
            rows.lookahead[d], rows.lookahead_null[d] = a, null
    return trace_from_rows(rows, shape, meta, where="executed routing of a live run")
