"""TrainState: the one mutable state of the loop, saved in every checkpoint as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainState:
    step: int = 0  # optimiser steps done
    epoch: int = 0  # epoch of the next batch (the loader's)
    samples: int = 0  # training samples seen, all ranks together
    data: dict[str, int] = field(default_factory=lambda: {"epoch": 0, "batch": 0})  # loader cursor
    best: float | None = None  # best validation score so far (PSNR, or -loss when pretraining)
    best_step: int | None = None
    world_size: int = 1  # processes that wrote this state (a restart may use another number)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def read(cls, path: Path) -> TrainState:
        data: dict[str, Any] = json.loads(path.read_text())
        return cls(**data)
