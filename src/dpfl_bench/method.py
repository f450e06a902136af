"""The method interface: the few questions on which LoRA methods for private federated learning differ.

The federated core asks a method these things and nothing else:

- `factors`: the adapter's factors: A and B, or A, R and B for W + B·R·A with an r×r middle factor R (Fed-SB);
- `initialize(weight, factors)`: a layer's factors to start from, given its frozen pretrained weight
  (default: as injected, B zero and A random; Fed-SB starts from the weight's SVD);
- `trains(round, step)`: which factors are trained at this local step of this round;
- `lr_multiplier(factor)`: the factor's learning rate relative to `--lr`;
- `postprocess(factor, grad)`: what to do to a factor's (already privatized) gradient before the step;
- `extra_step(factor, grad)`: a direction for a plain step of the round's learning rate taken before the
  optimizer's step, or None (default: none; the authors' Laplacian-smoothing variant of LA-LoRA);
- `uploads(round)`: which factors clients send and the server averages this round;
- `broadcast(round, state)`: on the server, after aggregation, the global state sent to the next round's
  clients (default: as aggregated). Flower's `Strategy.aggregate_fit` is the model: a method may rewrite
  both factors here (FedSVD re-factorizes B·A). It acts on the privatized aggregate only, so it is
  post-processing and costs no privacy.

And `label`, the name its results carry: the method's name, or with options that make it another variant
(the LA-LoRA authors' code), a name that says so, so that no table ever averages the two into one row.

The classification head always trains, and is sent unless `--head` keeps it at the clients. A method is one class in one file in
`methods/`, decorated with `@register_method`; its options are a frozen dataclass named in `Options`.
Third-party packages add methods through the entry-point group `dpfl_bench.methods`.

The built-in methods import torch inside the functions that compute with it, so that `dpfl-bench methods`
lists them without loading torch; a method of your own need not.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import pkgutil
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from dpfl_bench.errors import UserError
from dpfl_bench.registry import Registry

if TYPE_CHECKING:
    import torch


class Factor(str, enum.Enum):
    A = "A"  # lora_A: rank x in_features, random init
    B = "B"  # lora_B: out_features x rank, zero init
    HEAD = "head"  # the classification head, trained and uploaded by every method
    # After the head so that the other factors' order, which decides their noise draws, is what it was.
    R = "R"  # lora_R: rank x rank, between A and B, for the methods that ask for it


BOTH = frozenset({Factor.A, Factor.B})


def alternating(first: str, index: int) -> frozenset[Factor]:
    """Factor `first` ("A" or "B") at even `index`, the other one at odd: for methods that take turns."""
    factor = Factor(first)
    return frozenset({factor if index % 2 == 0 else (Factor.A if factor is Factor.B else Factor.B)})


@dataclass(frozen=True)
class NoOptions:
    pass


class Method:
    name: ClassVar[str]
    summary: ClassVar[str]  # one line for `dpfl-bench methods`
    citation: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    factors: ClassVar[frozenset[Factor]] = BOTH

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    @property
    def label(self) -> str:
        return self.name

    def initialize(self, weight: torch.Tensor, factors: dict[Factor, torch.Tensor]) -> dict[Factor, torch.Tensor]:
        """`factors` as matrices (A [r, in], B [out, r], R [r, r]) for a layer whose frozen weight is `weight`
        [out, in] (a 1x1 convolution's flattened); the same server-side for every client, so no data."""
        return factors

    def trains(self, round: int, step: int) -> frozenset[Factor]:
        return BOTH

    def lr_multiplier(self, factor: Factor) -> float:
        return 1.0

    def postprocess(self, factor: Factor, grad: torch.Tensor) -> torch.Tensor:
        return grad

    def extra_step(self, factor: Factor, grad: torch.Tensor) -> torch.Tensor | None:
        return None

    def uploads(self, round: int) -> frozenset[Factor]:
        return BOTH

    def broadcast(self, round: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state


METHODS: Registry[type[Method]] = Registry("method")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator that adds a method to the registry under `cls.name`."""
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"{cls.__name__}.Options must be a dataclass")
    return METHODS.add(cls.name, cls)


_loaded = False


def load_methods() -> Registry[type[Method]]:
    """Import every module of the built-in `dpfl_bench.methods` package, then the entry points."""
    global _loaded
    if not _loaded:
        import dpfl_bench.methods as builtin

        for module in pkgutil.iter_modules(builtin.__path__):
            importlib.import_module(f"{builtin.__name__}.{module.name}")
        for entry in entry_points(group="dpfl_bench.methods"):
            try:
                cls = entry.load()
                register_method(cls)
            except Exception as e:  # a broken plugin must say which one it is
                raise UserError(f"method plugin {entry.name!r} ({entry.value}) cannot be loaded: {e}") from None
        _loaded = True
    return METHODS


def create_method(name: str, options: Mapping[str, Any] = {}) -> Method:
    """The named method with its options; option values given as strings (from the CLI) are converted."""
    cls = load_methods().get(name)
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    values = {}
    for key, value in options.items():
        key = key.replace("-", "_")
        if key not in fields:
            valid = ", ".join(fields) or "none"
            raise UserError(f"method {name!r} has no option {key!r}; its options: {valid}")
        values[key] = _convert(value, fields[key].type, f"{name} option {key}")
    try:
        return cls(cls.Options(**values))
    except (TypeError, ValueError) as e:
        raise UserError(f"bad options for method {name!r}: {e}") from None


def _convert(value: Any, annotation: Any, what: str) -> Any:
    kind = {"float": float, "int": int, "str": str, "bool": bool}.get(getattr(annotation, "__name__", annotation))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # TOML's `0` for a float option
    if not isinstance(value, str) or kind in (None, str):
        return value
    if kind is bool:
        if value.lower() not in ("true", "false"):
            raise UserError(f"{what} must be true or false, got {value!r}")
        return value.lower() == "true"
    try:
        return kind(value)
    except ValueError:
        raise UserError(f"{what} must be a {kind.__name__}, got {value!r}") from None
