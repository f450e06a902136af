"""A regular (non-editable) install must carry every subpackage, the built-in methods included."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_every_package_folder_is_listed_for_setuptools():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    found = {
        "dpfl_bench." + ".".join(p.parent.relative_to(ROOT / "src" / "dpfl_bench").parts)
        for p in (ROOT / "src" / "dpfl_bench").rglob("__init__.py")
    }
    found = {name.rstrip(".") for name in found}
    assert found | {"dpfl_bench.methods"} == listed
    assert setup["package-dir"]["dpfl_bench.methods"] == "methods"
    assert (ROOT / "methods" / "__init__.py").exists()
