"""`python train.py --help`: every config key with its resolved default and one line of help,
read from the comments beside (or just above) each field of the dataclasses in looped.config,
so the help cannot drift from the code."""

from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap

from omegaconf import OmegaConf

_FIELD = re.compile(r"^\s+(\w+):[^=]*(?:=.*?)?(?:#\s*(.*))?$")


def _field_comments(cls: type) -> dict[str, str]:
    """field name -> its trailing comment, or the comment lines right above it, from cls and
    the classes it is made of (a component node's schema is made at run time, without source)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            source = textwrap.dedent(inspect.getsource(klass)).splitlines()
        except (OSError, TypeError):
            continue
        lines = source[next(i for i, ln in enumerate(source) if ln.startswith("class ")) + 1:]
        above = []
        for line in lines:
            stripped = line.strip()
            if stripped.startswith("#"):
                above.append(stripped.lstrip("# "))
                continue
            match = _FIELD.match(line)
            if match and not stripped.startswith(("def ", "@")) and line.startswith("    ") \
                    and not line.startswith("     "):
                out[match.group(1)] = (match.group(2) or " ".join(above)).strip()
            above = []
    return out


def _rows(cls: type, node, prefix: str) -> list[tuple[str, str, str]]:
    comments = _field_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        sub = OmegaConf.get_type(node, f.name) if OmegaConf.is_config(node[f.name]) else None
        if sub is not None and dataclasses.is_dataclass(sub):
            rows += _rows(sub, node[f.name], key + ".")
            continue
        value = node[f.name]
        shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        hint = comments.get(f.name, "")
        if not hint and hasattr(cls, "__held_out_of__"):
            hint = f"the held-out split's {f.name}; null: as trained"
        rows.append((key, _as_typed(shown), hint))
    return rows


def _as_typed(value) -> str:
    """A default as it is typed on the command line: null, 8, [1,2,4] (no spaces)."""
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(_as_typed(v) for v in value) + "]"
    return str(value)


def _key_lines(rows) -> list[str]:
    width = max(len(k) + len(v) for k, v, _ in rows) + 3
    return [f"  {f'{k}={v}':<{width}} {h}".rstrip() for k, v, h in rows]


def tool_help(doc: str, cls: type) -> str:
    """A key=value tool's help: its docstring, then one line per key of its arguments
    dataclass, with the default and the field's comment."""
    rows = _rows(cls, OmegaConf.structured(cls), "")
    return "\n".join([doc.strip(), "", "keys (key=default  help):", *_key_lines(rows)])


def config_help() -> str:
    """The help text: presets, then one line per key."""
    from looped.config import Config, load_config, preset_groups, presets, recipes

    cfg = load_config([])
    rows = _rows(Config, cfg, "")
    choices = [f"  {g}=NAME   NAME in: {', '.join(presets(g))}" for g in preset_groups()]
    choices.append(f"  recipe=NAME   a whole run's defaults in place of the main job's; NAME in: "
                   f"{', '.join(recipes())}")
    lines = ["usage: python train.py [key=value ...]   (defaults: configs/defaults.yaml's)",
             "", "presets:", *choices, "", "keys (key=default  help):"]
    lines += _key_lines(rows)
    return "\n".join(lines + ["", *_components()])


def _components() -> list[str]:
    """Each component slot's choices and their own knobs (the keys above show the defaults')."""
    from looped.components import slots

    lines = ["components (the selector picks one; its knobs join the node):"]
    for slot in slots().values():
        lines.append(f"  {slot.path}.{slot.selector}:")
        registry = slot.registry
        for name in registry:
            knobs = registry.configs[name]
            shown = ", ".join(f"{f.name}={_default(f)}" for f in dataclasses.fields(knobs))
            lines.append(f"    {name:<18} {shown or '(no knobs)'}")
    return lines


def _default(f: dataclasses.Field):
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return "null" if value is None else value
