"""The project's error tree and how every CLI ends: one line on stderr, no traceback, exit 2 for a
refusal or usage error (traces.cli, README "Exit codes")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.errors import CaptureError, ExecutorError, MemoryCheckError, ModelLoadError, OffloadRuntimeError
from sim.errors import InfeasibleError, SimError, UnsupportedError
from sim.policies.errors import PolicyError, PolicyUnsupported
from traces.cli import error_line, run_cli
from traces.errors import MoeOffloadError, TraceError, UsageError

ROOT = Path(__file__).resolve().parent.parent


def test_one_base_with_a_branch_per_package():
    for branch in (UsageError, TraceError, SimError, PolicyError, OffloadRuntimeError):
        assert issubclass(branch, MoeOffloadError)
    assert issubclass(InfeasibleError, SimError) and issubclass(UnsupportedError, SimError)
    assert issubclass(PolicyUnsupported, PolicyError)
    for err in (ExecutorError, CaptureError, ModelLoadError, MemoryCheckError):
        assert issubclass(err, OffloadRuntimeError)
        assert not issubclass(err, TraceError)  # a model that cannot load is not a malformed trace
    assert not issubclass(PolicyError, SimError)  # policies' own branch
    assert not issubclass(AssertionError, MoeOffloadError)


def test_statuses_follow_the_error():
    assert MoeOffloadError("x").status == "failed"
    assert InfeasibleError("short by 1 GB", 10**9).status == "infeasible"
    assert UnsupportedError("x").status == PolicyUnsupported("x").status == "unsupported"
    assert InfeasibleError("short by 1 GB").reason == "short by 1 GB"


def test_policies_import_nothing_from_the_simulator_core():
    for path in (ROOT / "sim" / "policies").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not (name.startswith("sim") and not name.startswith("sim.policies")), f"{path.name}: {name}"


def test_a_bug_is_never_a_recoverable_error():
    """run_cli lets an AssertionError's traceback through; a project error becomes one line, exit 2."""
    def bug():
        raise AssertionError("invariant broken")

    with pytest.raises(AssertionError):
        run_cli(bug)

    def refused():
        raise SimError("cache.slots=3: must be >= top_k (8)\nsecond line")

    assert run_cli(refused) == 2


def test_error_line_folds_to_one_line():
    assert error_line(SimError("a\n  b")) == "a b"
    e = FileNotFoundError(2, "No such file or directory", "/x/y")
    assert error_line(e) == "/x/y: No such file or directory"


def cli(*args: str, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


def one_line_error(out: subprocess.CompletedProcess, *needles: str) -> None:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "HYDRA_FULL_ERROR" not in out.stderr, out.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("args,needles", [
    (["policy=nope"], ["Could not find 'policy/nope'", "known: baselines"]),
    (["cache.slotz=3"], ["Could not override 'cache.slotz'", "Key 'slotz' not in"]),
    (["cache.slots=abc"], ["cache.slots=abc", "could not be converted"]),
    (["x=["], ["bad override 'x=['"]),
    (["+experiment=nope"], ["experiment/nope", "known: cache-sweep"]),
    (["model=tiny", "policy=lru", "trace.path=missing.parquet"], ["missing.parquet"]),
    (["model=tiny", "policy=lru", "hardware.memory_gb=0.5"], ["short by", "GB"]),
])
def test_sim_usage_errors_are_one_line_exit_2(tmp_path, args, needles):
    one_line_error(cli("-m", "sim", *args, cwd=tmp_path), *needles)
    assert not list(tmp_path.rglob("results.parquet"))


def test_run_dir_that_cannot_be_created(tmp_path):
    (tmp_path / "afile").write_text("")
    one_line_error(cli("-m", "sim", f"hydra.run.dir={tmp_path / 'afile' / 'run'}", "model=tiny", cwd=tmp_path),
                   "afile")


def test_traces_cli_errors(tmp_path):
    one_line_error(cli("-m", "traces", "info", str(tmp_path / "nope.parquet"), cwd=tmp_path), "nope.parquet")
    out = cli("-m", "traces", "stats", cwd=tmp_path)  # argparse's usage error: its own usage + one error line
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_roofline_cli_errors(tmp_path):
    one_line_error(cli("-m", "sim.roofline", str(tmp_path / "nope"), cwd=tmp_path), "no such run folder")


@pytest.mark.parametrize("module", ["runtime", "runtime.capture"])
def test_runtime_clis_name_the_missing_model(tmp_path, module):
    out = cli("-m", module, f"model={tmp_path / 'no-such-checkpoint'}", cwd=tmp_path)
    one_line_error(out, "no-such-checkpoint")
