"""Paths on disk: what stands in the way of a folder that is about to be written, and files written whole."""
import os
import tempfile
from contextlib import contextmanager, suppress

from safetensors import SafetensorError

from .errors import InputError


def file_in_the_way(path):
    """The nearest of `path` and its parents that exists, when it is not a folder (so `path` cannot be
    or become a folder); None otherwise."""
    for existing in (path, *path.parents):
        if existing.exists():
            return None if existing.is_dir() else existing
    return None


def unwritable_folder(path):
    """(the nearest existing folder of `path` and its parents, why nothing can be created in it) when
    it refuses a new entry (/proc, /sys, a read-only file system, no permission); None otherwise.
    Tried for real, with an empty folder made and removed at once (os.access says yes to root)."""
    existing = next((p for p in (path, *path.parents) if p.is_dir()), None)
    if existing is None:
        return None
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=existing))
    except OSError as error:
        return existing, error.strerror or str(error)
    return None


@contextmanager
def written_whole(path, suffix=".tmp"):
    """The name to write `path` under (path + suffix), moved into place when the block ends without an
    error and removed when it raises: a crash, a signal or a full disk mid-write never leaves a truncated
    file under `path`'s name, nor its half-written temporary. A failed write (OSError, SafetensorError: a
    full disk, a read-only folder) is an InputError naming `path` and saying whether a copy written before
    is intact."""
    tmp = f"{path}{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as error:
        with suppress(OSError):
            os.remove(tmp)
        if isinstance(error, (OSError, SafetensorError)):
            kept = "the copy saved before is intact" if os.path.exists(path) else "nothing was written"
            why = getattr(error, "strerror", None) or error  # SafetensorError has no strerror
            raise InputError(path, f"could not be written ({why}); {kept}") from None
        raise
