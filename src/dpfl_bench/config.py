"""Run configuration: one frozen dataclass per concern, and the TOML files options come from.

Every option has one flat name, the same on the command line (`--local-steps`) and in a TOML file
(`local-steps = 10`). Each dataclass checks its own values (a one-line `UserError`); `configure.build_config`
layers defaults, a task's defaults, a preset, TOML and flags, and checks what needs the registries (methods,
mechanisms, tasks). This module imports none of them, so everything may import it.
"""

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from dpfl_bench.errors import UserError

RNG_MODES = ("seeded", "secure")  # privacy.randomness: a seeded generator, or OS-keyed ChaCha20


def require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


@dataclass(frozen=True)
class FederatedConfig:
    clients: int = 4
    participation: float = 0.5  # fraction of clients sampled each round
    rounds: int = 5
    local_steps: int = 10  # optimizer steps each sampled client runs per round
    partition: str = "iid"  # iid | dirichlet (each class split across clients) | dirichlet-mix (each client's class mix)
    dirichlet_alpha: float = 0.5  # label skew; smaller is more skewed
    min_partition_size: int = 10
    client_size: int = 0  # training examples per client (iid, dirichlet-mix); 0: split the whole training set
    weighting: str = "uniform"  # FedAvg weights: uniform | size
    client_selection: str = "random"  # random: a fresh draw of clients each round | first: the same first ones
    head: str = "shared"  # shared: averaged with the adapters | local: each client keeps its own | reset: never kept

    def __post_init__(self) -> None:
        require(self.clients >= 1, f"--clients must be at least 1, got {self.clients}")
        require(0 < self.participation <= 1, f"--participation must be in (0, 1], got {self.participation}")
        require(self.rounds >= 1, f"--rounds must be at least 1, got {self.rounds}")
        require(self.local_steps >= 1, f"--local-steps must be at least 1, got {self.local_steps}")
        require(
            self.partition in ("iid", "dirichlet", "dirichlet-mix"),
            f"--partition must be iid, dirichlet or dirichlet-mix, got {self.partition!r}",
        )
        require(self.dirichlet_alpha > 0, f"--dirichlet-alpha must be > 0, got {self.dirichlet_alpha}")
        require(self.min_partition_size >= 1, f"--min-partition-size must be at least 1, got {self.min_partition_size}")
        require(self.client_size >= 0, f"--client-size must be 0 (split the whole training set) or more, got {self.client_size}")
        require(
            not (self.client_size and self.partition == "dirichlet"),
            f"--client-size {self.client_size} does not apply to --partition dirichlet, which splits every class across "
            "all clients; for equal clients with Dirichlet label skew use --partition dirichlet-mix",
        )
        require(self.weighting in ("uniform", "size"), f"--weighting must be uniform or size, got {self.weighting!r}")
        require(self.client_selection in ("random", "first"), f"--client-selection must be random or first, got {self.client_selection!r}")
        require(self.head in ("shared", "local", "reset"), f"--head must be shared, local or reset, got {self.head!r}")


@dataclass(frozen=True)
class TrainingConfig:
    batch_size: int = 32  # expected batch size (Poisson-sampled under sample-level DP)
    lr: float = 1e-3
    optimizer: str = "adamw"  # adamw | sgd
    eval_every: int = 1  # evaluate the global model every this many rounds (and always after the last)
    physical_batch_size: int = 0  # examples per forward pass (0: `physical_batch`); larger batches are split, same math
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast of the forward pass; privacy arithmetic stays fp32
    weight_decay: float = 0.0  # the optimizer's (decoupled for AdamW); the authors' code: SGD 1e-3, AdamW 1e-2
    lr_decay: float = 1.0  # the learning rate of round t is lr · lr_decay^t (the authors' vision code: 0.99)
    client_batching: str = "auto"  # on | off | auto: a round's clients in one pass when the model allows it
    batch_order: str = "fresh"  # fresh: each step draws its batch anew | epoch: a round's steps walk shuffled epochs

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        require(0 < self.lr < math.inf, f"--lr must be a number > 0, got {self.lr}")
        require(self.optimizer in ("adamw", "sgd"), f"--optimizer must be adamw or sgd, got {self.optimizer!r}")
        require(self.eval_every >= 1, f"--eval-every must be at least 1, got {self.eval_every}")
        require(self.physical_batch_size >= 0, f"--physical-batch-size must be 0 (automatic) or more, got {self.physical_batch_size}")
        require(self.precision in ("fp32", "bf16", "fp16"), f"--precision must be fp32, bf16 or fp16, got {self.precision!r}")
        require(0 <= self.weight_decay < math.inf, f"--weight-decay must be a number ≥ 0, got {self.weight_decay}")
        require(0 < self.lr_decay <= 1, f"--lr-decay must be in (0, 1] (a per-round multiplier), got {self.lr_decay}")
        require(self.client_batching in ("auto", "on", "off"), f"--client-batching must be auto, on or off, got {self.client_batching!r}")
        require(self.batch_order in ("fresh", "epoch"), f"--batch-order must be fresh or epoch, got {self.batch_order!r}")

    def physical_batch(self, device_type: str, clients: int = 1) -> int:
        """--physical-batch-size, or by default twice the expected batch of each of the `clients` trained in
        one pass: a Poisson batch exceeds its mean nearly half the time, and a pass for the few examples over
        would cost a second forward and backward. On a CPU at most 32 per client and 64 a pass, where bigger
        passes are slower (`benchmarks/client_batching.py`: MiniLM 2.7x slower at 256 than at 64); on CUDA
        an out-of-memory error halves it."""
        if self.physical_batch_size:
            return self.physical_batch_size
        if device_type == "cuda":
            return 2 * self.batch_size * clients
        return min(min(2 * self.batch_size, 32) * clients, 64)

    def lr_at(self, round: int) -> float:
        return self.lr * self.lr_decay**round


@dataclass(frozen=True)
class AdapterConfig:
    rank: int = 8
    lora_alpha: float = 16.0  # LoRA scale is lora_alpha / rank
    lora_targets: str = ""  # comma-separated module-name suffixes; empty: chosen for the model's architecture
    lora_dropout: float = 0.0  # dropout on the adapters' input (the authors' code: 0.05); drawn per example

    def __post_init__(self) -> None:
        require(self.rank >= 1, f"--rank must be at least 1, got {self.rank}")
        require(0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        require(self.lora_alpha > 0, f"--lora-alpha must be > 0, got {self.lora_alpha}")
        require(
            all(self.targets),
            f"--lora-targets takes module-name suffixes separated by commas, e.g. query,value; got {self.lora_targets!r}",
        )

    @property
    def targets(self) -> tuple[str, ...]:
        """The --lora-targets override, empty when the model's architecture decides."""
        return tuple(t.strip() for t in self.lora_targets.split(",")) if self.lora_targets.strip() else ()


@dataclass(frozen=True)
class SourcesConfig:
    """Where the task's model and data come from (the Hugging Face hub by default, or local copies), and how
    its images reach the model."""

    model: str = ""  # empty: the task's default model; else hf:<id-or-path> or timm:<name>
    model_path: str = ""  # local weights: a save_pretrained folder (hf) or a checkpoint file (timm)
    data_dir: str = ""  # local mirror of the data: save_to_disk folder, imagefolder or Parquet files
    workers: int = 0  # processes that decode or tokenize the data once at load (0: this process)
    # Image tasks: the fraction of the resized image a center crop keeps (timm's crop_pct); 1: resize straight
    # to the model's input. The authors' code resizes to 256 and crops 224: 0.875.
    center_crop: float = 1.0

    def __post_init__(self) -> None:
        kind, _, name = self.model.partition(":")
        require(
            not self.model or (kind in ("hf", "timm") and name.strip() != ""),
            f"--model must be hf:<id-or-path> or timm:<name>, e.g. timm:vit_base_patch16_224; got {self.model!r}",
        )
        require(
            not self.model_path or Path(self.model_path).exists(),
            f"--model-path {self.model_path} does not exist; give a save_pretrained folder (hf) or a checkpoint file (timm)",
        )
        require(
            not self.data_dir or Path(self.data_dir).is_dir(),
            f"--data-dir {self.data_dir} is not a folder; give a save_to_disk folder, an imagefolder or a folder of Parquet files",
        )
        require(self.workers >= 0, f"--workers must be 0 or more, got {self.workers}")
        require(0 < self.center_crop <= 1, f"--center-crop must be in (0, 1] (1: no crop; 256→224: 0.875), got {self.center_crop}")

    @property
    def given(self) -> list[str]:
        """The options that say where a model or data come from, set away from their defaults, as flags (for
        tasks that bring their own)."""
        return [
            f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(self)
            if f.name != "center_crop" and getattr(self, f.name) != f.default
        ]


@dataclass(frozen=True)
class PrivacyConfig:
    eps: float = 1.0  # target ε; inf trains without privacy; NaN for a level without an accountant (authors)
    delta: float = 1e-5
    dp_level: str = "sample"  # a privacy mechanism: sample (DP-SGD in every client) | client (DP-FedAvg) | authors
    clip: float = 1.0  # clipping norm C: per example (sample level) or per client update (client level)
    accountant: str = "rdp"  # rdp | prv
    rng: str = "seeded"  # seeded (reproducible from --seed) | secure (OS-keyed ChaCha20 for every privacy draw)
    calibration: str = "per-client"  # per-client: each client its own smallest σ_k | shared: the worst client's σ for all
    dp_sigma: float = 0.2  # the authors' regime only: noise std dp_sigma·C/B on the batch mean (no guarantee)

    def __post_init__(self) -> None:
        require(0 < self.delta < 1, f"--delta must be in (0, 1), got {self.delta}")
        require(0 < self.clip < math.inf, f"--clip must be a number > 0, got {self.clip}")
        require(self.accountant in ("rdp", "prv"), f"--accountant must be rdp or prv, got {self.accountant!r}")
        require(self.rng in RNG_MODES, f"--rng must be {' or '.join(RNG_MODES)}, got {self.rng!r}")
        require(self.calibration in ("per-client", "shared"), f"--calibration must be per-client or shared, got {self.calibration!r}")
        require(0 < self.dp_sigma < math.inf, f"--dp-sigma must be a number > 0, got {self.dp_sigma}")

    @property
    def accounted(self) -> bool:
        """Whether the run is backed by an accounted (ε, δ) guarantee."""
        return math.isfinite(self.eps)

    @property
    def regime(self) -> str:
        """The privacy regime in a run id: eps1, epsinf, or the unaccounted level with its noise."""
        return f"eps{self.eps:g}" if not math.isnan(self.eps) else f"{self.dp_level}-sigma{self.dp_sigma:g}"


@dataclass(frozen=True)
class AuditConfig:
    """The empirical privacy audit: canaries inserted into training, scored against what it released."""

    audit_canaries: int = 0  # M canaries (0: no audit); each inserted with probability 1/2
    audit_client: int = 0  # sample level: the client whose dataset gets the canary examples

    def __post_init__(self) -> None:
        require(self.audit_canaries >= 0, f"--audit-canaries must be 0 (no audit) or more, got {self.audit_canaries}")
        require(self.audit_client >= 0, f"--audit-client must be a client number, 0 or more, got {self.audit_client}")


@dataclass(frozen=True)
class RunConfig:
    task: str = "fashion"
    method: str = "la-lora"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    out: str = "results"
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    sources: SourcesConfig = field(default_factory=SourcesConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    method_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(self.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {self.device!r}")
        require(0 <= self.seed < 2**63, f"--seed must be in [0, 2^63), got {self.seed}")
        require(
            self.audit.audit_client < self.federated.clients,
            f"--audit-client {self.audit.audit_client} does not exist: the run has clients 0 to {self.federated.clients - 1}",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(_jsonable(self.to_dict()), sort_keys=True)

    def identity(self) -> dict[str, Any]:
        """What makes two runs the same run: everything but where results go, how many workers load the
        data and whether clients train one after another or together (none changes a result beyond float
        rounding)."""
        identity = {k: v for k, v in json.loads(self.to_json()).items() if k != "out"}
        identity["sources"] = {k: v for k, v in identity["sources"].items() if k != "workers"}
        identity["training"] = {k: v for k, v in identity["training"].items() if k != "client_batching"}
        for section, name in ADDED_IN_0_6:  # at their defaults, runs of 0.5 keep their ids (and references)
            if getattr(getattr(self, section), name) == getattr(SECTIONS[section], name):
                del identity[section][name]
        return identity


# Options added in 0.6, each defaulting to what 0.5 did.
ADDED_IN_0_6 = (
    ("federated", "client_selection"), ("federated", "head"), ("training", "batch_order"),
    ("adapter", "lora_dropout"), ("sources", "center_crop"),
)


def _jsonable(value: Any) -> Any:
    """inf and NaN are not JSON: write them as the strings "inf" and "nan", readable and reversible."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


SECTIONS: dict[str, type] = {
    "federated": FederatedConfig,
    "training": TrainingConfig,
    "adapter": AdapterConfig,
    "privacy": PrivacyConfig,
    "sources": SourcesConfig,
    "audit": AuditConfig,
}
_TOP_LEVEL = ("task", "method", "seed", "device", "out", "method_options")
PRESET = "preset"  # an option that stands for others (`presets.py`); not part of the resolved configuration


# The options a task may set for itself (`Task.defaults`); a test keeps this list true to the built-in tasks.
TASK_TUNED = (
    "clients", "participation", "partition", "dirichlet-alpha", "rounds", "local-steps", "batch-size", "lr", "rank",
    "lora-alpha", "eval-every",
)


def default_value(option: str) -> Any:
    """The default of a flat option (dashed or not), before any task, preset, file or flag."""
    name = option.replace("-", "_")
    for section in (RunConfig, *SECTIONS.values()):
        for f in dataclasses.fields(section):
            if f.name == name and f.default is not dataclasses.MISSING:
                return f.default
    raise KeyError(option)


def option_names() -> list[str]:
    """Every flat option name, as written in TOML and (with `--`) on the command line."""
    names = [*_TOP_LEVEL, PRESET]
    for section in SECTIONS.values():
        names += [f.name for f in dataclasses.fields(section)]
    return [n.replace("_", "-") for n in names]


def typed(flat: Mapping[str, Any], section: type) -> dict[str, Any]:
    """The options that belong to `section`, checked against its field types (ints may stand for floats)."""
    out = {}
    for f in dataclasses.fields(section):
        if f.name not in flat or f.name in SECTIONS:
            continue
        value, kind = flat[f.name], f.type
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        expected = dict if kind == Mapping[str, Any] else kind
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            wanted = {int: "an integer", float: "a number", str: "a string", dict: "a table"}[expected]
            raise UserError(f"option {f.name.replace('_', '-')} must be {wanted}, got {value!r}")
        out[f.name] = value
    return out


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file of flat options; a `[method-options]` table holds the method's own options."""
    data = read_toml(path, "config file")
    if "method-options" in data:
        data["method_options"] = data.pop("method-options")
        if not isinstance(data["method_options"], dict):
            raise UserError(f"config file {path}: [method-options] must be a table of key = value")
    normalise(data)
    return data


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file's contents; a missing, unreadable or invalid file is a one-line UserError."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} cannot be read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{what} {path} is not valid TOML: {e}") from None


def normalise(options: Mapping[str, Any]) -> dict[str, Any]:
    valid = set(option_names())
    out = {}
    for key, value in options.items():
        dashed = key.replace("_", "-")
        if dashed not in valid:
            raise UserError(f"unknown option {key!r}; valid options: {', '.join(sorted(valid))}")
        out[dashed.replace("-", "_")] = value
    return out
