"""Writes the importer's test cases (run once; the files are committed): one small routing log
in the vLLM logger's shape (canonical.jsonl) and the same routing in shapes real logs come in.

4 requests x 5 tokens, MoE layers 1-3 of a 4-layer model, 8 experts, top-2, seeded.
"""

import csv
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
rng = np.random.default_rng(14)
R, T, LAYERS, E, K = 4, 5, (1, 2, 3), 8, 2
ids = np.argsort(rng.random((R, T, len(LAYERS), E)), axis=-1)[..., :K]
w = -np.sort(-rng.random((R, T, len(LAYERS), K)), axis=-1).round(4)


def recs(r, order="token"):
    out = [(t, m) for t in range(T) for m in range(len(LAYERS))]
    if order == "layer":
        out.sort(key=lambda x: x[1])
    for t, m in out:
        yield t, LAYERS[m], [int(x) for x in ids[r, t, m]], [float(x) for x in w[r, t, m]]


def jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))


jsonl(HERE / "canonical.jsonl", ({"request_id": r, "layer": l, "token_idx": t, "topk_ids": i, "topk_weights": g}
                                 for r in range(R) for t, l, i, g in recs(r)))
# two ranks' files, each numbering its own requests from 0
for f in (0, 1):
    jsonl(HERE / "restart-ids" / f"rank{f}.jsonl",
          ({"request_id": r - 2 * f, "layer": l, "token_idx": t, "topk_ids": i, "topk_weights": g}
           for r in (2 * f, 2 * f + 1) for t, l, i, g in recs(r)))
# grouped by layer, no position column
with open(HERE / "layer-grouped.csv", "w", newline="") as fh:
    wr = csv.writer(fh)
    wr.writerow(["request_id", "layer", "topk_ids", "topk_weights"])
    for r in range(R):
        for t, l, i, g in recs(r, "layer"):
            wr.writerow([r, l, " ".join(map(str, i)), " ".join(map(str, g))])
# routing files beside a run's other JSON Lines files
for f in (0, 1):
    jsonl(HERE / "mixed" / f"routing_{f}.jsonl",
          ({"request_id": r, "layer": l, "token_idx": t, "topk_ids": i, "topk_weights": g}
           for r in (2 * f, 2 * f + 1) for t, l, i, g in recs(r)))
jsonl(HERE / "mixed" / "metrics.jsonl", ({"step": s, "loss": round(3.0 - 0.1 * s, 2)} for s in range(3)))
jsonl(HERE / "mixed" / "config.jsonl", [{"model": "tiny-moe", "dtype": "bfloat16"}])
# weights under another name, and another list field of width k (the draft's ids)
jsonl(HERE / "renamed-weights.jsonl",
      ({"rid": r, "layer_idx": l, "pos": t, "expert_ids": i, "draft_ids": i[::-1], "probs": g}
       for r in range(R) for t, l, i, g in recs(r)))
# a prefill-only log (routing recorded during prefill only)
jsonl(HERE / "prefill-only.jsonl", ({"request_id": r, "phase": "prefill", "layer": l, "token_idx": t, "topk_ids": i,
                                     "topk_weights": g} for r in range(R) for t, l, i, g in recs(r)))
