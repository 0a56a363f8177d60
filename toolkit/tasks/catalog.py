"""The built-in tasks and the architectures that do each, as the Markdown table README.md and
docs/architecture.md carry (a test keeps both equal to this)."""

from __future__ import annotations

from toolkit.models import MODELS
from toolkit.tasks import TASKS


def catalog() -> str:
    """One row per built-in task: its title, its architectures (its default first, with the
    titles reports give them) and the columns its report table shows."""
    rows = [
        "| task | trains | architectures (default first) | report columns |",
        "|---|---|---|---|",
    ]
    for name in TASKS.builtin_names():
        task = TASKS.get(name)
        archs = sorted((a for a in MODELS.builtin_names() if name in MODELS.get(a).tasks),
                       key=lambda a: (a != task.default_arch, a))  # fmt: skip
        named = ", ".join(f"`{a}` ({MODELS.get(a).title})" for a in archs)
        rows.append(f"| `{name}` | {task.title} | {named} | {', '.join(task.table)} |")
    return "\n".join(rows)
