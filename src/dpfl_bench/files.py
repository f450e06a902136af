"""Files written whole or not at all, so that an interrupted run, sweep or report never leaves half a file."""

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`write` into a temporary file beside `path`, then rename it over `path`: readers see the old file or
    the new one, never a part, and a failed write leaves the old one and no temporary file. The file gets
    the permissions of any new file (the umask's), not a temporary file's owner-only ones: results,
    checkpoints and reports are shared (a cluster's workers, a team's folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as file:
            write(file)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
