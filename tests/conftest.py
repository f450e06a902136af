"""Fixtures shared by every test file."""

import pytest

from dpfl_bench import cli


@pytest.fixture(autouse=True)
def fresh_process_caches():
    """What a sweep's worker keeps between points (task data, passed self-checks, noise calibrations) is
    emptied before each test, so no test depends on what another one loaded."""
    from dpfl_bench.privacy.accounting import _calibrated
    from dpfl_bench.privacy.per_example import _PASSED
    from dpfl_bench.tasks.base import _LOADED

    _LOADED.clear(), _PASSED.clear(), _calibrated.cache_clear()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: a second intra-op thread only adds overhead (use with pytest.mark.usefixtures)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Rich wraps at the console width (80 when not a terminal); tests read whole lines."""
    monkeypatch.setattr(cli.console, "width", 1000)
    monkeypatch.setattr(cli.errors, "width", 1000)


@pytest.fixture
def recorded_rounds(monkeypatch):
    """Each round of the runs in the test, as (state the clients started from, state the mechanism
    released, state broadcast, the clients' results)."""
    import dpfl_bench.federated as federated

    rounds = []
    train_round = federated.train_round

    def recorded(exp, global_state, client_states, round):
        released = []
        aggregate = exp.run.mechanism.aggregate
        exp.run.mechanism.aggregate = lambda *args: released.append(aggregate(*args)) or released[-1]
        try:
            broadcast, results, names = train_round(exp, global_state, client_states, round)
        finally:
            exp.run.mechanism.aggregate = aggregate
        rounds.append((global_state, released[0], broadcast, results))
        return broadcast, results, names

    monkeypatch.setattr(federated, "train_round", recorded)
    return rounds
