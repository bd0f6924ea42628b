"""No result lost or overwritten, every refusal named before the work (README, "Exit codes").

Each case runs the CLI as a user would (a subprocess) and checks its exit code, its one line on
stderr and what is, or is not, on disk afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg", "TQDM_DISABLE": "1"}
TINY = ["model=tiny", "trace.requests=1", "trace.prompt_tokens=4", "trace.decode_tokens=8"]


def start(*args: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env or ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env or ENV, text=True, capture_output=True,
                          timeout=timeout)


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def temp_files(d: Path) -> list[Path]:
    return [p for p in d.rglob(".*.tmp")]


# ------------------------------------------------------------------ results never lost or overwritten
def test_runs_started_in_the_same_second_keep_their_own_results(tmp_path):
    procs = [start("-m", "sim", *TINY, f"policy={p}", cwd=tmp_path) for p in ("lru", "belady")]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    files = sorted(tmp_path.glob("outputs/*/*/results.parquet"))
    assert len(files) == 2  # two run dirs, even within one second
    assert sorted(pd.read_parquet(f).policy.iloc[0] for f in files) == ["belady", "lru"]
    for (stdout, _), f in zip(outs, sorted(files, key=lambda f: pd.read_parquet(f).policy.iloc[0] != "lru")):
        assert f"results: {f}" in stdout  # every run prints its results file


def test_a_run_never_replaces_another_runs_results(tmp_path):
    run_dir = tmp_path / "run"
    first = run("-m", "sim", *TINY, "policy=lru", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = (run_dir / "results.parquet").read_bytes()
    second = run("-m", "sim", *TINY, "policy=belady", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert second.returncode == 2
    assert "already exists (another run's results)" in one_line(second.stderr)
    assert (run_dir / "results.parquet").read_bytes() == before


def test_two_runs_given_the_same_dir_at_once_lose_nothing(tmp_path):
    run_dir = tmp_path / "run"
    procs = [start("-m", "sim", *TINY, f"policy={p}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
             for p in ("lru", "belady")]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs  # one wrote its results; the other refused, with its reason
    loser = next(err for p, (_, err) in zip(procs, outs) if p.returncode == 2)
    assert "another run" in one_line(loser)
    df = pd.read_parquet(run_dir / "results.parquet")
    assert len(df) == 1 and (df.status == "ok").all()
    assert not temp_files(run_dir)


def test_interrupted_suite_keeps_its_finished_policies(tmp_path):
    """Ctrl-C during a multi-policy run: the finished policies' rows are on disk, one line says where,
    exit 130, no traceback and no temp file."""
    run_dir = tmp_path / "run"
    p = start("-m", "sim", "model=mixtral-8x7b", "model.layers=4", "trace.requests=3", "trace.decode_tokens=128",
              "policy=baselines", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    results = run_dir / "results.parquet"
    deadline = time.monotonic() + 240
    while not results.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()  # still running: the suite has more policies to go
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    line = one_line(err)
    assert line.startswith("interrupted: ") and str(results) in line
    df = pd.read_parquet(results)
    assert 1 <= len(df) < 8 and (df.status == "ok").all() and df.policy.iloc[0] == "stream"
    assert f"{len(df)} finished row" in line
    assert not temp_files(run_dir)


def test_sigterm_during_an_atomic_write_leaves_no_temp_file(tmp_path):
    script = tmp_path / "slow_write.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from traces.atomic import atomic_write
        from traces.cli import run_cli

        def slow(tmp):
            Path(tmp).write_text("partial")
            print("writing", flush=True)
            time.sleep(60)

        sys.exit(run_cli(lambda: atomic_write({str(tmp_path / 'out' / 'target.json')!r}, slow) and 0))
    """))
    p = start(str(script), cwd=tmp_path)
    assert p.stdout.readline().strip() == "writing"
    assert len(temp_files(tmp_path / "out")) == 1  # the hidden partial file exists mid-write
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and one_line(err) == "terminated"
    assert list((tmp_path / "out").iterdir()) == []  # neither the target nor its temp file


def test_unsupported_policy_is_a_row_and_the_others_run(tmp_path):
    """The default suite on a trace without recorded lookahead: lookahead's row is unsupported with
    its reason (printed under the table), the others run, exit 0."""
    from dataclasses import replace

    from traces import write_trace
    from traces.synth import synth_params_for, synthesize

    t = synthesize(replace(synth_params_for("tiny"), requests=1, prompt_tokens=4, decode_tokens=8,
                           lookahead_depth=0), seed=0)
    write_trace(t, tmp_path / "t.parquet")
    out = run("-m", "sim", "model=tiny", f"trace.path={tmp_path / 't.parquet'}", "policy=baselines",
              f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    df = pd.read_parquet(tmp_path / "run" / "results.parquet")
    row = df.set_index("policy").loc["lookahead"]
    assert row.status == "unsupported" and "lookahead_1" in row.reason
    assert (df[df.policy != "lookahead"].status == "ok").all()
    assert f"  lookahead: unsupported: {row.reason}" in out.stdout
    # the same policy named alone cannot run: refused, exit 2
    alone = run("-m", "sim", "model=tiny", f"trace.path={tmp_path / 't.parquet'}", "policy=lookahead", cwd=tmp_path)
    assert alone.returncode == 2 and "lookahead_1" in one_line(alone.stderr)


# ------------------------------------------------------------------ refused before the work
@pytest.mark.parametrize("make, args, needle", [
    (lambda d: (d / "adir").mkdir(), ["timeline_out={d}/adir"], "is a directory"),
    (lambda d: (d / "afile").write_text(""), ["timeline_out={d}/afile/run.json"], "is a file, not a directory"),
    (lambda d: (d / "afile").write_text(""), ["hydra.run.dir={d}/afile/run"], "afile"),
])
def test_output_paths_are_checked_before_the_work(tmp_path, make, args, needle):
    make(tmp_path)
    out = run("-m", "sim", *TINY, "policy=lru", *[a.format(d=tmp_path) for a in args], cwd=tmp_path)
    assert out.returncode == 2 and needle in one_line(out.stderr)
    assert not list(tmp_path.rglob("results.parquet"))


def test_traces_output_path_checked(tmp_path):
    (tmp_path / "adir").mkdir()
    out = run("-m", "traces", "synth", "--model", "tiny", "-o", str(tmp_path / "adir"), cwd=tmp_path)
    assert out.returncode == 2 and "is a directory" in one_line(out.stderr)


def test_a_closed_stdout_ends_quietly(tmp_path):
    p = subprocess.run(f"{sys.executable} -m traces synth --model tiny -o t.parquet && "
                       f"{sys.executable} -m traces stats t.parquet | head -1", shell=True, cwd=tmp_path, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stderr == "", p.stderr


# ------------------------------------------------------------------ the runtime's memory pre-check
def test_memory_estimate_counts_the_model_and_the_store():
    from runtime.memcheck import HEADROOM, estimate
    from sim.spec import ModelSpec

    spec = ModelSpec.from_preset("mixtral-8x7b")
    experts = spec.num_routed_experts_total * (spec.expert_params + spec.expert_bias_params)
    est = estimate(spec, device="cpu", wbytes=4)
    assert est.host_parts["expert store"] == 4 * experts
    assert est.host_parts["whole model while it is built"] == 4 * (spec.non_expert_params + experts)
    assert est.gpu_bytes == 0 and est.host_bytes == int(HEADROOM * sum(est.host_parts.values()))
    gpu = estimate(spec, device="cuda", wbytes=2, gpu_plan_bytes=int(24e9))
    assert gpu.gpu_parts == {"whole model while it is built": 2 * (spec.non_expert_params + experts)}
    assert 90e9 < gpu.gpu_bytes < 110e9  # Mixtral-8x7B in bf16: about 93 GB


def test_runtime_refuses_a_run_that_cannot_fit_before_building_it(tmp_path):
    env = {**ENV, "MOE_OFFLOAD_HOST_BYTES": "4e9"}  # this machine, as if it had 4 GB free
    t0 = time.monotonic()
    out = run("-m", "runtime", "model=mixtral-8x7b", "model.layers=2", "policy=lru", "device=cpu",
              f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env=env)
    line = one_line(out.stderr)
    assert out.returncode == 2, out.stderr
    assert "host memory" in line and "but 4.0 GB is available" in line and "short by" in line
    assert time.monotonic() - t0 < 120  # refused before building the 2-layer model (12 GB in fp32)
    assert not (tmp_path / "run" / "results.parquet").exists()


def test_runtime_refuses_a_single_infeasible_policy_before_building(tmp_path):
    out = run("-m", "runtime", "model=mixtral-8x7b", "policy=lru", "hardware.memory_gb=4", "device=cpu",
              f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 2 and "short by 0.73 GB" in one_line(out.stderr)
    assert not (tmp_path / "run" / "results.parquet").exists()


# ------------------------------------------------------------------ numeric settings, range-checked where read
@pytest.mark.parametrize("args, needle", [
    (["python", "-m", "sim", *TINY, "policy=lru", "cache.max_context_tokens=0"], "cache.max_context_tokens must be >= 1"),
    (["python", "-m", "runtime", "model=tiny", "policy=lru", "device=cpu", "warmup_steps=-2"], "warmup_steps=-2"),
    (["python", "-m", "sim.sweep", "search", *TINY, "experiment.search.trials=0"], "trials must be >= 1"),
])
def test_numeric_settings_are_range_checked(tmp_path, args, needle):
    out = run(*args[1:], cwd=tmp_path)
    assert out.returncode == 2 and needle in one_line(out.stderr)


def test_moe_layers_range_that_runs_backwards():
    from traces.errors import TraceError
    from traces.importers import parse_layers

    assert parse_layers("1,3,5-7") == (1, 3, 5, 6, 7)
    with pytest.raises(TraceError, match="runs backwards"):
        parse_layers("5-2")


def test_the_run_seed_changes_the_synthetic_trace_unless_trace_seed_is_set():
    from hydra import compose, initialize_config_dir

    from sim.config import register_configs
    from sim.presets import conf_dir
    from sim.run import base_keys, prepare

    register_configs()

    def trace_of(*ovr):
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name="sim", overrides=[*TINY, "policy=lru", *ovr])
        return prepare(cfg).trace.expert_ids, base_keys(cfg)["trace"]

    (a, ka), (b, kb), (c, kc) = trace_of(), trace_of("seed=1"), trace_of("seed=1", "trace.seed=0")
    assert ka == "synth:tiny:0" and kb == "synth:tiny:1" and kc == ka
    assert not (a == b).all() and (a == c).all()


def test_committed_benchmark_results_join_after_the_dtype_rekey():
    """Every committed row's config_id is the hash of its keys, dtype included: rows of one config
    (measured and its prediction) share an id, rows of different configs never do."""
    from sim.run import config_id

    keys = ["model", "model_layers", "hardware", "memory_gb", "h2d_gbps", "host_memory", "link_pace_gbps", "trace",
            "cache_slots", "cache_per_layer", "seed", "policy", "eviction", "prefetch", "predictor", "dtype"]
    ints = ("model_layers", "cache_slots", "cache_per_layer", "seed")

    def plain(c, v):
        if pd.isna(v):
            return None
        return int(v) if c in ints else v.item() if hasattr(v, "item") else v

    for f in sorted((ROOT / "benchmarks" / "results").glob("gpu_runtime-*.parquet")):
        df = pd.read_parquet(f)
        assert (df.dtype == "bf16").all()
        for _, r in df.iterrows():
            assert config_id({c: plain(c, r[c]) for c in keys}) == r.config_id, (f.name, r.policy)
        joined = set(df[df.source == "sim"].config_id) & set(df[df.source == "measured"].config_id)
        assert len(joined) >= 4, f.name  # the measured configs and their predictions


def test_dtype_is_in_the_config_id_and_the_bytes_moved():
    from hydra import compose, initialize_config_dir

    from sim.config import register_configs
    from sim.presets import conf_dir
    from sim.run import simulate

    register_configs()

    def row(*ovr):
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return simulate(compose(config_name="sim", overrides=[*TINY, "policy=lru", "cache.slots=8",
                                                                   "hardware=h200", *ovr]))[0]

    bf16, auto, fp32 = row("dtype=bf16"), row(), row("dtype=fp32")
    assert bf16["config_id"] == auto["config_id"] != fp32["config_id"]
    assert fp32["dtype"] == "fp32" and fp32["hit_rate"] == bf16["hit_rate"]
    assert fp32["gb_moved"] == pytest.approx(2 * bf16["gb_moved"], rel=0.01)  # twice the bytes per expert
