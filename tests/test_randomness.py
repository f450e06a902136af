"""Where the randomness comes from: one stream per purpose, seeded (reproducible) or secure (OS-keyed)."""

import itertools
import json
import math

import numpy as np
import pytest
from scipy import stats
from support import invoke

from dpfl_bench.configure import build_config
from dpfl_bench.federated import run_federated
from dpfl_bench.privacy import randomness as randomness_module
from dpfl_bench.privacy.randomness import SECRET, SERVER, Purpose, Randomness
from dpfl_bench.results import read_run
from dpfl_bench.tasks import TASKS

SYNTHETIC = TASKS.get("synthetic")


def first_words(stream, n: int = 4) -> tuple[int, ...]:
    return tuple(np.frombuffer(stream.bytes(8 * n), dtype=np.uint64).tolist())


# ---------------------------------------------------------------------------------------------- streams


def test_streams_of_different_purposes_rounds_clients_and_seeds_never_coincide():
    keys = list(itertools.product([0, 1, 2**32 + 5], list(Purpose), [0, 1, 3], [0, 1, SERVER]))
    seen = {first_words(Randomness(seed).stream(purpose, round, client)) for seed, purpose, round, client in keys}
    assert len(seen) == len(keys)


def test_keys_that_collide_in_a_plain_seed_sequence_do_not_collide_here():
    # SeedSequence([s, 3]) == SeedSequence([s, 3, 0]): trailing zero words vanish. And a seed of 2**32 + 5 is
    # the words [5, 1]: the seed 5 with a first key word of 1. Neither can happen with fixed-length spawn keys.
    assert first_words(np.random.Generator(np.random.PCG64(np.random.SeedSequence([5, 3])))) == first_words(
        np.random.Generator(np.random.PCG64(np.random.SeedSequence([5, 3, 0]))))
    assert first_words(Randomness(5).stream(Purpose.BATCHES, 0, 0)) != first_words(Randomness(5).stream(Purpose.BATCHES, 0, 1))
    assert first_words(Randomness(2**32 + 5).stream(Purpose.SPLIT)) != first_words(Randomness(5).stream(Purpose(1), 1, 0))


def test_seeded_streams_repeat_and_secure_ones_do_not():
    seeded, secure = Randomness(7), Randomness(7, "secure")
    for purpose in Purpose:
        assert first_words(seeded.stream(purpose, 2, 1)) == first_words(seeded.stream(purpose, 2, 1))
        repeats = first_words(secure.stream(purpose, 2, 1)) == first_words(secure.stream(purpose, 2, 1))
        assert repeats == (purpose not in SECRET), purpose  # only the privacy-relevant streams are secret


def test_torch_generator_is_never_seeded_for_a_secret_purpose():
    assert Randomness(0).torch_seed(Purpose.DROPOUT, 1, 2) == Randomness(0).torch_seed(Purpose.DROPOUT, 1, 2)
    assert Randomness(0).torch_seed(Purpose.DROPOUT, 1, 2) != Randomness(0).torch_seed(Purpose.INIT, 1, 2)
    for purpose in SECRET:
        with pytest.raises(AssertionError):
            Randomness(0, "secure").torch_seed(purpose)


@pytest.mark.parametrize("mode", ["seeded", "secure"])
def test_gaussian_noise_has_the_right_mean_and_std(mode):
    """KS test at a fixed sample size against N(0, std²); secure noise is the hardened sum of four draws."""
    std, n = 2.5, 100_000
    noise = Randomness(3, mode).stream(Purpose.NOISE).normal((n,), std).double().numpy()
    assert stats.kstest(noise, "norm", args=(0, std)).pvalue > 1e-4
    assert abs(noise.mean()) < 5 * std / math.sqrt(n)
    assert noise.std() == pytest.approx(std, rel=5 * math.sqrt(2 / n))


def test_secure_noise_sums_four_draws():
    class Counting:
        def __init__(self):
            self.shapes = []

        def standard_normal(self, size, dtype=np.float64):
            self.shapes.append(size)
            return np.zeros(size, dtype=dtype)

    counting = Counting()
    randomness_module.Stream(counting, hardened=True).normal((3, 5), 1.0)
    assert counting.shapes == [(4, 3, 5)]


def test_poisson_inclusion_is_compared_in_float64():
    # A rate that float32 cannot represent: 0.1 + 2^-30 rounds to 0.1 in float32 but not in float64.
    rate = 0.1 + 2**-30
    assert float(np.float32(rate)) != rate
    draws = np.random.Generator(np.random.PCG64(Randomness(0)._key(Purpose.BATCHES, 0, 0))).random(10_000)
    mask = Randomness(0).stream(Purpose.BATCHES).bernoulli(10_000, rate)
    assert np.array_equal(mask, draws < rate)


# ---------------------------------------------------------------------------------------------- runs


def run(tmp_path, **options):
    base = {"task": "synthetic", "method": "dp-lora", "device": "cpu", "eps": 1.0, "rounds": 2, "out": str(tmp_path)}
    return run_federated(build_config({**base, **options}, SYNTHETIC.defaults))


def test_two_secure_runs_with_the_same_flags_differ_and_record_no_seeded_secrets(tmp_path):
    first = run(tmp_path / "a", rng="secure")
    second = run(tmp_path / "b", rng="secure")
    assert first.rows[-1]["rng"] == "secure"
    assert first.rows[-1]["test_loss"] != second.rows[-1]["test_loss"]
    # client sizes (public to the accounting) are kept; label histograms and the training loss are not
    clients = json.loads(first.rows[-1]["client_data_json"])
    assert [set(c) for c in clients] == [{"examples", "sample_rate", "noise_multiplier"}] * 3
    assert math.isnan(first.rows[-1]["train_loss"])


def test_a_secure_client_level_run_records_nothing_about_its_clients(tmp_path):
    summary = run(tmp_path, rng="secure", **{"dp-level": "client"})
    assert json.loads(summary.rows[-1]["client_data_json"]) == []
    # bytes per round come from the expected number of clients (p·N), not the secret realised one
    fed = summary.mechanism.config.federated
    per_client = summary.rows[-1]["bytes_uploaded_per_round"] / (fed.participation * fed.clients)
    assert per_client == pytest.approx(sum(p.numel() * 4 for p in _trainable_shapes(summary)))


def _trainable_shapes(summary):
    from dpfl_bench.federated import prepare

    return prepare(summary.mechanism.config).workspace.params.all().values()


def test_a_seeded_run_records_the_label_histograms(tmp_path):
    clients = json.loads(run(tmp_path).rows[-1]["client_data_json"])
    assert all(sum(c["labels"]) == c["examples"] for c in clients)


def test_no_results_or_log_file_of_a_secure_run_holds_its_keys(tmp_path, monkeypatch):
    keys = []
    real = randomness_module.fresh_key

    def recording():
        key = real()
        keys.append(key.copy())
        return key

    monkeypatch.setattr(randomness_module, "fresh_key", recording)
    result = invoke("run", "--task", "synthetic", "--method", "dp-lora", "--rounds", "1", "--rng", "secure",
                    "--audit-canaries", "50", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    # participation, 3 clients' batches and noise, the server's noise stream, canary inclusion and sampling
    assert len(keys) == 1 + 3 * 2 + 1 + 2
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files
    blobs = [p.read_bytes() for p in files] + [result.output.encode()]
    table = read_run(next(tmp_path.glob("*.parquet")))
    blobs += [table.to_csv().encode()]
    for key in keys:
        as_int = int.from_bytes(key.tobytes(), "little")
        needles = [key.tobytes(), key.tobytes().hex().encode(), str(as_int).encode()] + [str(int(w)).encode() for w in key]
        for blob in blobs:
            assert not any(needle in blob for needle in needles)


def test_noise_does_not_depend_on_the_physical_batch_size(tmp_path):
    """The noise has its own stream, drawn after the sum: splitting the batch differently changes only the
    float rounding of the sum, never which noise is added."""
    small = run(tmp_path / "small", **{"physical-batch-size": 3})
    large = run(tmp_path / "large", **{"physical-batch-size": 64})
    for a, b in zip(small.rows, large.rows):
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-4)
        assert a["test_accuracy"] == b["test_accuracy"]

