"""Where attrctl keeps things on disk, and how it writes them.

The cache (dequantised models, extracted corpora and tasks) lives in ``$ATTRCTL_CACHE`` if set,
else ``$XDG_CACHE_HOME/attrctl``, else ``~/.cache/attrctl``.

Three ways of writing that survive faults:

- :func:`atomic_write` / :func:`atomic_dir` — build a file or folder under a temporary name beside
  the target, then rename it into place, so a reader sees the old one or the new one, never half;
- :func:`append_durably` — append whole lines to a log-like file (synth rows, metrics), fsynced;
  a failed append cuts the file back to its previous length;
- :class:`PidLock` — one writer at a time for a run directory or a synth file.

A write that fails because of the machine — a full disk (``ENOSPC``), a file size limit
(``EFBIG``), a read-only or permission-denied folder — becomes a :class:`~attrctl.errors.WriteError`
naming the file (:func:`writing`), instead of a traceback; the earlier files are untouched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from attrctl.errors import AttrctlError, InUseError, WriteError


def cache_dir(*parts: str) -> Path:
    """The attrctl cache folder (created), or a subfolder of it."""
    root = os.environ.get("ATTRCTL_CACHE")
    if root:
        base = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "attrctl"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------- failed writes
#: errno values that mean "the machine would not take the write", not "attrctl has a bug"
WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
)


def write_error(path: str | os.PathLike, err: BaseException) -> WriteError | None:
    """The user-facing error for a failed write to ``path``, or None when ``err`` is not a
    full disk, a size limit, a read-only or a permission-denied folder. Recognises ``OSError``
    and the I/O errors safetensors reports as text (``... (os error 28)``)."""
    if isinstance(err, AttrctlError):
        return None
    code = err.errno if isinstance(err, OSError) else None
    if code is None:
        found = re.search(r"os error (\d+)", str(err))
        code = int(found.group(1)) if found else None
    if code not in WRITE_ERRNOS:
        return None
    return WriteError(
        f"{path}: cannot write ({os.strerror(code)}). What was written before is intact; free "
        "some space or make the folder writable, then run the same command again (it continues "
        "where it stopped)"
    )


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk, size limit or read-only folder while writing ``path`` into a
    :class:`WriteError` naming it; every other error passes through unchanged."""
    try:
        yield
    except Exception as err:
        converted = write_error(path, err)
        if converted is None:
            raise
        raise converted from None


# ------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"
) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync and rename it over ``path``.

    Raises:
        WriteError: the disk is full, a size limit was hit or the folder is read-only; ``path``
            is as it was.
    """
    path = Path(path)
    binary = "b" in mode
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with writing(path):
            with os.fdopen(fd, mode, encoding=None if binary else encoding) as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder under a temporary name beside ``path``; swap it into place on success.

    An existing ``path`` is renamed aside first and deleted only once the new folder is in place,
    so an interruption leaves the old folder or the new one (at worst under its aside name,
    ``.<name>.old-*``), never a half-deleted one.

    Raises:
        WriteError: as :func:`atomic_write`; ``path`` is as it was.
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with writing(path):
            yield tmp
            _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.replace(tmp, path)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, aside)  # onto the empty folder mkdtemp made: atomic, and the name is ours
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(aside, path)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def append_durably(fh: IO, path: str | os.PathLike, data: bytes) -> None:
    """Append ``data`` (whole lines) to the open file ``fh`` and fsync it. On any failure — a
    full disk halfway through, SIGINT — the file is cut back to its length before the call, so it
    never ends in half a line written by this call.

    Raises:
        WriteError: the disk is full, a size limit was hit or the file is read-only.
    """
    fd = fh.fileno()
    start = os.fstat(fd).st_size
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)
        converted = write_error(path, err) if isinstance(err, Exception) else None
        if converted is None:
            raise
        raise converted from None


# ------------------------------------------------------------------------- one writer at a time
_HELD: dict[str, list] = {}  # lock path → [fd, holds] for the locks this process holds


class PidLock:
    """An exclusive lock that keeps a second process from writing what this one writes.

    The lock is ``fcntl.flock`` on ``path`` (created if missing), taken without waiting, with the
    holder's pid written inside. A refusal names the holder as the kernel reports it
    (``/proc/locks``), and the pid in the file only where the kernel cannot say. The kernel
    drops a flock when its process dies, however it dies, so the lock file a killed process leaves
    behind is stale by construction and the next process takes it over; no pid guessing is
    involved. Taking it is atomic: of two processes trying at once, exactly one gets it.
    Re-entrant within a process.

    Args:
        path: the lock file (``<run dir>/lock``, ``<synth file>.lock``).
        what: the thing it protects, named in messages.
    """

    def __init__(self, path: str | os.PathLike, what: str):
        self.path = Path(path)
        self.what = what
        self.held = False
        self.stale_pid: int | None = None  # the pid found in a lock file taken over

    def acquire(self) -> PidLock:
        """Take the lock.

        Raises:
            InUseError: a live process holds it (the message names its pid).
            WriteError: the lock file cannot be created (read-only folder, full disk).
        """
        import fcntl

        if self.held:
            return self
        key = os.path.abspath(self.path)
        if key in _HELD:
            _HELD[key][1] += 1
            self.held = True
            return self
        for _ in range(100):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as err:  # a read-only folder, or a lock "file" that is a folder
                raise write_error(self.path, err) or AttrctlError(
                    f"{self.path}: cannot open the lock file ({err.strerror or err})"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder_pid(fd)
                os.close(fd)
                who = f"process {holder}" if holder else "another process"
                raise InUseError(
                    f"{self.what} is in use by {who} (lock file {self.path}); wait for it to "
                    "finish, or stop it"
                ) from None
            # The holder may have released (unlinked the file) between our open and our flock:
            # then we hold a lock on a file nobody else will open. Only the current file counts.
            if _same_file(fd, self.path):
                break
            os.close(fd)
        else:  # pragma: no cover - needs a lock file replaced 100 times in a row
            raise InUseError(f"{self.what}: could not take the lock file {self.path}")
        self.stale_pid = _file_pid(fd)
        try:
            with writing(self.path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        _HELD[key] = [fd, 1]
        self.held = True
        return self

    def release(self) -> None:
        """Give the lock up and delete the lock file (once every hold of this process is given
        up). Idempotent."""
        if not self.held:
            return
        self.held = False
        key = os.path.abspath(self.path)
        entry = _HELD.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _HELD[key]
        fd = entry[0]
        try:
            if _same_file(fd, self.path):  # unlink while holding: the next taker makes a new one
                with contextlib.suppress(OSError):
                    self.path.unlink()
        finally:
            os.close(fd)

    def __enter__(self) -> PidLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        st, now = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)


def _holder_pid(fd: int) -> int | None:
    """The pid of the process that holds the flock on ``fd``'s file, for a refusal message.

    Asked of the kernel first (:func:`_flock_holder`): the pid inside the lock file is written a
    moment after the flock is taken, so right after a killed holder's lock is taken over the file
    still names the dead process. Where the kernel cannot say (no ``/proc/locks``, or no matching
    entry), the pid in the file is a best-effort fallback: read once, no waiting, and named only if
    that process is alive; otherwise the refusal says "another process".
    """
    pid = _flock_holder(fd)
    if pid is None:
        pid = _file_pid(fd)
        if pid is not None and not _pid_alive(pid):
            pid = None
    return pid


def _flock_holder(fd: int, locks: str = "/proc/locks") -> int | None:
    """The pid holding an exclusive ``flock`` on ``fd``'s file other than this process, from the
    kernel's lock table; ``None`` where there is no such table or no such entry.

    A ``/proc/locks`` line reads ``1: FLOCK  ADVISORY  WRITE 2085 fe:00:2147312 0 EOF``: the pid,
    then the file as major:minor (hex) and inode (decimal). Waiters (``1: -> FLOCK ...``) are not
    holders and are skipped. A pid of 0 is a holder outside this pid namespace: not nameable.
    """
    try:
        st = os.fstat(fd)
        with open(locks, encoding="ascii", errors="replace") as fh:
            table = fh.read()
    except OSError:
        return None
    me = os.getpid()
    for line in table.splitlines():
        f = line.split()
        if len(f) < 6 or f[1] != "FLOCK" or f[3] != "WRITE":
            continue
        try:
            pid = int(f[4])
            major, minor, ino = f[5].split(":")
            dev = os.makedev(int(major, 16), int(minor, 16))
            if (dev, int(ino)) == (st.st_dev, st.st_ino) and pid not in (0, me):
                return pid
        except ValueError:
            continue
    return None


def _file_pid(fd: int) -> int | None:
    """The pid written in a lock file (whoever wrote it last, alive or not)."""
    with contextlib.suppress(OSError, ValueError):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text:
            return int(text)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only; PermissionError is another user's
    except (ProcessLookupError, OverflowError, ValueError):  # no such process, or not a pid
        return False
    except PermissionError:
        pass
    return True
