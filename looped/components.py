"""Per-component configuration: each registered component declares its own knobs.

Six parts of a run are chosen by name from a registry, and each names a node of the config:

    slot                   selector    registry (the slot's shared fields beside it)
    task                   name        looped.data.TASKS (TaskConfig)
    model.depth_attention  sources     looped.model.depth.SOURCE_POLICIES (DepthAttentionConfig)
    model.cross_layer      method      looped.model.cross_layer.CROSS_LAYER_METHODS
                                       (CrossLayerConfig, in cross_layer/base.py)
    train.loop_sampling            sampler     looped.training.loop_sampling.LOOP_SAMPLERS
                                       (LoopSamplingConfig)
    train.objective        loss        looped.training.losses.LOSSES (ObjectiveConfig)
    exit                   criterion   looped.model.exit.EXIT_CRITERIA (ExitConfig)

Each registry knows its slot (path, selector, shared fields), so the slots are read off the
registries and nothing that defines a component imports the config. A component registers with
its knobs as a small dataclass next to it (`register(name, config=MyKnobs)`, or a nested
`Config` class). The node's schema is then the slot's shared fields (`slot.base`, e.g. `method`
and `param_loops` for a cross-layer method) plus the chosen
component's knobs, so `task.n_nodes=5` is checked against the chosen task's dataclass, and a new
component needs no edit of `looped/config.py`. A knobs dataclass may define `check(self, cfg)`
(cfg: the whole resolved config) to validate its values; that is their one home.

For tasks, the node also holds `eval`: the held-out split's difficulty, the task's own knobs
again, each optional (None keeps the training value).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import typing
from dataclasses import field
from typing import Optional

from looped.registry import NoKnobs, Registry


class Slot:
    """A node of the config that holds a component chosen by name: a view of the registry that
    fills it (which knows its path, selector and shared fields)."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.path, self.selector, self.base = registry.path, registry.selector, registry.base
        self.resolve = registry.resolve or (lambda value, loose: value)

    @property
    def kind(self) -> str:
        return self.registry.kind

    def component(self, loose) -> str:
        """The component a loosely merged config (a DictConfig without schema) chooses."""
        from omegaconf import OmegaConf

        from omegaconf.errors import OmegaConfBaseException

        default = getattr(self.base(), self.selector)
        try:
            value = OmegaConf.select(loose, f"{self.path}.{self.selector}", default=default)
        except OmegaConfBaseException:  # a node given a scalar, e.g. `model.cross_layer=3`
            value = default
        # the loose config is untyped: a number becomes the name its str field would hold, and
        # any other type keeps the default, for the schema to report the bad value in one line
        if value is None or value == "":  # `task.name=null`: the schema reports it in one line
            value = default
        elif isinstance(value, (bool, int, float)):
            value = str(value)
        elif value is not None and not isinstance(value, str):
            value = default
        return self.resolve(value, loose)


def _schema_name(base: type, component: str) -> str:
    return f"{base.__name__}__{''.join(c if c.isalnum() else '_' for c in component)}"


def schema(slot: Slot, component: str) -> type:
    """The node's dataclass for `component`: the slot's shared fields, then the component's knobs
    (and, for tasks, `eval`). Unknown components keep the shared fields alone, so a bad name
    fails with the registry's own message at validation."""
    registry = slot.registry
    knobs = registry.configs.get(component, NoKnobs)
    name = _schema_name(slot.base, component)
    module = sys.modules[__name__]
    cached = getattr(module, name, None)
    if cached is not None and getattr(cached, "__knobs__", None) is knobs:
        return cached
    extra = []
    if slot.path == "task":
        held_out = held_out_schema(knobs)
        extra = [("eval", held_out, field(default_factory=held_out))]
    cls = dataclasses.make_dataclass(name, extra, bases=(knobs, slot.base))
    # module-level and named, so configs holding it pickle and copy like any dataclass; a node
    # built from it knows its component and knobs from its type
    cls.__module__, cls.__qualname__ = __name__, name
    cls.__component__, cls.__knobs__ = component, knobs
    setattr(module, name, cls)
    return cls


def held_out_schema(knobs: type) -> type:
    """Every knob of `knobs` again, optional, default None (= as trained)."""
    hints = typing.get_type_hints(knobs)
    fields = [(f.name, Optional[hints[f.name]], None) for f in dataclasses.fields(knobs)]
    name = f"{knobs.__name__}__held_out"
    cls = dataclasses.make_dataclass(name, fields)
    cls.__module__, cls.__qualname__, cls.__held_out_of__ = __name__, name, knobs
    setattr(sys.modules[__name__], name, cls)
    return cls


def component_config(slot_path: str, component: str, **values):
    """A node's dataclass instance built in code, e.g. component_config("model.cross_layer",
    "denseformer", dilation=2): what the config loader would make of those keys."""
    slot = slots()[slot_path]
    if component not in slot.registry:
        slot.registry.lookup(component)  # the registry's one-line error
    return schema(slot, component)(**{slot.selector: component}, **values)


def check(slot: Slot, node, cfg) -> None:
    """Validate a resolved node: a known component (the one its schema was made for, so an unset
    selector that resolves by default is checked too), then the shared and the component's
    checks."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_object(node)  # the dataclass, so checks may use its methods
    slot.registry.lookup(type(values).__component__)
    knobs = type(values).__knobs__
    for cls in (slot.base, knobs):
        if hasattr(cls, "check"):
            cls.check(values, cfg)
    # a task's held-out split (task.eval.*): its knobs again, checked as the eval task sees them
    held_out = getattr(values, "eval", None)
    if dataclasses.is_dataclass(held_out) and hasattr(knobs, "check"):
        changed = {k: v for k, v in vars(held_out).items() if v is not None}
        if changed:
            from looped.errors import ConfigError

            try:
                knobs.check(dataclasses.replace(values, **changed), cfg)
            except ConfigError as e:
                keys = ", ".join(f"{slot.path}.eval.{k}={v}" for k, v in changed.items())
                raise ConfigError(f"held-out split ({keys}): {e}") from None


def unknown_knob_hint(key: str, cfg) -> str:
    """' (task 'roots' has knobs: n_chains, ...)' for a key inside a component node of cfg (a
    config built on the components' schemas); '' elsewhere."""
    from omegaconf import OmegaConf

    for slot in slots().values():
        if key.startswith(slot.path + "."):
            schema_cls = OmegaConf.get_type(OmegaConf.select(cfg, slot.path))
            component = schema_cls.__component__
            if component not in slot.registry:
                return ""
            names = [f.name for f in dataclasses.fields(schema_cls.__knobs__)] or ["none"]
            return f" ({slot.kind} '{component}' has knobs: {', '.join(names)})"
    return ""


@functools.cache
def slots() -> dict[str, Slot]:
    """The slots by path, in the order their nodes are checked (a node's check may rely on an
    earlier one's: the loop sampler's on the cross-layer method's)."""
    from looped.data import TASKS
    from looped.training.loop_sampling import LOOP_SAMPLERS
    from looped.training.losses import LOSSES
    from looped.model.cross_layer import CROSS_LAYER_METHODS
    from looped.model.depth import SOURCE_POLICIES
    from looped.model.exit import EXIT_CRITERIA

    registries = (TASKS, SOURCE_POLICIES, CROSS_LAYER_METHODS, LOOP_SAMPLERS, LOSSES,
                  EXIT_CRITERIA)
    return {r.path: Slot(r) for r in registries}
