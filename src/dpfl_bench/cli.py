"""The `dpfl-bench` command line: thin wrappers over the library, user errors printed as one red line."""

import dataclasses
import math
import os
import signal
import time
import warnings
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dpfl_bench.errors import UserError

# OpenMP threads that wait for work sleep instead of spinning: beside another busy process on 2 cores, one
# round took 8.9 s with the default policy and 4.5 s with this one (docs/benchmarks.md, "Where the time goes"). It must be
# set before torch loads its OpenMP runtime; an explicit setting wins. Sweep workers inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from dpfl_bench.progress import SweepProgress, progress_bars, round_status, run_label

app = typer.Typer(
    help="Benchmark differentially private federated fine-tuning of large models with LoRA.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console()
errors = Console(stderr=True)

Section = "Run"
Federated, Training, Privacy, Adapter = "Federated learning", "Local training", "Privacy", "LoRA"
Sources = "Model and data (hub tasks)"
Audit = "Privacy audit"
Resuming = "Checkpoints"
Execution = "Execution"
PLOT_FORMATS = (".png", ".pdf", ".svg")


def _print_version(value: bool) -> None:
    if value:
        from dpfl_bench import __version__

        console.print(f"dpfl-bench {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    pass


def _opt(help: str, panel: str, *flags: str, option: str = "") -> Any:
    """An option whose help ends with its default: for `option`, the configuration's own, and where tasks
    set their own, a pointer to them."""
    if option:
        from dpfl_bench.config import TASK_TUNED, default_value

        value = default_value(option)
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        help += f" \\[default: {shown}" + ("; a task may set its own: `dpfl-bench tasks`]" if option in TASK_TUNED else "]")
    return typer.Option(*flags, help=help, rich_help_panel=panel, show_default=False)


# Options that `run` and `privacy` share, declared once.
Eps = Annotated[Optional[float], _opt("Target privacy budget ε; `inf` trains without privacy. \\[default: 1]", Privacy)]
Delta = Annotated[Optional[float], _opt("Target δ; must be below 1/n of the smallest protected dataset. \\[default: 1e-5]", Privacy)]
DpLevel = Annotated[Optional[str], _opt("`sample`: DP-SGD in every client; `client`: DP-FedAvg over clients; `authors`: the LA-LoRA authors' own noise (per-tensor clipping of the batch mean, --dp-sigma), NO privacy guarantee and no --eps. \\[default: sample]", Privacy)]
DpSigma = Annotated[Optional[float], _opt("--dp-level authors only: noise std dp_sigma·C/B on each coordinate of the batch-mean gradient. \\[default: 0.2]", Privacy)]
Calibration = Annotated[Optional[str], _opt("`per-client`: each client the smallest σ_k that keeps it within ε for its own rate and steps; `shared`: the worst client's σ for all. \\[default: per-client]", Privacy)]
Rng = Annotated[Optional[str], _opt("`seeded`: every draw from --seed (reproducible; not private against anyone who can guess the seed); `secure`: OS-keyed ChaCha20 for every privacy draw, for private data. \\[default: seeded]", Privacy)]
AccountantName = Annotated[Optional[str], _opt("Privacy accountant: rdp or prv. \\[default: rdp]", Privacy)]
TaskName = Annotated[Optional[str], _opt("Task: data + pretrained model (see `dpfl-bench tasks`); its defaults fill options left out. \\[default: fashion]", Section)]
Clients = Annotated[Optional[int], _opt("Number of clients N.", Federated, option="clients")]
Participation = Annotated[Optional[float], _opt("Fraction of clients sampled each round, in (0, 1].", Federated, option="participation")]
Rounds = Annotated[Optional[int], _opt("Communication rounds.", Federated, option="rounds")]
LocalSteps = Annotated[Optional[int], _opt("Local optimizer steps K per sampled client and round.", Federated, option="local-steps")]
BatchSize = Annotated[Optional[int], _opt("(Expected) batch size per local step.", Training, option="batch-size")]
Seed = Annotated[Optional[int], _opt("Seed for data split, client sampling, init, batches and noise. \\[default: 0]", Section)]
Model = Annotated[Optional[str], _opt("hf:<id-or-path> or timm:<name> instead of the task's model (hub tasks).", Sources)]
ModelPath = Annotated[Optional[str], _opt("Local weights: a save_pretrained folder (hf) or a checkpoint file (timm).", Sources)]
DataDir = Annotated[Optional[str], _opt("Local copy of the data: a save_to_disk folder, an imagefolder or Parquet files.", Sources)]
Workers = Annotated[Optional[int], _opt("Processes that decode or tokenize the data once at load. \\[default: 0]", Sources)]
Partition = Annotated[Optional[str], _opt("Data split across clients: `iid`; `dirichlet`: each class split across clients in Dir(α) proportions; `dirichlet-mix`: each client's class mix drawn from Dir(α), clients of equal size.", Federated, option="partition")]
DirichletAlpha = Annotated[Optional[float], _opt("Dirichlet concentration α of dirichlet and dirichlet-mix; smaller is more skewed.", Federated, option="dirichlet-alpha")]
MinPartitionSize = Annotated[Optional[int], _opt("Smallest client dataset a dirichlet split may give.", Federated, option="min-partition-size")]
CheckpointEvery = Annotated[int, typer.Option(help="Checkpoint every N rounds, to resume from when interrupted. \\[default: 0: after every evaluated round]", show_default=False, rich_help_panel=Resuming)]
KeepCheckpoint = Annotated[bool, typer.Option("--keep-checkpoint", help="Keep the final state once the run has finished (the checkpoint is removed by default), for --extend-from.", rich_help_panel=Resuming)]
ExtendFrom = Annotated[Optional[Path], typer.Option(help="A results folder where a shorter run of this configuration (fewer --rounds) kept its checkpoint: go on from it instead of round 0, where that run is exactly this one's beginning (no accountant: an accounted run's noise depends on its length, so it starts from round 0 and says why).", show_default=False, rich_help_panel=Resuming)]
ClientSelection = Annotated[Optional[str], _opt("Which clients take part each round: `random`, a fresh draw (what client-level DP's accountant assumes); `first`, the same first ⌈p·N⌉ every round (the authors' GLUE code). \\[default: random]", Federated)]
BatchOrder = Annotated[Optional[str], _opt("`fresh`: each local step draws its batch anew (a Poisson sample under sample-level DP); `epoch`: a round's steps walk shuffled epochs of the client's data, a short last batch included (the authors' code; no sample-level guarantee). \\[default: fresh]", Training)]
Preset = Annotated[Optional[str], _opt("A paper's setting by name: authors-vision or authors-glue (see `dpfl-bench presets`); it prints what it sets, and your options override it.", Section)]
ClientSize = Annotated[Optional[int], _opt("Training examples per client, disjoint, with iid or dirichlet-mix; the rest of the training set is unused. \\[default: 0: split the whole training set]", Federated)]


@app.command()
def run(
    method: Annotated[Optional[str], _opt("LoRA method: dp-lora, ffa-lora, rolora, la-lora, fedsvd, fed-sb (see `dpfl-bench methods`). \\[default: la-lora]", Section)] = None,
    eps: Eps = None,
    delta: Delta = None,
    dp_level: DpLevel = None,
    dp_sigma: DpSigma = None,
    calibration: Calibration = None,
    clip: Annotated[Optional[float], _opt("Clipping norm C (per example, or per client update). \\[default: 1]", Privacy)] = None,
    accountant: AccountantName = None,
    rng: Rng = None,
    audit_canaries: Annotated[Optional[int], _opt("Empirical audit: insert M canaries (each with probability 1/2) and report the ε they reveal. \\[default: 0]", Audit)] = None,
    audit_client: Annotated[Optional[int], _opt("Sample level: the client whose dataset gets the canaries. \\[default: 0]", Audit)] = None,
    task: TaskName = None,
    clients: Clients = None,
    participation: Participation = None,
    rounds: Rounds = None,
    local_steps: LocalSteps = None,
    partition: Partition = None,
    dirichlet_alpha: DirichletAlpha = None,
    min_partition_size: MinPartitionSize = None,
    client_size: ClientSize = None,
    weighting: Annotated[Optional[str], _opt("FedAvg weights: uniform or size.", Federated, option="weighting")] = None,
    client_selection: ClientSelection = None,
    head: Annotated[Optional[str], _opt("The classification head: `shared`, sent and averaged with the adapters; `local`, never sent, each client keeps its own from round to round; `reset`, never sent nor kept, each client starts every round from the server's, which stays as initialized (the authors' GLUE code). With local or reset the global model is evaluated with the server's head, as the authors' code does. \\[default: shared]", Federated)] = None,
    batch_size: BatchSize = None,
    physical_batch_size: Annotated[Optional[int], _opt("Examples per forward pass; bigger batches are split (halved on CUDA out-of-memory). With --client-batching, counts the examples of all clients of a pass. \\[default: 0: twice the batch size (of each client trained together); on a CPU at most 32 per client and 64 a pass]", Training)] = None,
    precision: Annotated[Optional[str], _opt("fp32, bf16 or fp16: autocast of the forward pass; privacy arithmetic stays fp32. \\[default: fp32]", Training)] = None,
    lr: Annotated[Optional[float], _opt("Learning rate.", Training, option="lr")] = None,
    optimizer: Annotated[Optional[str], _opt("Local optimizer: adamw or sgd.", Training, option="optimizer")] = None,
    weight_decay: Annotated[Optional[float], _opt("Optimizer weight decay (decoupled for adamw). \\[default: 0]", Training)] = None,
    lr_decay: Annotated[Optional[float], _opt("Learning-rate multiplier per round: round t trains at lr · lr_decay^t. \\[default: 1]", Training)] = None,
    client_batching: Annotated[Optional[str], _opt("`auto`: a round's clients train together in one pass of the backbone when the model allows it (LoRA on linear layers or 1x1 convolutions, a linear head, a training pass that is per example), else one after another; `on`: together or a one-line refusal; `off`: one after another. Same results to float rounding. \\[default: auto]", Training)] = None,
    batch_order: BatchOrder = None,
    eval_every: Annotated[Optional[int], _opt("Evaluate every this many rounds (and after the last).", Training, option="eval-every")] = None,
    rank: Annotated[Optional[int], _opt("LoRA rank r.", Adapter, option="rank")] = None,
    lora_alpha: Annotated[Optional[float], _opt("LoRA alpha; the adapter scale is alpha / r.", Adapter, option="lora-alpha")] = None,
    lora_targets: Annotated[Optional[str], _opt("Module-name suffixes that get LoRA, comma-separated, e.g. query,value. \\[default: per architecture]", Adapter)] = None,
    lora_dropout: Annotated[Optional[float], _opt("Dropout on the adapters' input, drawn per example (the authors' code: 0.05). \\[default: 0]", Adapter)] = None,
    model: Model = None,
    model_path: ModelPath = None,
    data_dir: DataDir = None,
    workers: Workers = None,
    center_crop: Annotated[Optional[float], _opt("Image tasks: resize to the model's input / this fraction, then center-crop (the authors' 256 → 224: 0.875). \\[default: 1: resize straight to the input]", Sources)] = None,
    preset: Preset = None,
    method_opt: Annotated[Optional[list[str]], _opt("A method option KEY=VALUE (repeatable; see `dpfl-bench methods`).", Section)] = None,
    seed: Seed = None,
    device: Annotated[Optional[str], _opt("auto, cpu or cuda. \\[default: auto]", Section)] = None,
    out: Annotated[Optional[Path], _opt("Folder for the results Parquet file. \\[default: results]", Section)] = None,
    config: Annotated[Optional[Path], _opt("TOML file of these options (same names); flags override it.", Section)] = None,
    log_to: Annotated[Optional[str], typer.Option(help="Also log each evaluated round to a tracker: tensorboard (runs/<run id>) or mlflow (MLFLOW_TRACKING_URI, else runs/mlflow.db).", show_default=False, rich_help_panel=Execution)] = None,
    threads: Annotated[int, typer.Option(help="Torch threads for this run (recorded in its results). \\[default: 0: torch's own, one per core]", show_default=False, rich_help_panel=Execution)] = 0,
    checkpoint_every: CheckpointEvery = 0,
    keep_checkpoint: KeepCheckpoint = False,
    extend_from: ExtendFrom = None,
    restart: Annotated[bool, typer.Option("--restart", help="Start over: ignore this configuration's checkpoint and finished results.", rich_help_panel=Resuming)] = False,
) -> None:
    """Train one federated LoRA configuration under (ε, δ)-DP and write its per-round metrics to Parquet.

    Task defaults fill the options you leave out; `dpfl-bench tasks` shows them. An interrupted run
    resumes from its checkpoint when run again; a finished one is not run again (--restart).
    Example: dpfl-bench run --method la-lora --eps 1
    """
    resuming = {"checkpoint_every": checkpoint_every, "keep_checkpoint": keep_checkpoint, "extend_from": extend_from, "restart": restart}
    flags = {k: v for k, v in locals().items() if v is not None and k not in ("config", "method_opt", "resuming", "threads", "log_to", *resuming)}
    with _user_errors(interrupted="the rounds evaluated so far are saved; run the same command again to resume from its checkpoint"):
        if threads < 0:
            raise UserError(f"--threads must be 0 (torch's own) or more, got {threads}")
        if log_to is not None:
            from dpfl_bench.trackers import check_tracker

            check_tracker(log_to)
        from dpfl_bench.checkpoint import CheckpointConfig
        from dpfl_bench.config import RunConfig, load_toml
        from dpfl_bench.configure import build_config
        from dpfl_bench.execution import quiet_libraries
        from dpfl_bench.federated import find_resume, resolve_device, results_path, run_federated, writable_folder
        from dpfl_bench.lock import check_unlocked
        from dpfl_bench.results import read_run
        from dpfl_bench.tasks import TASKS
        from dpfl_bench.trackers import open_tracker

        options = load_toml(config) if config else {}
        options.update(flags)
        if method_opt:
            options["method_options"] = {**options.get("method_options", {}), **_key_values(method_opt, "--method-opt")}
        if "out" in options:
            options["out"] = str(options["out"])
        chosen = TASKS.get(options.get("task", RunConfig.task))
        resolved = build_config(options, chosen.defaults)
        _print_preset(options, resolved.method)
        checkpointing = CheckpointConfig(every=checkpoint_every, keep=keep_checkpoint, restart=restart, extend_from=str(extend_from or ""))
        resume = find_resume(resolved, checkpointing)
        if resume.finished_rows:
            console.print(resume.note, highlight=False)
            return
        # Everything that needs no data is refused before the header; the data's own checks come before the model.
        writable_folder(Path(resolved.out))
        resolve_device(resolved.device)
        check_unlocked(results_path(resolved))
        if threads:
            import torch

            torch.set_num_threads(threads)
        quiet_libraries()
        fed, priv = resolved.federated, resolved.privacy
        if priv.accounted:
            privacy_text = f"ε={priv.eps:g} δ={priv.delta:g} ({priv.dp_level} level, {priv.rng} rng)"
        elif math.isnan(priv.eps):
            privacy_text = f"{priv.dp_level} regime, dp-sigma {priv.dp_sigma:g} ([red]no privacy guarantee[/]: noise without an accountant)"
        else:
            privacy_text = "non-private ([red]no privacy guarantee[/])"
        audited = f" · audit: {resolved.audit.audit_canaries} canaries" if resolved.audit.audit_canaries else ""
        console.print(
            f"[bold]{resolved.task}[/] · {resolved.method} · {privacy_text} · "
            f"{fed.clients} clients × {fed.participation:g} · {fed.rounds} rounds × {fed.local_steps} steps · "
            f"batch {resolved.training.batch_size} · lr {resolved.training.lr:g} · rank {resolved.adapter.rank}{audited}"
        )
        if priv.accounted and priv.rng == "seeded":
            console.print(
                f"[yellow]seeded randomness: every draw follows from --seed {resolved.seed}, so this run is not private "
                "against anyone who can guess or brute-force the seed; for private data use --rng secure[/]"
            )
        if chosen.synthetic:
            console.print("[yellow]synthetic task: generated data and a random-init model, for tests only[/]")
        if resume.note:
            console.print(resume.note, highlight=False)
        with warnings.catch_warnings(), progress_bars(console) as progress:
            warnings.showwarning = _note  # a library's warning (an out-of-memory halving, a fallback) as one line
            bar = progress.add_task("loading data and model", total=fed.rounds, status="", unit="rounds")

            tracker = open_tracker(log_to, Path("runs"), results_path(resolved).stem) if log_to else None

            def on_round(done: int, row: dict | None) -> None:
                progress.update(bar, completed=done, description="training", **({"status": round_status(row)} if row else {}))
                if row and tracker:
                    loaded = done == resume.rounds_done  # from a checkpoint: every row it carries (a shorter run's too)
                    for logged in read_run(results_path(resolved)).to_dict("records") if loaded else [row]:
                        tracker.log(logged)

            def on_progress(done: float) -> None:
                progress.update(bar, completed=done, description="training")

            summary = run_federated(resolved, on_round=on_round, on_progress=on_progress, checkpointing=checkpointing, resume=resume)
            if tracker:
                tracker.close()
        _print_summary(summary)


@app.command()
def privacy(
    eps: Annotated[Optional[float], _opt("Target ε: print the noise multiplier σ that meets it.", Privacy)] = None,
    noise_multiplier: Annotated[Optional[float], _opt("σ: print the ε it gives instead.", Privacy)] = None,
    delta: Delta = None,
    dp_level: DpLevel = None,
    calibration: Calibration = None,
    accountant: AccountantName = None,
    task: TaskName = None,
    clients: Clients = None,
    participation: Participation = None,
    rounds: Rounds = None,
    local_steps: LocalSteps = None,
    batch_size: BatchSize = None,
    partition: Partition = None,
    dirichlet_alpha: DirichletAlpha = None,
    min_partition_size: MinPartitionSize = None,
    client_size: ClientSize = None,
    client_selection: ClientSelection = None,
    batch_order: BatchOrder = None,
    preset: Preset = None,
    seed: Seed = None,
    model: Model = None,
    model_path: ModelPath = None,
    data_dir: DataDir = None,
    workers: Workers = None,
) -> None:
    """Privacy calculator: σ for a target ε, or ε for a given σ, for the schedule `run` would use.

    Options left out take the task's defaults and the task's data is split as `run` splits it (loaded only
    where the split needs it: not with --client-size, nor for an iid split of a task that counts its
    examples, as fashion does), so `dpfl-bench privacy --eps 1` prints the σ that `dpfl-bench run --eps 1` uses (with --rng seeded:
    a secure run draws its own client schedule, which can move a sample-level σ slightly).
    """
    flags = {k: v for k, v in locals().items() if v is not None and k not in ("eps", "noise_multiplier")}
    with _user_errors():
        from dpfl_bench.config import RunConfig
        from dpfl_bench.configure import build_config
        from dpfl_bench.partition import counted_client_sizes, partition
        from dpfl_bench.privacy.accounting import worst_epsilon
        from dpfl_bench.privacy.mechanism import create_mechanism, load_mechanisms
        from dpfl_bench.privacy.randomness import Purpose, Randomness
        from dpfl_bench.tasks import TASKS

        if (eps is None) == (noise_multiplier is None):
            raise UserError("give exactly one of --eps (to get σ) or --noise-multiplier (to get ε)")
        if noise_multiplier is not None and not 0 < noise_multiplier < math.inf:
            raise UserError(f"--noise-multiplier must be a number > 0, got {noise_multiplier}")
        mechanisms = load_mechanisms()
        level = flags.get("dp_level", RunConfig().privacy.dp_level)
        if level in mechanisms.names() and not mechanisms.get(level).accounted:
            raise UserError(f"--dp-level {level} has no accountant, so there is no σ or ε to compute; use sample or client")
        chosen = TASKS.get(flags.get("task", RunConfig.task))
        config = build_config({**flags, "eps": eps if eps is not None else 1.0}, chosen.defaults)
        fed, priv = config.federated, config.privacy
        randomness = Randomness(config.seed)
        sizes = counted_client_sizes(chosen, config)
        if sizes is None:
            from dpfl_bench.execution import quiet_libraries

            quiet_libraries()
            sizes = [len(shard) for shard in partition(chosen.load(config.sources).train, config, randomness)]
        mechanism = create_mechanism(config, sizes)
        schedule = mechanism.participation(randomness.stream(Purpose.PARTICIPATION))
        level = f"{priv.dp_level} level, {fed.clients} clients of {min(sizes)}–{max(sizes)} examples"
        if eps is not None:
            mechanism.calibrate(schedule)
            low, high = mechanism.noise_multiplier_min, mechanism.noise_multiplier
            sigma = f"[bold]{high:.4f}[/]" if math.isclose(low, high, rel_tol=1e-9) else f"[bold]{low:.4f}–{high:.4f}[/] across clients ({priv.calibration} calibration)"
            console.print(f"noise multiplier σ = {sigma} for ε = {eps:g}, δ = {priv.delta:g} ({level})")
        else:
            spent = worst_epsilon(noise_multiplier, mechanism.exposures(schedule), delta=priv.delta, accountant=priv.accountant)
            console.print(f"ε = [bold]{spent:.4f}[/] (worst client) for σ = {noise_multiplier:g}, δ = {priv.delta:g} ({level})")


@app.command()
def methods() -> None:
    """List the LoRA methods, their options and citations."""
    import dataclasses

    from dpfl_bench.method import load_methods

    table = Table("method", "what it does", "options (default)", "citation", show_lines=True)
    table.columns[2].no_wrap = True
    for name, cls in load_methods():
        opts = "\n".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls.Options)) or "—"
        table.add_row(f"[bold]{name}[/]", cls.summary, opts, cls.citation)
    console.print(table)


@app.command()
def tasks() -> None:
    """List the tasks (data + pretrained model + LoRA targets) and their default options."""
    from dpfl_bench.config import TASK_TUNED, default_value
    from dpfl_bench.tasks import TASKS

    table = Table("task", "data and model", "LoRA on", "defaults (bold: the task's own)", show_lines=True)
    for name, task in TASKS:
        own = {k.replace("_", "-"): v for k, v in task.defaults.items()}
        values = {option: own.get(option, default_value(option)) for option in TASK_TUNED}
        defaults = ", ".join(f"[bold]{k}={v:g}[/]" if k in own and isinstance(v, float) else f"[bold]{k}={v}[/]" if k in own
                             else f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        table.add_row(f"[bold]{name}[/]", task.description, ", ".join(task.lora_targets), defaults)
    console.print(table)


@app.command()
def presets() -> None:
    """List the presets (`--preset NAME`): a paper's setting by name, and every value each one sets."""
    from dpfl_bench.presets import PRESETS

    table = Table("preset", "what it reproduces", "options it sets", show_lines=True)
    for name, preset in PRESETS:
        table.add_row(f"[bold]{name}[/]", preset.summary, preset.describe().removeprefix(f"preset {name} sets "))
    console.print(table)


@app.command()
def sweep(
    suite: Annotated[Path, typer.Argument(help="Suite file: base options and a grid (see benchmarks/*.toml).", show_default=False)],
    out: Annotated[Optional[Path], _opt("Results folder; overrides the suite's `out`.", Section)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the grid, what is finished and the time left (from the runs saved so far); run nothing.")] = False,
    probe: Annotated[bool, typer.Option("--probe", help="With --dry-run and nothing saved yet: time one round of the first point to estimate from.")] = False,
    where: Annotated[Optional[list[str]], typer.Option(help="Only the points whose OPTION equals VALUE (repeatable), e.g. --where method=dp-lora --where eps=inf; the others stay as they are.", show_default=False)] = None,
    backend: Annotated[str, typer.Option(help="`local`: --jobs worker processes on this machine, each running points one after another (torch, the data and the noise calibration loaded once; a crash fails only its point); `ray`: Ray tasks on a local instance or a cluster (pip install dpfl-bench\\[ray]).", rich_help_panel=Execution)] = "local",
    jobs: Annotated[int, typer.Option(help="Points at once. \\[default: local 1; ray: as many as the resources allow]", show_default=False, rich_help_panel=Execution)] = 0,
    address: Annotated[str, typer.Option(help="Ray cluster to join: auto or HOST:PORT (results folder on shared storage). \\[default: a local instance]", show_default=False, rich_help_panel=Execution)] = "",
    cpus_per_run: Annotated[int, typer.Option(help="Ray: CPUs each point reserves (and its torch threads).", rich_help_panel=Execution)] = 1,
    gpus_per_run: Annotated[float, typer.Option(help="Ray: GPUs each point reserves; fractions share a GPU (0.25: four points per GPU).", rich_help_panel=Execution)] = 0.0,
    retries: Annotated[int, typer.Option(help="Ray: attempts after a crash or a lost worker, each resuming from the point's checkpoint.", rich_help_panel=Execution)] = 2,
    checkpoint_every: CheckpointEvery = 0,
    keep_checkpoint: KeepCheckpoint = False,
    extend_from: ExtendFrom = None,
    log_to: Annotated[Optional[str], typer.Option(help="Also write each run to a tracker as it finishes: tensorboard (runs/<run id>) or mlflow (MLFLOW_TRACKING_URI, else runs/mlflow.db).", show_default=False, rich_help_panel=Execution)] = None,
) -> None:
    """Run every point of a benchmark suite once, locally (reused worker processes) or on Ray.

    Resumable: after an interruption (Ctrl-C, kill, crash) run the same command again; finished runs are
    skipped and an unfinished one resumes from its checkpoint. Example: dpfl-bench sweep benchmarks/smoke.toml
    """
    with _user_errors():
        from dpfl_bench.checkpoint import CheckpointConfig
        from dpfl_bench.execution import ExecutionConfig, create_backend
        from dpfl_bench.federated import check_extend_from, writable_folder
        from dpfl_bench.sweep import estimate_seconds, is_finished, load_suite, probe_seconds_per_round, rounds_done, select_points

        if log_to is not None:
            from dpfl_bench.trackers import check_tracker

            check_tracker(log_to)
        execution = ExecutionConfig(
            backend=backend, jobs=jobs, address=address, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run,
            retries=retries, checkpointing=CheckpointConfig(every=checkpoint_every, keep=keep_checkpoint, extend_from=str(extend_from or "")),
        )
        if extend_from is not None:
            check_extend_from(extend_from)
        loaded = load_suite(suite, out)
        everything = loaded.points
        if where:
            loaded = dataclasses.replace(loaded, points=select_points(loaded.points, _key_values(where, "--where")))
        saved = [rounds_done(config) for config in loaded.points]
        todo = [c for c, r in zip(loaded.points, saved) if r < c.federated.rounds]
        selected = f" (of {len(everything)}, by --where)" if where else ""
        console.print(
            f"[bold]{suite}[/]: {len(loaded.points)} runs{selected}, {len(loaded.points) - len(todo)} finished, "
            f"{len(todo)} to run · results in {loaded.out}"
        )
        if dry_run:
            if loaded.description:
                console.print(loaded.description, highlight=False)
            console.print(_grid_table(loaded, saved))
            if todo:
                estimate = estimate_seconds(loaded.points, measured=everything, checkpointing=execution.checkpointing)
                parallel = max(jobs, 1)
                if estimate is None and not probe:
                    console.print("time: no run of this suite has saved a round yet; add --probe to time one round of its first point")
                elif estimate is None:
                    per_round = probe_seconds_per_round(todo[0])
                    hours = per_round * sum(c.federated.rounds for c in todo) / 3600 / parallel
                    console.print(f"time left: about {hours:.1f} h with --jobs {parallel}, from a one-round probe of the first "
                                  f"point ({per_round:.1f} s with start-up and evaluation: an upper estimate; no run of this "
                                  "suite has saved a round yet)")
                else:
                    seconds, runs = estimate
                    hours = seconds / 3600 / parallel
                    copied = ", less the rounds --extend-from copies" if extend_from else ""
                    console.print(f"time left: about {hours:.1f} h with --jobs {parallel}, at the seconds per round of the "
                                  f"{runs} runs saved so far (wall time, evaluation included, on the machine they ran on{copied})")
            return
        if not todo:
            console.print(f"nothing to run · compare the results: dpfl-bench compare {loaded.out}")
            return
        writable_folder(loaded.out)
        runner = create_backend(execution)  # before the bars: a missing Ray is one line
        started = time.perf_counter()
        on_terminate = signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the sweep as Ctrl-C does
        try:
            with progress_bars(console) as progress:
                tracker = SweepProgress(progress, todo, loaded.varying, len(loaded.points))
                runner.run(todo, _logging_to(log_to, todo, tracker) if log_to else tracker)
        except KeyboardInterrupt:
            done = sum(is_finished(c) for c in loaded.points)
            errors.print(
                f"[yellow]interrupted[/]: {done} of {len(loaded.points)} runs finished; "
                "run the same command again to resume (unfinished runs continue from their checkpoints)"
            )
            raise typer.Exit(130)
        finally:
            signal.signal(signal.SIGTERM, on_terminate)
        if tracker.failed:
            table = Table("run", "error", title=f"{len(tracker.failed)} of {len(todo)} runs failed")
            for name, message in tracker.failed:
                table.add_row(name, escape(message))
            errors.print(table)
            raise typer.Exit(1)
        minutes = (time.perf_counter() - started) / 60
        console.print(f"all {len(loaded.points)} runs finished ({len(todo)} in {minutes:.1f} min) · compare them: dpfl-bench compare {loaded.out}")


@app.command()
def runs(
    results: Annotated[Path, typer.Argument(help="Folder of results files, searched recursively, or one file.")] = Path("results"),
    where: Annotated[Optional[list[str]], typer.Option(help="Keep the runs whose COLUMN equals VALUE (repeatable), e.g. method=la-lora, finished=false.", show_default=False)] = None,
    format: Annotated[str, typer.Option("--format", help="table or csv.")] = "table",
) -> None:
    """List the runs in a results folder, finished or not: task, method, regime, seed, key options, rounds
    done of planned, last test accuracy, ε spent, and how much validation accuracy still rose at the end
    (late gain: the mean over the last fifth of the rounds less that over the fifth before; under 0.01, a
    point of accuracy, reads as converged). Example: dpfl-bench runs results/ --where finished=false
    """
    with _user_errors():
        from dpfl_bench.compare import RUN_COLUMNS, list_runs

        if format not in ("table", "csv"):
            raise UserError(f"--format must be table or csv, got {format!r}")
        listed, warnings = list_runs(results)
        for column, value in _key_values(where or [], "--where").items():
            if column not in RUN_COLUMNS:
                raise UserError(f"--where {column}: not a column of this list; use one of {', '.join(RUN_COLUMNS)}")
            listed = listed[listed[column].astype(str).str.lower() == value.lower()]
        for warning in warnings:
            errors.print(f"[yellow]warning[/]: {escape(warning)}", highlight=False)
        if format == "csv":
            print(listed.to_csv(index=False), end="")
            return
        headers = {"local_steps": "K", "batch_size": "batch", "finished": "done", "test_accuracy": "test acc",
                   "late_gain": "late gain", "eps_spent": "ε spent"}
        shown = [c for c in RUN_COLUMNS if c != "run_id"]  # in the csv; too long for a terminal's table
        figures = {"test_accuracy": "{:.4f}", "eps_spent": "{:.4f}", "late_gain": "{:+.4f}"}
        cells = {k: ["–" if k in figures and math.isnan(v) else figures[k].format(v) if k in figures
                     else escape(f"{v:g}" if isinstance(v, float) else str(v)) for v in listed[k]] for k in shown}
        words = ("task", "method", "regime")  # may fold on a narrow terminal; figures are never cut
        widths = {k: min(max(map(len, [headers.get(k, k), *cells[k]])), 7 if k in words else 99) for k in shown}
        left_out = []
        for k in ("batch_size", "local_steps", "rank", "finished", "late_gain"):  # what a narrow terminal can do without
            if sum(w + 3 for w in widths.values()) <= console.width:  # padding and the space between
                break
            left_out.append(headers.get(k, k))
            del widths[k]
        note = f" ({', '.join(left_out)}: in --format csv)" if left_out else ""
        table = Table(title=f"{len(listed)} runs in {results}{note}", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
        for k, width in widths.items():
            table.add_column(headers.get(k, k), overflow="fold", no_wrap=k not in words, min_width=width)
        for i in range(len(listed)):
            table.add_row(*(cells[k][i] for k in widths))
        console.print(table)


@app.command()
def export(
    results: Annotated[Path, typer.Argument(help="Folder of results files, searched recursively, or one file.")] = Path("results"),
    to: Annotated[str, typer.Option(help="The tracker: tensorboard or mlflow.")] = "tensorboard",
    out: Annotated[Path, typer.Option(help="Where the tracker's files go: one TensorBoard run per run id, or MLflow's mlflow.db (unless MLFLOW_TRACKING_URI is set).")] = Path("runs"),
) -> None:
    """Export runs, finished or not, to an experiment tracker: each evaluated round's figures as series, the
    options as hyperparameters, the regime and guarantee as text or tags. Then: tensorboard --logdir runs, or
    mlflow ui --backend-store-uri sqlite:///runs/mlflow.db
    """
    with _user_errors():
        from dpfl_bench.compare import list_runs, results_files
        from dpfl_bench.federated import writable_folder
        from dpfl_bench.results import read_run
        from dpfl_bench.trackers import check_tracker, export_runs, view_command

        check_tracker(to)
        listed, warnings = list_runs(results)
        for warning in warnings:
            errors.print(f"[yellow]warning[/]: {escape(warning)}", highlight=False)
        files = [path for path in results_files(results) if path.stem in set(listed["run_id"])]
        rows = {path.stem: read_run(path).to_dict("records") for path in files}
        export_runs(rows, to, writable_folder(out, "--out"))
        console.print(f"{len(rows)} runs exported to {out} · view them: {view_command(to, out)}")


@app.command()
def compare(
    results: Annotated[Path, typer.Argument(help="Folder of results files, searched recursively, or one file.")] = Path("results"),
    metric: Annotated[str, typer.Option(help="Any numeric results column, e.g. test_accuracy, eps_spent, seconds_per_round.")] = "test_accuracy",
    by: Annotated[str, typer.Option(help="What a table's rows are: results columns or run options, comma-separated, e.g. method,rank.")] = "method",
    format: Annotated[str, typer.Option("--format", help="table, markdown, csv or json (csv and json: one line per cell).")] = "table",
    plot: Annotated[Optional[Path], typer.Option(help="Also draw the metric against round (a panel per privacy regime) and the final metric against regime, to this .png, .pdf or .svg file.", show_default=False)] = None,
    select: Annotated[str, typer.Option(help="Run options to tune per cell, comma-separated, e.g. lr or lr,smooth_sigma: each cell keeps the value with the best mean final val_accuracy (ties: the smaller) and reports its --metric.")] = "",
    baseline: Annotated[Optional[str], typer.Option(help="The method each LA-LoRA variant's gain row is measured against, e.g. dp-lora, or `la-lora (no filter)` to measure the filter. \\[default: each column's best method other than LA-LoRA, on the seeds they all ran, named in each cell]", show_default=False)] = None,
) -> None:
    """Compare finished runs: per task, methods × privacy regime, each cell the final metric's mean ± std over seeds.

    Columns: accounted ε ascending, then ε=∞ (no DP), then regimes without a guarantee (the authors' σ).
    The best cell of each column is highlighted; under the table a row per LA-LoRA variant gives its gain over
    the column's best method other than LA-LoRA (or --baseline), paired by seed, with a 95% interval.
    Example: dpfl-bench compare results/ --select lr --plot comparison.png
    """
    with _user_errors():
        from dpfl_bench import compare as summary_of

        if format not in ("table", "markdown", "csv", "json"):
            raise UserError(f"--format must be table, markdown, csv or json, got {format!r}")
        if plot is not None:
            _check_plot_path(plot)
        loaded, finals, columns, selected, summary, gains, tables = _compared(results, metric, by, select, baseline)
        if format == "table":
            for table in summary_of.to_rich(tables, metric):
                console.print(table)
        elif format == "markdown":
            console.print(summary_of.to_markdown(tables, metric), markup=False, highlight=False, soft_wrap=True)
        elif format == "csv":
            print(summary_of.to_records(summary, gains).to_csv(index=False), end="")
        else:
            print(summary_of.to_records(summary, gains).to_json(orient="records", indent=1, force_ascii=False))
        if plot:
            from dpfl_bench.plots import plot_comparison

            plot_comparison(loaded.rows, finals, metric, columns, plot, selected)
            errors.print(f"plot written to {plot}")


@app.command()
def report(
    results: Annotated[Path, typer.Argument(help="Folder of results files, searched recursively, or one file.")] = Path("results"),
    output: Annotated[Path, typer.Option("-o", "--output", help="The HTML file to write.")] = Path("report.html"),
    metric: Annotated[str, typer.Option(help="As for compare.")] = "test_accuracy",
    by: Annotated[str, typer.Option(help="As for compare.")] = "method",
    select: Annotated[str, typer.Option(help="As for compare: run options to tune per cell on validation accuracy.")] = "",
    baseline: Annotated[Optional[str], typer.Option(help="As for compare.", show_default=False)] = None,
) -> None:
    """One self-contained HTML file (no network): the comparison tables with intervals, the figure, every
    run's privacy and audit figures and its configuration. Example: dpfl-bench report results/ -o report.html
    """
    with _user_errors():
        from dpfl_bench.report import write_report

        if output.suffix.lower() not in (".html", ".htm"):
            raise UserError(f"-o {output}: the report is HTML; name a .html file")
        from dpfl_bench.federated import writable_folder

        writable_folder(output.parent, "-o's folder")
        loaded, finals, columns, selected, _, _, tables = _compared(results, metric, by, select, baseline)
        write_report(output, loaded, finals, tables, metric, columns, selected, results)
        errors.print(f"report written to {output} ({output.stat().st_size / 1e3:.0f} kB)")


@app.command()
def check(
    results: Annotated[Path, typer.Argument(help="Folder of results files, searched recursively.", show_default=False)],
    reference: Annotated[Path, typer.Option(help="Reference results: the last row of each reference run.", show_default=False)],
    tolerance: Annotated[float, typer.Option(help="How far below the reference's final accuracy a run may fall.")] = 0.03,
    update_reference: Annotated[bool, typer.Option("--update-reference", help="Write these results as the new reference instead of checking.")] = False,
) -> None:
    """CI regression gate: compare finished runs with reference results; exit 1 with a table of what fell short.

    A reference run that is missing or unfinished, a final accuracy more than --tolerance below the
    reference's, ε spent above its target, or a NaN test loss fails the check.

    Example: dpfl-bench check results/smoke --reference benchmarks/reference/smoke.parquet
    """
    with _user_errors():
        from dpfl_bench.check import check_runs
        from dpfl_bench.results import SCHEMA, read_run, write_rows

        if not 0 <= tolerance < 1:
            raise UserError(f"--tolerance must be in [0, 1), got {tolerance}")
        loaded = _load_results(results)
        if update_reference:
            if loaded.warnings or not loaded.finals["test_accuracy"].notna().all():
                raise UserError(f"a reference must come from finished, finite runs only; fix or remove what is warned about in {results}")
            write_rows(loaded.finals[SCHEMA.names].to_dict("records"), reference)
            console.print(f"reference written: {reference} ({len(loaded.finals)} runs)")
            return
        fix = f"write one with `dpfl-bench check {results} --reference {reference} --update-reference`"
        if not reference.is_file():
            raise UserError(f"reference {reference} does not exist; {fix}")
        try:
            expected = read_run(reference)
        except Exception as e:
            raise UserError(f"reference {reference} cannot be read ({type(e).__name__}); {fix}") from None
        shortfalls = check_runs(loaded, expected, tolerance)
        if shortfalls:
            table = Table("run", "problem", "expected", "got", title=f"check failed: {len(shortfalls)} problems")
            for s in shortfalls:
                table.add_row(s.run, f"[red]{s.problem}[/]", s.expected, s.got)
            console.print(table)
            raise typer.Exit(1)
        console.print(
            f"[green]check passed[/]: {len(expected)} reference runs present, each within {tolerance:g} of its "
            f"reference accuracy; {len(loaded.finals)} runs within their ε and finite"
        )


def _logging_to(tracker_name: str, points: list, on_event: Any) -> Any:
    """`on_event`, and each finished point's rows written to the tracker (the sweep's workers report only
    headlines, so the rows are read from the point's results file)."""
    from dpfl_bench.federated import results_path
    from dpfl_bench.results import read_run
    from dpfl_bench.trackers import export_runs

    def on(event: Any) -> None:
        on_event(event)
        if event.kind == "finished":
            path = results_path(points[event.point])
            export_runs({path.stem: read_run(path).to_dict("records")}, tracker_name, Path("runs"))

    return on


def _compared(results: Path, metric: str, by: str, select: str, baseline: str | None) -> tuple:
    """What `compare` and `report` show: the runs, the chosen ones, the summary, the gains and the tables;
    a warning when a cell averages runs that differ in more than their seed."""
    from dpfl_bench import compare as summary_of

    columns = [c.strip() for c in by.split(",") if c.strip()]
    if not columns:
        raise UserError("--by needs at least one column, e.g. --by method")
    loaded = _load_results(results)
    finals, selected = loaded.finals, []
    summary_of.check_columns(finals, metric, columns)
    if baseline is not None:
        summary_of.check_baseline(finals, baseline, columns)
    options = [o.strip() for o in select.split(",") if o.strip()]
    if options:
        finals, selected = summary_of.select_best(finals, options, columns)
    summary = summary_of.summarize(finals, metric, columns, selected)
    mixed = summary_of.mixed_options(finals, columns)
    if mixed:
        errors.print(
            f"[yellow]warning[/]: some cells average runs that differ in {', '.join(mixed)}; "
            f"to separate them use --by {','.join([*columns, mixed[0]])} (or choose one per cell with --select {mixed[0]})",
            highlight=False,
        )
    gains = summary_of.paired_gains(finals, summary, metric, columns, baseline)
    tables = summary_of.pivots(summary, metric, columns, gains, selected, baseline)
    return loaded, finals, columns, selected, summary, gains, tables


def _check_plot_path(path: Path) -> None:
    if path.suffix.lower() not in PLOT_FORMATS:
        raise UserError(f"--plot {path}: give a file name ending in {', '.join(PLOT_FORMATS)}")
    from dpfl_bench.federated import writable_folder

    writable_folder(path.parent, "--plot's folder")


def _print_preset(options: dict[str, Any], method: str) -> None:
    """What a preset among `options` set, and which of its values the other options replaced."""
    if "preset" in options:
        from dpfl_bench.presets import PRESETS

        given = {k.replace("_", "-") for k in options if k not in ("preset", "method_options")}
        given |= {f"{method}.{k.replace('-', '_')}" for k in options.get("method_options", {})}
        console.print(PRESETS.get(options["preset"]).describe(given, method), highlight=False)


def _note(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    errors.print(f"[yellow]note[/]: {escape(str(message))}", highlight=False, soft_wrap=True)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _load_results(folder: Path) -> Any:
    from dpfl_bench.compare import load_results

    loaded = load_results(folder)
    for warning in loaded.warnings:
        errors.print(f"[yellow]warning[/]: {escape(warning)}", highlight=False, soft_wrap=True)
    if loaded.finals.empty:
        raise UserError(f"no finished runs under {folder}" + (f" ({len(loaded.warnings)} files skipped)" if loaded.warnings else ""))
    return loaded








def _grid_table(loaded: Any, saved: list[int]) -> Table:
    from dpfl_bench.federated import run_id

    table = Table("#", "run", "status", "run id")
    for i, (config, rounds) in enumerate(zip(loaded.points, saved), 1):
        total = config.federated.rounds
        status = "[green]finished[/]" if rounds >= total else f"[yellow]round {rounds} of {total}[/]" if rounds else "to run"
        table.add_row(str(i), run_label(config, loaded.varying), status, run_id(config))
    return table


def _key_values(pairs: list[str], option: str) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"{option} takes KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out






def _print_summary(summary: Any) -> None:
    last = summary.rows[-1]
    table = Table(title="run finished", show_header=False)
    table.add_row("task · method", f"{last['task']} · {last['method']}")
    table.add_row("test accuracy", f"{last['test_accuracy']:.4f} after {last['round']} rounds (validation {last['val_accuracy']:.4f})")
    if last["guarantee"]:
        table.add_row("ε spent", f"{last['eps_spent']:.3f} of {last['eps_target']:g} (δ={last['delta']:g})")
        low, high = last["noise_multiplier_min"], last["noise_multiplier"]
        sigma = f"{high:.4f}" if math.isclose(low, high, rel_tol=1e-9) else f"{low:.4f}–{high:.4f} across clients"
        table.add_row("noise multiplier σ", f"{sigma} (clip {last['clip']:g}, {last['dp_level']} level, {last['rng']} rng)")
    elif math.isnan(last["eps_target"]):
        table.add_row("ε spent", f"[red]no privacy guarantee[/]: the {last['dp_level']} regime has no accountant")
        table.add_row("noise", f"as much as σ = {last['noise_multiplier']:.2g} would be against a per-example sensitivity (calibrated DP-SGD needs σ ≈ 1 or more)")
    else:
        table.add_row("ε spent", "∞ ([red]non-private: no privacy guarantee[/])")
    if last["audit_canaries"]:
        accounted = f"{last['eps_spent']:.3f}" if last["guarantee"] else "none (no guarantee)"
        table.add_row(
            "audit",
            f"ε ≥ {last['audit_eps_lower']:.3f} (95% lower bound; {last['audit_eps_lower_fdp']:.3f} if the trade-off curve is "
            f"Gaussian), ≈ {last['audit_eps_estimate']:.3f} (Gaussian fit) from {last['audit_canaries']} canaries; "
            f"accounted ε {accounted}",
        )
    table.add_row("time", f"{last['wall_seconds']:.1f} s ({last['train_seconds'] / last['round']:.1f} s training per round)")
    table.add_row("results", str(summary.path))
    console.print(table)


class _user_errors:
    """Turn a UserError into one red line and exit code 1; Ctrl-C into a short note and exit code 130."""

    def __init__(self, interrupted: str = "stopped before finishing") -> None:
        self.interrupted = interrupted

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, tb: Any) -> bool:
        if isinstance(error, UserError):
            errors.print(f"[red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)  # [..] is text
            raise typer.Exit(1)
        if isinstance(error, KeyboardInterrupt):
            errors.print(f"[yellow]interrupted[/]: {self.interrupted}")
            raise typer.Exit(130)
        return False
