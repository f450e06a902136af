"""The four LoRA methods: which factors train, change and travel, LA-LoRA's filter and lr, and the method registry.

Everything runs on the `synthetic` task (a tiny random-init BERT) with few rounds and steps, so it is fast.
"""

import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import dpfl_bench.cli as cli
import dpfl_bench.client as client_module
import dpfl_bench.federated as federated
import dpfl_bench.method as method_module
from dpfl_bench.adapters import State
from dpfl_bench.client import RunContext, Workspace, make_optimizer, train_client
from dpfl_bench.config import RunConfig
from dpfl_bench.configure import build_config
from dpfl_bench.errors import UserError
from dpfl_bench.method import BOTH, METHODS, Factor, Method, create_method, load_methods
from dpfl_bench.methods.la_lora import gaussian_smooth, laplacian_smooth
from dpfl_bench.tasks import TASKS, Examples

INF = math.inf
# Small enough to be quick, large enough to see alternation across rounds (B, A, B) and steps.
SMALL = {"task": "synthetic", "device": "cpu", "clients": 2, "participation": 1.0, "rounds": 3, "local_steps": 2}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """The models here are tiny: a second intra-op thread only adds overhead, and on a busy machine
    spinning OpenMP threads made this file several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config_for(method: str, eps: float, **options: Any) -> RunConfig:
    return build_config({**SMALL, "method": method, "eps": eps, **options}, TASKS.get("synthetic").defaults)


def names_of(state: State, factor: Factor) -> set[str]:
    """Parameter names of one factor, by the same naming rules as `add_lora`."""
    if factor is Factor.A:
        return {n for n in state if ".lora_A." in n}
    if factor is Factor.B:
        return {n for n in state if ".lora_B." in n}
    return {n for n in state if n.startswith("head.")}


def same(before: State, after: State, factor: Factor) -> bool:
    """Whether every tensor of `factor` is bit-identical in the two states."""
    names = names_of(before, factor)
    return bool(names) and all(torch.equal(before[n], after[n]) for n in names)


def all_changed(before: State, after: State, factor: Factor) -> bool:
    """Whether every tensor of `factor` differs between the two states."""
    names = names_of(before, factor)
    return bool(names) and all(not torch.equal(before[n], after[n]) for n in names)


# --- whole runs, with the global state and the uploads recorded round by round ---------------------------


@dataclass
class Recorded:
    states: list[State]  # the global state before round 0, then after each round
    uploads: list[list[State]]  # per round, one update (upload − global) per sampled client
    rows: list[dict[str, Any]]
    config: RunConfig


def run_recorded(out: Any, method: str, eps: float, **options: Any) -> Recorded:
    config = config_for(method, eps, out=str(out), **options)
    states: list[State] = []
    uploads: list[list[State]] = []
    real_create = federated.create_mechanism

    def recording_mechanism(*args: Any) -> Any:
        # The core asks the run's mechanism (FedAvg, or DP-FedAvg at client level) to aggregate once a round.
        mechanism = real_create(*args)
        real_aggregate = mechanism.aggregate

        def aggregate(global_state: State, names: list[str], deltas: list[State], *rest: Any) -> State:
            if not states:
                states.append({n: t.clone() for n, t in global_state.items()})
            uploads.append(deltas)
            new_state = real_aggregate(global_state, names, deltas, *rest)
            states.append({n: t.clone() for n, t in new_state.items()})
            return new_state

        mechanism.aggregate = aggregate
        return mechanism

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(federated, "create_mechanism", recording_mechanism)
        summary = federated.run_federated(config)
    assert len(states) == config.federated.rounds + 1, "expected one aggregation per round"
    return Recorded(states, uploads, summary.rows, config)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Each (method, ε, options) run once per module and shared by the tests that read it."""
    cache: dict[tuple, Recorded] = {}

    def get(method: str, eps: float, **options: Any) -> Recorded:
        key = (method, eps, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = run_recorded(tmp_path_factory.mktemp("runs"), method, eps, **options)
        return cache[key]

    return get


PRIVACY = [
    pytest.param(INF, {}, id="no-dp"),
    pytest.param(1.0, {}, id="sample-dp"),
    pytest.param(1.0, {"dp_level": "client"}, id="client-dp"),
]


@pytest.mark.parametrize("eps, extra", PRIVACY)
def test_ffa_lora_never_changes_a(runs: Any, eps: float, extra: dict) -> None:
    run = runs("ffa-lora", eps, **extra)
    assert (run.rows[-1]["noise_multiplier"] > 0) == math.isfinite(eps)  # the DP cases really add noise
    initial, final = run.states[0], run.states[-1]
    assert len(run.states) == SMALL["rounds"] + 1
    for after in run.states[1:]:
        assert same(initial, after, Factor.A), "FFA-LoRA's A must stay at its initial value, bit for bit"
    assert all_changed(initial, final, Factor.B)
    assert all_changed(initial, final, Factor.HEAD)
    for round_uploads in run.uploads:
        for upload in round_uploads:
            assert set(upload) == names_of(initial, Factor.B) | names_of(initial, Factor.HEAD)


@pytest.mark.parametrize("eps, extra", PRIVACY)
def test_rolora_alternates_one_factor_per_round(runs: Any, eps: float, extra: dict) -> None:
    run = runs("rolora", eps, **extra)
    assert (run.rows[-1]["noise_multiplier"] > 0) == math.isfinite(eps)
    start = run.states[0]
    expected = [Factor.B, Factor.A, Factor.B]  # default first_factor = B
    for round, trained in enumerate(expected):
        frozen = Factor.A if trained is Factor.B else Factor.B
        before, after = run.states[round], run.states[round + 1]
        assert all_changed(before, after, trained), f"round {round}: {trained.value} should have changed"
        assert all_changed(before, after, Factor.HEAD)
        assert same(before, after, frozen), f"round {round}: {frozen.value} must be untouched (noise included)"
        for upload in run.uploads[round]:
            assert set(upload) == names_of(start, trained) | names_of(start, Factor.HEAD)


def test_rolora_first_factor_option() -> None:
    method = create_method("rolora", {"first_factor": "A"})
    assert [method.trains(r, 0) for r in range(3)] == [{Factor.A}, {Factor.B}, {Factor.A}]
    assert [method.uploads(r) for r in range(3)] == [{Factor.A}, {Factor.B}, {Factor.A}]
    # Within a round the trained factor stays the same at every local step.
    assert {method.trains(1, s) for s in range(5)} == {frozenset({Factor.B})}


def test_uploaded_bytes_ffa_and_rolora_send_half_the_adapters(runs: Any) -> None:
    start = runs("dp-lora", INF).states[0]
    nbytes = {f: sum(start[n].numel() * start[n].element_size() for n in names_of(start, f)) for f in Factor}
    per_round = SMALL["clients"]  # participation 1: every client uploads every round
    rounds = SMALL["rounds"]
    measured = {m: runs(m, INF).rows[-1]["bytes_uploaded_per_round"] for m in ("dp-lora", "ffa-lora", "rolora")}
    # The head is uploaded by every method; take it out and compare what remains.
    adapters = {m: b - per_round * nbytes[Factor.HEAD] for m, b in measured.items()}

    assert adapters["dp-lora"] == per_round * (nbytes[Factor.A] + nbytes[Factor.B])
    assert adapters["ffa-lora"] == per_round * nbytes[Factor.B]
    assert adapters["rolora"] == pytest.approx(per_round * (2 * nbytes[Factor.B] + nbytes[Factor.A]) / rounds)
    assert adapters["ffa-lora"] / adapters["dp-lora"] == pytest.approx(0.5, abs=0.05)
    assert adapters["rolora"] / adapters["dp-lora"] == pytest.approx(0.5, abs=0.05)


# --- one client's local loop ----------------------------------------------------------------------------


@dataclass
class ClientSetup:
    ws: Workspace
    global_state: State
    clients: list[Examples]
    run: RunContext


def client_setup(method: str, eps: float, **options: Any) -> ClientSetup:
    """The fixed parts a client trains with, exactly as `federated.run_federated` builds them."""
    exp = federated.prepare(config_for(method, eps, **options))
    return ClientSetup(exp.workspace, exp.workspace.params.state(), exp.clients, exp.run)


def train_one(setup: ClientSetup, monkeypatch: pytest.MonkeyPatch, round: int = 0) -> tuple[list[State], State]:
    """Train client 0 for one round; the trainable state before the first and after every optimizer step,
    and the upload."""
    snapshots = [setup.global_state]
    real_make_optimizer = client_module.make_optimizer

    def recording_make_optimizer(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        optimizer = real_make_optimizer(*args, **kwargs)
        optimizer.register_step_post_hook(lambda opt, a, k: snapshots.append(setup.ws.params.state()))
        return optimizer

    monkeypatch.setattr(client_module, "make_optimizer", recording_make_optimizer)
    result = train_client(setup.ws, setup.global_state, setup.clients[0], setup.run, client=0, round=round)
    return snapshots, result.upload


@pytest.mark.parametrize("eps", [INF, 1.0], ids=["no-dp", "sample-dp"])
def test_la_lora_alternates_inside_the_local_loop(monkeypatch: pytest.MonkeyPatch, eps: float) -> None:
    steps = 4
    setup = client_setup("la-lora", eps, local_steps=steps)
    assert (setup.run.mechanism.name != "none") == (eps != INF)
    snapshots, upload = train_one(setup, monkeypatch, round=1)
    assert len(snapshots) == steps + 1
    for step in range(steps):
        before, after = snapshots[step], snapshots[step + 1]
        trained, frozen = (Factor.B, Factor.A) if step % 2 == 0 else (Factor.A, Factor.B)
        assert all_changed(before, after, trained), f"step {step}: {trained.value} should have changed"
        # Under DP this also shows that no noise reached the frozen factor.
        assert same(before, after, frozen), f"step {step}: {frozen.value} must be bit-identical"
        assert all_changed(before, after, Factor.HEAD)
    assert set(upload) == set(setup.global_state), "LA-LoRA uploads A, B and the head"


@pytest.mark.parametrize("round, trained, frozen", [(0, Factor.B, Factor.A), (1, Factor.A, Factor.B)])
def test_rolora_client_trains_only_that_rounds_factor(
    monkeypatch: pytest.MonkeyPatch, round: int, trained: Factor, frozen: Factor
) -> None:
    """The uploads alone cannot show it: a client must not train the other factor locally either."""
    setup = client_setup("rolora", 1.0)
    if trained is Factor.A:  # start from a state where A's gradient is not zero (B = 0 at init)
        for name in names_of(setup.global_state, Factor.B):
            setup.global_state[name] = torch.randn_like(setup.global_state[name]) * 0.1
    snapshots, upload = train_one(setup, monkeypatch, round=round)
    for before, after in zip(snapshots, snapshots[1:]):
        assert all_changed(before, after, trained)
        assert same(before, after, frozen)
    assert set(upload) == names_of(setup.global_state, trained) | names_of(setup.global_state, Factor.HEAD)


@pytest.mark.parametrize("eps", [INF, 1.0], ids=["no-dp", "sample-dp"])
def test_ffa_lora_client_never_trains_a_locally(monkeypatch: pytest.MonkeyPatch, eps: float) -> None:
    """FFA-LoRA's A is never uploaded, so the global states cannot show a client training it: check the
    client's own A after every local step, from a state where A's gradient is not zero."""
    setup = client_setup("ffa-lora", eps, local_steps=3)
    for name in names_of(setup.global_state, Factor.B):
        setup.global_state[name] = torch.randn_like(setup.global_state[name]) * 0.1
    snapshots, upload = train_one(setup, monkeypatch)
    assert len(snapshots) == 4
    for before, after in zip(snapshots, snapshots[1:]):
        assert same(before, after, Factor.A), "A must stay bit-identical in the client, noise included"
        assert all_changed(before, after, Factor.B) and all_changed(before, after, Factor.HEAD)
    assert not names_of(setup.global_state, Factor.A) & set(upload)


def test_la_lora_filter_is_applied_to_the_noisy_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """With plain SGD an update is -lr * gradient, so the smoothed run's B update must equal the
    unsmoothed run's B update (same seed, same noise) smoothed along B's output axis."""
    updates = {}
    for sigma in (0.0, 1.0):
        setup = client_setup("la-lora", 1.0, local_steps=1, optimizer="sgd", method_options={"smooth_sigma": sigma})
        snapshots, _ = train_one(setup, monkeypatch)
        updates[sigma] = {n: snapshots[1][n] - snapshots[0][n] for n in snapshots[0]}
    b_names = names_of(setup.global_state, Factor.B)
    for name in b_names:
        raw, smoothed = updates[0.0][name], updates[1.0][name]
        assert not torch.allclose(raw, smoothed)
        torch.testing.assert_close(smoothed, gaussian_smooth(raw, 0, 1.0), rtol=1e-4, atol=1e-7)
    for name in names_of(setup.global_state, Factor.HEAD):  # the head is never filtered
        torch.testing.assert_close(updates[1.0][name], updates[0.0][name])


def test_la_lora_b_learning_rate_multiplier() -> None:
    setup = client_setup("la-lora", INF, lr=0.01)
    params = setup.ws.params

    def lr_of(method: Method, factor: Factor) -> float:
        optimizer = make_optimizer(params, method, setup.run.config, 0)
        first = next(iter(params.by_factor[factor].values()))
        (lr,) = [g["lr"] for g in optimizer.param_groups if any(p is first for p in g["params"])]
        return lr

    default = create_method("la-lora")
    assert lr_of(default, Factor.B) == pytest.approx(2 * 0.01)
    assert lr_of(default, Factor.A) == pytest.approx(0.01)
    assert lr_of(default, Factor.HEAD) == pytest.approx(0.01)
    assert lr_of(create_method("la-lora", {"lr_b_multiplier": "3"}), Factor.B) == pytest.approx(3 * 0.01)
    assert lr_of(create_method("dp-lora"), Factor.B) == pytest.approx(0.01)


def test_la_lora_laplacian_filter_takes_an_extra_smoothed_step_before_the_optimizers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The authors' variant: param -= lr · smooth(g) (base lr, the head included), then the optimizer's
    own step on the raw g. With plain SGD and the filter off, one step is -lr_group · g, which gives g."""
    lr = 0.05
    updates = {}
    for variant, sigma in (("gaussian", 0.0), ("laplacian", 1.0)):
        options = {"smooth_sigma": sigma, "filter": variant}
        setup = client_setup("la-lora", 1.0, local_steps=1, optimizer="sgd", lr=lr, method_options=options)
        snapshots, _ = train_one(setup, monkeypatch)
        updates[variant] = {n: snapshots[1][n] - snapshots[0][n] for n in snapshots[0]}
    for factor, multiplier in ((Factor.B, 2.0), (Factor.HEAD, 1.0)):  # step 0 trains B (and the head)
        for name in names_of(setup.global_state, factor):
            raw = updates["gaussian"][name]
            grad = -raw / (multiplier * lr)
            smoothed = laplacian_smooth(grad.flatten() if factor is Factor.HEAD else grad, 1.0).reshape(grad.shape)
            torch.testing.assert_close(updates["laplacian"][name], raw - lr * smoothed, rtol=1e-4, atol=1e-7)
            assert not torch.allclose(updates["laplacian"][name], raw)


def direct_laplacian(shape: tuple[int, ...]) -> torch.Tensor:
    """The authors' periodic discrete Laplacian over every axis of `shape`, as a dense matrix on the flattened
    tensor: row i has −2 at i and 1 at i ± 1, each written over the last (so on 2 elements: −2 and 1)."""
    def one_axis(n: int) -> torch.Tensor:
        matrix = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n if n > 1 else 0):
            matrix[i, i] = -2
            matrix[i, (i + 1) % n] = 1
            matrix[i, (i - 1) % n] = 1
        return matrix

    total = torch.zeros(math.prod(shape), math.prod(shape), dtype=torch.float64)
    for axis, n in enumerate(shape):
        term = torch.ones(1, 1, dtype=torch.float64)
        for other, m in enumerate(shape):
            term = torch.kron(term, one_axis(m) if other == axis else torch.eye(m, dtype=torch.float64))
        total += term
    return total


@pytest.mark.parametrize("shape", [(7,), (3, 4), (4, 5, 1, 1), (2, 6)])
def test_fft_laplacian_smoothing_equals_a_direct_solve(shape: tuple[int, ...]) -> None:
    grad = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma = 0.7
    system = torch.eye(grad.numel(), dtype=torch.float64) - sigma * direct_laplacian(shape)
    expected = torch.linalg.solve(system, grad.flatten()).reshape(shape)
    torch.testing.assert_close(laplacian_smooth(grad, sigma), expected, rtol=1e-10, atol=1e-12)
    assert laplacian_smooth(grad, 0.0) is grad
    if 2 not in shape:  # their stencil on an axis of 2 elements damps its mean too
        torch.testing.assert_close(laplacian_smooth(grad, sigma).mean(), grad.mean())


def test_laplacian_smoothing_on_two_elements_is_the_authors_stencil() -> None:
    """Their 1-D kernel on a binary head's bias: c = [−2, 1], so coefficients 1/(1 + σ) and 1/(1 + 3σ)."""
    grad = torch.tensor([3.0, 1.0], dtype=torch.float64)  # frequencies: sum 4, difference 2
    expected = torch.fft.ifft(torch.fft.fft(grad) * torch.tensor([1 / 2, 1 / 4], dtype=torch.float64)).real
    torch.testing.assert_close(laplacian_smooth(grad, 1.0), expected)
    torch.testing.assert_close(laplacian_smooth(torch.tensor([5.0]), 1.0), torch.tensor([5.0]))  # one element: as it is


def test_learning_rate_decays_per_round_and_weight_decay_reaches_the_optimizer() -> None:
    setup = client_setup("la-lora", INF, lr=0.01, lr_decay=0.9, weight_decay=0.001, optimizer="sgd")
    optimizer = make_optimizer(setup.ws.params, create_method("la-lora"), setup.run.config, 3)
    lrs = sorted(g["lr"] for g in optimizer.param_groups)
    assert lrs == pytest.approx([0.01 * 0.9**3, 0.01 * 0.9**3, 2 * 0.01 * 0.9**3])
    assert isinstance(optimizer, torch.optim.SGD) and all(g["weight_decay"] == 0.001 for g in optimizer.param_groups)


def test_la_lora_schedule() -> None:
    method = create_method("la-lora")
    assert [method.trains(0, s) for s in range(4)] == [{Factor.B}, {Factor.A}, {Factor.B}, {Factor.A}]
    assert [method.trains(3, s) for s in range(2)] == [{Factor.B}, {Factor.A}]  # restarts in every round
    assert method.uploads(0) == BOTH
    swapped = create_method("la-lora", {"first-factor": "A"})
    assert [swapped.trains(0, s) for s in range(2)] == [{Factor.A}, {Factor.B}]


# --- the Gaussian low-pass filter -------------------------------------------------------------------------


def alternating(length: int) -> torch.Tensor:
    return torch.tensor([(-1.0) ** i for i in range(length)])


def test_filter_keeps_a_constant_gradient() -> None:
    method = create_method("la-lora")
    rank, features = 4, 20
    a = torch.randn(rank, 1).expand(rank, features).contiguous()  # constant along A's input axis
    b = torch.randn(1, rank).expand(features, rank).contiguous()  # constant along B's output axis
    torch.testing.assert_close(method.postprocess(Factor.A, a), a)
    torch.testing.assert_close(method.postprocess(Factor.B, b), b)
    for sigma in (0.5, 1.0, 3.0, 10.0):  # a kernel wider than the signal too
        torch.testing.assert_close(gaussian_smooth(a, 1, sigma), a)


def test_filter_attenuates_an_alternating_pattern() -> None:
    method = create_method("la-lora")
    rank, features = 4, 128
    a = torch.randn(rank, 1) * alternating(features)  # +1/-1 along A's input axis
    b = alternating(features)[:, None] * torch.randn(1, rank)  # +1/-1 along B's output axis
    smoothed_a, smoothed_b = method.postprocess(Factor.A, a), method.postprocess(Factor.B, b)
    assert smoothed_a.norm() / a.norm() < 0.1
    assert smoothed_b.norm() / b.norm() < 0.1
    # Away from the ends (radius 3 for sigma 1), where padding does not matter, almost nothing is left.
    assert smoothed_a[:, 3:-3].norm() / a[:, 3:-3].norm() < 0.02
    assert smoothed_b[3:-3].norm() / b[3:-3].norm() < 0.02


def test_filter_never_mixes_the_rank_axis() -> None:
    method = create_method("la-lora")
    rank, features = 4, 16
    a = torch.zeros(rank, features)
    a[2] = torch.randn(features)
    b = torch.zeros(features, rank)
    b[:, 1] = torch.randn(features)
    smoothed_a, smoothed_b = method.postprocess(Factor.A, a), method.postprocess(Factor.B, b)
    assert torch.count_nonzero(smoothed_a[[0, 1, 3]]) == 0
    assert torch.count_nonzero(smoothed_b[:, [0, 2, 3]]) == 0
    assert not torch.allclose(smoothed_a[2], a[2])  # the row itself was smoothed
    assert not torch.allclose(smoothed_b[:, 1], b[:, 1])
    # An alternating pattern along the rank axis passes through untouched.
    across_rank = alternating(rank)[:, None].expand(rank, features).contiguous()
    torch.testing.assert_close(method.postprocess(Factor.A, across_rank), across_rank)


def test_filter_kernel_is_a_normalized_gaussian() -> None:
    impulse = torch.zeros(1, 21)
    impulse[0, 10] = 1.0
    response = gaussian_smooth(impulse, 1, 1.0)[0]
    offsets = torch.arange(-3, 4, dtype=torch.float32)  # radius ceil(3 sigma) = 3
    weights = torch.exp(-(offsets**2) / 2)
    torch.testing.assert_close(response[7:14], weights / weights.sum())
    assert torch.count_nonzero(response[:7]) == 0 and torch.count_nonzero(response[14:]) == 0


def test_filter_off_and_head_untouched() -> None:
    grad = torch.randn(4, 16)
    off = create_method("la-lora", {"smooth_sigma": "0"})
    assert torch.equal(off.postprocess(Factor.A, grad), grad)
    assert torch.equal(off.postprocess(Factor.B, grad.T), grad.T)
    assert torch.equal(gaussian_smooth(grad, 1, 0.0), grad)
    on = create_method("la-lora")
    head = torch.randn(2, 16) * alternating(16)
    assert torch.equal(on.postprocess(Factor.HEAD, head), head)


def test_filter_on_conv_shaped_factors() -> None:
    method = create_method("la-lora")
    rank, in_features, out_features = 4, 128, 96
    a = torch.randn(rank, 1, 1, 1) * alternating(in_features)[None, :, None, None]  # [rank, in, 1, 1]
    b = alternating(out_features)[:, None, None, None] * torch.randn(1, rank, 1, 1)  # [out, rank, 1, 1]
    smoothed_a, smoothed_b = method.postprocess(Factor.A, a), method.postprocess(Factor.B, b)
    assert smoothed_a.shape == a.shape and smoothed_b.shape == b.shape
    torch.testing.assert_close(smoothed_a[..., 0, 0], method.postprocess(Factor.A, a[..., 0, 0]))
    torch.testing.assert_close(smoothed_b[..., 0, 0], method.postprocess(Factor.B, b[..., 0, 0]))
    assert smoothed_a.norm() / a.norm() < 0.1 and smoothed_b.norm() / b.norm() < 0.1
    constant = torch.randn(rank, 1, 1, 1).expand(rank, in_features, 1, 1).contiguous()
    torch.testing.assert_close(method.postprocess(Factor.A, constant), constant)


# --- the registry, entry points and option errors -------------------------------------------------------


class _ThirdPartyMethod(Method):
    name = "my-method"
    summary = "a test method from a fake plugin"
    citation = "none"

    def trains(self, round: int, step: int) -> frozenset[Factor]:
        return frozenset({Factor.B})

    def broadcast(self, round: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: torch.zeros_like(t) if ".lora_B." in n else t for n, t in state.items()}  # forget what B learned


class _FakeEntryPoint:
    name = "my-method"
    group = "dpfl_bench.methods"

    def load(self) -> type[Method]:
        return _ThirdPartyMethod


def test_entry_point_method_is_found_and_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    load_methods()  # built-ins registered in the real registry before it is swapped for a copy
    monkeypatch.setattr(METHODS, "_entries", dict(METHODS._entries))  # restored, without my-method, afterwards
    monkeypatch.setattr(method_module, "_loaded", False)
    fake_entry_points = lambda group: [_FakeEntryPoint()] if group == "dpfl_bench.methods" else []  # noqa: E731
    monkeypatch.setattr(method_module, "entry_points", fake_entry_points)
    monkeypatch.setattr(cli, "console", Console(width=200))  # wide enough that names are not wrapped

    method = create_method("my-method")
    assert isinstance(method, _ThirdPartyMethod)
    assert method.trains(0, 0) == {Factor.B}
    assert {"dp-lora", "ffa-lora", "rolora", "la-lora", "my-method"} <= set(METHODS.names())

    result = CliRunner().invoke(cli.app, ["methods"])
    assert result.exit_code == 0, result.output
    assert "my-method" in result.output and "a test method from a fake plugin" in result.output
    for name in ("dp-lora", "ffa-lora", "rolora", "la-lora"):
        assert name in result.output


def test_an_entry_point_method_uses_the_server_hook(monkeypatch: pytest.MonkeyPatch, recorded_rounds: list, tmp_path: Any) -> None:
    load_methods()
    monkeypatch.setattr(METHODS, "_entries", dict(METHODS._entries))
    monkeypatch.setattr(method_module, "_loaded", False)
    monkeypatch.setattr(method_module, "entry_points", lambda group: [_FakeEntryPoint()] if group == "dpfl_bench.methods" else [])
    federated.run_federated(config_for("my-method", INF, out=str(tmp_path)))
    for _, released, broadcast, _ in recorded_rounds:
        b = [n for n in released if ".lora_B." in n]
        assert any(torch.any(released[n]) for n in b) and not any(torch.any(broadcast[n]) for n in b)


def test_registry_is_clean_after_the_entry_point_test() -> None:
    assert "my-method" not in load_methods()
    with pytest.raises(UserError, match="unknown method 'my-method'"):
        create_method("my-method")


def test_unknown_method_option() -> None:
    listed = r"method 'la-lora' has no option 'nope'; its options: first_factor, lr_b_multiplier, smooth_sigma"
    with pytest.raises(UserError, match=listed):
        create_method("la-lora", {"nope": "1"})
    with pytest.raises(UserError, match=r"method 'ffa-lora' has no option 'first_factor'; its options: none"):
        create_method("ffa-lora", {"first_factor": "A"})


@pytest.mark.parametrize("name", ["rolora", "la-lora"])
@pytest.mark.parametrize("value", ["C", "b", "AB", ""])
def test_bad_first_factor(name: str, value: str) -> None:
    message = rf"bad options for method '{name}': first_factor must be 'A' or 'B', got '{value}'"
    with pytest.raises(UserError, match=message):
        create_method(name, {"first_factor": value})


def test_bad_la_lora_numbers() -> None:
    with pytest.raises(UserError, match="smooth_sigma must be >= 0"):
        create_method("la-lora", {"smooth_sigma": "-1"})
    with pytest.raises(UserError, match="lr_b_multiplier must be > 0"):
        create_method("la-lora", {"lr_b_multiplier": 0})
    with pytest.raises(UserError, match="la-lora option lr_b_multiplier must be a float, got 'two'"):
        create_method("la-lora", {"lr_b_multiplier": "two"})
    with pytest.raises(UserError, match="filter must be 'gaussian' or 'laplacian', got 'median'"):
        create_method("la-lora", {"filter": "median"})


def test_bad_first_factor_on_the_command_line(tmp_path: Any) -> None:
    args = ["run", "--task", "synthetic", "--method", "rolora", "--method-opt", "first_factor=C"]
    args += ["--out", str(tmp_path)]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 1
    assert "first_factor must be 'A' or 'B'" in result.output
    assert not list(tmp_path.iterdir()), "nothing should be written for a rejected configuration"
