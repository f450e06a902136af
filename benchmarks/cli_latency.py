"""How long the CLI takes to answer, against `python -c pass` in the same run.

    python benchmarks/cli_latency.py [--repeats 5]

Each command runs in a fresh process, the commands taking turns, `--repeats` times after one untimed pass
(which leaves Python's bytecode cache written, as on a user's machine); prints the median
seconds and the ratio to an empty interpreter, and saves results/bench_cli_latency.json. Run it on an idle
machine: beside another busy process every figure grows.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "dpfl-bench --help": ["dpfl-bench", "--help"],
    "dpfl-bench --version": ["dpfl-bench", "--version"],
    "dpfl-bench methods": ["dpfl-bench", "methods"],
    "dpfl-bench tasks": ["dpfl-bench", "tasks"],
    "dpfl-bench presets": ["dpfl-bench", "presets"],
    "dpfl-bench privacy --eps 1": ["dpfl-bench", "privacy", "--eps", "1"],
    "dpfl-bench privacy --noise-multiplier 1.3": ["dpfl-bench", "privacy", "--noise-multiplier", "1.3"],
    "dpfl-bench privacy --task synthetic --eps 1": ["dpfl-bench", "privacy", "--task", "synthetic", "--eps", "1"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if shutil.which("dpfl-bench") is None:
        sys.exit("dpfl-bench is not on PATH: install the package first")
    # Python's default is to cache compiled bytecode; a machine that turns it off (PYTHONDONTWRITEBYTECODE)
    # compiles the package on every start, which is not what a user's install does. One untimed pass writes it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    seconds: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for repeat in range(args.repeats + 1):
        for name, command in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, env=env)
            if repeat:
                seconds[name].append(time.perf_counter() - start)
    base = statistics.median(seconds["python -c pass"])
    table = {name: {"seconds": statistics.median(times), "ratio": statistics.median(times) / base} for name, times in seconds.items()}
    for name, row in table.items():
        print(f"{name:<45} {row['seconds']:6.2f} s  {row['ratio']:6.1f}×")
    out = Path("results/bench_cli_latency.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"repeats": args.repeats, "commands": table}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
