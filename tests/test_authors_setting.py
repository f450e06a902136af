"""The LA-LoRA authors' setting by name: presets, the options they set (batch order, client selection, the
head, LoRA dropout, center crop), the authors' LA-LoRA as its own row, and one client round of every
method against the authors' step re-derived here in plain torch (from their `DP_lora.py` / `DP_LLM.py`)."""

import json
import math
import statistics
from typing import Any

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from support import assert_user_error, invoke, write_run

import dpfl_bench.federated as federated
from dpfl_bench.client import train_client
from dpfl_bench.compare import load_results, paired_gains, summarize
from dpfl_bench.configure import build_config
from dpfl_bench.errors import UserError
from dpfl_bench.method import Factor, create_method
from dpfl_bench.presets import PRESETS
from dpfl_bench.privacy.mechanism import create_mechanism
from dpfl_bench.privacy.randomness import Purpose, Randomness
from dpfl_bench.tasks import TASKS

SYNTHETIC = TASKS.get("synthetic").defaults


pytestmark = pytest.mark.usefixtures("one_thread")


# What README's preset table documents, written out here rather than read from `presets.py`.
AUTHORS_VISION = {
    ("federated", "clients"): 8, ("federated", "client_size"): 500, ("federated", "partition"): "dirichlet-mix",
    ("federated", "dirichlet_alpha"): 0.1, ("federated", "participation"): 0.5, ("federated", "client_selection"): "random",
    ("federated", "head"): "shared", ("federated", "rounds"): 101, ("federated", "local_steps"): 32,
    ("training", "batch_size"): 16, ("training", "batch_order"): "epoch", ("training", "optimizer"): "adamw",
    ("training", "lr"): 1e-4, ("training", "weight_decay"): 0.01, ("training", "lr_decay"): 0.99,
    ("adapter", "rank"): 16, ("adapter", "lora_alpha"): 16.0, ("adapter", "lora_dropout"): 0.05,
    ("sources", "center_crop"): 0.875,
}
AUTHORS_GLUE = {
    ("federated", "clients"): 20, ("federated", "partition"): "iid", ("federated", "participation"): 0.2,
    ("federated", "client_selection"): "first", ("federated", "head"): "reset", ("federated", "rounds"): 101,
    ("federated", "local_steps"): 20, ("training", "batch_size"): 16, ("training", "batch_order"): "epoch",
    ("training", "optimizer"): "adamw", ("training", "lr"): 2e-4, ("training", "weight_decay"): 0.01,
    ("training", "lr_decay"): 1.0, ("adapter", "rank"): 8, ("adapter", "lora_alpha"): 16.0,
    ("adapter", "lora_dropout"): 0.05, ("adapter", "lora_targets"): "query,key,value,dense",
}
AUTHORS_LA_LORA = {"first_factor": "A", "filter": "laplacian", "smooth_sigma": 1.0, "lr_b_multiplier": 2.0}


@pytest.mark.parametrize(
    "preset, task, expected", [("authors-vision", "fashion", AUTHORS_VISION), ("authors-glue", "synthetic", AUTHORS_GLUE)]
)
def test_a_preset_sets_exactly_its_documented_values_and_explicit_options_override_it(preset, task, expected):
    defaults = TASKS.get(task).defaults
    assert {n.replace("-", "_") for n in PRESETS.get(preset).options} == {name for _, name in expected}  # nothing else
    config = build_config({"task": task, "preset": preset, "dp-level": "authors", "method": "la-lora"}, defaults)
    for (section, name), value in expected.items():
        assert getattr(getattr(config, section), name) == value, name
    assert dict(config.method_options) == AUTHORS_LA_LORA
    rolora = build_config({"task": task, "preset": preset, "dp-level": "authors", "method": "rolora"}, defaults)
    assert rolora.method_options["first_factor"] == ("A" if preset == "authors-glue" else "B")

    yours = {"lr": 3e-3, "method-options": {"smooth_sigma": 0.0}}
    mine = build_config({"task": task, "preset": preset, "dp-level": "authors", **yours}, defaults)
    assert mine.training.lr == 3e-3 and mine.method_options["smooth_sigma"] == 0.0
    assert mine.method_options["first_factor"] == "A" and mine.training.batch_size == 16  # the rest stays the preset's


def test_the_run_prints_what_the_preset_set_and_what_it_did_not(tmp_path):
    result = invoke("run", "--task", "synthetic", "--preset", "authors-glue", "--dp-level", "authors", "--clients", "3",
                    "--participation", "0.5", "--rounds", "1", "--local-steps", "2", "--device", "cpu", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("preset authors-glue sets"))
    assert "client-selection first" in line and "head reset" in line and "la-lora: first_factor=A" in line
    assert "clients 20" not in line and "(yours instead: clients, local-steps, participation, rounds)" in line


def test_an_epoch_walks_disjoint_batches_with_a_short_last_one_then_reshuffles():
    config = build_config({"task": "synthetic", "eps": math.inf, "batch-order": "epoch", "batch-size": 16})
    mechanism = create_mechanism(config, [50])
    batches = mechanism.draw_batches(0, 6, Randomness(0).stream(Purpose.BATCHES, 3, 0))
    assert [len(b) for b in batches] == [16, 16, 16, 2, 16, 16]
    first_epoch = torch.cat(batches[:4])
    assert sorted(first_epoch.tolist()) == list(range(50))  # every example once
    assert len(set(torch.cat(batches[4:]).tolist())) == 32  # the next epoch: a new shuffle, no repeats inside it
    assert not torch.equal(batches[4], batches[0])
    fresh = create_mechanism(build_config({"task": "synthetic", "eps": math.inf, "batch-size": 16}), [50])
    drawn = fresh.draw_batches(0, 6, Randomness(0).stream(Purpose.BATCHES, 3, 0))
    assert all(len(b) == 16 for b in drawn)  # each step a full batch of its own shuffle, never a short one


def test_first_selection_picks_the_same_clients_every_round():
    config = build_config(
        {"task": "synthetic", "eps": math.inf, "clients": 10, "participation": 0.3, "rounds": 5, "client-selection": "first"}
    )
    schedule = create_mechanism(config, [60] * 10).participation(Randomness(0).stream(Purpose.PARTICIPATION))
    assert schedule == [[0, 1, 2]] * 5
    random = build_config({"task": "synthetic", "eps": math.inf, "clients": 10, "participation": 0.3, "rounds": 5})
    assert len({tuple(r) for r in create_mechanism(random, [60] * 10).participation(Randomness(0).stream(Purpose.PARTICIPATION))}) > 1


def record_client_rounds(monkeypatch) -> list[tuple[int, int, dict, dict]]:
    """Every client round's (round, client, start state, upload), sequential or batched."""
    calls = []
    one, together = federated.train_client, federated.train_clients

    def sequential(ws, start, data, run, *, client, round):
        result = one(ws, start, data, run, client=client, round=round)
        calls.append((round, client, start, result.upload))
        return result

    def batched(ws, starts, data, run, *, clients, round):
        results = together(ws, starts, data, run, clients=clients, round=round)
        calls.extend((round, k, start, r.upload) for k, start, r in zip(clients, starts, results))
        return results

    monkeypatch.setattr(federated, "train_client", sequential)
    monkeypatch.setattr(federated, "train_clients", batched)
    return calls


def head_of(state: dict) -> dict:
    return {n: t for n, t in state.items() if n.startswith("head.")}


@pytest.mark.parametrize("level", ["sample", "client"])
@pytest.mark.parametrize("batching", ["off", "on"])
def test_a_local_head_is_never_averaged_and_stays_with_its_client(monkeypatch, tmp_path, level, batching):
    calls = record_client_rounds(monkeypatch)
    config = build_config({"task": "synthetic", "device": "cpu", "eps": 8.0, "dp-level": level, "clients": 3, "participation": 0.6,
                           "rounds": 4, "local-steps": 2, "head": "local", "client-batching": batching, "out": str(tmp_path)}, SYNTHETIC)
    initial = head_of(federated.prepare(config).workspace.params.state())
    federated.run_federated(config)
    last_head: dict[int, dict] = {}
    for round, client, start, upload in sorted(calls, key=lambda c: c[0]):
        expected = last_head.get(client, initial)  # its own head from its last round, or the server's at first
        assert all(torch.equal(start[n], expected[n]) for n in initial), (round, client)
        last_head[client] = head_of(upload)
        assert not all(torch.equal(upload[n], initial[n]) for n in initial)  # it did train
    rounds_taken = [sum(c == k for _, c, _, _ in calls) for k in range(3)]
    assert max(rounds_taken) >= 2  # some client came back, and started from its own head
    # The server's head never moved: every client's first round started from the initial one, and the
    # adapters (averaged) did move.
    firsts = {}
    for round, client, start, _ in calls:
        firsts.setdefault(client, start)
    assert all(torch.equal(s[n], initial[n]) for s in firsts.values() for n in initial)
    last_start, first_start = calls[-1][2], calls[0][2]
    assert not all(torch.equal(last_start[n], first_start[n]) for n in last_start if not n.startswith("head."))


def test_a_reset_head_starts_every_client_round_from_the_initial_head(monkeypatch, tmp_path):
    calls = record_client_rounds(monkeypatch)
    config = build_config({"task": "synthetic", "device": "cpu", "eps": math.inf, "clients": 2, "rounds": 3, "local-steps": 2,
                           "head": "reset", "out": str(tmp_path)}, SYNTHETIC)
    initial = head_of(federated.prepare(config).workspace.params.state())
    federated.run_federated(config)
    assert len(calls) == 6
    for round, client, start, upload in calls:
        assert all(torch.equal(start[n], initial[n]) for n in initial)
        assert not all(torch.equal(upload[n], initial[n]) for n in initial)
    adapters = [n for n in calls[-1][2] if not n.startswith("head.")]
    assert not all(torch.equal(calls[-1][2][n], calls[0][2][n]) for n in adapters)  # the adapters were averaged


def test_the_authors_la_lora_and_the_default_never_share_a_row(tmp_path):
    write_run(tmp_path, method="la-lora", seed=0, accuracies=[0.6], eps=1.0)
    write_run(tmp_path, method="la-lora", seed=0, accuracies=[0.7], eps=1.0, method_options=AUTHORS_LA_LORA)
    write_run(tmp_path, method="la-lora", seed=0, accuracies=[0.65], eps=1.0, method_options={"smooth_sigma": 0.0})
    write_run(tmp_path, method="dp-lora", seed=0, accuracies=[0.5], eps=1.0)
    finals = load_results(tmp_path).finals
    summary = summarize(finals)
    assert sorted(summary["method"]) == ["dp-lora", "la-lora", "la-lora (authors' code)", "la-lora (no filter)"]
    gains = paired_gains(finals, summary, "test_accuracy", ["method"])
    measured = {variant: (over, round(gain.mean, 6)) for (*_, variant), (over, gain) in gains.items()}
    # each variant against the best method that is no LA-LoRA variant, never against another variant
    assert measured == {"la-lora": ("dp-lora", 0.1), "la-lora (authors' code)": ("dp-lora", 0.2), "la-lora (no filter)": ("dp-lora", 0.15)}


def test_a_variant_as_baseline_measures_what_the_others_add_to_it(tmp_path):
    for seed, (default, unfiltered) in enumerate([(0.6, 0.5), (0.7, 0.65), (0.8, 0.7)]):
        write_run(tmp_path, method="la-lora", seed=seed, accuracies=[default], eps=1.0)
        write_run(tmp_path, method="la-lora", seed=seed, accuracies=[unfiltered], eps=1.0, method_options={"smooth_sigma": 0.0})
        write_run(tmp_path, method="dp-lora", seed=seed, accuracies=[0.9], eps=1.0)
    result = invoke("compare", tmp_path, "--baseline", "la-lora (no filter)", "--format", "markdown")
    assert result.exit_code == 0, result.output
    assert "| la-lora − la-lora (no filter) | **+0.0833 [+0.0116, +0.1550] (3 pairs)** * |" in result.output
    assert "la-lora (no filter) − la-lora (no filter)" not in result.output  # a variant is not measured against itself
    plain = invoke("compare", tmp_path, "--format", "markdown").output
    assert "| la-lora gain | -0.2000 [" in plain and "| la-lora (no filter) gain | **-0.2833 [" in plain
    against_default = invoke("compare", tmp_path, "--baseline", "la-lora", "--format", "markdown").output
    assert "| la-lora (no filter) − la-lora | **-0.0833 [" in against_default
    records = json.loads(invoke("compare", tmp_path, "--baseline", "la-lora (no filter)", "--format", "json").output)
    over = {r["method"]: r["gain_over"] for r in records}
    assert over == {"dp-lora": None, "la-lora": "la-lora (no filter)", "la-lora (no filter)": None}


def test_a_baseline_without_any_la_lora_run_is_one_line(tmp_path):
    write_run(tmp_path, method="dp-lora", seed=0, accuracies=[0.5], eps=1.0)
    write_run(tmp_path, method="ffa-lora", seed=0, accuracies=[0.6], eps=1.0)
    assert_user_error(invoke("compare", tmp_path, "--baseline", "dp-lora"), "--baseline dp-lora: these runs have no la-lora variant")


def test_a_run_records_its_methods_variant(tmp_path):
    result = invoke("run", "--task", "synthetic", "--dp-level", "authors", "--rounds", "1", "--clients", "2", "--device", "cpu",
                    "--method-opt", "first_factor=A", "--method-opt", "filter=laplacian", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    rows = pd.read_parquet(next(tmp_path.glob("*.parquet")))
    assert (rows["method"] == "la-lora (authors' code)").all()
    assert create_method("la-lora", {"first_factor": "A"}).label == "la-lora (A first)"
    assert create_method("la-lora").label == "la-lora" and create_method("rolora", {"first_factor": "A"}).label == "rolora"


@pytest.mark.parametrize(
    "args, text",
    [
        (["--batch-order", "epoch", "--eps", "1"], "--batch-order epoch cannot be accounted at sample level"),
        (["--preset", "authors-glue", "--eps", "1"], "use --batch-order fresh"),
        (["--client-selection", "first", "--dp-level", "client"], "--client-selection first cannot be accounted at client level"),
        (["--batch-order", "walk"], "--batch-order must be fresh or epoch"),
        (["--client-selection", "last"], "--client-selection must be random or first"),
        (["--head", "private"], "--head must be shared, local or reset"),
        (["--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
        (["--center-crop", "0"], "--center-crop must be in (0, 1]"),
        (["--center-crop", "0.875"], "--center-crop applies to image tasks, not to synthetic"),
        (["--preset", "authors"], "unknown preset 'authors'; choose one of: authors-glue, authors-vision"),
    ],
)
def test_bad_authors_setting_options_are_one_line_errors(tmp_path, args, text):
    assert_user_error(invoke("run", "--task", "synthetic", "--device", "cpu", *args, "--out", tmp_path), text)


# --- One client round, against the authors' step re-derived in plain torch -----------------------------


def their_laplacian(grad: torch.Tensor, sigma: float, lora: bool) -> torch.Tensor:
    """`LaplacianSmoothing2D` for a LoRA factor (a 5-point stencil written into an H×W kernel, FFT2), else
    `LaplacianSmoothing` on the flattened tensor (a 3-point stencil, the real part of its FFT)."""
    if lora:
        kernel = torch.zeros(grad.shape, dtype=torch.float64)
        kernel[0, 0], kernel[0, 1], kernel[1, 0], kernel[-1, 0], kernel[0, -1] = -4.0, 1.0, 1.0, 1.0, 1.0
        return torch.fft.ifft2(torch.fft.fft2(grad.double()) / (1 - sigma * torch.fft.fft2(kernel))).real.float()
    flat = grad.flatten().double()
    kernel = torch.zeros(flat.numel(), dtype=torch.float64)
    kernel[0], kernel[1], kernel[-1] = -2.0, 1.0, 1.0
    coefficient = 1 / (1 - sigma * torch.fft.fft(kernel).real)
    return torch.fft.ifft(torch.fft.fft(flat) * coefficient).real.float().view(grad.shape)


def their_round(exp: Any, start: dict, client: int, round: int) -> dict:
    """One client round as their update functions do it: for each batch of the round, the mean loss's
    gradient of the trained tensors, C = min(median tensor norm, 0.4), each tensor clipped to C, noise of std
    dp_sigma·C/B added; LA-LoRA then steps param -= lr·smooth(grad) first; then AdamW (weight decay 1e-2,
    LA-LoRA's B at 2× the lr, built afresh for the round) on the noisy gradient."""
    config, ws = exp.run.config, exp.workspace
    name, options = config.method, config.method_options
    ws.params.load(start)
    model, by_factor = ws.model, ws.params.by_factor
    model.train()
    lr, batch, dp_sigma = config.training.lr_at(round), config.training.batch_size, config.privacy.dp_sigma
    randomness = Randomness(config.seed)
    batches = exp.run.mechanism.draw_batches(client, config.federated.local_steps, randomness.stream(Purpose.BATCHES, round, client))
    noise = randomness.stream(Purpose.NOISE, round, client)
    b_lr = 2 * lr if name == "la-lora" else lr
    groups = [{"params": list(by_factor[Factor.A].values()), "lr": lr}, {"params": list(by_factor[Factor.B].values()), "lr": b_lr},
              {"params": list(by_factor[Factor.HEAD].values()), "lr": lr}]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)

    def trained_factor(step: int) -> Factor | None:
        if name == "la-lora":  # batch_idx % 2 == 0 trains A
            return Factor.A if step % 2 == 0 else Factor.B
        if name == "rolora":  # one factor a round, the first given by the setting
            first = Factor(options["first_factor"])
            return first if round % 2 == 0 else ({Factor.A: Factor.B, Factor.B: Factor.A}[first])
        if name == "ffa-lora":
            return Factor.B
        return None  # both

    data = exp.clients[client]
    for step, index in enumerate(batches):
        factor = trained_factor(step)
        factors = [f for f in Factor if factor in (None, f) or f is Factor.HEAD]
        trained = {n: p for f in factors for n, p in by_factor[f].items()}
        for params in by_factor.values():
            for n, p in params.items():
                p.requires_grad_(n in trained)
                p.grad = None
        features, labels = data.batch(index)
        loss = F.cross_entropy(model(**features), labels)
        grads = dict(zip(trained, torch.autograd.grad(loss, list(trained.values()))))
        norms = {n: g.norm() for n, g in grads.items()}
        clip = min(statistics.median(float(v) for v in norms.values()), 0.4)
        for n, g in grads.items():
            scale = clip / norms[n]  # a tensor: C / 0 is inf (or NaN for 0 / 0), which their min(1, ·) turns into 1
            g = g * min(1, scale) + noise.normal(g.shape, dp_sigma * clip / batch)
            if name == "la-lora":
                with torch.no_grad():
                    trained[n].sub_(lr * their_laplacian(g, options["smooth_sigma"], lora="lora" in n))
            trained[n].grad = g
        optimizer.step()
    return {n: p.detach().clone() for n, p in ws.params.all().items()}


@pytest.mark.parametrize("method", ["dp-lora", "ffa-lora", "rolora", "la-lora"])
@pytest.mark.parametrize("round", [0, 1])
def test_one_client_round_under_the_preset_is_the_authors_step(method, round):
    """The authors' GLUE preset (A first for LA-LoRA and RoLoRA, the Laplacian extra step, epoch batches
    with a short last one) on the tiny BERT, dropout off: the masks are our per-example draws, not theirs."""
    config = build_config({"task": "synthetic", "device": "cpu", "preset": "authors-glue", "dp-level": "authors", "method": method,
                           "clients": 8, "participation": 1.0, "local-steps": 5, "lora-dropout": 0.0, "lr": 1e-3}, SYNTHETIC)
    exp = federated.prepare(config)
    start = exp.workspace.params.state()
    # 75 examples in batches of 16: 4 full ones and a short one, as their loop walks one epoch (E = 1).
    batches = exp.run.mechanism.draw_batches(0, 5, Randomness(0).stream(Purpose.BATCHES, round, 0))
    assert len(exp.clients[0]) == 75 and [len(b) for b in batches] == [16, 16, 16, 16, 11]
    ours = train_client(exp.workspace, start, exp.clients[0], exp.run, client=0, round=round).upload
    theirs = their_round(exp, start, 0, round)
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=1e-5, atol=2e-7)
    moved = [n for n in ours if not torch.equal(ours[n], start[n])]
    assert any(".lora_A." in n for n in moved) == (method != "ffa-lora" and not (method == "rolora" and round == 1))


def test_the_vision_preset_refuses_a_text_task():
    with pytest.raises(UserError, match="--center-crop applies to image tasks"):
        build_config({"task": "synthetic", "preset": "authors-vision", "dp-level": "authors", "device": "cpu"}, SYNTHETIC)


def test_a_model_passes_its_self_check_once_per_process_and_another_build_is_checked_again(monkeypatch):
    """A sweep's worker skips the per-example self-check for a model built as one it has checked (same task,
    sources, adapters, device), and checks any other build."""
    from dpfl_bench.privacy import per_example

    checked = []
    original = per_example.PerExampleGradients.compute
    monkeypatch.setattr(per_example.PerExampleGradients, "compute", lambda self, *a, **k: checked.append(1) or original(self, *a, **k))
    base = {"task": "synthetic", "device": "cpu", "eps": 1.0, "client-batching": "off"}
    federated.prepare(build_config(base, SYNTHETIC))
    federated.prepare(build_config({**base, "seed": 5, "method": "dp-lora"}, SYNTHETIC))  # the same model
    assert len(checked) == 1
    federated.prepare(build_config({**base, "lora-targets": "query"}, SYNTHETIC))  # another one
    assert len(checked) == 2


def test_the_smoke_references_run_ids_are_still_those_of_its_suite():
    """Options added since 0.5 leave the run ids of 0.5's configurations as they were: CI's reference
    (written by 0.5) is matched by run id."""
    from pathlib import Path

    from dpfl_bench.federated import run_id
    from dpfl_bench.results import read_run
    from dpfl_bench.sweep import load_suite

    root = Path(__file__).parents[1]
    reference = set(read_run(root / "benchmarks/reference/smoke.parquet")["run_id"])
    assert {run_id(c) for c in load_suite(root / "benchmarks/smoke.toml").points} == reference
