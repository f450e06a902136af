"""The prepared device script runs every part at toy sizes on the CPU (`--smoke`) and reports every row."""

import json
import os
import subprocess
import sys
from pathlib import Path

from dpfl_bench.method import load_methods

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu" / "check.py"


def test_the_smoke_mode_runs_every_part_and_reports_every_row(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rounds = report["every_method_round"]
    levels = ("none", "sample", "client", "authors")
    assert {(r["method"], r["level"]) for r in rounds} == {(m, level) for m in load_methods().names() for level in levels}
    assert all(r["finite"] for r in rounds)
    assert [r["exact_to_float_tolerance"] for r in report["engine_against_autograd"]] == [True, True]
    assert report["noise_on_both"]["same_noise"]
    assert len(report["step_cost"]) == 3 * 3 * 2 * 2  # models × trained factors × DP or not × precision
    assert all(r["seconds"] > 0 for r in report["step_cost"])
