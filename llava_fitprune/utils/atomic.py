"""Atomic writes: a reader (or a rerun after a crash) sees the old file or the whole new one, never half.

A file is written to a hidden temporary sibling (same folder, so the rename stays on one file
system), flushed and fsynced, then `os.replace`d over the target. A folder is built as a hidden
temporary sibling and renamed into place when complete. Torch-free: cheap to import anywhere.

    write_json(path, obj)                       # also write_text, write_bytes
    with atomic_path("plot.png") as tmp:        # for writers that want a path (savefig, torch.save)
        fig.savefig(tmp)
    with atomic_dir("out/checkpoint-7") as tmp: # a folder appears only when everything in it is written
        save_everything(tmp)
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from typing import Any, Iterator

TMP_MARK = ".tmp-"  # in every temporary name: `.{name}.tmp-{pid}-{random}{suffix}`


def temporary_sibling(path: str | os.PathLike) -> str:
    """A fresh hidden name beside `path`, keeping its suffix (savefig picks the format from it)."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    suffix = os.path.splitext(name)[1]
    return os.path.join(folder, f".{name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


def _fsync_dir(folder: str) -> None:
    """Make a rename inside `folder` durable (best effort: not every OS or file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path to write; on success it replaces `path` (fsynced), on error it is removed."""
    path = os.fspath(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8", newline: str | None = None) -> None:
    """`newline` as in `open` (None: "\\n" becomes the platform's line end; "" keeps the text as is)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding=encoding, newline=newline) as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, newline: bool = True,
               **dumps_kw) -> None:
    """`json.dumps(obj, indent=indent, **dumps_kw)` plus a final newline (unless newline=False)."""
    write_text(path, json.dumps(obj, indent=indent, **dumps_kw) + ("\n" if newline else ""))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary folder to fill; on success it becomes `path` (an existing `path` is replaced).

    Killed before the end, only a hidden `.{name}.tmp-*` folder is left, which `path`'s readers never
    look at (and `remove_stale_temporaries` clears)."""
    path = os.path.abspath(os.fspath(path))
    tmp = temporary_sibling(path)
    os.makedirs(tmp)
    try:
        yield tmp
        publish_dir(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


def publish_dir(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Make the finished folder `tmp` (a sibling of `path`) become `path`: its files are fsynced, then
    it is renamed into place; an existing `path` is replaced."""
    tmp, path = os.path.abspath(os.fspath(tmp)), os.path.abspath(os.fspath(path))
    for root, _, files in os.walk(tmp):
        for name in files:
            _fsync_file(os.path.join(root, name))
    _fsync_dir(tmp)
    if os.path.lexists(path):  # rename over a non-empty folder fails: move the old one aside first
        old = temporary_sibling(path)
        os.replace(path, old)
        os.replace(tmp, path)
        remove_path(old)
    else:
        os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def remove_stale_temporaries(folder: str | os.PathLike, name: str) -> list[str]:
    """Remove temporaries that `atomic_path`/`atomic_dir` left for `folder/name` when a process was
    killed mid-write (call only when no other process is writing `name`). Returns what was removed."""
    folder = os.fspath(folder)
    prefix = f".{name}{TMP_MARK}"
    gone = [os.path.join(folder, n) for n in os.listdir(folder) if n.startswith(prefix)] if os.path.isdir(folder) else []
    for p in gone:
        remove_path(p)
    return gone
