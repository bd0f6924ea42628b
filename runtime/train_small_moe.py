"""Train the project's own small MoE on Python's standard-library source, then capture its traces.

Tests and CI can never fetch a checkpoint, so the project trains a small language model with a
transformers MoE architecture whose routing shape is Phi-3.5-MoE's (PhimoeForCausalLM: 16 routed
experts, top-2, sparsemixer routing), depth-reduced to 8 layers with a small hidden size, and ships
its checkpoint and traces. One command does everything::

    python -m runtime.train_small_moe --out runs/small-moe            # GPU: the full run
    python -m runtime.train_small_moe --out /tmp/s --smoke            # CPU: a few steps, tiny sizes

Data: the ``*.py`` files of the running Python's standard library (every machine has them; the
Python Software Foundation License, PSF-2.0), excluding test directories and site-packages. Files
are split by a hash of their relative path: about 5% are held out; training never sees them, and
the capture prompts are cut from them (so routing is in-domain). Tokenizer: a byte-level BPE
trained here with the ``tokenizers`` package (a transformers dependency), or plain bytes if it
is missing. Everything is seeded; file order, splits and batches are deterministic, and on the
CPU a rerun gives the same weights bit for bit (on a GPU, up to kernel nondeterminism, which
deterministic algorithms are asked to avoid). The data differ between Python versions: the
version and a digest of the file list are recorded.

Outputs under ``--out``: ``checkpoint/`` (config.json, model.safetensors in bf16, tokenizer,
README.md), ``prompts.jsonl`` (held-out prompts with their source file and line),
``small-moe.parquet`` (trace: lookahead_1..D, INT4 draft columns) and ``train_log.json`` (settings,
data provenance, loss curve, held-out loss, draft agreement and acceptance, timings).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

PAD, EOS, BOS = 0, 1, 2
SPECIALS = ["<|pad|>", "<|eos|>", "<|bos|>"]
EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
DATA_LICENSE = {
    "name": "Python standard library source (*.py)",
    "license": "PSF-2.0 (Python Software Foundation License Version 2)",
    "url": "https://docs.python.org/3/license.html",
}


@dataclass
class TrainSettings:
    out: str = "runs/small-moe"
    seed: int = 0
    # model: Phi-3.5-MoE routing (16 experts, top-2), depth-reduced
    layers: int = 8
    hidden: int = 128
    intermediate: int = 128
    heads: int = 4
    kv_heads: int = 2
    experts: int = 16
    top_k: int = 2
    vocab: int = 4096
    router_aux_loss_coef: float = 0.02
    router_jitter_noise: float = 0.01
    # data
    max_files: int | None = None
    heldout_every: int = 20  # a file is held out when hash(path) % heldout_every == 0
    seq_len: int = 256
    # optimisation
    batch: int = 64
    steps: int = 2000
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 200  # the checkpoint kept is the one with the best held-out loss
    eval_blocks: int = 64
    log_every: int = 50
    experts_implementation: str = "auto"  # auto: grouped_mm on a GPU (3x faster there), eager on the CPU
    # capture
    prompts: int = 64
    prompt_tokens: int = 64
    new_tokens: int = 128
    capture_batch: int = 16
    lookahead: int = 3
    device: str = "auto"


def smoke_settings(out: str) -> TrainSettings:
    """Tiny sizes for a CPU test: seconds, not minutes."""
    return TrainSettings(
        out=out, layers=2, hidden=32, intermediate=32, heads=2, kv_heads=1, experts=4, top_k=2, vocab=300,
        max_files=12, heldout_every=4, seq_len=32, batch=4, steps=4, warmup=2, eval_every=2, eval_blocks=4,
        log_every=1, prompts=3, prompt_tokens=16, new_tokens=4, capture_batch=2, lookahead=2, device="cpu",
    )


# ----------------------------------------------------------------------------- data
def stdlib_files(max_files: int | None = None) -> tuple[Path, list[Path]]:
    """The standard library's .py files in a stable order (sorted relative paths)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if any(part in EXCLUDED_DIRS for part in rel.parts[:-1]):
            continue
        files.append(p)
    if not files:
        raise RuntimeError(f"no Python source files under {root}")
    return root, files[:max_files] if max_files else files


def _is_heldout(rel: str, every: int) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % every == 0


def read_corpus(s: TrainSettings) -> dict[str, Any]:
    root, files = stdlib_files(s.max_files)
    train, held = [], []
    digest = hashlib.sha256()
    for p in files:
        rel = p.relative_to(root).as_posix()
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        digest.update(rel.encode() + b"\0" + hashlib.sha256(text.encode()).digest())
        (held if _is_heldout(rel, s.heldout_every) else train).append((rel, text))
    if not train or not held:
        raise RuntimeError(f"data split left {len(train)} training and {len(held)} held-out files; adjust --heldout-every")
    return {
        "root": str(root), "train": train, "heldout": held,
        "provenance": {
            **DATA_LICENSE, "python": platform.python_version(), "stdlib": str(root),
            "files": len(train) + len(held), "train_files": len(train), "heldout_files": len(held),
            "heldout_rule": f"sha256(relative path) % {s.heldout_every} == 0",
            "sha256": digest.hexdigest(), "train_chars": sum(len(t) for _, t in train),
        },
    }


class ByteTokenizer:
    """Fallback when the ``tokenizers`` package is absent: ids 3 + byte (matches runtime.capture.byte_tokens)."""

    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return [3 + b for b in text.encode("utf-8")]


def train_tokenizer(texts: list[str], vocab: int):
    """A byte-level BPE trained on the training files (deterministic), or bytes."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        return ByteTokenizer(), "bytes"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(single=f"{SPECIALS[BOS]} $A", special_tokens=[(SPECIALS[BOS], BOS)])
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok, "byte-level BPE (tokenizers)"


def encode(tok: Any, text: str) -> list[int]:
    return tok.encode(text) if isinstance(tok, ByteTokenizer) else tok.encode(text, add_special_tokens=False).ids


def token_stream(tok: Any, docs: list[tuple[str, str]]) -> np.ndarray:
    ids: list[int] = []
    for _, text in docs:
        ids.append(BOS)
        ids.extend(encode(tok, text))
        ids.append(EOS)
    return np.asarray(ids, dtype=np.int64)


def heldout_prompts(docs: list[tuple[str, str]], n: int, min_chars: int = 60, max_chars: int = 600) -> list[dict[str, Any]]:
    """Code blocks (blank-line separated) from held-out files, round-robin over the files (at most
    four per file), starting in the middle of each file to skip licence headers and docstrings."""
    per_file: list[list[dict[str, Any]]] = []
    for rel, text in docs:
        blocks, line, start, cur = [], 1, 1, []
        for ln in text.splitlines():
            if ln.strip():
                if not cur:
                    start = line
                cur.append(ln)
            elif cur:
                blocks.append((start, "\n".join(cur)))
                cur = []
            line += 1
        if cur:
            blocks.append((start, "\n".join(cur)))
        good = [{"text": b + "\n", "file": rel, "line": st} for st, b in blocks if min_chars <= len(b) <= max_chars]
        if good:
            mid = len(good) // 2
            per_file.append(good[mid:mid + 4])
    out: list[dict[str, Any]] = []
    for round_ in range(4):  # one per file first, then the second ones, ...
        for blocks in per_file:
            if len(blocks) > round_ and len(out) < n:
                out.append(blocks[round_])
    if not out:
        raise RuntimeError("no usable prompt blocks in the held-out files")
    return out


# ----------------------------------------------------------------------------- model
def build_config(s: TrainSettings, vocab: int):
    from transformers import PhimoeConfig

    return PhimoeConfig(
        vocab_size=vocab, hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, num_local_experts=s.experts,
        num_experts_per_tok=s.top_k, max_position_embeddings=max(1024, s.seq_len * 2),
        router_aux_loss_coef=s.router_aux_loss_coef, router_jitter_noise=s.router_jitter_noise,
        input_jitter_noise=0.0, attention_dropout=0.0, output_router_logits=False,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


def _lr(step: int, s: TrainSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    t = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@torch.no_grad()
def evaluate(model: torch.nn.Module, blocks: np.ndarray, device: torch.device, batch: int, autocast: bool) -> float:
    model.eval()
    losses = []
    for i in range(0, len(blocks), batch):
        x = torch.from_numpy(blocks[i:i + batch]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=x, labels=x)
        losses.append(float(out.loss) * len(x))
    model.train()
    return sum(losses) / len(blocks)


def train(s: TrainSettings) -> dict[str, Any]:
    """Data, tokenizer, training, checkpoint, held-out prompts and trace capture (one command)."""
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if s.device == "auto" and torch.cuda.is_available() else ("cpu" if s.device == "auto" else s.device))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(s.seed)
    np_rng = np.random.default_rng(s.seed)

    corpus = read_corpus(s)
    tok, tok_kind = train_tokenizer([t for _, t in corpus["train"]], s.vocab)
    vocab = tok.vocab_size if isinstance(tok, ByteTokenizer) else tok.get_vocab_size()
    train_blocks, held_blocks = _blocks(s, tok, corpus)
    t_data = time.time() - t0

    config = build_config(s, vocab)
    impl = s.experts_implementation
    if impl == "auto":
        impl = "grouped_mm" if device.type == "cuda" else "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, experts_implementation=impl)
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    t1 = time.time()
    curve, evals, best_loss, best_step = _train_loop(model, s, train_blocks, held_blocks, device, np_rng)
    t_train = time.time() - t1

    ckpt = _save_checkpoint(model, tok, out, _model_card(s, corpus["provenance"], tok_kind, n_params, best_loss, best_step))
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    del model

    # ---- held-out prompts and the trace
    prompts = heldout_prompts(corpus["heldout"], s.prompts)
    with open(out / "prompts.jsonl.tmp", "w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps(p) + "\n")
    os.replace(out / "prompts.jsonl.tmp", out / "prompts.jsonl")
    t2 = time.time()
    summary = capture_traces(s, ckpt, prompts, out, device)
    t_capture = time.time() - t2

    log = {
        "settings": asdict(s), "device": str(device), "data": corpus["provenance"], "tokenizer": tok_kind,
        "vocab": vocab, "train_tokens": int(train_blocks.size), "heldout_tokens_evaluated": int(held_blocks.size),
        "params": n_params, "checkpoint_bytes": ckpt_bytes, "loss_curve": curve, "evals": evals,
        "final_heldout_loss": round(best_loss, 5), "best_step": best_step, "experts_implementation": impl, **summary,
        "seconds": {"data": round(t_data, 1), "train": round(t_train, 1), "capture": round(t_capture, 1),
                    "total": round(time.time() - t0, 1)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
    }
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    print(json.dumps({k: log[k] for k in ("final_heldout_loss", "best_step", "params", "checkpoint_bytes", "draft_agreement",
                                          "acceptance", "seconds")}, indent=1))
    return log


def _blocks(s: TrainSettings, tok: Any, corpus: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out token blocks of ``seq_len`` tokens."""
    train_ids = token_stream(tok, corpus["train"])
    held_ids = token_stream(tok, corpus["heldout"])
    T = s.seq_len
    n_train = len(train_ids) // T
    n_held = min(s.eval_blocks, len(held_ids) // T)
    if n_train < 1 or n_held < 1:
        raise RuntimeError(f"not enough tokens for seq_len={T}: {len(train_ids)} train, {len(held_ids)} held out")
    return train_ids[: n_train * T].reshape(n_train, T), held_ids[: n_held * T].reshape(n_held, T)


def _train_loop(model: Any, s: TrainSettings, train_blocks: np.ndarray, held_blocks: np.ndarray,
                device: torch.device, np_rng: np.random.Generator) -> tuple[list[dict], list[dict], float, int]:
    """AdamW over shuffled blocks; keeps the weights of the best held-out loss and loads them back.
    Returns (loss curve, evaluations, best held-out loss, its step)."""
    n_train = len(train_blocks)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=s.lr, betas=(0.9, 0.95), eps=1e-8)
    autocast = device.type == "cuda"
    order = np.concatenate([np_rng.permutation(n_train) for _ in range(math.ceil(s.steps * s.batch / n_train) + 1)])
    curve, evals = [], []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    t1 = time.time()
    for step in range(s.steps):
        idx = order[step * s.batch:(step + 1) * s.batch]
        x = torch.from_numpy(train_blocks[idx]).to(device)
        for g in opt.param_groups:
            g["lr"] = _lr(step, s)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            o = model(input_ids=x, labels=x, output_router_logits=True)
        opt.zero_grad(set_to_none=True)
        o.loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        if step % s.log_every == 0 or step == s.steps - 1:
            aux = float(o.aux_loss.detach()) if getattr(o, "aux_loss", None) is not None else None
            lm = float(o.loss.detach()) - (s.router_aux_loss_coef * aux if aux is not None else 0.0)
            curve.append({"step": step, "loss": round(lm, 5), "aux_loss": None if aux is None else round(aux, 5),
                          "grad_norm": round(float(gn), 4), "lr": _lr(step, s)})
            print(f"step {step:5d}  loss {lm:.4f}  aux {aux if aux is None else round(aux, 4)}  "
                  f"|g| {float(gn):.3f}  {time.time() - t1:.0f}s", flush=True)
        if (step + 1) % s.eval_every == 0 or step == s.steps - 1:
            ev = evaluate(model, held_blocks, device, s.batch, autocast)
            evals.append({"step": step + 1, "heldout_loss": round(ev, 5)})
            print(f"  held-out loss {ev:.4f} (ppl {math.exp(ev):.1f})", flush=True)
            if best is None or ev < best[0]:
                best = (ev, step + 1, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
    assert best is not None
    model.load_state_dict(best[2])
    return curve, evals, best[0], best[1]


def _save_checkpoint(model: Any, tok: Any, out: Path, card: str) -> Path:
    """The model in bf16 safetensors with its tokenizer and card, written atomically as out/checkpoint."""
    from transformers import PreTrainedTokenizerFast

    ckpt = out / "checkpoint"
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=out))
    model.eval()
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    model.generation_config.bos_token_id = BOS
    model.generation_config.save_pretrained(tmp)
    if not isinstance(tok, ByteTokenizer):
        PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=SPECIALS[PAD], eos_token=SPECIALS[EOS],
                                bos_token=SPECIALS[BOS]).save_pretrained(tmp)
    (tmp / "README.md").write_text(card)
    if ckpt.exists():
        import shutil

        shutil.rmtree(ckpt)
    os.chmod(tmp, 0o755)
    for f in tmp.iterdir():
        os.chmod(f, 0o644)
    os.replace(tmp, ckpt)
    return ckpt


def capture_traces(s: TrainSettings, ckpt: Path, prompts: list[dict[str, Any]], out: Path, device: torch.device) -> dict[str, Any]:
    """The committed trace: held-out prompts, lookahead 1..D, INT4 draft (group 128)."""
    from runtime.capture import CaptureSettings, capture
    from runtime.models import load_model
    from traces.io import write_trace

    loaded = load_model(ckpt, device=device, dtype="bfloat16" if device.type == "cuda" else "float32")
    loaded.shape = type(loaded.shape)(**{**loaded.shape.to_dict(), "name": "small-moe"})
    cs = CaptureSettings(max_new_tokens=s.new_tokens, batch_size=s.capture_batch, lookahead=s.lookahead, draft=True,
                         draft_bits=4, draft_group_size=128, max_prompt_tokens=s.prompt_tokens)
    origin = {"origin": "heldout-stdlib", "path": "prompts.jsonl", "count": len(prompts),
              "sha256": hashlib.sha256("\0".join(p["text"] for p in prompts).encode()).hexdigest(),
              "license": DATA_LICENSE["license"]}
    trace = capture(loaded, [p["text"] for p in prompts], cs, prompts_origin=origin)
    trace.meta["model"]["name"] = "small-moe"
    trace.meta["model"]["source"] = "runtime.train_small_moe (checkpoint/)"
    path = write_trace(trace, out / "small-moe.parquet")
    os.chmod(path, 0o644)
    v = trace.valid_mask()
    a, d = trace.expert_ids[v], trace.draft[v]
    agree = (a[..., :, None] == d[..., None, :]).any(-1).mean()
    dec = v & (trace.phase == 1)
    load = np.bincount(a.reshape(-1), minlength=trace.shape.num_experts) / a.size
    return {
        "trace": str(path), "trace_rows": trace.num_rows,
        "draft_agreement": round(float(agree), 4),
        "acceptance": round(float(trace.draft_match[dec].mean()), 4) if dec.any() else None,
        "expert_load_max_over_mean": round(float(load.max() * trace.shape.num_experts), 3),
    }


def _model_card(s: TrainSettings, data: dict[str, Any], tok_kind: str, n_params: int, loss: float, step: int) -> str:
    return (
        "# small-moe\n\n"
        "A small MoE language model trained by this project (runtime/train_small_moe.py) so that tests, CI and\n"
        "notebooks have real routing traces and a real checkpoint without network access. Not a useful\n"
        "language model.\n\n"
        f"- architecture: transformers PhimoeForCausalLM (Phi-3.5-MoE's routing: {s.experts} experts, top-{s.top_k},\n"
        f"  sparsemixer), {s.layers} layers, hidden {s.hidden}, expert intermediate {s.intermediate}, {n_params:,} parameters\n"
        f"- tokenizer: {tok_kind}, vocabulary {s.vocab}\n"
        f"- data: {data['name']}, Python {data['python']}, {data['train_files']} training files;\n"
        f"  {data['heldout_files']} files held out ({data['heldout_rule']}); licence {data['license']} ({data['url']})\n"
        f"- training: {s.steps} steps x {s.batch} x {s.seq_len} tokens, AdamW lr {s.lr}, seed {s.seed}\n"
        f"- kept: the step-{step} weights, best held-out loss {loss:.4f} nats/token (evaluated every {s.eval_every} steps)\n"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m runtime.train_small_moe", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=TrainSettings.out)
    p.add_argument("--smoke", action="store_true", help="tiny CPU settings (a test)")
    for f in TrainSettings.__dataclass_fields__.values():
        if f.name == "out":
            continue
        typ = {"int": int, "float": float, "str": str}.get(str(f.type).split(" ")[0], None)
        if typ is None:  # int | None
            typ = int
        p.add_argument("--" + f.name.replace("_", "-"), type=typ, default=None)
    a = p.parse_args(argv)
    s = smoke_settings(a.out) if a.smoke else TrainSettings(out=a.out)
    for name in TrainSettings.__dataclass_fields__:
        v = getattr(a, name, None)
        if v is not None and name != "out":
            setattr(s, name, v)
    return train(s)


if __name__ == "__main__":
    from traces.cli import run_cli

    sys.exit(run_cli(lambda: main() and 0))
