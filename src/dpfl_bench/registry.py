"""A small name -> object registry shared by tasks and methods.

Names are validated on the way in (lowercase, digits and dashes, unique) and a failed lookup lists the
valid names, so a typo on the command line is answered with the fix.
"""

import re
from typing import Generic, Iterator, TypeVar

from dpfl_bench.errors import UserError

T = TypeVar("T")
_NAME = re.compile(r"^[a-z][a-z0-9-]*$")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if not _NAME.match(name):
            raise ValueError(f"{self.kind} name {name!r} must be lowercase letters, digits and dashes")
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UserError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[tuple[str, T]]:
        return iter(sorted(self._entries.items()))
