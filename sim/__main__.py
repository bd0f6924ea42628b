"""`python -m sim` (also `moe-sim`): replay a routing trace under one policy or a suite, print one
table, and write the results (Parquet + JSON) beside the resolved config in the Hydra run dir."""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sim.config import register_configs
from sim.errors import SimError
from traces.cli import hydra_task

log = logging.getLogger("sim")
register_configs()


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="sim")
@hydra_task
def app(cfg: DictConfig) -> float:
    from pathlib import Path

    from hydra.types import RunMode

    exp = cfg.get("experiment")
    if (HydraConfig.get().mode == RunMode.MULTIRUN or cfg.get("resume")
            or (isinstance(exp, DictConfig) and exp.get("search") is not None)):
        # sweeps, resume and search behave exactly as under `python -m sim.sweep` (a failing job
        # is recorded and the sweep goes on; finished jobs are reused)
        from sim.experiments.sweep import task

        return task(cfg)

    from sim.report import ResultsWriter, format_speculative, format_table, reasons, write_results
    from sim.run import simulate
    from sim.timeline import chrome_trace
    from traces.atomic import check_output_file, write_json_atomic
    from traces.cli import Interrupted

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    results = ResultsWriter(out_dir, cfg.results_name)  # refuses another run's directory, before the work
    if cfg.timeline_out:
        check_output_file(cfg.timeline_out, "timeline_out")
    timelines, cycles = [], []

    def on_policy(p, sim, runlog, row):
        if cfg.timeline_out:
            timelines.append((p.name, sim, runlog))
        link = sim.hw.h2d_bandwidth(sim.expert_bytes)
        cycles.extend({"policy": p.name, "link_bytes_per_s": link, **c} for c in runlog.cycles)

    try:
        rows = simulate(cfg, on_policy=on_policy, on_row=results.add, strict=True)
    except KeyboardInterrupt:
        raise Interrupted(results.where()) from None
    if cycles:  # speculative runs: one record per draft/verify cycle (python -m sim.roofline RUN_DIR)
        write_results(cycles, out_dir, "cycles")
    for name, sim, runlog in timelines:
        path = Path(cfg.timeline_out)
        if len(timelines) > 1:
            path = path.with_name(f"{path.stem}.{name}{path.suffix or '.json'}")
        write_json_atomic(
            path,
            chrome_trace(runlog.compute_spans, runlog.copy_spans, runlog.occupancy,
                         num_experts=sim.model.num_experts, moe_layers=sim.model.moe_layers),
            indent=None,
        )
    print(format_table(rows))
    spec = format_speculative(rows)
    if spec:
        print(spec)
    if reasons(rows):
        print(reasons(rows))
    print(f"results: {results.parquet}")
    ok = [r["tpot_ms"] for r in rows if r.get("status") == "ok"]
    if not ok:  # every policy was refused while running (e.g. unsupported): exit 2
        raise SimError(f"no policy ran (reasons above); rows in {results.parquet}")
    return float(min(ok))


def main() -> int:
    """Exit code of ``python -m sim OVERRIDES`` (traces.cli: 0 ran, 2 refused, 130 interrupted)."""
    from sim.experiments.aggregate import check_sweep_args
    from traces.cli import run_cli

    def go() -> None:
        check_sweep_args(sys.argv[1:])
        app()

    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())
