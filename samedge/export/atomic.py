"""Replacing a bundle folder without a moment in which it is missing, and without deleting what
samedge did not write.

* :func:`check_target` refuses an output folder that holds anything but a samedge bundle's own
  files (cheap: run it before building a model).
* :func:`swap_in` exchanges a staged folder with the target in one ``renameat2(RENAME_EXCHANGE)``
  on Linux, so readers see the old bundle or the new one, never neither; elsewhere (or on a file
  system without it) two renames, the old behaviour. The parent folder is fsynced after.
* :func:`clean_stale` removes ``.NAME.staging-PID`` / ``.NAME.old-PID`` siblings left by export
  processes that were killed (their PID no longer runs).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import sys
from pathlib import Path

from samedge.errors import BundleError
from samedge.runtime.bundle import BUNDLE_FORMAT, MANIFEST_NAME

# What samedge itself writes inside a bundle besides the manifest and its artifacts.
OWN_EXTRAS = ("report",)
_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:staging|old)-(?P<pid>\d+)$")
_OWN_TEMP = re.compile(r"^\..+\.(?:staging|old|tmp)-\d+$")  # half-written files of samedge's


def _listed_files(folder: Path) -> set[str] | None:
    """The files a samedge manifest in ``folder`` lists (None when there is no such manifest).

    Lenient on purpose: a manifest of an older format, or one missing fields, still tells which
    files samedge wrote there."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        return None
    listed = {MANIFEST_NAME}
    for artifact in manifest.get("artifacts") or []:
        files = artifact.get("files") if isinstance(artifact, dict) else None
        if isinstance(files, dict):
            listed.update(str(name) for name in files)
    return listed


def foreign_files(folder: Path) -> list[str]:
    """Files under ``folder`` that its samedge manifest does not account for (all of them when
    it has none): what replacing the folder would destroy without having written it."""
    listed = _listed_files(folder) or set()
    foreign = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if rel.parts[0] in OWN_EXTRAS or _OWN_TEMP.match(rel.parts[0]):
            continue
        if path.is_symlink() or not path.is_dir():
            if rel.as_posix() not in listed:
                foreign.append(rel.as_posix())
    return foreign


def check_target(target: Path) -> None:
    """Refuse to write a bundle over anything but nothing, an empty folder or a samedge bundle
    made only of its own files; the message names what would have been lost."""
    target = Path(target)
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise BundleError(f"{target} exists and is not a folder; refusing to replace it",
                          hint="choose a new output folder")
    if not any(target.iterdir()):
        return
    if _listed_files(target) is None:
        raise BundleError(
            f"{target} exists and is not a samedge bundle; refusing to overwrite it",
            hint="choose an empty or new output folder",
        )
    foreign = foreign_files(target)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5
                                          else "")
        raise BundleError(
            f"{target} is a samedge bundle but also holds files it did not write ({shown}); "
            "refusing to overwrite them",
            hint="move those files out of the bundle folder, or choose another output folder",
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(target: Path) -> list[Path]:
    """Delete staging/old folders of ``target`` whose writer process is gone; returns them."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for path in target.parent.iterdir():
        match = _LEFTOVER.match(path.name)
        if match and match["name"] == target.name and not _alive(int(match["pid"])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """Linux renameat2(2) through libc; False where the call or the flag is unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    call = getattr(libc, "renameat2", None)
    if call is None:
        return False
    call.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    if call(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(source), None, str(target))


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX: the directory entry lives in the parent)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def swap_in(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target`` atomically; the previous ``target`` (if any) is deleted.

    With RENAME_EXCHANGE the old folder ends up at ``staging``'s name and is removed from there;
    if the process dies before that, :func:`clean_stale` removes it later.
    """
    staging, target = Path(staging), Path(target)
    if target.exists():
        if _renameat2(staging, target, _RENAME_EXCHANGE):
            fsync_dir(target.parent)
            shutil.rmtree(staging, ignore_errors=True)
            return
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(staging, target)
        fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    if not _renameat2(staging, target, _RENAME_NOREPLACE):
        os.replace(staging, target)
    fsync_dir(target.parent)
