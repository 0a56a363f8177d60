"""SR-MAE training toolkit.

The package root holds the commands (`python -m toolkit.<command>`); the libraries live in
folders, one floor each (docs/architecture.md). Modules that moved keep their old import paths:
`MOVED` maps each old name to its new one, and importing the old name gives the new module
itself (with a DeprecationWarning that says what to write), so `isinstance` and the registries
see one object.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import CodeType, ModuleType

__version__ = "0.1.0"

# old module -> new module; a command's old `python -m` name runs the command in RUN_AS.
MOVED = {
    "toolkit.errors": "toolkit.core.errors",
    "toolkit.config": "toolkit.core.config",
    "toolkit.atomic": "toolkit.core.atomic",
    "toolkit.logging": "toolkit.core.logging",
    "toolkit.registry": "toolkit.core.registry",
    "toolkit.cli": "toolkit.core.cli",
    "toolkit.metrics": "toolkit.core.metrics",
    "toolkit.stats": "toolkit.core.stats",
    "toolkit.recipe": "toolkit.runs.recipe",
    "toolkit.hold": "toolkit.runs.hold",
    "toolkit.preflight": "toolkit.runs.preflight",
    "toolkit.sweep": "toolkit.runs.sweep",
    "toolkit.engine.loop": "toolkit.runs.loop",
    "toolkit.optim": "toolkit.engine.optim",
    "toolkit.cluster.devices": "toolkit.engine.devices",
    "toolkit.launch_sweep": "toolkit.cluster.sweeps",
    "toolkit.data.lensing": "toolkit.data.sim.lensing",
    "toolkit.data.substructure": "toolkit.data.sim.substructure",
    "toolkit.data.inputs": "toolkit.prediction.inputs",
    "toolkit.data.files": "toolkit.prediction.files",
    "toolkit.data.tiles": "toolkit.prediction.tiles",
}
RUN_AS = {"toolkit.data.lensing": "toolkit.simulate"}


class _Moved(importlib.abc.MetaPathFinder, importlib.abc.InspectLoader):
    """Finds an old module name and loads it as the module it moved to."""

    def find_spec(
        self, name: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(name, self, origin=MOVED[name])

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}: import that instead",
                      DeprecationWarning, stacklevel=2)  # fmt: skip
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """The new module ran when it was imported."""

    def get_code(self, fullname: str) -> CodeType | None:
        """`python -m OLD`: runpy runs this code as __main__, the command's (or the module's)."""
        new = RUN_AS.get(fullname, MOVED[fullname])
        spec = importlib.util.find_spec(new)
        return spec.loader.get_code(new) if spec and spec.loader else None  # type: ignore[attr-defined]

    def get_source(self, fullname: str) -> str | None:
        return None


if not any(isinstance(f, _Moved) for f in sys.meta_path):
    sys.meta_path.insert(0, _Moved())
