"""`python -m traces` (also `moe-traces`): import, inspect, summarise and synthesise routing traces."""

from __future__ import annotations

import argparse
import sys

from traces.errors import TraceError


def build_parser() -> argparse.ArgumentParser:
    from traces import importers, info, stats, synth

    p = argparse.ArgumentParser(prog="python -m traces", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, module, help_ in (
        ("import", importers, "convert another tool's routing log (JSONL or CSV) into a trace"),
        ("info", info, "validate a trace and print its shape, provenance and size"),
        ("stats", stats, "routing statistics per layer and overall"),
        ("synth", synth, "generate a seeded synthetic trace for a model preset"),
    ):
        sp = sub.add_parser(name, help=help_, description=help_)
        module.add_arguments(sp)
        sp.set_defaults(run=module.run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except TraceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
