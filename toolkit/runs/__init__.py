"""A training run from start to finish: its recipe read and checked, its directory located,
held, checked before a relaunch, trained (the loop) and read back; sweeps of runs.

`toolkit.runs` was one module before it was this folder: its names (`locate`, `load_model`,
`check_relaunch`, ...) still resolve here, from the modules that now own them."""

from __future__ import annotations

import importlib
from typing import Any

# name -> module that owns it, for `from toolkit.runs import NAME` written before the move. Only
# these: any other name is a submodule's (`from toolkit.runs import recipe`) or unknown.
_DIRECTORY = ("Target", "locate", "Finished", "finished", "another_run", "state_shapes",
              "check_relaunch", "training_record", "expected_by", "load_model", "shard_problems",
              "check_shards", "eval_loader", "eval_path", "param_summary")  # fmt: skip
_OLD_NAMES = {**dict.fromkeys(_DIRECTORY, "toolkit.runs.directory"),
              "build_model": "toolkit.engine.model"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _OLD_NAMES:
        raise AttributeError(f"module 'toolkit.runs' has no attribute {name!r}")
    return getattr(importlib.import_module(_OLD_NAMES[name]), name)
