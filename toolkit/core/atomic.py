"""Atomic file writes: written beside the target, then renamed over it, so that a reader (or a
rerun deciding what is finished) never sees half a file, whenever the writer was stopped; and
the folders they go into."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from toolkit.core.errors import UserError


def write_atomic(path: Path, data: bytes | str, durable: bool = False) -> None:
    """Write `data` to `path` in one rename. `durable`: flushed to disk before the rename (a
    marker that says other files are complete must not land before they do after a crash)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_npy(path: Path, array: Any) -> None:
    """A NumPy array saved as `path` (.npy) in one rename: an interrupted writer leaves no
    half-written file for a rerun to take as done."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array)
    write_atomic(path, buf.getvalue())


def make_folder(path: Path) -> Path:
    """`path` made as a folder to write into (with its parents); a user error in one line where
    it is a file, or cannot be made."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{path}: a file, not a folder to write into") from None
    except OSError as err:
        raise UserError(f"{path}: cannot make the folder ({err.strerror or err})") from None
    return path
