"""Writing files so that a crash never leaves a half-written one, with the permissions a plain `open` would give.

Each file is written under a temporary name in the same folder and renamed over the target: readers see the old
file or the new one, never a piece. Temporary files and folders are created private (0600 / 0700) by
`tempfile`; before they are renamed into place they get the mode a normal file or folder would have under the
user's umask (typically 0644 / 0755), so a shared group or a serving account can read a run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def current_umask() -> int:
    try:  # Linux reports it without changing it (changing it, even briefly, races with other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    return 0o777 & ~current_umask()


def write_text(path: Path, text: str) -> None:
    """Write text atomically (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: the old file stays whole until the new one is complete."""
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from a file another process may be writing or may never have written: {} when the file is
    missing, unreadable, not JSON or not an object."""
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def make_public(folder: Path) -> None:
    """Give a folder made by tempfile (and everything in it) the modes a plain mkdir / open would have."""
    files_mode, folders_mode = file_mode(), folder_mode()
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), folders_mode)
        for name in files:
            os.chmod(os.path.join(root, name), files_mode)
    os.chmod(folder, folders_mode)


def sha256(path: Path) -> str:
    """Hex digest of a file, read in 1 MiB blocks (model files are larger than memory should hold twice)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def replace_folder(staging: Path, target: Path) -> None:
    """Put a finished folder where `target` is (the caller checked that replacing it was asked for). The old
    folder is moved aside before the new one takes its place, and deleted only after."""
    aside = None
    if target.exists():
        aside = target.with_name(f".replaced-{os.getpid()}-{target.name}")
        os.replace(target, aside)
    os.replace(staging, target)
    if aside is not None:
        import shutil

        shutil.rmtree(aside, ignore_errors=True)


def why_unwritable(folder: Path) -> str | None:
    """Why no folder can be made at `folder`, or no file written in it - under a file, a read-only filesystem,
    /proc, a full disk, no permission - or None when both can. It tries to create an unnamed file (gone when
    closed) in the nearest existing folder rather than asking os.access: root passes every permission check yet
    cannot write to a read-only mount or to /proc."""
    existing = Path(folder)
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return f"'{existing}' is a file, so no folder can be made " + ("there" if existing == Path(folder) else "under it")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as exc:
        return f"no file can be created in '{existing}' ({_os_reason(exc)})"
    return None


def _os_reason(exc: OSError) -> str:
    reasons = {errno.EROFS: "it is on a read-only filesystem", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied", errno.ENOSPC: "its disk is full",
               errno.ENOENT: "the filesystem there holds no ordinary files"}  # what /proc says of its folders
    return reasons.get(exc.errno, str(exc.strerror or exc))
