"""The regression gate: compare finished runs with reference results of the same configurations.

A reference file holds the last row of each reference run. A run matches its reference by run id, a hash
of the full configuration, so a check never compares runs that were set up differently: change a suite and
its reference must be written again (`dpfl-bench check RESULTS --reference REF --update-reference`).
"""

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dpfl_bench.compare import Results, flat_options, regime

EPS_SLACK = 1e-6  # calibration meets the target to within its bisection tolerance, from below


@dataclass(frozen=True)
class Shortfall:
    run: str  # task · method · ε · seed
    problem: str
    expected: str
    got: str


def run_name(row: pd.Series) -> str:
    """task · method · regime (as compare labels it: a run without a guarantee says so) · seed."""
    sigma = flat_options(row["config_json"]).get("dp_sigma", math.nan)
    label = regime(row["dp_level"], row["guarantee"], row["eps_target"], sigma).label
    return f"{row['task']} · {row['method']} · {label} · seed {row['seed']}"


def check_runs(results: Results, reference: pd.DataFrame, tolerance: float) -> list[Shortfall]:
    """What fell short: every reference run must be present and finished, its final accuracy at most
    `tolerance` below the reference's; in every run, ε spent within its target and the losses finite.

    `results` are the finished runs (and the rounds the unfinished ones reached), as `compare` loads them."""
    shortfalls = []
    rows, unfinished, finals = results.rows, results.unfinished, results.finals.set_index("run_id")
    for run_id, ref in reference.set_index("run_id").iterrows():
        name = run_name(ref)
        if run_id not in finals.index:
            got = f"unfinished (round {unfinished[run_id]})" if run_id in unfinished else "no results file"
            shortfalls.append(Shortfall(name, "missing", f"{ref['rounds_total']} rounds", got))
            continue
        accuracy = finals.loc[run_id, "test_accuracy"]
        if not accuracy >= ref["test_accuracy"] - tolerance:  # NaN fails too
            expected = f"≥ {ref['test_accuracy'] - tolerance:.4f} (reference {ref['test_accuracy']:.4f} − {tolerance:g})"
            shortfalls.append(Shortfall(name, "accuracy", expected, f"{accuracy:.4f}"))
    for run_id, run in rows.groupby("run_id", sort=True):
        final = run.sort_values("round").iloc[-1]
        over = run[run["eps_spent"] > run["eps_target"] * (1 + EPS_SLACK)]
        if len(over):
            worst = over["eps_spent"].max()
            shortfalls.append(Shortfall(run_name(final), "ε over target", f"≤ {final['eps_target']:g}", f"{worst:.4f}"))
        # The test loss, not the training loss: a round in which no client took part has no training loss.
        losses = run[["test_loss", "test_accuracy"]].to_numpy(dtype=float)
        if not np.isfinite(losses).all():
            first = run[~np.isfinite(losses).all(axis=1)]["round"].min()
            shortfalls.append(Shortfall(run_name(final), "diverged", "finite test loss", f"NaN or ∞ from round {first}"))
    return shortfalls
