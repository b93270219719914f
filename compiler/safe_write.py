"""Every file onnxforge writes goes through here: atomic, never over what it reads.

- `atomic_path(path)` yields a temp name in the target's folder
  (`.<name>.onnxforge-tmp-<pid>-<random>`); on success the temp is fsynced, given the
  usual permissions (`mode & ~umask`, 0666 for data, 0777 for libraries and
  programs) and renamed over `path`. A rename replaces a symlink at `path` itself,
  never the file it points to. On failure the temp is removed.
- An existing target that is not a regular file (a directory, a device, a fifo, a
  socket) is refused instead of being replaced.
- Temp files left by a killed run (their pid no longer alive) are removed the next
  time onnxforge writes into that folder.
- `check_writes(written, read)` refuses a written path that is the same file as a
  path the run reads (symlinks and hard links resolved); `reading(paths)` guards every
  atomic write made inside the `with` block against those paths, so passes that
  write (e.g. `--dump-dir`) are covered too.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import UnsafeWriteError

TEMP_MARK = ".onnxforge-tmp-"
_TEMP_RE = re.compile(r"^\..+" + re.escape(TEMP_MARK) + r"(\d+)-[0-9a-f]+(\.[^.]*)?$")

Labelled = tuple[str, "str | os.PathLike"]
# (label, path) pairs every atomic write in this context must not touch.
_GUARDED: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar(
    "onnxforge_guarded_reads", default=())


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------ written vs read


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Same inode where both exist (symlinks and hard links resolved), else same realpath."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _labelled(items: Iterable[Labelled | str | os.PathLike], default: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        if isinstance(item, tuple):
            label, path = item
        else:
            label, path = default, item
        if path is not None:
            out.append((label, os.fspath(path)))
    return out


def check_writes(written: Iterable[Labelled | str | os.PathLike],
                 read: Iterable[Labelled | str | os.PathLike]) -> None:
    """Raise UnsafeWriteError if a path to write is a file the run reads, or not writable.

    Items are paths or (label, path) pairs; the label names the path in the message
    (e.g. "--report", "external data of model.onnx").
    """
    reads = _labelled(read, "input")
    for label, path in _labelled(written, "output"):
        check_target(path, label)
        for read_label, read_path in reads:
            if _same_file(path, read_path):
                raise UnsafeWriteError(
                    f"{label} {path} is the same file as {read_label} {read_path}, which this "
                    "run reads; refusing to overwrite it (nothing was written). Choose another "
                    "output path."
                )


def check_target(path: str | os.PathLike, label: str = "output") -> None:
    """Refuse an existing target that is not a regular file (or a symlink, replaced)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UnsafeWriteError(f"{label} {path}: cannot be written ({exc})") from exc
    if stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode):
        return
    kind = ("a directory" if stat.S_ISDIR(info.st_mode) else
            "a character device" if stat.S_ISCHR(info.st_mode) else
            "a block device" if stat.S_ISBLK(info.st_mode) else
            "a fifo" if stat.S_ISFIFO(info.st_mode) else
            "a socket" if stat.S_ISSOCK(info.st_mode) else "not a regular file")
    raise UnsafeWriteError(
        f"{label} {path} is {kind}, not a regular file; refusing to replace it (nothing "
        "was written). Choose a file path."
    )


@contextlib.contextmanager
def reading(paths: Iterable[Labelled | str | os.PathLike]) -> Iterator[None]:
    """Inside the block, every atomic write refuses to replace one of `paths`."""
    token = _GUARDED.set(_GUARDED.get() + tuple(_labelled(paths, "input")))
    try:
        yield
    finally:
        _GUARDED.reset(token)


def guarded_reads() -> list[tuple[str, str]]:
    return list(_GUARDED.get())


# ------------------------------------------------------------------ temp files


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def is_temp_name(name: str) -> bool:
    return _TEMP_RE.match(name) is not None


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove onnxforge temp files/folders in `folder` whose writer is no longer alive."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_RE.match(entry.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def temp_name(path: Path, suffix: str = "") -> Path:
    """`.<name>.onnxforge-tmp-<pid>-<random><suffix>` in the folder of `path`."""
    return path.parent / f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def prepare_target(path: str | os.PathLike, label: str = "output") -> Path:
    """Checks before writing `path`: its folder exists, it is a regular file (or absent)
    and no file the run reads; stale temp files in its folder are cleaned."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_writes([(label, path)], guarded_reads())
    clean_stale_temps(path.parent)
    return path


def reserve_temp(path: str | os.PathLike, suffix: str = "", label: str = "output") -> Path:
    """`prepare_target(path)`, then create an empty temp file beside it (exclusively) for
    a writer to fill; hand it to `publish`, or remove it on failure."""
    path = prepare_target(path, label)
    tmp = temp_name(path, suffix)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    return tmp


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish(tmp: str | os.PathLike, path: str | os.PathLike, mode: int = 0o666,
            label: str = "output") -> Path:
    """fsync `tmp`, give it `mode & ~umask` and rename it over `path` (a symlink at
    `path` is replaced, not followed). Re-checks the target right before the rename."""
    tmp, path = Path(tmp), Path(path)
    check_writes([(label, path)], guarded_reads())
    _fsync_file(tmp)
    os.chmod(tmp, mode & ~umask())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, mode: int = 0o666, suffix: str = "",
                label: str = "output", reserve: bool = True) -> Iterator[Path]:
    """Yield a temp path beside `path` to write (by any means); publish it on success.

    `suffix` ends the temp name (tools that pick a format by suffix, e.g. `.so`);
    `reserve` creates it empty first (exclusive, so no other writer gets the name).
    """
    path = Path(path)
    tmp = reserve_temp(path, suffix, label) if reserve else temp_name(prepare_target(path, label),
                                                                        suffix)
    try:
        yield tmp
        publish(tmp, path, mode, label)
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, label: str = "output") -> Iterator[Path]:
    """Yield a fresh temp folder beside `path` (for writers of several files); the caller
    moves its files into place with `publish`; the folder is removed afterwards."""
    path = prepare_target(path, label)
    tmp = temp_name(path)
    tmp.mkdir(mode=0o700)
    try:
        yield tmp
    finally:
        _remove(tmp)


def write_bytes(path: str | os.PathLike, data: bytes, *, mode: int = 0o666,
                label: str = "output") -> Path:
    """Write `data` to `path` atomically."""
    with atomic_path(path, mode=mode, label=label) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, *, mode: int = 0o666,
               label: str = "output") -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return write_bytes(path, text.encode("utf-8"), mode=mode, label=label)


def write_json(path: str | os.PathLike, data: Any, *, default: Any = None,
               label: str = "output") -> Path:
    """Write `data` as indented JSON (and a final newline) to `path` atomically."""
    text = json.dumps(data, indent=2, default=default) + "\n"
    return write_text(path, text, label=label)
