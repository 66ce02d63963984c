"""Plugins: the user's own modules that register components (a task, a source policy, an exit
criterion, a loop sampler, a cross-layer method) from outside the package.

    python train.py imports=[my_tasks.py] task.name=mine          # a file
    python train.py imports=[my_pkg.tasks] task.name=mine         # a module on the Python path

`imports` is imported before the config resolves, so the registrations exist when the config
names them; the run's config.yaml keeps the list, so `looped eval` and `load_run` import the
same modules again. Installed packages can instead declare an entry point in the group
`looped.plugins`; those load every time a config resolves.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

from looped.errors import ConfigError

ENTRY_POINT_GROUP = "looped.plugins"
_imported: set[str] = set()


def _import_file(path: Path) -> None:
    name = f"looped_plugin_{path.stem}_{abs(hash(str(path))) % 10**8}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"imports: {path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)  # errors in the user's own code keep their traceback


def import_plugins(names: list[str] | tuple[str, ...] = ()) -> None:
    """Import the entry-point plugins and the given modules or .py files (each once)."""
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if f"ep:{entry.value}" not in _imported:
            _imported.add(f"ep:{entry.value}")
            entry.load()
    for name in names:
        name = str(name)
        if name in _imported:
            continue
        if name.endswith(".py"):
            path = Path(name).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(f"imports: plugin file {name} does not exist")
            _import_file(path)
        else:
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as e:
                if e.name is None or not name.startswith(e.name):
                    raise  # the plugin itself imports something missing: its own problem
                raise ConfigError(f"imports: no module named '{name}' on the Python path; give a "
                                  f"module name or the path of a .py file") from None
        _imported.add(name)
