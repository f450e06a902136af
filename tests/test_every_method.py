"""Every method `dpfl-bench methods` lists runs a round under every privacy mechanism, and none changes
what privacy costs: the accountant is given the same noise and the same steps whatever the method."""

import math

import pytest

from dpfl_bench.configure import build_config
from dpfl_bench.federated import run_federated
from dpfl_bench.method import load_methods
from dpfl_bench.tasks import TASKS

SYNTHETIC = TASKS.get("synthetic").defaults
LEVELS = {
    "none": {"eps": math.inf},
    "sample": {"eps": 8.0},
    "client": {"eps": 8.0, "dp-level": "client", "clients": 6, "participation": 0.5},
    "authors": {"dp-level": "authors"},
}
PRIVACY_COLUMNS = ("dp_level", "eps_target", "delta", "noise_multiplier", "noise_multiplier_min", "clip", "eps_spent", "guarantee")
# The authors' regime has no accountant (ε is NaN); the noise multiplier it records for comparison depends on
# how many tensors a step trains, so it differs from method to method by design.
UNACCOUNTED_COLUMNS = ("dp_level", "delta", "clip", "eps_spent", "guarantee")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("level", LEVELS)
def test_every_method_runs_under_every_mechanism_at_the_same_privacy_cost(tmp_path, level):
    privacy = {}
    for method in load_methods().names():
        config = build_config({"task": "synthetic", "device": "cpu", "method": method, "rounds": 2, "local-steps": 2,
                               "out": str(tmp_path), **LEVELS[level]}, SYNTHETIC)
        rows = run_federated(config).rows
        assert [row["round"] for row in rows][-1] == 2 and math.isfinite(rows[-1]["test_accuracy"])
        columns = UNACCOUNTED_COLUMNS if level == "authors" else PRIVACY_COLUMNS
        privacy[method] = [tuple(repr(row[c]) for c in columns) for row in rows]  # repr: NaN equals NaN
    assert len(privacy) >= 6
    assert len(set(map(tuple, privacy.values()))) == 1, privacy  # the same costs, round by round
