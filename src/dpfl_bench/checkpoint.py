"""Resumable runs: what a run needs to go on after its last checkpointed round as if never stopped.

A checkpoint sits beside its results file (`<run id>.ckpt`) and holds the global adapters and head, the
clients' own heads (`--head local`), the mechanism's and the audit's running state, the rows so far and the run's counters. Nothing else is
needed: every random draw of round t comes from a stream derived afresh from (seed, purpose, t, client),
and torch's own generator is reseeded per client-round (see `privacy/randomness.py`), so a resumed run's
rows equal an uninterrupted run's in every column but the timings.

A `--rng secure` run is never checkpointed: its participation schedule and its ChaCha keys are secret and
live in memory only, so it starts over when interrupted.

A kept checkpoint (`--keep-checkpoint`) holds the final state, from which a longer run of the same
configuration can go on (`--extend-from`): where nothing of a round depends on how many rounds follow it
(see `federated._extension`), a run of 200 rounds begins with exactly the 100 of a run of 100.
"""

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

import dpfl_bench
from dpfl_bench.adapters import State
from dpfl_bench.config import RunConfig
from dpfl_bench.errors import UserError
from dpfl_bench.files import write_atomically

FORMAT = 2  # bumped when the checkpoint's layout changes


@dataclass(frozen=True)
class CheckpointConfig:
    """How a run is checkpointed and resumed. Not part of the run's identity: none of it changes a result."""

    every: int = 0  # rounds between checkpoints; 0: after every evaluated round
    keep: bool = False  # keep the final state once the run has finished
    restart: bool = False  # ignore an existing checkpoint and finished results: start over
    extend_from: str = ""  # a folder where a shorter run of the same configuration kept its checkpoint

    def __post_init__(self) -> None:
        if self.every < 0:
            raise UserError(f"--checkpoint-every must be 0 (every evaluated round) or more, got {self.every}")

    def due(self, rounds_done: int, evaluated: bool, rounds: int) -> bool:
        if rounds_done == rounds:
            return self.keep  # a finished run needs no checkpoint, unless it is kept
        return rounds_done % self.every == 0 if self.every else evaluated


@dataclass
class Checkpoint:
    rounds_done: int
    global_state: State
    rows: list[dict[str, Any]]
    mechanism: dict[str, Any]  # Mechanism.state()
    audit: dict[str, Any]  # the audit's state()
    wall_seconds: float
    train_seconds: float
    bytes_uploaded: float
    physical_batch_size: int  # after any out-of-memory halving
    client_states: dict[int, State]  # what each client keeps between rounds (its own head with --head local)


def checkpoint_path(results: Path) -> Path:
    return results.with_suffix(".ckpt")


def save_checkpoint(path: Path, checkpoint: Checkpoint, config: RunConfig) -> None:
    """Write atomically (a temporary file, then a rename): a run killed while saving keeps the old one."""
    payload = {
        "format": FORMAT,
        "version": dpfl_bench.__version__,
        "identity_json": json.dumps(config.identity(), sort_keys=True),
        "rounds_done": checkpoint.rounds_done,
        "global_state": {n: t.detach().cpu() for n, t in checkpoint.global_state.items()},
        "rows_json": json.dumps(checkpoint.rows),  # rows hold NaN and inf, which JSON (Python's) keeps
        "mechanism": checkpoint.mechanism,
        "audit": checkpoint.audit,
        "counters": [checkpoint.wall_seconds, checkpoint.train_seconds, checkpoint.bytes_uploaded],
        "physical_batch_size": checkpoint.physical_batch_size,
        "client_states": {str(k): {n: t.detach().cpu() for n, t in state.items()} for k, state in checkpoint.client_states.items()},
    }
    write_atomically(path, lambda file: torch.save(payload, file))


def load_checkpoint(path: Path, config: RunConfig) -> Checkpoint:
    """The checkpoint at `path`, refused in one line when it is damaged or from another configuration or version."""
    fix = f"run with --restart to start over (or delete {path})"
    payload = _read(path, fix)
    if payload["identity"] != config.identity():
        raise UserError(f"checkpoint {path} belongs to another configuration; {fix}")
    return _checkpoint(payload)


def find_shorter_run(candidates: Iterable[Path], config: RunConfig) -> tuple[tuple[Path, Checkpoint] | None, int]:
    """Among the checkpoints `candidates`, that of the run that is `config` but for fewer rounds, the one
    furthest on (None when there is none); and how many could not be read or are of another version."""
    wanted, found, unusable = _but_rounds(config.identity()), [], 0
    for path in candidates:
        try:
            payload = _read(path, "")
        except UserError:
            unusable += 1
            continue
        if payload["identity"]["federated"]["rounds"] < config.federated.rounds and _but_rounds(payload["identity"]) == wanted:
            found.append((payload["rounds_done"], path, payload))
    if not found:
        return None, unusable
    _, path, payload = max(found, key=lambda f: f[0])
    return (path, _checkpoint(payload)), unusable


def _but_rounds(identity: dict[str, Any]) -> dict[str, Any]:
    return {**identity, "federated": {k: v for k, v in identity["federated"].items() if k != "rounds"}}


def _read(path: Path, fix: str) -> dict[str, Any]:
    try:
        payload = torch.load(io.BytesIO(path.read_bytes()), weights_only=True)
        version, payload["identity"] = payload["version"], json.loads(payload["identity_json"])
    except Exception as e:
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}); {fix}") from None
    if payload.get("format") != FORMAT or version != dpfl_bench.__version__:
        raise UserError(f"checkpoint {path} was written by dpfl-bench {version}, this is {dpfl_bench.__version__}; {fix}")
    return payload


def _checkpoint(payload: dict[str, Any]) -> Checkpoint:
    wall, train, uploaded = payload["counters"]
    return Checkpoint(
        rounds_done=payload["rounds_done"],
        global_state=payload["global_state"],
        rows=json.loads(payload["rows_json"]),
        mechanism=payload["mechanism"],
        audit=payload["audit"],
        wall_seconds=wall,
        train_seconds=train,
        bytes_uploaded=uploaded,
        physical_batch_size=payload["physical_batch_size"],
        client_states={int(k): state for k, state in payload["client_states"].items()},
    )
