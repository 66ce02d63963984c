"""Registries: variants chosen by name (tasks, source policies, exit criteria, loop samplers,
cross-layer methods, losses, attention kinds, kernels, ...), each with its own knobs.

A registry that fills a node of the config (a *slot*, see looped.components) knows where: its
`path` (e.g. "model.cross_layer"), the `selector` field that names the component ("method"), and
the `base` dataclass of the fields every component of the slot shares. Nothing here imports the
config, so the components' modules can define their registries without reaching up to it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

from looped.errors import ConfigError

T = TypeVar("T")


@dataclass
class NoKnobs:
    """The knobs of a component that has none."""


def knobs_of(obj: Any, config: Optional[type] = None) -> type:
    """The knobs dataclass a component registers with: `config`, else its nested `Config`."""
    knobs = config or getattr(obj, "Config", None) or NoKnobs
    if not dataclasses.is_dataclass(knobs):
        raise TypeError(f"{obj!r}: the knobs {knobs!r} must be a dataclass")
    missing = [f.name for f in dataclasses.fields(knobs)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise TypeError(f"{obj!r}: every knob needs a default, {', '.join(missing)} has none")
    return knobs


class Registry(dict):
    """Name -> implementation, filled by the `register` decorator; `configs` holds each name's
    knobs dataclass. `lookup` of an unknown name raises a one-line ConfigError that lists the
    valid names."""

    def __init__(self, kind: str, *, path: Optional[str] = None, selector: Optional[str] = None,
                 base: Optional[type] = None,
                 resolve: Optional[Callable[[Any, Any], str]] = None):
        super().__init__()
        self.kind = kind
        self.configs: dict[str, type] = {}
        # the slot this registry fills, if any: its config node, the field naming the component,
        # the node's shared fields, and (for a selector whose None means a default that depends
        # on the rest of the config) resolve(value, loose config) -> the component's name
        self.path, self.selector, self.base, self.resolve = path, selector, base, resolve

    def register(self, name: str, config: Optional[type] = None) -> Callable[[T], T]:
        """Register under `name`, with knobs `config` (a dataclass whose fields all have
        defaults), else the object's nested `Config` dataclass, else none."""
        def wrap(obj: T) -> T:
            self[name] = obj
            self.configs[name] = knobs_of(obj, config)
            return obj
        return wrap

    def lookup(self, name: str):
        if name not in self:
            raise ConfigError(f"unknown {self.kind} '{name}'; choose one of: {', '.join(self)}")
        return self[name]
