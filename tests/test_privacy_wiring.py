"""What the guarantee rests on, checked inside real runs: FedAvg weights as configured, and the canaries'
inclusion draws independent of every other random draw of the run."""

import math

import pytest
import torch

import dpfl_bench.federated as federated
from dpfl_bench.configure import build_config
from dpfl_bench.tasks import TASKS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("batching", ["off", "on"])
@pytest.mark.parametrize("level", [{"eps": math.inf}, {"eps": 8.0}], ids=["non-private", "sample-level"])
@pytest.mark.parametrize("weighting", ["uniform", "size"])
def test_a_run_averages_its_clients_with_the_configured_weights(recorded_rounds, tmp_path, weighting, level, batching):
    config = build_config({"task": "synthetic", "device": "cpu", "clients": 3, "participation": 1.0, "rounds": 2,
                           "local-steps": 1, "partition": "dirichlet", "dirichlet-alpha": 0.5, "weighting": weighting,
                           "client-batching": batching, "out": str(tmp_path), **level}, TASKS.get("synthetic").defaults)
    federated.run_federated(config)
    for started, released, _, results in recorded_rounds:
        sizes = [r.num_examples for r in results]
        assert len(set(sizes)) > 1, "clients of different sizes, or the weights could not differ"
        weights = [1.0] * len(results) if weighting == "uniform" else [float(n) for n in sizes]
        for name in results[0].upload:
            expected = started[name] + sum(w * (r.upload[name] - started[name]) for w, r in zip(weights, results)) / sum(weights)
            torch.testing.assert_close(released[name], expected, rtol=1e-5, atol=1e-7)
