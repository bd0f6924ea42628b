"""`python -m runtime` (also `moe-run`): offloaded execution measured in the simulator's terms.

Composes conf/run.yaml (the simulator's groups model, hardware, policy, trace, cache, governor plus
mode=live|replay, engine=graphed|eager, device, repetitions, timeline_out, host_memory,
link_pace_gbps), runs each policy
``repetitions`` times on the offloaded model, prints the simulator's table and writes
``results.parquet``/``.json`` (``source = measured``, and with ``predict=true`` the simulator's row
of each config, ``source = sim``, joined by ``config_id``) beside the resolved config in the Hydra run
directory; live runs also write the executed routing as ``executed_trace.parquet``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from sim.config import RunBase
from sim.presets import setting
from traces.cli import hydra_task


@dataclass
class RunConf(RunBase):
    """Structured config of `python -m runtime` (ConfigStore name ``run_schema``): the simulator's
    groups and run keys (sim.config.RunBase) plus the runtime's own."""

    source: Optional[str] = setting(None, "model= resolved to a checkpoint dir, config.json or tiny-<family>")
    layers: Optional[int] = setting(None, "depth reduction of `source` (presets: model.layers)")
    mode: str = setting("replay", "replay: execute the trace's routing | live: the model's own routing")
    device: str = setting("auto", "auto: cuda if present, else cpu")
    repetitions: int = setting(3, "measured repetitions of each policy")
    warmup_steps: int = setting(-1, "-1: one unmeasured pass over the whole trace first; N: its first N steps; 0: none")
    host_memory: Optional[str] = setting(None, "pinned | pageable: sets hardware.host_memory")
    link_pace_gbps: Optional[float] = setting(None, "pace copies to this bandwidth: sets hardware.link_pace_gbps")
    cpu_backend: str = setting("sync", "on the CPU: sync (inline) | thread (two stream threads) | "
                                       "virtual (deterministic virtual time, the simulator's durations; replay)")
    engine: Any = setting(None, "group conf/engine: graphed (static KV cache + CUDA graphs between routing reads, "
                                "runtime.lean) | eager (transformers' forward) | null: graphed on a GPU, eager on the "
                                "CPU; the simulator's prediction uses the resolved engine's host overhead")
    predict: bool = setting(True, "also the simulator's row of each config (source=sim)")


def register_configs() -> None:
    """Idempotent: the simulator's schemas plus ``run_schema``."""
    from hydra.core.config_store import ConfigStore

    from sim.config import register_configs as register_sim

    register_sim()
    ConfigStore.instance().store(name="run_schema", node=RunConf)


def rewrite_args(argv: list[str]) -> list[str]:
    """``model=X`` where X is not a preset becomes ``~model source=X`` (runtime.capture's rule)."""
    from runtime.capture import rewrite_model_args

    return rewrite_model_args(argv)


def speculative_table(rows: list[dict[str, Any]]) -> str:
    """The simulator's speculative table (acceptance, mean k, tokens per cycle, coverage, ELB recall,
    k histogram) over measured and simulated rows, then, for live runs, the draft's routing agreement
    with the target and the acceptance per draft position; empty when no row is speculative."""
    import pandas as pd

    from sim.report import format_speculative

    text = format_speculative([{**r, "policy": f"{r.get('policy')} ({r.get('source')})"} for r in rows])
    live = [r for r in rows if r.get("status") == "ok" and r.get("mode") == "live"
            and r.get("draft_agreement") is not None]
    if text and live:
        df = pd.DataFrame(live)[["policy", "repetition", "draft_agreement", "acceptance_by_position"]]
        text += "\nlive draft vs target:\n" + df.to_string(index=False, float_format=lambda v: f"{v:.3f}")
    return text


def run_app(cfg: Any, out_dir: Path) -> list[dict[str, Any]]:
    """Measure every policy of ``cfg``, write results (and timelines) under ``out_dir``; return the rows."""
    from runtime.errors import OffloadRuntimeError
    from runtime.measure import Session, check_config, timeline_json
    from runtime.memcheck import check_run
    from sim.report import ResultsWriter, format_table, reasons, write_results
    from traces.atomic import check_output_file, write_json_atomic
    from traces.cli import Interrupted
    from traces.io import write_trace

    timelines, cycles = [], []
    results = ResultsWriter(out_dir, cfg.results_name)  # refuses another run's directory, before the work
    if cfg.timeline_out:
        check_output_file(cfg.timeline_out, "timeline_out")
    check_config(cfg)  # settings refused before anything is estimated or built
    refuse_single_policy(cfg)
    est = check_run(cfg)  # refuses, with the numbers, a run that cannot fit this machine's memory
    reps = int(cfg.get("repetitions", 1))
    progress = (lambda msg: print(msg, file=sys.stderr, flush=True)) if cfg.get("progress", True) else (lambda msg: None)
    if est is not None:
        progress(f"building the model: about {est.host_bytes / 1e9:.1f} GB of host memory"
                 + (f", {est.gpu_bytes / 1e9:.1f} GB of GPU memory" if est.gpu_bytes else "") + " (estimated)")

    def on_run(p, run, log, row):
        if cfg.timeline_out and log.compute_spans is not None:
            timelines.append((p.name, log))
        cycles.extend(sess.cycle_records(p.name, row, log))  # speculative runs: python -m sim.roofline RUN_DIR
        results.add(row)  # an interrupted suite keeps its measured rows
        progress(f"{p.name}: repetition {int(row.get('repetition', 0)) + 1}/{reps} measured in {row.get('wall_s', 0):.1f} s")

    sess = Session(cfg)
    try:
        try:
            rows = sess.measure(cfg, on_run=on_run)
        except KeyboardInterrupt:
            raise Interrupted(results.where()) from None
        results.rows = list(rows)  # every row: measured, predicted (source=sim) and refused ones
        results.write()
        if cycles:
            write_results(cycles, out_dir, "cycles")
        if getattr(sess, "executed", None) is not None:
            write_trace(sess.executed, out_dir / "executed_trace.parquet")
        names = list(dict.fromkeys(n for n, _ in timelines))
        for name in names:
            log = [lg for n, lg in timelines if n == name][-1]
            path = Path(cfg.timeline_out)
            if len(names) > 1:
                path = path.with_name(f"{path.stem}.{name}{path.suffix or '.json'}")
            write_json_atomic(path, timeline_json(log, sess.om), indent=None)
    finally:
        sess.close()
    print(format_table(rows, extra=["source", "repetition"]))
    spec = speculative_table(rows)
    if spec:
        print(spec)
    if reasons(rows):
        print(reasons(rows))
    print(f"results: {results.parquet}")
    if not any(r.get("status") == "ok" and r.get("source") == "measured" for r in rows):
        raise OffloadRuntimeError(f"no policy ran (reasons above); rows in {results.parquet}")
    return rows


def refuse_single_policy(cfg: Any) -> None:
    """One named policy whose budget cannot hold it is refused before the model is built (exit 2);
    in a suite such policies are rows with their status and reason, and the others run."""
    if cfg.policy.get("suite"):
        return
    if cfg.get("mode", "replay") == "replay" and not cfg.get("source"):
        from runtime.measure import apply_overrides
        from sim.run import policy_plan, prepare

        apply_overrides(cfg)
        policy_plan(prepare(cfg), cfg.policy)  # InfeasibleError: the budget, with its shortfall


@hydra_task
def _app(cfg: Any) -> None:
    from hydra.core.hydra_config import HydraConfig

    run_app(cfg, Path(HydraConfig.get().runtime.output_dir))


def main(argv: list[str] | None = None) -> int:
    """Exit code of `python -m runtime key=value ...` (traces.cli)."""
    import hydra

    from traces.cli import run_cli

    register_configs()
    sys.argv = [sys.argv[0]] + rewrite_args(list(sys.argv[1:] if argv is None else argv))
    return run_cli(hydra.main(version_base="1.3", config_path="pkg://conf", config_name="run")(_app))


if __name__ == "__main__":
    sys.exit(main())
