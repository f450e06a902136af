"""Build a RunConfig from options: the defaults, a task's defaults, a preset, a TOML file and flags, lowest
first, then the checks that need the registries (the method's options, the privacy level, the task). It is
the one way the CLI, sweeps and benchmarks make a configuration; validation fails with a one-line `UserError`.
"""

import dataclasses
import math
from typing import Any, Mapping

from dpfl_bench.config import PRESET, SECTIONS, PrivacyConfig, RunConfig, normalise, require, typed
from dpfl_bench.method import create_method
from dpfl_bench.presets import PRESETS
from dpfl_bench.privacy.mechanism import load_mechanisms, mechanism_of
from dpfl_bench.tasks import TASKS


def build_config(options: Mapping[str, Any], task_defaults: Mapping[str, Any] = {}) -> RunConfig:
    """Build a validated RunConfig from flat options (keys with dashes or underscores), over a preset they
    name, over task defaults."""
    given = normalise(options)
    preset = PRESETS.get(given.pop(PRESET)) if PRESET in given else None
    flat = {**normalise(task_defaults), **normalise(preset.options if preset else {}), **given}
    if preset is not None:
        method = flat.get("method", RunConfig.method)
        flat["method_options"] = {**preset.method_options.get(method, {}), **flat.get("method_options", {})}
    _check_level(flat)
    sections = {name: section(**typed(flat, section)) for name, section in SECTIONS.items()}
    privacy = sections["privacy"]
    if load_mechanisms().get(privacy.dp_level).accounted:
        require(privacy.eps > 0, f"--eps must be > 0 (use inf for a non-private run), got {privacy.eps}")
    top = typed(flat, RunConfig)
    # Saved and hashed with every run: the method's options after conversion, its defaults included.
    method = create_method(top.get("method", RunConfig.method), top.get("method_options", {}))
    top["method_options"] = dataclasses.asdict(method.options)
    config = RunConfig(**top, **sections)
    mechanism_of(config).check_config(config)
    require(
        config.sources.center_crop == 1 or TASKS.get(config.task).images,
        f"--center-crop applies to image tasks, not to {config.task}; drop it",
    )
    return config


def _check_level(flat: dict[str, Any]) -> None:
    """A privacy level is a registered mechanism. One with an accountant takes --eps > 0 (inf: no privacy);
    one without (authors) takes --dp-sigma and no --eps: its ε is NaN, never a number that could be read as
    a guarantee. --dp-sigma means nothing to the other levels."""
    mechanisms = load_mechanisms()
    level = flat.get("dp_level", PrivacyConfig.dp_level)
    levels = [name for name in mechanisms.names() if name != "none"]  # none is what --eps inf runs
    require(level in levels, f"--dp-level must be one of {', '.join(levels)}, got {level!r}")
    if mechanisms.get(level).accounted:
        require("dp_sigma" not in flat, f"--dp-sigma applies only to --dp-level authors (noise without a guarantee), not {level}; drop it")
        return
    require("eps" not in flat, _no_eps(level))
    flat["eps"] = math.nan


def _no_eps(level: str) -> str:
    return f"--eps does not apply to --dp-level {level}: it has no accountant and no guarantee; drop --eps (set its noise with --dp-sigma)"
