"""One local step changes exactly the trainable parameters (LoRA A, B, the head) and nothing else."""

import math

import pytest
import torch

from dpfl_bench.client import RunContext, train_client
from dpfl_bench.configure import build_config
from dpfl_bench.federated import prepare
from dpfl_bench.method import Factor, create_method
from dpfl_bench.tasks import TASKS


def make_setup(**options):
    """The workspace exactly as federated.run_federated builds it, on the synthetic task."""
    task = TASKS.get("synthetic")
    config = build_config(
        {"task": "synthetic", "method": "dp-lora", "eps": math.inf, "local-steps": 1, "device": "cpu", **options},
        task.defaults,
    )
    exp = prepare(config)
    return exp.workspace, config, exp, exp.clients


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the whole model, copied."""
    return {n: v.detach().clone() for n, v in model.state_dict().items()}


def step_once(ws, config, exp, clients, global_state):
    before = snapshot(ws.model)
    run = RunContext(config, create_method(config.method), exp.run.mechanism, exp.run.randomness)
    result = train_client(ws, global_state, clients[0], run, client=0, round=0)
    return before, snapshot(ws.model), result


def trainable_names(ws) -> dict[Factor, set[str]]:
    return {f: set(p) for f, p in ws.params.by_factor.items()}


def check_frozen_untouched(ws, before, after):
    trainable = set(ws.params.all())
    assert set(before) == set(after)
    frozen = [n for n in before if n not in trainable]
    assert len(frozen) > 20, "the base model's weights, biases, embeddings, LayerNorms and buffers are all here"
    assert any(".lora_" not in n and "attention.self.query.base_layer.weight" in n for n in frozen)
    for name in frozen:
        assert torch.equal(before[name], after[name]), f"frozen {name} changed"
    for name, param in ws.model.named_parameters():
        if name not in trainable:
            assert not param.requires_grad, f"frozen {name} requires grad"


def test_trainable_set_is_lora_factors_and_head():
    ws, *_ = make_setup()
    names = trainable_names(ws)
    assert names[Factor.A] and all(".lora_A." in n for n in names[Factor.A])
    assert names[Factor.B] and all(".lora_B." in n for n in names[Factor.B])
    assert names[Factor.HEAD] == {"head.weight", "head.bias"}
    # LoRA goes on every targeted linear layer: query, key, value and the dense layers, in both layers
    assert len(names[Factor.A]) == len(names[Factor.B])
    assert any("attention.self.value" in n for n in names[Factor.A])
    assert any("intermediate.dense" in n for n in names[Factor.A])
    # B starts at zero, A does not
    assert all(torch.count_nonzero(p) == 0 for p in ws.params.by_factor[Factor.B].values())
    assert all(torch.count_nonzero(p) > 0 for p in ws.params.by_factor[Factor.A].values())


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_step_from_zero_b_changes_b_and_head_only(optimizer):
    ws, config, exp, clients = make_setup(optimizer=optimizer)
    assert exp.run.mechanism.name == "none"
    global_state = ws.params.state()
    before, after, result = step_once(ws, config, exp, clients, global_state)

    check_frozen_untouched(ws, before, after)
    for name in ws.params.by_factor[Factor.B]:
        assert not torch.equal(before[name], after[name]), f"B {name} did not change"
    for name in ws.params.by_factor[Factor.HEAD]:
        assert not torch.equal(before[name], after[name]), f"head {name} did not change"
    # with B = 0, dL/dA = (alpha/r) B^T (dL/dy) x^T is exactly zero, so A cannot move at the first step
    # (SGD: zero step; AdamW without weight decay: m = 0 gives a zero step)
    for name in ws.params.by_factor[Factor.A]:
        assert torch.equal(before[name], after[name]), f"A {name} changed although its gradient is zero"

    # the upload is exactly the trained A, B and head
    assert set(result.upload) == set(ws.params.all())
    for name, value in result.upload.items():
        assert torch.equal(value, after[name])
    assert result.num_examples == len(clients[0])
    assert math.isfinite(result.train_loss) and result.train_loss > 0


def test_step_from_nonzero_b_changes_a_b_and_head_only():
    ws, config, exp, clients = make_setup(optimizer="sgd")
    gen = torch.Generator().manual_seed(7)
    global_state = {
        n: (torch.randn(v.shape, generator=gen) * 0.1 if n in ws.params.by_factor[Factor.B] else v)
        for n, v in ws.params.state().items()
    }
    before_load = snapshot(ws.model)
    _, after, _ = step_once(ws, config, exp, clients, global_state)

    check_frozen_untouched(ws, before_load, after)
    for name in ws.params.all():
        assert not torch.equal(global_state[name], after[name]), f"trainable {name} did not change"


def test_sample_level_dp_step_changes_only_trainable_parameters():
    # DP-SGD path: per-example gradients through hooks, clipping and noise; the frozen model stays untouched
    ws, config, exp, clients = make_setup(eps=8.0, delta=1e-3, optimizer="sgd")
    assert exp.run.mechanism.name == "sample" and exp.run.mechanism.noise_multiplier > 0
    global_state = ws.params.state()
    before, after, _ = step_once(ws, config, exp, clients, global_state)

    check_frozen_untouched(ws, before, after)
    # noise reaches every trainable tensor, A included (its clipped gradient is zero, its noise is not)
    for name in ws.params.all():
        assert not torch.equal(before[name], after[name]), f"trainable {name} did not change"
    ws.per_example.remove()


def test_local_step_is_a_pure_function_of_its_inputs():
    ws, config, exp, clients = make_setup(optimizer="adamw")
    global_state = ws.params.state()
    _, first, r1 = step_once(ws, config, exp, clients, global_state)
    _, second, r2 = step_once(ws, config, exp, clients, global_state)  # reloads global_state first
    for name in r1.upload:
        assert torch.equal(r1.upload[name], r2.upload[name])
    assert r1.train_loss == r2.train_loss


def test_sample_level_step_survives_an_empty_poisson_batch():
    ws, config, exp, clients = make_setup(eps=8.0, delta=1e-3, optimizer="sgd")
    exp.run.mechanism.sample_rates = [0.0] * len(clients)  # every batch is empty
    global_state = ws.params.state()
    try:
        before, after, result = step_once(ws, config, exp, clients, global_state)
    finally:
        ws.per_example.remove()
    check_frozen_untouched(ws, before, after)
    # the step is pure noise: still a valid DP-SGD step that moves the trainable parameters
    for name in ws.params.all():
        assert not torch.equal(before[name], after[name])
    assert result.train_loss == 0.0


def test_batchnorm_stays_in_eval_mode_during_a_local_step():
    """BatchNorm would mix a batch's examples (and update its running statistics from private data): during
    a client's local steps every BatchNorm layer of the default task's EfficientNet must be in eval mode."""
    config = build_config({"task": "mnist", "method": "dp-lora", "eps": math.inf, "local-steps": 2, "batch-size": 4,
                           "physical-batch-size": 4, "device": "cpu"}, TASKS.get("mnist").defaults)
    exp = prepare(config)
    norms = [m for m in exp.workspace.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) > 10
    modes: list[bool] = []
    hooks = [m.register_forward_pre_hook(lambda module, inputs: modes.append(module.training)) for m in norms]
    statistics = {n: b.clone() for n, b in exp.workspace.model.named_buffers() if "running" in n}
    try:
        train_client(exp.workspace, exp.workspace.params.state(), exp.clients[0], exp.run, client=0, round=0)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(modes) == 2 * len(norms) and not any(modes)
    assert exp.workspace.model.training  # the rest of the model trains (dropout on)
    for name, value in exp.workspace.model.named_buffers():
        if name in statistics:
            assert torch.equal(value, statistics[name]), name
