"""Where a writer may put its file: an existing folder, never one it invents."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError


def output_path(path: str | os.PathLike[str], what: str = "output") -> Path:
    """``path`` as a Path once its folder is known to exist and the path is not a folder.

    Writers refuse a missing parent folder instead of creating it: a typo in a path must not
    make new folders (at the filesystem root, even) behind the user's back.
    """
    target = Path(path)
    parent = target.parent
    if not parent.is_dir():
        state = "is not a folder" if parent.exists() else "does not exist"
        raise ConfigError(
            f"cannot write the {what} to {str(target)!r}: folder {str(parent)!r} {state}; "
            "create it first or choose another path"
        )
    if target.is_dir():
        raise ConfigError(
            f"cannot write the {what} to {str(target)!r}: it is a folder; give a file name"
        )
    return target
