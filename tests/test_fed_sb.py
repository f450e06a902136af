"""Fed-SB through the middle factor: A and B start from the frozen weight's SVD and never change, only R
(and the head) trains, the aggregate of R is the exact aggregate of the clients' products, a client uploads
r² numbers per adapted layer, R's per-example gradients are autograd's, and it runs under every privacy
mechanism and with clients trained together."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpfl_bench.federated as federated
from dpfl_bench.adapters import add_lora
from dpfl_bench.client import train_client
from dpfl_bench.config import AdapterConfig, SourcesConfig
from dpfl_bench.configure import build_config
from dpfl_bench.errors import UserError
from dpfl_bench.method import Factor, create_method
from dpfl_bench.privacy.per_example import PerExampleGradients
from dpfl_bench.tasks import TASKS

SYNTHETIC = TASKS.get("synthetic")
RANK = 3

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyCNN(nn.Module):
    """1x1 convolutions and a linear head, called like a task model."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 6, 1), nn.ReLU())
        self.head = nn.Linear(6, 3)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(pixel_values).mean(dim=(2, 3)))


def synthetic_model() -> tuple[nn.Module, dict, torch.Tensor]:
    torch.manual_seed(0)
    built = SYNTHETIC.build_model(2, SourcesConfig())
    data = SYNTHETIC.load(SourcesConfig()).train
    features, labels = data.batch(torch.arange(5))
    return built, features, labels


def cnn_model() -> tuple[nn.Module, dict, torch.Tensor]:
    torch.manual_seed(0)
    features = {"pixel_values": torch.randn(5, 3, 4, 4)}
    return TinyCNN(), features, torch.tensor([0, 1, 2, 0, 1])


def adapted(kind: str):
    """(model, trainable params, features, labels) with Fed-SB's adapters on a linear or a convolutional model."""
    if kind == "linear":
        built, features, labels = synthetic_model()
        model, targets, heads = built.module, built.lora_targets, built.heads
    else:
        model, features, labels = cnn_model()
        targets, heads = ("body.0", "body.2"), ("head",)
    model.eval()
    with torch.no_grad():
        pretrained = model(**features)
    params = add_lora(model, targets, heads, AdapterConfig(rank=RANK, lora_alpha=2.0 * RANK), create_method("fed-sb"))
    return model, params, features, labels, pretrained


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_the_factors_start_from_the_weights_svd_and_the_model_from_the_pretrained_one(kind):
    model, params, features, _, pretrained = adapted(kind)
    layers = params.by_factor[Factor.A]
    assert layers and len(params.by_factor[Factor.R]) == len(layers) == len(params.by_factor[Factor.B])
    for a_name, a in layers.items():
        prefix = a_name.split(".lora_A.")[0]
        weight = model.get_parameter(prefix + ".base_layer.weight").detach().flatten(1).double()
        b = params.by_factor[Factor.B][a_name.replace(".lora_A.", ".lora_B.")].detach().flatten(1).double()
        r = params.by_factor[Factor.R][a_name.replace(".lora_A.", ".lora_R.")]
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        best = u[:, :RANK] @ torch.diag(s[:RANK]) @ vh[:RANK]  # the best rank-r approximation of W
        torch.testing.assert_close(b @ a.detach().flatten(1).double(), best, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.T @ b, torch.eye(RANK, dtype=torch.double), rtol=1e-5, atol=1e-5)
        assert r.shape[:2] == (RANK, RANK) and not torch.any(r)
    with torch.no_grad():
        torch.testing.assert_close(model(**features), pretrained)  # R = 0: W + B·0·A = W


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_per_example_gradients_of_r_are_autograds_and_the_frozen_factors_get_none(kind):
    model, params, features, labels, _ = adapted(kind)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # R nonzero, so that R's gradient depends on R's own value too
        for p in params.by_factor[Factor.R].values():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    params.set_trainable(frozenset({Factor.R}))
    trained = params.of(frozenset({Factor.R}))
    engine = PerExampleGradients(model, params.all())
    losses = F.cross_entropy(model(**features), labels, reduction="none")
    mine = engine.compute(losses)
    assert set(mine) == set(trained)  # nothing formed for A, B or the frozen head
    for i in range(len(labels)):
        loss = F.cross_entropy(model(**{k: v[i : i + 1] for k, v in features.items()}), labels[i : i + 1])
        engine.reset()
        for name, g in zip(trained, torch.autograd.grad(loss, list(trained.values()))):
            torch.testing.assert_close(mine[name][i], g, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in params.all().values())


def test_a_client_round_changes_r_and_the_head_and_nothing_else():
    config = build_config({"task": "synthetic", "device": "cpu", "method": "fed-sb", "eps": 8.0}, SYNTHETIC.defaults)
    exp = federated.prepare(config)
    start = exp.workspace.params.state()
    result = train_client(exp.workspace, start, exp.clients[0], exp.run, client=0, round=0)
    after = exp.workspace.params.state()
    changes = {n for n in start if not torch.equal(after[n], start[n])}
    assert changes == set(exp.workspace.params.of(frozenset({Factor.R, Factor.HEAD})))
    assert set(result.upload) == changes


LEVELS = {
    "none": {"eps": math.inf},
    "sample": {"eps": 8.0},
    "client": {"eps": 8.0, "dp-level": "client", "clients": 6, "participation": 0.5},
    "authors": {"dp-level": "authors"},
}


def of(state: dict, kind: str) -> dict:
    return {n: t for n, t in state.items() if f".lora_{kind}." in n}


@pytest.mark.parametrize("batching", ["off", "on"])
@pytest.mark.parametrize("level", LEVELS)
def test_a_fed_sb_run_averages_r_exactly_and_never_moves_a_or_b(recorded_rounds, tmp_path, level, batching):
    config = build_config({"task": "synthetic", "device": "cpu", "method": "fed-sb", "rounds": 2, "local-steps": 2,
                           "rank": RANK, "client-batching": batching, "out": str(tmp_path), **LEVELS[level]},
                          SYNTHETIC.defaults)
    federated.run_federated(config)
    first = recorded_rounds[0][0]
    for started, released, broadcast, results in recorded_rounds:
        for name in [*of(first, "A"), *of(first, "B")]:
            assert torch.equal(released[name], first[name]) and torch.equal(broadcast[name], first[name])
        for result in results:  # R (and the head) alone, r² numbers per layer
            assert set(result.upload) == {*of(first, "R"), *(n for n in first if n.startswith("head") or ".lora_" not in n)}
            assert all(t.shape[:2] == (RANK, RANK) for t in of(result.upload, "R").values())
        if level != "client":  # no noise at the server: FedAvg of R, and of the products, exactly
            for r_name in of(first, "R"):
                clients_r = torch.stack([res.upload[r_name] for res in results]).double()
                torch.testing.assert_close(released[r_name].double(), clients_r.mean(0), rtol=1e-6, atol=1e-7)
                a = first[r_name.replace(".lora_R.", ".lora_A.")].flatten(1).double()
                b = first[r_name.replace(".lora_R.", ".lora_B.")].flatten(1).double()
                products = torch.stack([b @ r.flatten(1) @ a for r in clients_r])
                torch.testing.assert_close(b @ released[r_name].flatten(1).double() @ a, products.mean(0), rtol=1e-6, atol=1e-7)
    assert any(torch.any(t) for t in of(recorded_rounds[-1][1], "R").values())  # R did learn


def test_a_client_uploads_r_squared_numbers_per_adapted_layer(tmp_path):
    options = {"task": "synthetic", "device": "cpu", "rounds": 1, "rank": RANK, "eps": math.inf, "out": str(tmp_path)}
    sizes = {}
    for method in ("fed-sb", "dp-lora"):
        config = build_config({**options, "method": method}, SYNTHETIC.defaults)
        sizes[method] = federated.run_federated(config).rows[-1]["bytes_uploaded_per_round"]
    exp = federated.prepare(build_config({**options, "method": "fed-sb"}, SYNTHETIC.defaults))
    params = exp.workspace.params
    layers = len(params.by_factor[Factor.R])
    head = sum(p.numel() for p in params.by_factor[Factor.HEAD].values())
    adapters = sum(p.numel() for f in (Factor.A, Factor.B) for p in params.by_factor[f].values())
    per_client = SYNTHETIC.defaults["clients"] * SYNTHETIC.defaults.get("participation", 1.0)
    assert sizes["fed-sb"] == per_client * 4 * (layers * RANK**2 + head)
    assert sizes["dp-lora"] == per_client * 4 * (adapters + head)


def test_a_rank_above_a_layers_size_is_one_line():
    config = build_config({"task": "synthetic", "device": "cpu", "method": "fed-sb", "rank": 10_000}, SYNTHETIC.defaults)
    with pytest.raises(UserError, match=r"fed-sb needs --rank at most \d+"):
        federated.prepare(config)
