"""The federated core: sample clients -> local training -> aggregate -> evaluate -> record.

It knows nothing of any particular method: a method only answers the questions in `dpfl_bench.method`.
"""

import hashlib
import json
import math
import os
import resource
import time
import warnings
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import dpfl_bench
from dpfl_bench.adapters import State, add_lora
from dpfl_bench.checkpoint import Checkpoint, CheckpointConfig, checkpoint_path, find_shorter_run, load_checkpoint, save_checkpoint
from dpfl_bench.client import ClientResult, RunContext, Workspace, train_client
from dpfl_bench.client_batch import train_clients, uncovered
from dpfl_bench.config import RunConfig
from dpfl_bench.errors import UserError
from dpfl_bench.lock import writer_lock
from dpfl_bench.method import Factor, create_method
from dpfl_bench.partition import clients_per_round, partition
from dpfl_bench.precision import autocast, to_device, use_tensor_cores
from dpfl_bench.privacy.canaries import create_audit
from dpfl_bench.privacy.mechanism import Mechanism, Schedule, create_mechanism, mechanism_of
from dpfl_bench.privacy.per_example import PerExampleGradients, check_per_example
from dpfl_bench.privacy.randomness import SERVER, Purpose, Randomness
from dpfl_bench.results import option_values, read_run, write_rows
from dpfl_bench.tasks import TASKS, Examples, Task, TaskData

EVAL_BATCH_SIZE = 64  # on 2 CPU cores, 2,000 fashion images took 6.8 s at 64 and 9.3 s at 256


@dataclass(frozen=True)
class RunSummary:
    path: Path
    rows: list[dict[str, Any]]
    mechanism: Mechanism | None  # None when the run had finished before and was not run again


def run_id(config: RunConfig) -> str:
    """Readable, and the same for the same configuration wherever its results are written."""
    digest = hashlib.sha256(json.dumps(config.identity(), sort_keys=True).encode()).hexdigest()[:8]
    return f"{config.task}_{config.method}_{config.privacy.regime}_seed{config.seed}_{digest}"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(name)


def check_precision(device: torch.device, precision: str) -> None:
    """Refuse a precision the device cannot autocast to, before anything is loaded."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16 needs a GPU with bfloat16 support (Ampere or newer); use fp16 or fp32")
    if precision == "fp16" and device.type == "cpu":
        try:
            with autocast(device, precision):
                nn.Linear(2, 2)(torch.ones(1, 2)).sum().backward()
        except RuntimeError:
            raise UserError("--precision fp16 is not supported on CPU by this torch; use bf16 or fp32") from None


@dataclass(frozen=True)
class Experiment:
    """Everything a run trains with, fixed before its first round."""

    run: RunContext  # configuration, method, mechanism (calibrated for the schedule), randomness, audit
    task: Task
    data: TaskData
    model_name: str  # the model actually used
    clients: list[Examples]  # each client's private training data
    schedule: Schedule  # the clients that take part in each round
    workspace: Workspace
    batched: bool  # a round's clients train together (`client_batch`), or one after another


def prepare(config: RunConfig) -> Experiment:
    """Load data and model, split the data, draw the participation schedule and calibrate the noise."""
    task = TASKS.get(config.task)
    reset_peak_memory(resolve_device(config.device))  # a worker that runs several points measures each alone
    method = create_method(config.method, config.method_options)
    randomness = Randomness(config.seed, config.privacy.rng)
    device = resolve_device(config.device)
    check_precision(device, config.training.precision)
    use_tensor_cores(device)
    data = task.load(config.sources)  # with its validation split held out of data.train
    clients = [data.train.subset(torch.from_numpy(idx)) for idx in partition(data.train, config, randomness)]
    mechanism = create_mechanism(config, [len(c) for c in clients])
    schedule = mechanism.participation(randomness.stream(Purpose.PARTICIPATION))
    mechanism.calibrate(schedule)

    torch.manual_seed(randomness.torch_seed(Purpose.INIT))  # peft's LoRA A and the head draw from torch's generator
    built = task.build_model(data.num_classes, config.sources)
    model = built.module.to(device)  # move first, then add adapters (Opacus issue 820)
    params = add_lora(model, config.adapter.targets or built.lora_targets, built.heads, config.adapter, method)
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        # Convolutions run channels-last (NHWC): oneDNN's and cuDNN's fast kernels want it; one DP step of
        # the default task took 0.64× the time on a CPU. Same numbers to float rounding.
        model.to(memory_format=torch.channels_last)
    clips_examples = mechanism.clip_examples is not None
    workspace = Workspace(
        model=model,
        params=params,
        device=device,
        per_example=PerExampleGradients(model, params.all()) if clips_examples else None,
        physical_batch_size=config.training.physical_batch(device.type),
        precision=config.training.precision,
    )
    if workspace.per_example is not None:
        # The same model, checked once per process: its builder (not just the task's name), its sources (a
        # --model), its adapters and device.
        built_from = (task.build_model, config.task, config.sources, config.adapter, str(device))
        check_per_example(workspace.per_example, model, params, device, data.train, built.name, cache_key=built_from)
    audit = create_audit(config, mechanism, params, randomness)
    batched = client_batching(config.training.client_batching, workspace, data.train)
    if batched:  # one pass holds every client's batch
        fed = config.federated
        workspace.physical_batch_size = config.training.physical_batch(device.type, clients_per_round(fed.clients, fed.participation))
    run = RunContext(config, method, mechanism, randomness, audit)
    return Experiment(run, task, data, built.name, clients, schedule, workspace, batched)


def client_batching(mode: str, ws: Workspace, sample: Examples) -> bool:
    """Whether a round's clients train together: `on` when the model allows it (else a one-line refusal),
    `auto` likewise but falling back with a warning, `off` never."""
    if mode == "off":
        return False
    reason = uncovered(ws, sample)
    if reason is None:
        return True
    if mode == "on":
        raise UserError(f"--client-batching on: this model has {reason}; use --client-batching auto or off")
    warnings.warn(f"clients train one after another: the model has {reason}", stacklevel=2)
    return False


def results_path(config: RunConfig) -> Path:
    return Path(config.out) / f"{run_id(config)}.parquet"


def saved_rows(config: RunConfig) -> list[dict[str, Any]]:
    """The rows of this configuration's results file; none when there is no file or it cannot be read
    (a damaged file is redone, and replaced atomically when the rerun saves)."""
    path = results_path(config)
    try:
        return read_run(path).to_dict("records") if path.exists() else []
    except Exception:
        return []


@dataclass(frozen=True)
class Resume:
    """Where a run starts: finished before, from a checkpoint, or from round 0 (with why, in `note`)."""

    finished_rows: list[dict[str, Any]]  # the results of a run that finished before; empty otherwise
    checkpoint: Checkpoint | None
    note: str  # one line for the user; empty for a plain fresh start

    @property
    def rounds_done(self) -> int:
        return self.checkpoint.rounds_done if self.checkpoint else 0


def find_resume(config: RunConfig, checkpointing: CheckpointConfig = CheckpointConfig()) -> Resume:
    """How a run of `config` would start now. Raises UserError for a checkpoint that must not be used."""
    path = results_path(config)
    saved = checkpoint_path(path)
    if checkpointing.restart:
        return Resume([], None, "--restart: starting over" if path.exists() or saved.exists() else "")
    rows = saved_rows(config)
    if rows and rows[-1]["round"] >= config.federated.rounds:
        return Resume(rows, None, f"finished before: results in {path} (--restart runs it again)")
    if config.privacy.rng == "secure":
        partial = rows or saved.exists()
        return Resume([], None, "a --rng secure run cannot resume (its keys are never written): starting over" if partial else "")
    if saved.exists():
        checkpoint = load_checkpoint(saved, config)
        return Resume([], checkpoint, f"resuming from round {checkpoint.rounds_done} of {config.federated.rounds} ({saved.name})")
    if checkpointing.extend_from:
        return _extension(config, Path(checkpointing.extend_from))
    return Resume([], None, f"no checkpoint beside the {len(rows)} saved rounds: starting over" if rows else "")


def _extension(config: RunConfig, folder: Path) -> Resume:
    """Go on from a shorter run's kept checkpoint, where that run is this one's beginning: every draw of a
    round comes from its own stream and the learning rate decays per round, so only a mechanism calibrated
    to the whole schedule (an accountant's) ties a round to the run's length. Otherwise start from round 0,
    saying why."""
    check_extend_from(folder)
    if mechanism_of(config).accounted:
        return Resume([], None, "not extended: the noise is calibrated to the whole run, so a shorter run is not its beginning")
    same_name = folder.glob(f"{run_id(config).rsplit('_', 1)[0]}_*.ckpt")  # the readable part of a run id has no rounds
    found, unusable = find_shorter_run(same_name, config)
    if found is None:
        skipped = f" ({unusable} checkpoint(s) there unreadable or of another dpfl-bench version)" if unusable else ""
        return Resume([], None, f"no shorter run of this configuration kept in {folder}{skipped}: starting from round 0")
    path, checkpoint = found
    return Resume([], checkpoint, f"extending {path} from round {checkpoint.rounds_done} to {config.federated.rounds}")


def check_extend_from(folder: Path) -> None:
    if not folder.is_dir():
        raise UserError(f"--extend-from {folder}: not a folder; name the results folder of the shorter runs")


def run_federated(
    config: RunConfig,
    *,
    on_round: Callable[[int, dict[str, Any] | None], None] = lambda r, row: None,
    on_progress: Callable[[float], None] = lambda rounds: None,
    checkpointing: CheckpointConfig = CheckpointConfig(),
    resume: Resume | None = None,
) -> RunSummary:
    """Run one configuration to the end, writing its results file after every evaluation and a
    checkpoint as `checkpointing` says; resume from the checkpoint of an interrupted run (`resume`, from
    `find_resume`: a caller that has told the user how the run starts passes what it found). `on_round`
    hears of each finished round (and, once loaded, of the rounds done before); `on_progress`, of the
    rounds done so far within a round, in fractions of client-steps, for progress bars."""
    out = writable_folder(Path(config.out)) / f"{run_id(config)}.parquet"  # fail before training, not after
    with writer_lock(out):
        return _run(config, out, on_round, on_progress, checkpointing, resume)


def _run(
    config: RunConfig, out: Path, on_round: Callable[[int, dict[str, Any] | None], None],
    on_progress: Callable[[float], None], checkpointing: CheckpointConfig, resume: Resume | None,
) -> RunSummary:
    started = time.perf_counter()
    resume = resume if resume is not None else find_resume(config, checkpointing)
    saved = checkpoint_path(out)
    if resume.finished_rows:
        return RunSummary(out, resume.finished_rows, None)
    exp = prepare(config)
    task, method, data, clients, ws = exp.task, exp.run.method, exp.data, exp.clients, exp.workspace
    mechanism, randomness, audit = exp.run.mechanism, exp.run.randomness, exp.run.audit
    fed, params = config.federated, ws.params
    global_state = params.state()
    client_states: dict[int, State] = {}  # what clients keep between rounds (`train_round`)
    secret = randomness.secure
    client_data = json.dumps(mechanism.client_records([c.labels for c in clients], data.num_classes, secret))
    rows: list[dict[str, Any]] = []
    config_json = config.to_json()
    run_fields = {"run_id": out.stem, "rounds_total": fed.rounds, "config_json": config_json, **option_values(config_json)}
    train_seconds, bytes_uploaded = 0.0, 0.0
    if resume.checkpoint is not None:
        ckpt = resume.checkpoint
        global_state = {n: t.to(ws.device) for n, t in ckpt.global_state.items()}
        rows, train_seconds, bytes_uploaded = ckpt.rows, ckpt.train_seconds, ckpt.bytes_uploaded
        started -= ckpt.wall_seconds
        ws.physical_batch_size = ckpt.physical_batch_size
        client_states = {k: {n: t.to(ws.device) for n, t in state.items()} for k, state in ckpt.client_states.items()}
        mechanism.load_state(ckpt.mechanism)
        audit.load_state(ckpt.audit)
        if rows:  # rounds saved after the checkpoint are redone
            # When extending a shorter run, its rows become this run's, less the evaluation its last round
            # forced; when resuming this run, neither changes anything.
            on_grid = [row for row in rows if row["round"] % config.training.eval_every == 0]
            rows = [{**row, **run_fields} for row in on_grid]
            write_rows(rows, out)
        else:
            out.unlink(missing_ok=True)
    on_round(resume.rounds_done, rows[-1] if rows else None)  # loaded: training starts

    within = {"round": resume.rounds_done, "steps": 0, "of": 1}  # the round under way, in client-steps

    def advance(count: int) -> None:
        within["steps"] += count
        on_progress(within["round"] + within["steps"] / within["of"])

    exp = replace(exp, run=replace(exp.run, on_steps=advance))
    for round in range(resume.rounds_done, fed.rounds):
        within.update(round=round, steps=0, of=max(len(exp.schedule[round]) * fed.local_steps, 1))
        round_started = time.perf_counter()
        global_state, results, names = train_round(exp, global_state, client_states, round)
        train_seconds += time.perf_counter() - round_started
        # Per client sampled on average: at client level the realised number of clients is secret.
        bytes_uploaded += mechanism.expected_clients * sum(global_state[n].numel() * global_state[n].element_size() for n in names)

        row = None
        evaluated = (round + 1) % config.training.eval_every == 0 or round + 1 == fed.rounds
        if evaluated:
            params.load(global_state)
            accuracy, loss = evaluate(ws.model, data.test, ws.device, ws.precision)
            val_accuracy, val_loss = evaluate(ws.model, data.val, ws.device, ws.precision)
            spent = mechanism.spent(exp.schedule[: round + 1])
            train_loss = float(np.mean([r.train_loss for r in results])) if results and not secret else math.nan
            row = {
                **run_fields,
                "task": task.name,
                "model": exp.model_name,
                "method": method.label,
                "dp_level": mechanism.name,
                "rng": randomness.mode,
                "eps_target": config.privacy.eps,
                "delta": config.privacy.delta,
                "noise_multiplier": mechanism.noise_multiplier,
                "noise_multiplier_min": mechanism.noise_multiplier_min,
                "clip": mechanism.clip,
                "eps_spent": max(spent),
                "eps_spent_mean": float(np.mean(spent)),
                "guarantee": mechanism.accounted,
                **audit.estimates(config.privacy.delta),
                "round": round + 1,
                "test_accuracy": accuracy,
                "test_loss": loss,
                "val_accuracy": val_accuracy,  # for tuning: --select in compare chooses on it, never on test
                "val_loss": val_loss,
                "train_loss": train_loss,  # noiseless statistic of private data: not recorded when secure
                "wall_seconds": time.perf_counter() - started,
                "train_seconds": train_seconds,
                "peak_memory_bytes": peak_memory_bytes(ws.device),
                "physical_batch_size": ws.physical_batch_size,
                "clients_together": exp.batched,
                "threads": torch.get_num_threads(),
                "bytes_uploaded_per_round": bytes_uploaded / (round + 1),
                "seed": config.seed,
                "client_data_json": client_data,
                **versions(),
            }
            rows.append(row)
            write_rows(rows, out)
        if not secret and checkpointing.due(round + 1, evaluated, fed.rounds):
            checkpoint = Checkpoint(round + 1, global_state, rows, mechanism.state(), audit.state(),
                                    time.perf_counter() - started, train_seconds, bytes_uploaded, ws.physical_batch_size,
                                    client_states)
            save_checkpoint(saved, checkpoint, config)
        on_round(round + 1, row)
    if ws.per_example is not None:
        ws.per_example.remove()
    if not checkpointing.keep:
        saved.unlink(missing_ok=True)
    return RunSummary(out, rows, mechanism)


def train_round(
    exp: Experiment, global_state: State, client_states: dict[int, State], round: int
) -> tuple[State, list[ClientResult], list[str]]:
    """One round: the round's clients train from the global state (and what each kept), the server
    aggregates what they send and the method says what to broadcast. Returns the new global state, the
    clients' results and the names sent; `client_states` is updated in place.

    With --head local or reset the head is never sent, so the server's stays as initialized; with local each
    client keeps its own from round to round (starting from the server's), with reset it is thrown away."""
    run, ws = exp.run, exp.workspace
    fed, params, chosen = run.config.federated, ws.params, exp.schedule[round]
    unsent = frozenset({Factor.HEAD}) if fed.head != "shared" else frozenset()
    starts = [{**global_state, **client_states.get(k, {})} for k in chosen]
    if exp.batched and chosen:
        results = train_clients(ws, starts, [exp.clients[k] for k in chosen], run, clients=chosen, round=round)
    else:
        results = [train_client(ws, start, exp.clients[k], run, client=k, round=round) for k, start in zip(chosen, starts)]
    if fed.head == "local":
        client_states |= {k: {n: r.upload[n] for n in params.of(unsent)} for k, r in zip(chosen, results)}
    names = list(params.of((run.method.uploads(round) | {Factor.HEAD}) - unsent))
    deltas = [{n: r.upload[n] - global_state[n] for n in names} for r in results]
    weights = [1.0 if fed.weighting == "uniform" else float(r.num_examples) for r in results]
    canaries = run.audit.canary_updates(round, names)  # canary clients join the round like real ones
    new_state = run.mechanism.aggregate(global_state, names, deltas + canaries, weights + [1.0] * len(canaries),
                                        run.randomness.stream(Purpose.NOISE, round, SERVER))
    run.audit.observe_round(global_state, new_state, names)  # what the mechanism released
    return run.method.broadcast(round, new_state), results, names


def writable_folder(folder: Path, option: str = "--out") -> Path:
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {folder} is a file; name a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{option} {folder} cannot be created: {e.strerror}; choose another folder") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"{option} {folder} is not writable; choose another folder")
    return folder


@torch.no_grad()
def evaluate(model: nn.Module, test: Examples, device: torch.device, precision: str = "fp32") -> tuple[float, float]:
    """Accuracy and mean cross-entropy of `model` on `test`."""
    model.eval()
    correct, loss = 0, 0.0
    for chunk in test.shortest_first(torch.arange(len(test))).split(EVAL_BATCH_SIZE):
        features, labels = test.batch(chunk)
        with autocast(device, precision):
            logits = model(**to_device(features, device))
        labels = labels.to(device)
        correct += int((logits.argmax(dim=1) == labels).sum())
        loss += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
    return correct / len(test), loss / len(test)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or on Linux the process's resident high-water mark
    (writing 5 to clear_refs resets VmHWM). Elsewhere the CPU peak stays the process's since it started."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:", 1)[1].split()[0]) * 1024  # in kB
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def versions() -> dict[str, str]:
    return {
        "dpfl_bench_version": dpfl_bench.__version__,
        **{f"{pkg}_version": version(pkg) for pkg in ("torch", "peft", "opacus", "transformers")},
    }
