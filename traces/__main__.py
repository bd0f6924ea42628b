"""`python -m traces` (also `moe-traces`): import, inspect, summarise and synthesise routing traces."""

from __future__ import annotations

import argparse
import sys



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
    """Exit code of ``python -m traces ARGS`` (traces.cli: errors print one line)."""
    from traces.cli import run_cli

    def go() -> int:
        from traces.atomic import check_output_file

        args = build_parser().parse_args(argv)
        if getattr(args, "output", None):  # before any work: not a directory, a folder we can write
            check_output_file(args.output, "-o")
        return int(args.run(args) or 0)

    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())
