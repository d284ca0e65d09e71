"""Outputs that appear whole or not at all, and are the same bytes every time.

Every output is built in a temporary folder beside its target and renamed into
place only when complete (:func:`atomic_output`), so a failed or interrupted run
never leaves a half-written output, and an existing output survives a failure.
Leftovers of killed runs are cleaned by the next run; a run holds an ``flock``
on its temporary folder, which is how the cleaner tells a live run from a dead one. JSON is written with sorted
keys and nothing records a time, so identical inputs give byte-identical files.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file as _save_file

_TMP_TAG = "peftdsl-tmp"
_OLD_TAG = "peftdsl-old"


class OutputExists(FileExistsError):
    """The output path exists and ``--force`` was not given: a user error, raised before any work."""

    def __init__(self, target: Path) -> None:
        super().__init__(errno.EEXIST, "output exists (pass --force to replace it)", str(target))
        self.target = target


# =========================================================================== atomic directories


def check_output_free(target: Path, force: bool) -> None:
    """Raise :class:`OutputExists` when ``target`` exists and may not be replaced.

    The runner calls this before computing anything, so a refused run costs nothing.
    """
    target = Path(target)
    if not force and (target.exists() or target.is_symlink()):
        raise OutputExists(target)


@contextlib.contextmanager
def atomic_output(target: Path, *, force: bool) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; rename it into place on success.

    Beside the target (not in /tmp) so that the final rename stays on one file
    system and is atomic. On any exception, KeyboardInterrupt included, the
    temporary folder is removed and an existing target is left untouched.
    With ``force`` an existing target is swapped out in one step where the OS
    allows it (``renameat2(RENAME_EXCHANGE)``), otherwise moved aside first; a
    reader sees the old output or the new one, never a mix.
    """
    target = Path(target).absolute()
    clean_leftovers(target)  # first: it may put back an output a killed run had moved aside
    check_output_free(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp, lock = _locked_folder(target)
    try:
        yield tmp
        _fsync_tree(tmp)
        check_output_free(target, force)  # another process may have written it meanwhile
        _put_in_place(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            os.close(lock)


def clean_leftovers(target: Path) -> None:
    """Remove temporary folders that killed runs left beside ``target``.

    A folder that another run still holds (an ``flock`` on the folder, taken when
    it was made) is that run writing the same target right now and is left alone,
    whichever pid namespace (container) the run lives in. If a run died between
    moving the old output aside and renaming the new one in, the old output is put
    back: the user never asked to lose it. A folder is removed while this run holds
    its lock, so its owner cannot be mistaken for dead and then take it back.
    """
    target = Path(target).absolute()
    if not target.parent.is_dir():
        return
    for kind in (_OLD_TAG, _TMP_TAG):
        for path in sorted(target.parent.glob(f".{target.name}.{kind}-*")):
            with _claimed(path) as dead:
                if not dead:
                    continue
                if kind == _OLD_TAG and not (target.exists() or target.is_symlink()):
                    os.rename(path, target)
                else:
                    _remove(path)


@contextlib.contextmanager
def replaced_files(folder: Path, tag: str = "report") -> Iterator[Path]:
    """Yield a locked temporary folder inside ``folder``; on success each file written there
    replaces its namesake in ``folder``. For a report folder, which may hold other files:
    a failure (a full disk) removes the temporary files and leaves the previous ones whole;
    only the renames, which need no space, come after the last byte is written."""
    folder = Path(folder).absolute()
    anchor = folder / tag  # temporary folders are named `.<tag>.peftdsl-tmp-…`, cleaned as outputs' are
    folder.mkdir(parents=True, exist_ok=True)
    clean_leftovers(anchor)
    tmp, lock = _locked_folder(anchor)
    try:
        yield tmp
        _fsync_tree(tmp)
        for name in sorted(os.listdir(tmp)):
            os.replace(tmp / name, folder / name)
        _fsync_dir(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if lock is not None:
            os.close(lock)


def _sibling(target: Path, tag: str) -> Path:
    """``.<name>.<tag>-<pid>-<random>`` in the target's folder."""
    return target.parent / f".{target.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def _lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive ``flock`` on ``path``; None when another
    process holds it; raises OSError where the file system has no flock."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and not path.is_symlink() else 0)
                 | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _locked_folder(target: Path) -> tuple[Path, int | None]:
    """A new temporary folder beside ``target``, locked for as long as this run writes it.

    Between ``mkdir`` and ``flock`` a cleaner could take the folder for a dead run's: it
    removes folders while holding their lock, so a folder that is still ours after we
    hold the lock is safe; otherwise make another."""
    while True:
        tmp = _sibling(target, _TMP_TAG)
        tmp.mkdir()
        try:
            fd = _lock(tmp)
        except FileNotFoundError:
            continue  # a cleaner removed it already
        except OSError:
            return tmp, None  # no flock here (some network file systems): the pid in the name decides
        if fd is not None and _same_file(fd, tmp):
            return tmp, fd
        if fd is not None:
            os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


@contextlib.contextmanager
def _claimed(path: Path) -> Iterator[bool]:
    """Whether ``path`` is a dead run's leftover; while True, this process holds its lock."""
    try:
        fd = _lock(path)
    except FileNotFoundError:
        yield False  # another cleaner got there first
        return
    except OSError:
        yield not _owner_alive(path)  # no flock on this file system: fall back to the pid
        return
    if fd is None:
        yield False  # a live run holds it
        return
    try:
        yield True
    finally:
        os.close(fd)


def _owner_alive(path: Path) -> bool:
    """Where there is no flock: whether the pid in the name is a running process here."""
    match = re.search(r"-(\d+)-[0-9a-f]+$", path.name)
    if match is None:
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        return False  # ours from an earlier, failed attempt in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _put_in_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``, replacing an existing target without a mixed state."""
    if not (target.exists() or target.is_symlink()):
        os.rename(tmp, target)
        return
    if _exchange(tmp, target):
        _remove(tmp)  # now holds the old output
        return
    old = _sibling(target, _OLD_TAG)
    try:
        lock = _lock(target)  # held while the old output is aside, so no cleaner takes it for a leftover
    except OSError:
        lock = None
    try:
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        _remove(old)
    finally:
        if lock is not None:
            os.close(lock)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2``; False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` so the rename publishes durable data."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories
    finally:
        os.close(fd)


def save_file(tensors: Mapping[str, torch.Tensor], filename: str, metadata: dict[str, str]) -> None:
    """safetensors' ``save_file``, with its I/O failures as the ``OSError`` they are.

    The Rust writer reports a full disk as ``SafetensorError("… No space left on
    device (os error 28)")``; callers handle ``OSError`` (the runner's R601).
    """
    try:
        _save_file(tensors, filename, metadata=metadata)
    except SafetensorError as err:
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), filename) from err


def json_bytes(value: Any) -> bytes:
    """JSON as every output writes it: sorted keys, indent 2, a trailing newline (stable diffs)."""
    return (json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
