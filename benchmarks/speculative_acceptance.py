"""Real acceptance of the INT4 draft on the project's trained model: per draft position, and the
draft's routing agreement with the target's (runtime/speculate.py, live decoding).

Acceptance is a property of the model and its draft, not of the card: this runs on the CPU in fp32
(the GPU's bf16 can flip near-ties; benchmarks/gpu_speculative.py reports that share). Prompts: the
first ``--prompts`` texts of traces/data/small-moe-prompts.jsonl (held-out code, the model's
domain), tokenized with the model's tokenizer and cut to ``--prompt-tokens``. Fixed k (default 8)
so every draft position is measured; the output is checked against the target's greedy output.

    python benchmarks/speculative_acceptance.py --out benchmarks/results/speculative_acceptance-cpu.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "small-moe"))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"--out {out}: exists (no run overwrites another's results)", file=sys.stderr)
        return 2
    import torch
    from transformers import AutoTokenizer

    from runtime.models import load_model
    from runtime.replay import reference_decode
    from runtime.speculate import HFEngine, SpeculativeDecoder, draft_experts
    from sim.governor import build_governor

    torch.manual_seed(0)
    lm = load_model(args.model, dtype="float32", device="cpu", seed=0)
    tok = AutoTokenizer.from_pretrained(args.model)
    texts = [json.loads(x)["text"] for x in (ROOT / "traces/data/small-moe-prompts.jsonl").read_text().splitlines()]
    prompts = [tok(t)["input_ids"][: args.prompt_tokens] for t in texts[: args.prompts]]
    mods = [h.experts for h in lm.moe_handles]
    fn, kind, nbytes = draft_experts(mods)
    eng = HFEngine(lm.model, mods, fn)
    t0 = time.perf_counter()
    dec = SpeculativeDecoder(eng, build_governor({"name": "fixed", "k": args.k}), num_experts=lm.shape.num_experts,
                             top_k=lm.shape.top_k)
    got = dec.generate(prompts, args.new_tokens)
    wall = time.perf_counter() - t0
    ref = reference_decode(lm.model, prompts, args.new_tokens)["tokens"]
    s = dec.summary()
    res = {
        "what": "INT4 draft (routed experts, group 128) acceptance on the trained small-moe, live greedy decoding",
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(), "host": platform.node(),
        "device": "cpu", "dtype": "float32", "torch": torch.__version__, "command": " ".join(["python", *sys.argv]),
        "model": args.model.replace(str(ROOT) + "/", ""), "draft_kind": kind, "draft_bytes": nbytes,
        "prompts": len(prompts), "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "k": args.k,
        "output_equals_target_greedy": got == ref, "wall_s": wall, **s,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
