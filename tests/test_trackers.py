"""Export to TensorBoard, read back with TensorBoard's own event reader: each evaluated round's figures as
series against the round, what the run is and whether it has a guarantee as text, its options as
hyperparameters; from finished results (`export`) and live from a run (`--log-to`)."""

import builtins

import pytest
from support import assert_user_error, invoke, write_run

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def events(folder):
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def text_of(accumulator, tag="run/text_summary") -> str:
    return accumulator.Tensors(tag)[0].tensor_proto.string_val[0].decode()


def test_export_writes_each_runs_series_its_description_and_its_options(tmp_path):
    results = tmp_path / "results"
    private = write_run(results, method="dp-lora", seed=0, accuracies=[0.5, 0.6, 0.7], eps=1.0)
    authors = write_run(results, method="la-lora", seed=0, accuracies=[0.8], dp_level="authors", dp_sigma=0.2)
    for _ in range(2):  # exporting again adds nothing
        result = invoke("export", results, "--out", tmp_path / "runs")
        assert result.exit_code == 0, result.output
    run = events(tmp_path / "runs" / private.stem)
    assert [(e.step, round(e.value, 6)) for e in run.Scalars("test_accuracy")] == [(1, 0.5), (2, 0.6), (3, 0.7)]
    assert [e.step for e in run.Scalars("eps_spent")] == [1, 2, 3]
    assert "an accounted (ε, δ) guarantee" in text_of(run)
    hparams = b"".join(run.PluginTagToContent("hparams").values())
    assert b"local_steps" in hparams and b"guarantee" in hparams  # the options, as hyperparameters
    unaccounted = events(tmp_path / "runs" / authors.stem)
    assert "NO privacy guarantee" in text_of(unaccounted)
    assert "eps_spent" not in unaccounted.Tags()["scalars"]  # NaN: no ε to plot


def test_a_run_logs_each_evaluated_round_as_it_comes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("run", "--task", "synthetic", "--rounds", "2", "--local-steps", "1", "--eps", "inf", "--log-to", "tensorboard")
    assert result.exit_code == 0, result.output
    (folder,) = (tmp_path / "runs").iterdir()
    assert [e.step for e in events(folder).Scalars("val_accuracy")] == [1, 2]


def test_a_bad_tracker_or_a_missing_tensorboard_is_one_line(tmp_path, monkeypatch):
    write_run(tmp_path, method="dp-lora", seed=0, accuracies=[0.5], eps=1.0)
    assert_user_error(invoke("export", tmp_path, "--to", "wandb"), "the tracker must be one of tensorboard")
    assert_user_error(invoke("run", "--task", "synthetic", "--log-to", "wandb"), "the tracker must be one of tensorboard")
    real_import = builtins.__import__

    def without_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_tensorboard)
    assert_user_error(invoke("export", tmp_path, "--out", tmp_path / "runs"), "pip install tensorboard")


def test_a_sweep_writes_each_run_as_it_finishes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    suite = tmp_path / "suite.toml"
    suite.write_text('out = "results"\n[base]\ntask = "synthetic"\nrounds = 2\nlocal-steps = 1\neps = inf\n'
                     '[grid]\nmethod = ["dp-lora", "fed-sb"]\n')
    result = invoke("sweep", suite, "--log-to", "tensorboard")
    assert result.exit_code == 0, result.output
    runs = sorted((tmp_path / "runs").iterdir())
    assert [p.name for p in runs] == sorted(p.stem for p in (tmp_path / "results").glob("*.parquet")) and len(runs) == 2
    assert all([e.step for e in events(run).Scalars("test_accuracy")] == [1, 2] for run in runs)


def test_an_extended_run_logs_the_rounds_it_carries_over(tmp_path, monkeypatch):
    """The rounds copied from the shorter run's checkpoint reach the tracker too, not only the last one."""
    monkeypatch.chdir(tmp_path)
    short = ("run", "--task", "synthetic", "--local-steps", "1", "--eps", "inf", "--out", "short")
    assert invoke(*short, "--rounds", "2", "--keep-checkpoint").exit_code == 0
    result = invoke("run", *short[1:-2], "--rounds", "3", "--extend-from", "short", "--log-to", "tensorboard")
    assert result.exit_code == 0, result.output
    assert "extending" in result.output
    (folder,) = (tmp_path / "runs").iterdir()
    assert [e.step for e in events(folder).Scalars("val_accuracy")] == [1, 2, 3]
