"""How every command ends on a refused input: one line on stderr, exit status 1."""
import sys


def fail(error):
    """A refused input: one line on stderr, exit status 1."""
    print(f"error: {error}", file=sys.stderr)
    return 1
