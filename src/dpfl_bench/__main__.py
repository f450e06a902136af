"""`python -m dpfl_bench` is the `dpfl-bench` command."""

from dpfl_bench.cli import app

app(prog_name="dpfl-bench")
