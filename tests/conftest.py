"""Fixtures shared by every test file."""

import pytest

from dpfl_bench import cli


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Rich wraps at the console width (80 when not a terminal); tests read whole lines."""
    monkeypatch.setattr(cli.console, "width", 1000)
    monkeypatch.setattr(cli.errors, "width", 1000)
