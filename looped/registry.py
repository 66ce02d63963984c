"""Registries: variants chosen by name (tasks, source policies, exit criteria, loop samplers)."""

from __future__ import annotations

from typing import Callable, TypeVar

from looped.errors import ConfigError

T = TypeVar("T")


class Registry(dict):
    """Name -> implementation, filled by the `register` decorator. `lookup` of an unknown name
    raises a one-line ConfigError that lists the valid names."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[T], T]:
        def wrap(obj: T) -> T:
            self[name] = obj
            return obj
        return wrap

    def lookup(self, name: str):
        if name not in self:
            raise ConfigError(f"unknown {self.kind} '{name}'; choose one of: {', '.join(self)}")
        return self[name]
