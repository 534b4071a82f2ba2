"""
Writing files so that nothing is lost and nothing half-written is ever read:
- atomic_write: a file is written under a temporary name of its own beside it (two writers never share
  one), flushed to disk, then renamed over the old one, so that a write killed half-way leaves the previous
  file as it was; a full disk is a one-line error that says so.
- atomic_folder: a folder (a Hugging Face export) is written whole under a temporary name and renamed into
  place when complete; an existing folder is replaced only when asked.
- RunLock: a training run holds its folder, so that a second run on the same out_dir is refused instead of
  interleaving its checkpoints with the first's. The lock is the kernel's (flock), so a run killed by any
  signal, kill -9 included, leaves nothing stuck.

    atomic_write("out/run/history.json", lambda f: json.dump(history, f), "w")
    with atomic_folder("out/emo_tiny_hf", replace=False) as tmp:
        ...write every file into tmp...
    lock = RunLock("out/run")       # raises UserError if another process holds it; lock.release() at the end
"""

import errno
import fcntl
import os
import secrets
import shutil
from contextlib import contextmanager

from errors import UserError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def temporary_name(path):
    """A name beside path that no other writer uses: PATH.<pid>.<random>.tmp."""
    return f"{path.rstrip(os.sep)}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


class RecordingFile:
    """A file whose write remembers the OS error it met: torch.save turns a full disk into an unrelated
    RuntimeError ('unexpected pos'), so the cause is kept here to be reported."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def __getattr__(self, name):
        return getattr(self.file, name)


def disk_full_error(path, error):
    """The one-line error for a write of path that met a full disk."""
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    return UserError(f"no space left on the device to write {path} ({free / 2 ** 20:.0f} MiB free, "
                     f"{os.strerror(error.errno)}): nothing was replaced; free some space and run again")


def atomic_write(path, write, mode="wb"):
    """write(f) into a temporary file beside path, flushed to disk, then renamed over path: a write killed
    half-way leaves the old file as it was. A full disk raises a UserError (the old file kept)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_name(path)
    recorder = None
    try:
        with open(tmp, mode) as f:
            recorder = RecordingFile(f)
            write(recorder)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as error:
        cause = (recorder and recorder.error) or error
        if isinstance(cause, OSError) and cause.errno in DISK_FULL:
            raise disk_full_error(path, cause) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_target(folder, replace):
    """Refuse to write into folder when it holds anything, unless replace: a user error, before any work."""
    if os.path.isfile(folder):
        raise UserError(f"{folder} is a file: give a folder to write into")
    if os.path.isdir(folder) and os.listdir(folder) and not replace:
        raise UserError(f"{folder} exists and is not empty: give another folder, or --replace to replace it")


@contextmanager
def atomic_folder(folder, replace=False):
    """A temporary folder beside folder to write into; when the block ends without error it becomes folder
    (an existing one replaced only with replace). A failure removes the temporary folder and leaves folder as
    it was."""
    check_target(folder, replace)
    tmp = temporary_name(folder)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            raise disk_full_error(folder, error) from None
        raise
    if os.path.exists(folder):  # set the old one aside first: a folder cannot be renamed over a full one
        old = temporary_name(folder)
        os.rename(folder, old)
        os.rename(tmp, folder)
        shutil.rmtree(old)
    else:
        os.rename(tmp, folder)


class RunLock:
    """An exclusive hold on a run's folder (folder/run.lock, flock) for this process's life or until
    release(): another process asking for it gets a UserError naming the holder."""

    def __init__(self, folder):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, "run.lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise UserError(f"{folder} is in use by another run (process {holder}): wait for it to end, or give "
                            "another out_dir") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
