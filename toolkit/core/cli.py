"""What every command shares: one-line user errors with exit status 2, and logging set-up."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from toolkit.core.config import RecipeError
from toolkit.core.errors import UserError

logger = logging.getLogger(__name__)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (no usage dump), like every other user error."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message} (see --help)")


def setup_logging() -> None:
    level = os.environ.get("SRMAE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level if isinstance(logging.getLevelName(level), int) else "INFO",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # Their INFO lines (every file of every checkpoint) drown the training log.
    for noisy in ("accelerate", "DeepSpeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a command's main; a user error becomes one line on stderr and exit status 2."""
    setup_logging()
    try:
        return main(argv)
    except (UserError, RecipeError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
