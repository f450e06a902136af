"""DP-SGD as the clients run it (per-example gradients, per-example clipping, noise), and client-level DP.

Everything that trains uses the `synthetic` task (tiny random-init BERT) or a tiny 1x1-conv CNN built here.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpfl_bench.client as client_module
import dpfl_bench.federated as federated
import dpfl_bench.server as server
from dpfl_bench.adapters import TrainableParams, add_lora
from dpfl_bench.client import RunContext, Workspace, train_client
from dpfl_bench.config import AdapterConfig, SourcesConfig
from dpfl_bench.configure import build_config
from dpfl_bench.federated import run_federated
from dpfl_bench.method import BOTH, Factor, Method, create_method
from dpfl_bench.privacy.mechanism import Mechanism, create_mechanism
from dpfl_bench.privacy.per_example import PerExampleGradients
from dpfl_bench.privacy.randomness import Purpose, Randomness
from dpfl_bench.tasks import TASKS

SYNTHETIC = TASKS.get("synthetic")
ALL = frozenset(Factor)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # These models are tiny: one intra-op thread is faster, and with two OpenMP threads on a busy 2-core
    # machine each small matmul took ~100x longer (spin-waiting), which made this file take minutes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synthetic_data():
    return SYNTHETIC.load(SourcesConfig())


def synthetic_model(rank: int = 4, seed: int = 0) -> tuple[nn.Module, TrainableParams]:
    torch.manual_seed(seed)
    built = SYNTHETIC.build_model(2, SourcesConfig())
    model = built.module
    params = add_lora(model, built.lora_targets, built.heads, AdapterConfig(rank=rank, lora_alpha=2.0 * rank))
    return model, params


def randomize_b(params: TrainableParams, seed: int = 1, scale: float = 0.1) -> None:
    """B starts at zero, which makes every A gradient zero; give it values so that A's gradients are real."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.by_factor[Factor.B].values():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)


class TinyCNN(nn.Module):
    """1x1 convolutions and a linear head, called like a task model: model(**features) -> logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(pixel_values).mean(dim=(2, 3)))


def cnn_model(seed: int = 0) -> tuple[nn.Module, TrainableParams]:
    torch.manual_seed(seed)
    model = TinyCNN()
    params = add_lora(model, ("body.0", "body.2"), ("head",), AdapterConfig(rank=2, lora_alpha=4.0))
    return model, params


def brute_force_per_example(model, params: dict[str, nn.Parameter], features, labels) -> dict[str, torch.Tensor]:
    """One example at a time, ordinary backward."""
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for i in range(len(labels)):
        one = {k: v[i : i + 1] for k, v in features.items()}
        loss = F.cross_entropy(model(**one), labels[i : i + 1])
        for name, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            rows[name].append(g)
    return {n: torch.stack(r) for n, r in rows.items()}


def clip_and_sum(grads: dict[str, torch.Tensor], clip: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Reference: clip each example's whole materialized gradient to `clip`, then sum over examples."""
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(dim=1) for g in grads.values()))
    scale = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("b,b...->...", scale, g) for n, g in grads.items()}, norms


def test_a_layer_called_twice_per_forward_is_refused():
    """Per-call norms would understate the example's norm (and break the clip), so this must not pass."""
    layer = nn.Linear(3, 2)
    per_example = PerExampleGradients(layer, dict(layer.named_parameters()))
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="called once"):
        per_example.clipped_sum(layer(layer(x)[:, :1].expand(-1, 3)).sum(dim=1), 1.0)


def test_the_engine_lets_each_layers_activations_go_once_it_has_used_them(monkeypatch):
    """What it keeps per example: while layer k's gradient is formed, the recorded outputs of the layers
    done before it are already freed (memory stays one layer's activations, not the whole network's)."""
    import weakref

    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    engine = PerExampleGradients(model, dict(model.named_parameters()))
    losses = F.cross_entropy(model(torch.randn(5, 8)), torch.tensor([0, 1, 2, 0, 1]), reduction="none")
    outputs = [weakref.ref(record[4]) for record in engine._records]
    alive_at_each_layer = []
    einsum = torch.einsum

    def counting_einsum(*args):
        alive_at_each_layer.append(sum(ref() is not None for ref in outputs))
        return einsum(*args)

    monkeypatch.setattr(torch, "einsum", counting_einsum)
    engine.compute(losses)
    assert alive_at_each_layer == [2, 1, 0]  # three layers: the others' outputs still to be used, and no more


def dp_config(**options):
    base = {
        "task": "synthetic",
        "method": "dp-lora",
        "device": "cpu",
        "optimizer": "sgd",
        "lr": 1.0,
        "local-steps": 1,
        "batch-size": 16,
        "physical-batch-size": 64,
    }
    return build_config({**base, **options}, SYNTHETIC.defaults)


def sample_dp(config, data, sigma: float) -> Mechanism:
    """Sample-level DP-SGD for one client holding `data`, at a chosen σ (no calibration: fast)."""
    mechanism = create_mechanism(config, [len(data)])
    mechanism.noise_multipliers = [sigma]
    return mechanism


def train(ws, global_state, data, *, round=0, method, config, mechanism, seed=0):
    return train_client(ws, global_state, data, RunContext(config, method, mechanism, Randomness(seed)), client=0, round=round)


# ---------------------------------------------------------------------------------------------- per-example


def test_per_example_gradients_match_brute_force_on_synthetic_lora(synthetic_data):
    model, params = synthetic_model()
    randomize_b(params)
    params.set_trainable(ALL)
    model.train()
    trainable = params.all()
    features, labels = synthetic_data.train.batch(torch.arange(8))

    per_example = PerExampleGradients(model, trainable)
    losses = F.cross_entropy(model(**features), labels, reduction="none")
    ours = per_example.compute(losses)
    per_example.remove()  # the brute-force forwards below must not be recorded

    expected = brute_force_per_example(model, trainable, features, labels)
    assert set(ours) == set(trainable)
    assert any(".lora_A." in n for n in ours) and any(".lora_B." in n for n in ours)
    assert "head.weight" in ours and "head.bias" in ours
    for name, g in expected.items():
        assert ours[name].shape == (8, *trainable[name].shape)
        torch.testing.assert_close(ours[name], g, atol=1e-5, rtol=1e-4, msg=name)
        assert g.abs().max() > 0, f"{name}: a vacuous comparison"


@pytest.mark.parametrize("build", ["synthetic", "cnn"])
def test_fused_clipped_sum_equals_clipping_the_brute_force_per_example_gradients(build, synthetic_data):
    """The training path (`clipped_sum`, never holding every per-example gradient) gives the same sums and
    norms as clipping brute-force per-example gradients one example at a time."""
    if build == "synthetic":
        model, params = synthetic_model()
        features, labels = synthetic_data.train.batch(torch.arange(12))
    else:
        model, params = cnn_model()
        features, labels = {"pixel_values": torch.randn(12, 3, 5, 5)}, torch.randint(0, 3, (12,))
    randomize_b(params, scale=0.5)
    params.set_trainable(ALL)
    trainable = params.all()
    expected = brute_force_per_example(model, trainable, features, labels)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(dim=1) for g in expected.values()))
    clip = float(norms.median())  # about half the examples get clipped
    expected_sums, _ = clip_and_sum(expected, clip)

    per_example = PerExampleGradients(model, trainable)
    sums, our_norms = per_example.clipped_sum(F.cross_entropy(model(**features), labels, reduction="none"), clip)
    per_example.remove()
    torch.testing.assert_close(our_norms, norms, atol=1e-5, rtol=1e-4)
    assert set(sums) == set(trainable)
    for name, value in expected_sums.items():
        torch.testing.assert_close(sums[name], value, atol=1e-5, rtol=1e-4, msg=name)


def test_per_example_gradients_match_brute_force_on_1x1_conv_lora():
    model, params = cnn_model()
    randomize_b(params, scale=0.5)
    params.set_trainable(ALL)
    trainable = params.all()
    generator = torch.Generator().manual_seed(3)
    features = {"pixel_values": torch.randn(6, 3, 5, 4, generator=generator)}
    labels = torch.tensor([0, 1, 2, 0, 1, 2])

    per_example = PerExampleGradients(model, trainable)
    losses = F.cross_entropy(model(**features), labels, reduction="none")
    ours = per_example.compute(losses)
    per_example.remove()

    expected = brute_force_per_example(model, trainable, features, labels)
    assert set(ours) == set(trainable) and len(trainable) == 6
    for name, g in expected.items():
        torch.testing.assert_close(ours[name], g, atol=1e-5, rtol=1e-4, msg=name)
        assert g.abs().max() > 0, name


def test_the_per_example_check_accepts_the_pretrained_efficientnet_of_the_default_task():
    """prepare() refuses models whose per-example gradients mix examples; the real EfficientNet-Lite0 must
    pass (rounding between batch sizes 3 and 1 moved one nearly cancelling layer by 1% of itself)."""
    from dpfl_bench.federated import prepare

    config = build_config({"task": "fashion", "eps": 1.0, "clients": 2, "rounds": 1, "local-steps": 1})
    experiment = prepare(config)  # raises UserError if the check fails
    assert experiment.run.mechanism.name == "sample"


class PerTokenHead(nn.Module):
    """The head (with bias) runs on every token before pooling: the bias gradient sums over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(input_ids)))).mean(dim=1)


def test_per_example_gradients_with_multi_token_head_bias():
    torch.manual_seed(0)
    model = PerTokenHead()
    params = add_lora(model, ("mix",), ("head",), AdapterConfig(rank=2, lora_alpha=4.0))
    randomize_b(params, scale=0.5)
    params.set_trainable(ALL)
    features = {"input_ids": torch.randint(0, 20, (5, 7), generator=torch.Generator().manual_seed(1))}
    labels = torch.tensor([0, 1, 1, 0, 1])
    per_example = PerExampleGradients(model, params.all())
    ours = per_example.compute(F.cross_entropy(model(**features), labels, reduction="none"))
    per_example.remove()
    expected = brute_force_per_example(model, params.all(), features, labels)
    assert set(ours) == set(expected) == {"mix.lora_A.default.weight", "mix.lora_B.default.weight", "head.weight", "head.bias"}
    for name, g in expected.items():
        torch.testing.assert_close(ours[name], g, atol=1e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------------- clipping


def test_clipping_through_the_model_bounds_an_outlier_example():
    """An example whose input is scaled up 1e4 has a huge gradient; after clipping it adds at most C."""
    model, params = cnn_model()
    randomize_b(params, scale=0.5)
    params.set_trainable(ALL)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, 4, 4, generator=generator)
    x[2] *= 1e4
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    per_example = PerExampleGradients(model, params.all())

    def losses(index):
        return F.cross_entropy(model(pixel_values=x[index]), labels[index], reduction="none")

    everyone, others = list(range(6)), [i for i in range(6) if i != 2]
    grads = per_example.compute(losses(everyone))
    raw_norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    clip = 2 * float(raw_norms[others].max())  # the normal examples stay below C; the outlier is far above
    assert raw_norms[2] > 100 * clip

    summed, norms = per_example.clipped_sum(losses(everyone), clip)  # the training path
    rest, _ = per_example.clipped_sum(losses(others), clip)
    per_example.remove()
    torch.testing.assert_close(norms, raw_norms, rtol=1e-4, atol=0)
    outlier = torch.sqrt(sum((summed[n] - rest[n]).pow(2).sum() for n in grads))
    assert outlier <= clip * (1 + 1e-4)
    assert outlier == pytest.approx(clip, rel=1e-3)  # scaled down to C, not dropped
    for n, g in grads.items():  # the other examples are not scaled down on the outlier's account
        torch.testing.assert_close(rest[n], g[others].sum(0), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- noise


def test_noise_std_is_sigma_c_over_expected_batch(synthetic_data):
    """With B = 0 every per-example gradient of A is exactly 0 (dL/dA = B^T ...), so after one SGD step
    with lr 1 the change of A is exactly -noise / expected_batch_size: a direct sample of the noise the
    client adds, through the real `train_client`. Its std must be σ·C / min(batch, n) — the *expected*
    Poisson batch, not the realised one (which varies by ±25% here) — over ~3,800 A entries per round."""
    sigma, clip, batch = 3.0, 0.7, 16
    data = synthetic_data.train.subset(torch.arange(200))
    model, params = synthetic_model(rank=8)
    ws = Workspace(model, params, torch.device("cpu"), PerExampleGradients(model, params.all()), 64)
    config = dp_config(**{"batch-size": batch, "clip": clip})
    mechanism = sample_dp(config, data, sigma)
    method = create_method("dp-lora")
    global_state = params.state()
    a_names = list(params.by_factor[Factor.A])
    expected_std = sigma * clip / batch

    stds, realised = [], []
    for round in range(6):
        result = train(ws, global_state, data, round=round, method=method, config=config, mechanism=mechanism)
        change = torch.cat([(result.upload[n] - global_state[n]).flatten() for n in a_names]).double()
        assert change.numel() > 3000
        assert abs(float(change.mean())) < 4 * expected_std / math.sqrt(change.numel())
        stds.append(float(change.std()))
        realised.append(len(mechanism.draw_batches(0, 1, Randomness(0).stream(Purpose.BATCHES, round, 0))[0]))  # its draw
    for s in stds:
        assert s == pytest.approx(expected_std, rel=0.05)
    assert sum(stds) / len(stds) == pytest.approx(expected_std, rel=0.02)
    assert len(set(stds)) == len(stds)  # fresh noise every round
    assert max(realised) != min(realised)  # the batches really did vary in size

    # Same (seed, round, client): the same noise, bit for bit.
    again = train(ws, global_state, data, method=method, config=config, mechanism=mechanism)
    first = train(ws, global_state, data, method=method, config=config, mechanism=mechanism)
    for n in again.upload:
        assert torch.equal(again.upload[n], first.upload[n])


class TrainsBOnly(Method):
    name = "test-b-only"
    summary = "trains only B (test helper)"
    citation = "-"

    def trains(self, round, step):
        return frozenset({Factor.B})

    def uploads(self, round):
        return BOTH


def test_frozen_factor_is_bit_identical_and_gets_no_noise(synthetic_data):
    data = synthetic_data.train.subset(torch.arange(100))
    model, params = synthetic_model()
    randomize_b(params)  # so A *would* get a nonzero gradient if it were trainable
    per_example = PerExampleGradients(model, params.all())
    ws = Workspace(model, params, torch.device("cpu"), per_example, 64)
    config = dp_config(**{"local-steps": 3, "lr": 0.5})
    global_state = params.state()

    result = train(ws, global_state, data, method=TrainsBOnly(), config=config, mechanism=sample_dp(config, data, 2.0))
    for name in params.by_factor[Factor.A]:
        assert torch.equal(result.upload[name], global_state[name]), name
    for factor in (Factor.B, Factor.HEAD):
        for name in params.by_factor[factor]:
            assert not torch.equal(result.upload[name], global_state[name]), name

    # The per-example machinery does not even compute gradients for the frozen factor.
    params.set_trainable(frozenset({Factor.B, Factor.HEAD}))
    features, labels = data.batch(torch.arange(4))
    grads = per_example.compute(F.cross_entropy(model(**features), labels, reduction="none"))
    assert set(grads) == set(params.of(frozenset({Factor.B, Factor.HEAD})))
    per_example.remove()


# ---------------------------------------------------------------------------------------------- whole runs


def run_options(tmp_path, **options):
    """One client after another: these runs record what `train_client` and its helpers see."""
    base = {"task": "synthetic", "method": "dp-lora", "device": "cpu", "out": str(tmp_path), "seed": 0, "client-batching": "off"}
    return build_config({**base, **options}, SYNTHETIC.defaults)


def test_sample_level_run_stays_within_budget(tmp_path):
    config = run_options(tmp_path, eps=1.0, rounds=4, clients=3, participation=2 / 3)
    summary = run_federated(config)
    spent = [row["eps_spent"] for row in summary.rows]
    assert [row["round"] for row in summary.rows] == [1, 2, 3, 4]
    assert all(row["dp_level"] == "sample" for row in summary.rows)
    assert all(e <= 1.0 for e in spent), spent
    assert spent == sorted(spent) and spent[0] > 0
    assert spent[-1] == pytest.approx(1.0, rel=0.02)  # σ was calibrated for exactly this schedule
    sigma = summary.rows[-1]["noise_multiplier"]
    assert 0 < sigma == summary.mechanism.noise_multiplier
    for row in summary.rows:
        assert row["eps_spent_mean"] <= row["eps_spent"]


def test_non_private_run_has_no_noise(tmp_path):
    summary = run_federated(run_options(tmp_path, eps=math.inf, rounds=1, **{"local-steps": 2}))
    (row,) = summary.rows
    assert row["noise_multiplier"] == 0 and row["dp_level"] == "none"
    assert row["eps_spent"] == math.inf


def test_client_level_run_clips_every_update_and_stays_within_budget(tmp_path, monkeypatch):
    clip = 0.05
    seen: list[tuple[float, float]] = []
    original = server.clip_update

    def recording_clip_update(update, c):
        clipped = original(update, c)
        norm = lambda s: math.sqrt(sum(float(t.float().pow(2).sum()) for t in s.values()))  # noqa: E731
        seen.append((norm(update), norm(clipped)))
        assert c == clip
        return clipped

    monkeypatch.setattr(server, "clip_update", recording_clip_update)
    config = run_options(
        tmp_path, eps=4.0, rounds=3, clients=6, participation=0.5, clip=clip, lr=0.05, **{"dp-level": "client"}
    )
    summary = run_federated(config)
    assert summary.mechanism.name == "client" and summary.mechanism.exposures([[0]] * 3)[0].sample_rate == 0.5
    schedule = summary.mechanism.participation(Randomness(config.seed).stream(Purpose.PARTICIPATION))  # the run's
    assert len(seen) == sum(len(chosen) for chosen in schedule) > 0  # every sampled client's update was clipped
    assert all(after <= clip * (1 + 1e-6) for _, after in seen), seen
    assert any(before > clip for before, _ in seen)  # the clip was active, not vacuous
    spent = [row["eps_spent"] for row in summary.rows]
    assert all(e <= 4.0 for e in spent) and spent == sorted(spent)
    assert all(row["dp_level"] == "client" for row in summary.rows)


# --- what a run does, observed through the code path it takes ------------------------------------------


@pytest.fixture(scope="module")
def recorded_sample_run(tmp_path_factory):
    """A sample-level dp-lora run with, for every local step, the batch it drew, the clipped sum, and the
    gradient each parameter received at the optimizer step (dp-lora post-processes nothing)."""
    steps: list[dict] = []
    real_sum, real_optimizer = client_module.summed_gradients, client_module.make_optimizer

    def recording_sum(ws, data, index, clip, seeds):
        summed, loss = real_sum(ws, data, index, clip, seeds)
        steps.append({"batch": len(index), "summed": {n: g.clone() for n, g in summed.items()}})
        return summed, loss

    def recording_optimizer(params, method, config, round):
        optimizer = real_optimizer(params, method, config, round)
        names = {id(p): n for n, p in params.all().items()}

        def before_step(opt, args, kwargs):
            steps[-1]["grads"] = {names[id(p)]: p.grad.clone() for g in opt.param_groups for p in g["params"] if p.grad is not None}

        optimizer.register_step_pre_hook(before_step)
        return optimizer

    config = run_options(tmp_path_factory.mktemp("recorded"), eps=1.0, rounds=3, **{"local-steps": 6, "batch-size": 16})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(client_module, "summed_gradients", recording_sum)
        mp.setattr(client_module, "make_optimizer", recording_optimizer)
        summary = run_federated(config)
    return summary, steps


def test_a_run_draws_poisson_batches_at_the_accounted_rate(recorded_sample_run):
    """Each local step's batch is Poisson(n·q) with q = batch/n: its realised sizes average the batch size."""
    summary, steps = recorded_sample_run
    batch = summary.mechanism.config.training.batch_size
    sizes = [s["batch"] for s in steps]
    assert len(sizes) == 3 * 3 * 6 and len(set(sizes)) > 3  # 3 clients x 3 rounds x 6 steps, sizes vary
    q = summary.mechanism.sample_rates[0]
    assert q == batch / 200
    standard_error = math.sqrt(batch * (1 - q) / len(sizes))
    assert abs(sum(sizes) / len(sizes) - batch) < 4 * standard_error, sizes


def test_every_trained_factor_and_the_head_get_noise_of_std_sigma_c_over_b_in_a_run(recorded_sample_run):
    """What the optimizer applies, times the expected batch, minus the clipped sum, is the noise: its std
    must be σ·C on every tensor that trains, the head included."""
    summary, steps = recorded_sample_run
    sigma, clip = summary.mechanism.noise_multiplier, summary.mechanism.clip
    batch = summary.mechanism.config.training.batch_size
    assert sigma > 0
    params = dict(federated.prepare(summary.mechanism.config).workspace.params.by_factor)
    assert {f for f, names in params.items() if names} == {Factor.A, Factor.B, Factor.HEAD}  # dp-lora has no R
    for factor in (Factor.A, Factor.B, Factor.HEAD):
        noise = torch.cat([(s["grads"][n] * batch - s["summed"][n]).flatten() for s in steps for n in params[factor]])
        assert float(noise.std()) == pytest.approx(sigma * clip, rel=0.1), factor
        assert abs(float(noise.mean())) < 5 * sigma * clip / math.sqrt(noise.numel()), factor


def test_a_client_level_run_adds_server_noise_and_divides_by_the_expected_number_of_clients(tmp_path, monkeypatch):
    """Inside a run: each round's new global state is global + (Σ clip(update) + N(0, σ²C²)) / (p·N), with
    the updates recorded from what the clients uploaded. The residual after taking out the clipped mean is
    the noise alone: its std is σC/(pN), and it has no component along the clipped sum (which a divisor
    of the realised number of clients would leave)."""
    uploads: dict[int, list] = {}
    transitions = []
    real_train, real_create = federated.train_client, federated.create_mechanism

    def recording_train(ws, global_state, data, run, *, client, round):
        result = real_train(ws, global_state, data, run, client=client, round=round)
        uploads.setdefault(round, []).append(result.upload)
        return result

    def recording_mechanism(*args):
        mechanism = real_create(*args)
        real_aggregate = mechanism.aggregate

        def aggregate(global_state, names, *rest):
            new = real_aggregate(global_state, names, *rest)
            transitions.append((dict(global_state), new, names))
            return new

        mechanism.aggregate = aggregate
        return mechanism

    monkeypatch.setattr(federated, "train_client", recording_train)
    monkeypatch.setattr(federated, "create_mechanism", recording_mechanism)
    clip, clients, participation = 0.5, 6, 0.5
    config = run_options(tmp_path, eps=1000.0, rounds=5, clients=clients, participation=participation, clip=clip, lr=0.05,
                         **{"dp-level": "client"})
    summary = run_federated(config)
    sigma, expected_clients = summary.mechanism.noise_multiplier, participation * clients
    assert 0 < sigma < 0.1
    realised = [len(uploads.get(r, [])) for r in range(5)]
    assert any(m not in (0, expected_clients) for m in realised), realised  # rounds where the two divisors differ

    def flat(state, names):
        return torch.cat([state[n].flatten().double() for n in names])

    for round, (before, after, names) in enumerate(transitions):
        clipped = [flat(server.clip_update({n: u[n] - before[n] for n in names}, clip), names) for u in uploads.get(round, [])]
        summed = sum(clipped, torch.zeros(sum(before[n].numel() for n in names), dtype=torch.float64))
        assert all(float(c.norm()) == pytest.approx(clip, rel=1e-4) for c in clipped)  # every update was clipped
        residual = flat(after, names) - flat(before, names) - summed / expected_clients
        noise_std = sigma * clip / expected_clients
        assert float(residual.std()) == pytest.approx(noise_std, rel=0.05), round
        if float(summed.norm()) > 0:
            along = float(residual @ summed) / float(summed.norm())
            assert abs(along) < 4 * noise_std, (round, realised[round], along)


def test_aggregate_client_level_noise_and_clip():
    """Without noise the new state is global + mean of the clipped deltas; with noise its std is σC/m."""
    global_state = {"x": torch.zeros(20000)}
    deltas = [{"x": torch.full((20000,), 10.0)}, {"x": torch.full((20000,), -0.0001)}]

    def private(deltas, clip, noise_multiplier):
        noise = {"x": Randomness(0).stream(Purpose.NOISE).normal((20000,), noise_multiplier * clip)}
        return server.noisy_sum_step(global_state, ["x"], deltas, noise, clip=clip, divisor=len(deltas))

    clean = private(deltas, clip=1.0, noise_multiplier=0.0)
    per_client = [server.clip_update({"x": d["x"]}, 1.0)["x"] for d in deltas]
    torch.testing.assert_close(clean["x"], (per_client[0] + per_client[1]) / 2)
    assert float(per_client[0].double().norm()) == pytest.approx(1.0, rel=1e-6)
    torch.testing.assert_close(per_client[1], deltas[1]["x"])  # small updates pass unscaled

    zero = [{"x": torch.zeros(20000)}] * 4
    noisy = private(zero, clip=0.5, noise_multiplier=2.0)
    assert float(noisy["x"].std()) == pytest.approx(2.0 * 0.5 / 4, rel=0.03)


# ---------------------------------------------------------------------------------------------- Opacus #820


def test_lora_params_survive_a_move_after_wrapping(synthetic_data):
    """Opacus issue 820: with peft, moving the model after wrapping could leave the DP engine updating
    tensors the forward no longer reads. Here the model is moved (float64 and back) *after* LoRA and the
    per-example hooks are attached; one DP step must then change exactly the LoRA factors and head that the
    forward uses, and nothing else."""
    data = synthetic_data.train.subset(torch.arange(100))
    model, params = synthetic_model()
    randomize_b(params)
    per_example = PerExampleGradients(model, params.all())
    model.to(torch.float64)
    model.to(torch.float32)
    model.to("cpu")

    live = dict(model.named_parameters())
    for name, p in params.all().items():
        assert live[name] is p, f"{name}: the tracked parameter is no longer the model's"
        assert p.dtype == torch.float32

    features, labels = data.batch(torch.arange(32))
    model.eval()
    with torch.no_grad():
        before_out = model(**features)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference = copy.deepcopy(model)

    ws = Workspace(model, params, torch.device("cpu"), per_example, 64)
    config = dp_config(**{"lr": 0.5})
    result = train(ws, params.state(), data, method=create_method("dp-lora"), config=config, mechanism=sample_dp(config, data, 1.0))

    tracked = set(params.all())
    for name, p in model.named_parameters():
        if name in tracked:
            assert not torch.equal(p, before[name]), f"{name} did not change"
            assert torch.equal(p.detach(), result.upload[name])
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
    model.eval()
    with torch.no_grad():
        after_out = model(**features)
        assert not torch.allclose(after_out, before_out)
        # The upload, loaded into an untouched copy, reproduces the stepped model's outputs: the tensors the
        # engine updated are the ones the forward reads.
        ref_params = dict(reference.named_parameters())
        for name, value in result.upload.items():
            ref_params[name].copy_(value)
        torch.testing.assert_close(reference(**features), after_out)
    per_example.remove()


# ---------------------------------------------------------------------------------------------- empty batch


def test_empty_poisson_batch_still_takes_a_noisy_step(synthetic_data):
    """Regression: an empty Poisson draw (probability ≈ e^-batch per step) used to reach the model as a
    0-example forward, which BERT rejects. The step must still happen, as noise alone."""
    data = synthetic_data.train.subset(torch.arange(200))
    config = dp_config(**{"batch-size": 1})
    mechanism = sample_dp(config, data, 1.0)
    # A round whose first Poisson draw selects nobody (≈ 37% of rounds at q = 1/n).
    round = next(r for r in range(100) if len(mechanism.draw_batches(0, 1, Randomness(0).stream(Purpose.BATCHES, r, 0))[0]) == 0)
    model, params = synthetic_model()
    ws = Workspace(model, params, torch.device("cpu"), PerExampleGradients(model, params.all()), 64)
    global_state = params.state()
    result = train(ws, global_state, data, round=round, method=create_method("dp-lora"), config=config, mechanism=mechanism)
    # Nothing was sampled, yet the step is still a noisy one (the noise is what protects the empty draw).
    name = next(iter(params.by_factor[Factor.A]))
    assert not torch.equal(result.upload[name], global_state[name])

