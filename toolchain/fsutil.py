"""Writing outputs safely, in one place: refuse to overwrite without --force, never replace what slim-edge
did not write, and write atomically (a temporary sibling renamed into place), so that a crash or a full disk
leaves the old output or none, never half of one and never a temporary file. Also the cache root and a
file's sha256, the two file facts every part of slim-edge shares."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path

from .errors import SlimEdgeError


def cache_dir(*parts: str) -> Path:
    """A path under slim-edge's cache: $SLIM_EDGE_CACHE, else $XDG_CACHE_HOME/slim-edge, else ~/.cache/slim-edge."""
    root = env_folder("SLIM_EDGE_CACHE", "~/.cache/slim-edge")
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "slim-edge"
    return Path(root, *parts)


def env_folder(var: str, unset: str) -> Path | None:
    """The folder environment variable `var` names, None when it is unset or empty; a file there is refused
    (`unset`: where things go without the variable, for the message)."""
    if not os.environ.get(var):
        return None
    path = Path(os.environ[var]).expanduser()
    if path.exists() and not path.is_dir():
        raise SlimEdgeError(f"{var}={path} is a file, not a folder; point it at a folder (or unset it for {unset})")
    return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def path_kind(path: Path, flag: str = "-o") -> str | None:
    """What `path` is ("a file", "a folder", "a symlink loop", "a FIFO", ...), None when nothing is there; a path
    the OS cannot look up at all (too long, a file used as a folder) is a SlimEdgeError naming the reason."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop"
        if e.errno == errno.ENOTDIR:
            return None
        shown = str(path) if len(str(path)) <= 200 else f"{str(path)[:120]}...({len(str(path))} characters)"
        raise SlimEdgeError(
            f"{flag + ' ' if flag else ''}{shown}: {e.strerror}; choose a shorter or valid path"
        ) from None
    if stat.S_ISREG(st.st_mode):
        return "a file"
    if stat.S_ISDIR(st.st_mode):
        return "a folder"
    return {
        stat.S_IFIFO: "a FIFO",
        stat.S_IFSOCK: "a socket",
        stat.S_IFCHR: "a character device",
        stat.S_IFBLK: "a block device",
    }.get(stat.S_IFMT(st.st_mode), "not a regular file")


def check_writable(path: Path, flag: str = "-o") -> None:
    """Refuse an output whose nearest existing folder cannot be written (read-only, immutable, a full quota),
    found by writing there: the permission bits do not tell for root or a read-only mount."""
    folder = next((d for d in Path(path).absolute().parents if d.is_dir()), None)
    try:
        fd, name = tempfile.mkstemp(prefix=".slim-edge-write-test.", dir=folder)
    except OSError as e:
        raise SlimEdgeError(
            f"{flag} {path}: cannot write in {folder} ({e.strerror}); choose a folder you can write to"
        ) from None
    os.close(fd)
    os.unlink(name)


def check_output_file(path: Path, force: bool, flag: str = "-o") -> None:
    """Refuse an existing output file without --force, and a folder or a symlink always: --force replaces a
    file, it does not follow a link to somewhere else or remove a folder."""
    path = Path(path)
    path_kind(path, flag)  # a path too long to look up is named, not a traceback
    if path.is_symlink():
        raise SlimEdgeError(
            f"{flag} {path} is a symlink (to {os.readlink(path)}); slim-edge does not write "
            f"through links: remove it or choose another path"
        )
    if path.is_dir():
        raise SlimEdgeError(f"{flag} {path} is a folder, not a file; choose a file path")
    if path.exists() and not force:
        raise SlimEdgeError(f"{path} already exists; pass --force to replace it, or choose another {flag}")
    check_writable(path, flag)


def check_output_dir(path: Path, force: bool, is_ours, flag: str = "-o", inputs=()) -> None:
    """Refuse an output folder that exists without --force; with --force replace only an empty folder or one
    `is_ours(path)` recognises (slim-edge wrote it), never a file, a link, an input or a folder above one.
    Called before the work, so that a refusal costs nothing."""
    path = Path(path)
    path_kind(path, flag)
    for src in inputs:
        src = Path(src).resolve()
        out = path.resolve()
        if out == src or out in src.parents:
            raise SlimEdgeError(
                f"{flag} {path} is the input {src} or a folder that holds it; writing there "
                f"would delete the input: choose another {flag}"
            )
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        kind = "a symlink" if path.is_symlink() else "a file"
        raise SlimEdgeError(
            f"{flag} {path} is {kind}, not a folder slim-edge wrote; it is left alone: "
            f"remove it or choose another {flag}"
        )
    check_writable(path, flag)
    if not path.exists():
        return
    if any(path.iterdir()) and not is_ours(path):
        raise SlimEdgeError(
            f"{flag} {path} is a folder slim-edge did not write (even --force only replaces "
            f"slim-edge's own output or an empty folder); choose another {flag} or empty it yourself"
        )
    if not force:
        raise SlimEdgeError(f"{path} already exists; pass --force to replace it, or choose another {flag}")


def _full_disk(e: OSError, path: Path) -> SlimEdgeError | None:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return SlimEdgeError(
            f"the disk is full writing {path} ({e.strerror}); nothing was written: free "
            f"some space or choose another output path"
        )
    return None


def check_free_space(folder: Path, need: int, flag: str = "-o") -> None:
    free = shutil.disk_usage(folder).free
    if free < need:
        raise SlimEdgeError(
            f"not enough disk space in {folder}: need {need >> 20} MiB, {free >> 20} MiB free; "
            f"free some space or choose another {flag}"
        )


def fsync_dir(folder: Path) -> None:
    """fsync a folder: its entries (a rename into it) reach the disk."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then each folder bottom-up: what must precede renaming `folder` into
    place, or a crash soon after the rename can leave the new name over files the disk never got whole."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(Path(root))


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path` to write by name (a writer, a subprocess, torch.save); on
    success it is fsynced and renamed over `path`, on any failure removed. A full disk is a SlimEdgeError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make every output private
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        full = _full_disk(e, path)
        if full is not None:
            raise full from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: bytes | str) -> Path:
    """Write `data` (str as UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: Path):
    """Yield an empty temporary folder beside `path`; on success it replaces `path` (which the caller has
    checked is slim-edge's to replace), on any failure it is removed. A full disk is a SlimEdgeError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        fsync_tree(tmp)
        if path.exists():  # rename the old one aside first, so that a failed swap loses nothing
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = _full_disk(e, path)
        if full is not None:
            raise full from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def scratch_dir(near: Path):
    """A temporary folder beside `near` (same file system, so a rename from it is atomic), removed on exit
    whatever happens. A full disk is a SlimEdgeError."""
    near = Path(near)
    near.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{near.name}.", suffix=".tmp", dir=near.parent))
    try:
        yield tmp
    except OSError as e:
        full = _full_disk(e, near)
        if full is not None:
            raise full from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def move_into_place(src: Path, dst: Path) -> Path:
    """Rename a finished file (written in a scratch_dir beside `dst`) over `dst`."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)
    return Path(dst)
