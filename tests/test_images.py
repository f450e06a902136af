"""The image tasks' network: folding its frozen BatchNorms changes nothing but float rounding."""

import unittest.mock

import torch

from dpfl_bench.configure import build_config
from dpfl_bench.tasks import TASKS, images


def test_folding_the_frozen_batchnorms_keeps_the_networks_function():
    task = TASKS.get("mnist")
    sources = build_config({"task": "mnist"}, task.defaults).sources
    folded = task.build_model(10, sources).module
    with unittest.mock.patch.object(images, "fold_frozen_batchnorm", lambda network: None):
        plain = task.build_model(10, sources).module
    folded.network._fc.load_state_dict(plain.network._fc.state_dict())  # the new head is randomly initialized

    def norms(model):
        return sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())

    assert norms(plain) - norms(folded) == 1 + len(plain.network._blocks)  # the stem's and each depthwise one
    pixels = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    plain.eval(), folded.eval()
    with torch.no_grad():
        torch.testing.assert_close(folded(pixels), plain(pixels), rtol=1e-4, atol=1e-4)
