"""The examples in README and docs/ are code a reader will copy: they must work."""

import re
from pathlib import Path

from dpfl_bench.method import METHODS, Factor, create_method

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
DOCS = {path.name: path.read_text() for path in sorted((ROOT / "docs").glob("*.md"))}


def test_the_add_a_method_example_registers_a_working_method():
    section = DOCS["extending.md"].split("## Adding a method", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    try:
        exec(compile(code, "docs/extending.md", "exec"), {})
        method = create_method("b-only-late", {"switch_round": "2"})
        assert method.trains(1, 0) == {Factor.A, Factor.B}
        assert method.trains(2, 0) == {Factor.B}
    finally:
        METHODS._entries.pop("b-only-late", None)


def test_the_quick_start_names_the_test_command_that_ci_runs():
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    quick_start = README.split("## Quick start", 1)[1].split("##", 1)[0]
    assert "python -m pytest -q" in quick_start
    assert "python -m pytest -q" in ci and "make install" in ci and "make install" in quick_start


def test_the_readmes_list_of_configuration_defaults_is_the_codes():
    import re

    from dpfl_bench.config import default_value

    text = " ".join(DOCS["tasks.md"].split())
    listed = re.search(r"the configuration's \(([^)]*)\)", text).group(1)
    names = {"clients": "clients", "participation": "participation", "rounds": "rounds", "local steps": "local-steps",
             "batch": "batch-size", "lr": "lr", "rank": "rank"}
    pairs = re.findall(r"([a-z ]+?) ([0-9.e-]+)(?:,|;|$)", listed)
    assert [n.strip() for n, _ in pairs] == list(names)
    for name, value in pairs:
        assert float(value) == default_value(names[name.strip()]), name


def test_every_command_shown_parses():
    """Each `dpfl-bench ...` line of a shell block in README and docs/ is one the CLI accepts: its command
    exists and its options parse (nothing runs: click builds the context and stops)."""
    import shlex

    import typer

    from dpfl_bench.cli import app

    command = typer.main.get_command(app)
    shown = 0
    for name, text in {"README.md": README, **DOCS}.items():
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                for part in re.split(r"&&|\|", line.split(" #")[0]):
                    words = shlex.split(part)
                    if words[:1] != ["dpfl-bench"]:
                        continue
                    sub = command.get_command(None, words[1])
                    assert sub is not None, (name, part)
                    sub.make_context(words[1], words[2:], resilient_parsing=False)
                    shown += 1
    assert shown >= 30


def test_every_results_column_is_documented():
    """docs/results.md is the column reference: a column added to the schema without a line there fails."""
    from dpfl_bench.results import SCHEMA

    reference = DOCS["results.md"]
    missing = [name for name in SCHEMA.names if f"`{name}`" not in reference]
    assert not missing, missing
