"""The pack's one text progress line, for the headless runner and the trainer.

On a terminal the line is redrawn in place with a carriage return; in a log (stderr not a
terminal) each report is a line of its own, with no carriage returns, so logs stay readable.
"""
import sys

from .threads import announce


class TextProgress:
    """`[label] ####........ done/total detail` on stderr; `close()` ends a redrawn line."""

    WIDTH = 20

    def __init__(self, label):
        self.label, self.open = label, False

    def update(self, done, total, detail=""):
        announce()  # the command line's thread choice, once, before its first progress line
        stream = sys.stderr
        tail = f" {detail}" if detail else ""
        if not stream.isatty():
            print(f"[{self.label}] {done}/{total}{tail}", file=stream, flush=True)
            return
        filled = min(max(int(self.WIDTH * done / max(total, 1)), 0), self.WIDTH)
        stream.write(f"\r[{self.label}] {'#' * filled}{'.' * (self.WIDTH - filled)} {done}/{total}{tail}")
        stream.flush()
        self.open = True

    def close(self):
        if self.open:
            sys.stderr.write("\n")
            self.open = False
