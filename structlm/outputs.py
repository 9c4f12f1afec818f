"""Output paths: checked before any work, written atomically, shareable, never left half-written.

* :class:`OutputFolder` reserves a folder output (``structlm prune --out``) up front: it refuses
  a path it must not replace, takes a lock so that two processes never write the same path,
  creates a staging folder beside it (which proves the place is writable) and, on
  :meth:`~OutputFolder.commit`, renames the finished staging folder into place.  Leaving the
  ``with`` block any other way (an error, Ctrl-C, SIGTERM) removes everything it created.
* :func:`staging_folder` / :func:`sweep_stale`: temporary folders are named with the PID of
  their process, so the ones a killed process (kill -9) leaves behind are recognised and removed
  by the next run that stages in the same place.
* :func:`check_writable_file` checks a single-file output (``--json``) before any work;
  :func:`write_atomic` writes it so that readers see nothing or all of it.
* :func:`share_modes` gives written files the modes ``save_pretrained`` would (0644 / 0755
  under umask 022): safetensors writes 0600 and staging folders are private until renamed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path


class OutputError(RuntimeError):
    """An output path cannot be written (the message names the path and the cause)."""


# --------------------------------------------------------------------------------------------
# staging folders named with the PID, and the sweep of those left by dead processes
# --------------------------------------------------------------------------------------------

def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _staging_pid(name: str, prefix: str) -> int | None:
    """The PID in ``{prefix}{pid}-{token}``, or None for a name of another shape."""
    pid, sep, _ = name[len(prefix):].partition("-")
    return int(pid) if sep and pid.isdigit() else None


def sweep_stale(parent: Path, prefix: str) -> list[Path]:
    """Remove ``parent/{prefix}{pid}-*`` entries whose process is gone; return what was removed."""
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid = _staging_pid(entry.name, prefix)
        if pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def make_staging(parent: Path, prefix: str) -> Path:
    """Create ``parent/{prefix}{pid}-{token}`` (mode 0777 & ~umask) after sweeping stale ones."""
    sweep_stale(parent, prefix)
    while True:
        path = parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


@contextlib.contextmanager
def staging_folder(parent: Path, prefix: str):
    """A PID-named temporary folder in ``parent``, removed on exit however the block ends."""
    path = make_staging(Path(parent), prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# modes and single files
# --------------------------------------------------------------------------------------------

def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_modes(root: Path) -> None:
    """Files 0666 & ~umask, folders 0777 & ~umask, under ``root`` (included)."""
    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(folder, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(folder, f), 0o666 & ~mask)


def write_atomic(path: Path, payload: bytes) -> None:
    """Write a file so that readers see either nothing or the whole of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(payload)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def describe_os_error(e: OSError, creating: bool = False) -> str:
    """The cause of a failed write in words (``creating``: making an entry in an existing
    folder, where ENOENT means that file system takes none, as in /proc)."""
    if creating and e.errno == errno.ENOENT:
        return "that file system takes no new files"
    if e.errno == errno.ENOSPC:
        return "the disk is full"
    if e.errno == errno.EROFS:
        return "the file system is read-only"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return e.strerror or str(e)


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (symlinks followed)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _existing_parent_folder(path: Path, flag: str) -> Path:
    """The closest existing ancestor of ``path``, refused when it is a file (``path`` is under a file)."""
    ancestor = _nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise OutputError(f"{flag} {path}: cannot create it because {ancestor} is a file, not a folder")
    return ancestor


def _occupied(path: Path) -> bool:
    """Whether writing ``path`` would replace something: a file, or a folder that is not empty."""
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def _check_creatable_under(path: Path, flag: str) -> Path:
    """The closest existing ancestor of ``path``, checked to be a folder we can create things in."""
    ancestor = _existing_parent_folder(path, flag)
    try:
        probe = tempfile.mkdtemp(prefix=f".structlm-probe-{os.getpid()}-", dir=ancestor)
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot write in {ancestor} ({describe_os_error(e, creating=True)}); "
                          f"choose another path") from None
    os.rmdir(probe)
    return ancestor


def check_writable_file(path: Path, flag: str = "--json") -> None:
    """Refuse, before any work, a file output that could not be written at the end."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder; give a file name, e.g. {path / 'results.json'}")
    if path.exists():
        try:
            with open(path, "ab"):  # opening for append changes nothing in the file
                pass
        except OSError as e:
            raise OutputError(f"{flag} {path} cannot be written ({describe_os_error(e)}); choose another path") from None
        return
    _check_creatable_under(path, flag)


def write_output_file(path: Path, payload: bytes, flag: str = "--json") -> None:
    """Create the parents of ``path`` and write it atomically, one clear error on failure."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, payload)
    except OSError as e:
        raise OutputError(f"could not write {flag} {path} ({describe_os_error(e)})") from None


# --------------------------------------------------------------------------------------------
# folder outputs: reserve, lock, stage, commit
# --------------------------------------------------------------------------------------------

def _protected(out: Path) -> str | None:
    """Why ``out`` may never be replaced (the working folder, one of its parents, home, root)."""
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        return "it is the current folder or one of its parents"
    if resolved == Path.home().resolve():
        return "it is the home folder"
    if resolved == Path(resolved.anchor):
        return "it is the root of the file system"
    return None


def check_output_path(out: Path, force: bool, flag: str = "--out") -> None:
    """Refuse an output folder that exists and is not empty unless ``force``; never replace the
    working folder (``.``), its parents, home or root; refuse a path under a file."""
    out = Path(out)
    why = _protected(out)
    if why:
        raise OutputError(f"{flag} {out}: refusing to write a checkpoint there because {why}; "
                          f"name a new folder, e.g. {flag} out/pruned")
    if _occupied(out) and not force:
        raise FileExistsError(f"output path {out} exists and is not empty; choose another path or pass "
                              f"--force (force=True) to replace it")
    if not out.exists():
        _existing_parent_folder(out, flag)


_LEFTOVER = re.compile(r"^\..+\.(?:partial|old)-(?P<pid>\d+)-[0-9a-f]{8}$")  # staged or replaced outputs


def sweep_output_leftovers(parent: Path) -> None:
    """Remove what killed writers left in ``parent`` for any output: ``.NAME.partial-PID-*`` and
    ``.NAME.old-PID-*`` of dead PIDs, and ``.NAME.lock`` files that nobody holds."""
    for entry in parent.iterdir():
        match = _LEFTOVER.match(entry.name)
        if match and int(match["pid"]) != os.getpid() and not pid_alive(int(match["pid"])):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        elif entry.name.startswith(".") and entry.name.endswith(".lock") and entry.is_file():
            _remove_if_unheld(entry)


def _remove_if_unheld(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.path.samestat(os.fstat(fd), os.stat(path)):  # still the file at that path
            os.unlink(path)  # a writer that opened it meanwhile sees it gone and makes a new one
    except (BlockingIOError, FileNotFoundError):
        pass  # held by a live writer, or already gone
    finally:
        os.close(fd)


class OutputLock:
    """An exclusive ``flock`` on ``parent/.{name}.lock`` (holder's PID inside), taken without
    waiting: a second writer of the same output is refused at once.  The file is removed on
    release; one left by a killed process is simply locked again (the kernel dropped the lock)."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out.parent / f".{out.name}.lock"
        self.fd: int | None = None

    def acquire(self, flag: str = "--out") -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise OutputError(f"{flag} {self.out} is being written by another "
                                  f"structlm process (pid {holder}); wait for it to finish or choose "
                                  f"another path") from None
            # the file may have been unlinked by its previous holder between our open and flock
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


class OutputFolder:
    """Reserve folder ``out`` before any work and write it atomically::

        with OutputFolder(out, force) as output:   # checked, locked, staging folder created
            ...                                    # the long work
            write files into output.staging
            output.commit()                        # modes fixed, renamed into place

    The staging folder ``.{name}.partial-{pid}-{token}`` lives beside ``out``; parents of
    ``out`` that did not exist are created and, unless the commit happened, removed again."""

    def __init__(self, out, force: bool = False, flag: str = "--out"):
        self.out = Path(out)
        self.force = force
        self.flag = flag
        self.staging: Path | None = None
        self.committed = False
        self._lock = OutputLock(self.out)
        self._created: list[Path] = []  # parents we created, deepest last

    def __enter__(self) -> "OutputFolder":
        check_output_path(self.out, self.force, self.flag)
        try:
            self._make_parents()
            self._lock.acquire(self.flag)
            sweep_output_leftovers(self.out.parent)
            self.staging = make_staging(self.out.parent, f".{self.out.name}.partial-")
        except OSError as e:
            self._undo()
            where = Path(e.filename).parent if e.filename else self.out.parent  # the folder, not our entry
            raise OutputError(f"{self.flag} {self.out}: cannot write in {where} "
                              f"({describe_os_error(e, creating=True)}); choose another path") from None
        except BaseException:
            self._undo()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._undo()

    def _make_parents(self) -> None:
        missing = []
        parent = Path(os.path.abspath(self.out.parent))
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for folder in reversed(missing):
            os.mkdir(folder)
            self._created.append(folder)

    def _undo(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        self._lock.release()
        if not self.committed:
            for folder in reversed(self._created):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only while empty
        self._created = []

    def require_space(self, need_bytes: int, what: str) -> None:
        """Refuse now, rather than after the work, when the disk cannot hold the output."""
        free = shutil.disk_usage(self.staging).free
        if free < need_bytes:
            raise OutputError(f"{self.flag} {self.out}: not enough disk space, {free / 2**20:.0f} MiB free "
                              f"in {self.out.parent.resolve()} and {what} needs about "
                              f"{need_bytes / 2**20:.0f} MiB; free some space or choose another disk")

    def commit(self) -> Path:
        """Give the staged files shareable modes and rename them into place.  A path that
        appeared at ``out`` while we worked (checked under the lock) is replaced only with force."""
        if _occupied(self.out) and not self.force:
            raise FileExistsError(f"output path {self.out} appeared while structlm was working (written by "
                                  f"another program?) and was left as it is; choose another path or pass "
                                  f"--force (force=True) to replace it")
        try:
            share_modes(self.staging)
            _replace(self.staging, self.out)
        except OSError as e:
            raise OutputError(f"could not move the finished output into {self.out} ({describe_os_error(e)})") from None
        self.staging = None
        self.committed = True
        self._undo()
        return self.out


def _replace(staging: Path, out: Path) -> None:
    if not (out.exists() or out.is_symlink()):
        os.replace(staging, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.replace(out, old)
    os.replace(staging, out)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
