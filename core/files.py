"""Paths on disk: what stands in the way of a folder that is about to be written."""


def file_in_the_way(path):
    """The nearest of `path` and its parents that exists, when it is not a folder (so `path` cannot be
    or become a folder); None otherwise."""
    for existing in (path, *path.parents):
        if existing.exists():
            return None if existing.is_dir() else existing
    return None
