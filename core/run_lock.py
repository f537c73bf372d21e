"""A trainer's output folder: made before any work (`make_run_folder`), and held by one trainer at a
time through a lock file holding the trainer's process id.

`hold(folder)` creates <folder>/train.lock with the running process's id and removes it when the block
ends, however it ends (an error, Ctrl-C). A lock left by a process that is gone (killed, a crash of
the machine) is stale: it is taken over with a note. A lock whose process still runs refuses the
second trainer in one line naming its pid.
"""
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError

LOCK_NAME = "train.lock"
FRESH_S = 10  # a lock this young without a pid is one being written, not a stale one


def _age(path):
    try:
        return time.time() - os.stat(path).st_mtime
    except OSError:
        return FRESH_S


def running(pid):
    """Whether a process `pid` exists (on Windows, where no signal can only probe, always assumed)."""
    if pid == os.getpid():
        return False  # this process's own lock, left by an earlier run in it: not another trainer
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _holder(path):
    """The pid written in the lock `path`, or None when it is unreadable, empty or not a number."""
    try:
        with open(path) as f:
            text = f.read(32).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@contextmanager
def hold(folder, flag="--out"):
    """Hold <folder>/train.lock for the block (see the module docstring); InputError naming `flag` when
    another trainer holds it."""
    path = os.path.join(folder, LOCK_NAME)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid = _holder(path)
            if pid is None and _age(path) < FRESH_S:  # created this instant, its pid not written yet
                raise InputError(flag, f"{folder}: another trainer is starting on this folder") from None
            if pid is not None and running(pid):
                raise InputError(flag, f"{folder}: another trainer (pid {pid}) is running on this folder; wait for "
                                       f"it to finish or stop it (if no trainer runs, delete {path})") from None
            print(f"{folder}: taking over a stale lock ({'pid ' + str(pid) if pid else 'no pid'}, no longer running)",
                  file=sys.stderr)
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        except OSError as error:
            raise InputError(flag, f"{folder}: cannot write its lock file ({error.strerror or error})") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        break
    else:
        raise InputError(flag, f"{folder}: its lock {path} could not be taken; delete it if no trainer runs")
    try:
        yield path
    finally:
        if _holder(path) == os.getpid():
            try:
                os.remove(path)
            except OSError:
                pass


def make_run_folder(out, flag="--out"):
    """Create the folder `out`, returning the folders made (outermost first) so a refused run can remove
    them (`remove_empty`); InputError naming `flag` when it cannot be made (/proc/x, a read-only place)."""
    path, made = Path(out).absolute(), []
    while not path.exists():
        made.append(path)
        path = path.parent
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(flag, f"{out}: cannot be created ({error.strerror or error})") from None
    return made[::-1]


def remove_empty(made):
    """Remove the folders make_run_folder made, deepest first, where still empty (a refused run writes nothing)."""
    for path in reversed(made):
        try:
            path.rmdir()
        except OSError:
            return
