"""``python -m traces synth``: write a synthetic trace of a model preset, any dial overridden."""

from __future__ import annotations

import argparse
import dataclasses
import time

from traces.presets import PRESETS
from traces.synth.params import SynthParams, synth_params_for


# ------------------------------------------------------------------------ CLI
def _profile(text: str) -> tuple[float, float, float]:
    parts = [float(x) for x in text.split(",")]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected one value or first,peak,last; got {text!r}")
    return (parts[0], parts[1], parts[2])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=f"model preset id: {', '.join(PRESETS)}")
    p.add_argument("-o", "--output", required=True, help="trace file to write (.parquet)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g = p.add_argument_group("dials (default: the model family's preset, see traces/synth.py)")
    for f in dataclasses.fields(SynthParams):
        if f.name == "model":
            continue
        opt = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        if f.type in ("bool", bool):
            g.add_argument(opt, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif f.name in ("reuse", "hot_share"):
            g.add_argument(opt, type=_profile, default=None, metavar="P|FIRST,PEAK,LAST", help=help_)
        else:
            typ = int if f.type in ("int", int) else float
            g.add_argument(opt, type=typ, default=None, help=help_)


def run(args: argparse.Namespace) -> int:
    from traces.io import write_trace

    params = synth_params_for(args.model)
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(SynthParams)
        if f.name != "model" and getattr(args, f.name, None) is not None
    }
    params = dataclasses.replace(params, **overrides)
    t0 = time.perf_counter()
    from traces.synth import synthesize

    trace = synthesize(params, args.seed)
    t1 = time.perf_counter()
    path = write_trace(trace, args.output)
    t2 = time.perf_counter()
    print(
        f"{path}: synthetic {trace.shape.name} trace, seed {args.seed}, {trace.num_requests} requests, "
        f"{int(trace.lengths.sum())} tokens, {trace.num_rows} rows "
        f"(generated in {t1 - t0:.2f} s, written in {t2 - t1:.2f} s)"
    )
    return 0
