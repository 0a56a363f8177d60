"""A run's model built from its recipe: the architecture its task asks for, frozen as the recipe
says. The training loop, evaluation and the tests build models here, so they agree."""

from __future__ import annotations

from torch import nn

from toolkit.core.errors import UserError
from toolkit.core.schema import Recipe
from toolkit.models import MODELS, apply_freeze
from toolkit.tasks import Task, task_of


def build_model(r: Recipe, task: Task | None = None) -> nn.Module:
    """The recipe's architecture for its task, with its parameters frozen as the recipe says."""
    model = (task or task_of(r)).build_model(r)
    if r.freeze:
        try:
            apply_freeze(model, r.freeze, MODELS.get(r.model.arch).freeze_modes)  # type: ignore[arg-type]
        except ValueError as err:
            raise UserError(f"freeze: {err}") from None
    return model
