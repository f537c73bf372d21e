"""The run in progress: its folders and the hidden values (PROMPT, EXTRA_PNGINFO, UNIQUE_ID) that
the stand-ins and the graph's validation read, set by the runner for the length of one run."""
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Session:
    """The folders and hidden values (PROMPT, EXTRA_PNGINFO, UNIQUE_ID) of the run in progress."""

    out_dir: Path = Path("output")
    input_dir: Path = Path("input")
    prompt: dict | None = None
    extra_pnginfo: dict | None = None

    @property
    def temp_dir(self):
        return self.out_dir / "temp"

    def hidden(self, kind, node_id):
        return {"PROMPT": self.prompt, "EXTRA_PNGINFO": self.extra_pnginfo, "UNIQUE_ID": node_id}.get(kind)


_session = Session()


@contextmanager
def using(session):
    global _session
    previous, _session = _session, session
    try:
        yield session
    finally:
        _session = previous


def session():
    """The run in progress (default folders ./output and ./input outside a run)."""
    return _session
