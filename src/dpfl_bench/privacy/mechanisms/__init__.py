"""The built-in privacy mechanisms, one module each, registered on import (see `privacy/mechanism.py`)."""

from dpfl_bench.privacy.mechanisms import authors, client, none, sample  # noqa: F401
