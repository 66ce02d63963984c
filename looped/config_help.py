"""`python train.py --help`: every config key with its resolved default and one line of help,
read from the comments beside (or just above) each field of the dataclasses in looped.config,
so the help cannot drift from the code."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing

from omegaconf import OmegaConf

_FIELD = re.compile(r"^\s+(\w+):[^=]*(?:=.*?)?(?:#\s*(.*))?$")


def _field_comments(cls: type) -> dict[str, str]:
    """field name -> its trailing comment, or the comment lines right above it."""
    out, above = {}, []
    for line in inspect.getsource(cls).splitlines()[2:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        match = _FIELD.match(line)
        if match and not stripped.startswith(("def ", "@")):
            out[match.group(1)] = (match.group(2) or " ".join(above)).strip()
        above = []
    return out


def _rows(cls: type, node, prefix: str) -> list[tuple[str, str, str]]:
    comments = _field_comments(cls)
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        sub = hints[f.name]
        if dataclasses.is_dataclass(sub):
            rows += _rows(sub, node[f.name], key + ".")
            continue
        value = node[f.name]
        shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        rows.append((key, "null" if shown is None else str(shown), comments.get(f.name, "")))
    return rows


def config_help() -> str:
    """The help text: presets, then one line per key."""
    from looped.config import Config, load_config, preset_groups, presets

    cfg = load_config([])
    rows = _rows(Config, cfg, "")
    width = max(len(k) + len(v) for k, v, _ in rows) + 3
    choices = [f"  {g}=NAME   NAME in: {', '.join(presets(g))}" for g in preset_groups()]
    lines = ["usage: python train.py [key=value ...]   (defaults: configs/defaults.yaml's)",
             "", "presets:", *choices, "", "keys (key=default  help):"]
    lines += [f"  {f'{k}={v}':<{width}} {h}".rstrip() for k, v, h in rows]
    return "\n".join(lines)
