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


@dataclass
class RunConf(RunBase):
    """Structured config of `python -m runtime` (ConfigStore name ``run_schema``): the simulator's
    groups and run keys (sim.config.RunBase) plus the runtime's own."""

    source: Optional[str] = setting(None, "model= resolved to a checkpoint dir, config.json or tiny-<family>")
    layers: Optional[int] = setting(None, "depth reduction of `source` (presets: model.layers)")
    mode: str = setting("replay", "replay: execute the trace's routing | live: the model's own routing")
    device: str = setting("auto", "auto: cuda if present, else cpu")
    dtype: str = setting("auto", "random weights: auto = bf16 on a GPU, fp32 on the CPU")
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


SPECULATIVE_COLUMNS = ["policy", "source", "repetition", "acceptance_rate", "mean_k", "tokens_per_cycle",
                       "draft_agreement", "acceptance_by_position"]


def speculative_table(rows: list[dict[str, Any]]) -> str:
    """Acceptance, mean k, tokens per cycle (and, measured live, the draft's routing agreement and
    acceptance per draft position) of the speculative rows; empty when there are none."""
    import pandas as pd

    spec = [r for r in rows if r.get("status") == "ok" and r.get("mean_k") is not None
            and not (isinstance(r.get("mean_k"), float) and r["mean_k"] != r["mean_k"])]
    if not spec:
        return ""
    df = pd.DataFrame(spec)
    df = df[[c for c in SPECULATIVE_COLUMNS if c in df.columns]]
    return df.to_string(index=False, float_format=lambda v: f"{v:.3f}")


def run_app(cfg: Any, out_dir: Path) -> list[dict[str, Any]]:
    """Measure every policy of ``cfg``, write results (and timelines) under ``out_dir``; return the rows."""
    from runtime.measure import Session, timeline_json
    from sim.report import format_table, write_results
    from traces.atomic import write_json_atomic
    from traces.io import write_trace

    timelines = []

    def on_run(p, run, log, row):
        if cfg.timeline_out and log.compute_spans is not None:
            timelines.append((p.name, log))

    sess = Session(cfg)
    try:
        rows = sess.measure(cfg, on_run=on_run)
        write_results(rows, out_dir, cfg.results_name)
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
    print(f"results: {out_dir / (cfg.results_name + '.parquet')}")
    return rows


def _app(cfg: Any) -> None:
    from hydra.core.hydra_config import HydraConfig

    from sim.errors import SimError
    from traces.errors import TraceError

    try:
        run_app(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (SimError, TraceError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """`python -m runtime key=value ...`."""
    import hydra

    register_configs()
    sys.argv = [sys.argv[0]] + rewrite_args(list(sys.argv[1:] if argv is None else argv))
    hydra.main(version_base="1.3", config_path="pkg://conf", config_name="run")(_app)()


if __name__ == "__main__":
    main()
