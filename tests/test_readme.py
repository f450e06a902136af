"""The README's examples are code a reader will copy: they must work."""

import re
from pathlib import Path

from dpfl_bench.method import METHODS, Factor, create_method

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_the_add_a_method_example_registers_a_working_method():
    section = README.split("## Adding a method", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    try:
        exec(compile(code, "README.md", "exec"), {})
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
    from pathlib import Path

    from dpfl_bench.config import default_value

    text = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    listed = re.search(r"the configuration's \(([^)]*)\)", text).group(1)
    names = {"clients": "clients", "participation": "participation", "rounds": "rounds", "local steps": "local-steps",
             "batch": "batch-size", "lr": "lr", "rank": "rank"}
    pairs = re.findall(r"([a-z ]+?) ([0-9.e-]+)(?:,|;|$)", listed)
    assert [n.strip() for n, _ in pairs] == list(names)
    for name, value in pairs:
        assert float(value) == default_value(names[name.strip()]), name
