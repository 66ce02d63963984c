"""Registries: variants chosen by name (tasks, source policies, exit criteria, loop samplers,
cross-layer methods), each with its own knobs (see looped.components)."""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

from looped.errors import ConfigError

T = TypeVar("T")


class Registry(dict):
    """Name -> implementation, filled by the `register` decorator; `configs` holds each name's
    knobs dataclass. `lookup` of an unknown name raises a one-line ConfigError that lists the
    valid names."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.configs: dict[str, type] = {}

    def register(self, name: str, config: Optional[type] = None) -> Callable[[T], T]:
        """Register under `name`, with knobs `config` (a dataclass whose fields all have
        defaults), else the object's nested `Config` dataclass, else none."""
        from looped.components import knobs_of

        def wrap(obj: T) -> T:
            self[name] = obj
            self.configs[name] = knobs_of(obj, config)
            return obj
        return wrap

    def lookup(self, name: str):
        if name not in self:
            raise ConfigError(f"unknown {self.kind} '{name}'; choose one of: {', '.join(self)}")
        return self[name]
