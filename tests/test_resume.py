"""Resumable runs: a run killed outright and run again finishes with exactly the rows of a run never
stopped; a finished run is not run again; a checkpoint that does not fit is refused in one line."""

import json
import os
import subprocess
import sys

import pytest
from support import assert_one_line_error, invoke

import dpfl_bench
from dpfl_bench.checkpoint import CheckpointConfig, checkpoint_path, load_checkpoint
from dpfl_bench.config import RunConfig
from dpfl_bench.configure import build_config
from dpfl_bench.errors import UserError
from dpfl_bench.federated import find_resume, results_path, run_federated, run_id
from dpfl_bench.results import read_run
from dpfl_bench.tasks import TASKS

TIMING = ["wall_seconds", "train_seconds", "peak_memory_bytes"]
BASE = {"task": "synthetic", "rounds": 5, "clients": 2, "participation": 1.0, "local-steps": 2}
KINDS = {  # each state a checkpoint must carry: audit sums, server noise, alternation, the authors' σ record,
    # the clients' own heads
    "sample-level-audited": {"audit-canaries": 50},
    "client-level-audited": {"dp-level": "client", "clients": 6, "participation": 0.5, "audit-canaries": 20},
    "non-private": {"eps": "inf"},
    "alternating-method": {"method": "rolora"},
    "authors-regime": {"dp-level": "authors"},
    "local-heads": {"head": "local", "clients": 3, "participation": 0.6},
    "server-hook": {"method": "fedsvd"},  # the broadcast re-factorizes what the checkpoint holds
    "middle-factor": {"method": "fed-sb"},  # R in the state; A and B from the weights, again on resume
}
KILL_AFTER_ROUND_2 = """
import json, os, signal, sys
from dpfl_bench.config import RunConfig
from dpfl_bench.configure import build_config
from dpfl_bench.federated import run_federated
from dpfl_bench.tasks import TASKS
config = build_config(json.loads(sys.argv[1]), TASKS.get("synthetic").defaults)
run_federated(config, on_round=lambda done, row: os.kill(os.getpid(), signal.SIGKILL) if done == 2 else None)
"""


def options(tmp_path, **extra) -> dict:
    merged = {**BASE, **extra, "out": str(tmp_path / "results")}
    return {k.replace("-", "_"): float(v) if v == "inf" else v for k, v in merged.items()}


def configure(opts: dict) -> RunConfig:
    """The configuration `dpfl-bench run` builds from these options (the task's defaults beneath them)."""
    return build_config(opts, TASKS.get("synthetic").defaults)


def flags(opts: dict) -> list[str]:
    return [part for k, v in opts.items() for part in (f"--{k.replace('_', '-')}", str(v))]


class Stop(Exception):
    pass


def stop_after(round: int):
    def on_round(done, row):
        if done == round:
            raise Stop

    return on_round


@pytest.mark.parametrize("kind", KINDS)
def test_a_run_killed_after_round_2_resumes_to_the_rows_of_an_uninterrupted_run(kind, tmp_path):
    opts = options(tmp_path, **KINDS[kind])
    config = configure(opts)
    path = results_path(config)
    expected = read_run(run_federated(config).path)
    path.rename(tmp_path / "uninterrupted.parquet")

    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_ROUND_2, json.dumps(opts)], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert checkpoint_path(path).exists() and read_run(path)["round"].max() == 2

    result = invoke("run", *flags(opts))
    assert result.exit_code == 0, result.output
    assert "resuming from round 2 of 5" in result.output
    resumed = read_run(path)
    assert resumed.drop(columns=TIMING).equals(expected.drop(columns=TIMING))
    assert not checkpoint_path(path).exists(), "a finished run removes its checkpoint"


@pytest.fixture
def interrupted(tmp_path):
    """A non-private run stopped by an exception after round 2 of 5: (options, its config)."""
    opts = options(tmp_path, eps="inf")
    config = configure(opts)
    with pytest.raises(Stop):
        run_federated(config, on_round=stop_after(2))
    assert checkpoint_path(results_path(config)).exists()
    return opts, config


def test_a_finished_run_is_not_run_again_and_restart_runs_it_again(tmp_path):
    opts = options(tmp_path, eps="inf")
    path = results_path(configure(opts))
    assert invoke("run", *flags(opts)).exit_code == 0
    written = path.stat().st_mtime_ns

    again = invoke("run", *flags(opts))
    assert again.exit_code == 0 and again.output.strip() == f"finished before: results in {path} (--restart runs it again)"
    assert path.stat().st_mtime_ns == written

    restarted = invoke("run", *flags(opts), "--restart")
    assert restarted.exit_code == 0 and "--restart: starting over" in restarted.output
    assert path.stat().st_mtime_ns != written


@pytest.mark.parametrize("damage", ["truncated", "foreign", "other-version"])
def test_a_damaged_or_foreign_checkpoint_is_refused_in_one_line_and_restart_ignores_it(damage, interrupted, tmp_path, monkeypatch):
    opts, config = interrupted
    saved = checkpoint_path(results_path(config))
    if damage == "truncated":
        saved.write_bytes(saved.read_bytes()[:100])
        expected = "cannot be read"
    elif damage == "foreign":  # another configuration's checkpoint under this run's name
        other = configure({**opts, "lr": 0.5})
        with pytest.raises(Stop):
            run_federated(other, on_round=stop_after(1))
        checkpoint_path(results_path(other)).replace(saved)
        expected = "belongs to another configuration"
    else:  # written by this version, read by another
        expected = f"was written by dpfl-bench {dpfl_bench.__version__}, this is 9.9.9"
        monkeypatch.setattr(dpfl_bench, "__version__", "9.9.9")

    line = assert_one_line_error(invoke("run", *flags(opts)), expected, "--restart")
    assert str(saved) in line
    result = invoke("run", *flags(opts), "--restart")
    assert result.exit_code == 0, result.output
    assert read_run(results_path(config))["round"].max() == 5


def test_checkpoint_every_n_rounds_and_keep_checkpoint(tmp_path):
    opts = options(tmp_path, eps="inf")
    config = configure(opts)
    with pytest.raises(Stop):  # evaluated every round, but checkpointed every second one
        run_federated(config, on_round=stop_after(3), checkpointing=CheckpointConfig(every=2))
    saved = checkpoint_path(results_path(config))
    assert load_checkpoint(saved, config).rounds_done == 2
    assert read_run(results_path(config))["round"].max() == 3

    result = invoke("run", *flags(opts), "--checkpoint-every", 2, "--keep-checkpoint")
    assert "resuming from round 2 of 5" in result.output
    assert read_run(results_path(config))["round"].tolist() == [1, 2, 3, 4, 5]
    assert load_checkpoint(saved, config).rounds_done == 5, "kept: the final state"


EXTENSIBLE = {  # no accountant: what a round does does not depend on how many follow it
    "non-private": KINDS["non-private"],
    "authors-preset-like": {**KINDS["authors-regime"], "batch-order": "epoch", "lr-decay": 0.9, "lora-dropout": 0.05},
    "local-heads": {**KINDS["local-heads"], "eps": "inf"},
    "server-hook": {**KINDS["server-hook"], "eps": "inf"},
    "alternating-method": {"method": "rolora", "eps": "inf"},  # its factor alternates by round
    "audited": {**KINDS["authors-regime"], "audit-canaries": 50},
}


@pytest.mark.parametrize("kind", EXTENSIBLE)
def test_a_run_extended_from_a_shorter_ones_kept_checkpoint_equals_a_run_of_that_length(kind, tmp_path):
    """3 rounds kept, then 6 from them: the rows of 6 rounds run from the start (evaluated every second
    round: the 3-round run's forced last evaluation is not one of them)."""
    long = options(tmp_path, **EXTENSIBLE[kind], rounds=6, eval_every=2)
    short = {**long, "rounds": 3, "out": str(tmp_path / "short")}
    config = configure(long)
    expected = read_run(run_federated(config).path)
    results_path(config).rename(tmp_path / "from-the-start.parquet")
    run_federated(configure(short), checkpointing=CheckpointConfig(keep=True))
    assert read_run(results_path(configure(short)))["round"].tolist() == [2, 3]

    result = invoke("run", *flags(long), "--extend-from", tmp_path / "short")
    assert result.exit_code == 0, result.output
    assert f"extending {checkpoint_path(results_path(configure(short)))} from round 3 to 6" in " ".join(result.output.split())
    extended = read_run(results_path(config))
    assert extended["round"].tolist() == [2, 4, 6]
    assert extended.drop(columns=TIMING).equals(expected.drop(columns=TIMING))


def test_an_accounted_run_is_not_extended_nor_one_from_a_run_as_long_and_each_says_why(tmp_path):
    for kept in (options(tmp_path / "accounted", rounds=2), options(tmp_path / "as-long", eps="inf")):
        run_federated(configure(kept), checkpointing=CheckpointConfig(keep=True))
    resume = find_resume(configure(options(tmp_path)), CheckpointConfig(extend_from=str(tmp_path / "accounted" / "results")))
    assert resume.checkpoint is None and "the noise is calibrated to the whole run" in resume.note
    as_long = CheckpointConfig(extend_from=str(tmp_path / "as-long" / "results"))
    resume = find_resume(configure(options(tmp_path, eps="inf")), as_long)
    assert resume.checkpoint is None and resume.note.startswith("no shorter run of this configuration kept in")
    resume = find_resume(configure(options(tmp_path, eps="inf", rounds=9)), as_long)
    assert resume.checkpoint is not None and resume.checkpoint.rounds_done == 5, "the 5-round run is shorter than 9"
    same_name = run_id(configure(options(tmp_path, eps="inf"))).rsplit("_", 1)[0]
    (tmp_path / "as-long" / "results" / f"{same_name}_0000000.ckpt").write_bytes(b"damaged")
    resume = find_resume(configure(options(tmp_path, eps="inf")), as_long)
    assert "(1 checkpoint(s) there unreadable or of another dpfl-bench version)" in resume.note


def test_extend_from_a_missing_folder_is_a_one_line_error_in_run_and_sweep(tmp_path):
    opts = options(tmp_path, eps="inf")
    assert_one_line_error(invoke("run", *flags(opts), "--extend-from", tmp_path / "nowhere"), "not a folder", "--extend-from")
    suite = tmp_path / "suite.toml"
    suite.write_text(f'out = "{tmp_path / "sweep"}"\n[base]\ntask = "synthetic"\nrounds = 1\n[grid]\nseed = [0, 1]\n')
    assert_one_line_error(invoke("sweep", suite, "--extend-from", tmp_path / "nowhere"), "not a folder", "--extend-from")


def test_a_secure_run_writes_no_checkpoint_and_starts_over(tmp_path):
    """Its participation and keys are secret and never written, so there is nothing to resume from."""
    opts = options(tmp_path, rng="secure")
    config = configure(opts)
    with pytest.raises(Stop):
        run_federated(config, on_round=stop_after(2))
    assert not checkpoint_path(results_path(config)).exists()
    result = invoke("run", *flags(opts))
    assert result.exit_code == 0 and "cannot resume (its keys are never written): starting over" in result.output


def test_a_negative_checkpoint_interval_is_refused(tmp_path):
    with pytest.raises(UserError, match="--checkpoint-every must be"):
        CheckpointConfig(every=-1)
    assert_one_line_error(invoke("run", "--task", "synthetic", "--checkpoint-every", -1), "--checkpoint-every must be 0")


def test_a_checkpoint_is_written_atomically_and_shared_as_the_results_are(interrupted):
    """No temporary file is left beside the results, whatever was interrupted; the checkpoint's permissions
    are the umask's, like the results file's (another worker of a cluster may resume it), not owner-only."""
    _, config = interrupted
    names = sorted(os.listdir(results_path(config).parent))
    assert names == sorted([results_path(config).name, checkpoint_path(results_path(config)).name])
    umask = os.umask(0)
    os.umask(umask)
    for path in (results_path(config), checkpoint_path(results_path(config))):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name
