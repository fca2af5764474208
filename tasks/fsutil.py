"""Folder replacement that never leaves a half-written result in place."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def replace_dir(new: Path, dest: Path) -> None:
    """Move the complete folder ``new`` to ``dest``.

    An existing ``dest`` is moved aside first and deleted only after the new one is in
    place; if the final rename fails, the old one is put back.
    """
    if not dest.exists() and not dest.is_symlink():
        os.replace(new, dest)
        return
    old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old-"))
    old.rmdir()  # only the unique name is wanted
    os.replace(dest, old)
    try:
        os.replace(new, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
