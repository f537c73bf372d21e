"""Python's garbage collector during the command line's start-up (`python -m ldm_nodes`), never a host's.

Importing torch and the pack makes several hundred thousand Python objects, and every full collection
on the way walks all of them; later collections, while sampling, walk them again. On the 2-core machine
that was about half a second of the first image (bench/RESULTS.md). So the command line turns collection
off before torch is imported (`pause_for_cli`, called by the package's __init__ only when this
interpreter was started as `python -m ldm_nodes`, as threads.short_spin_for_cli), and once the imports
are done `resume` moves every object made so far into the permanent generation (gc.freeze) and turns
collection on again: cycles made afterwards are collected as ever, what the imports made is not scanned
again. A host (ComfyUI) imports torch first, so its collector is never touched.
"""
import gc

from .threads import PACKAGE, cli_before_torch

_paused = False


def pause_for_cli(package=PACKAGE, argv=None):
    """Turn collection off when this process is the pack's command line and torch is not loaded yet.
    Returns whether it did."""
    global _paused
    if not cli_before_torch(package, argv) or not gc.isenabled():
        return False
    gc.disable()
    _paused = True
    return True


def resume():
    """After the imports: freeze what exists and collect again, if pause_for_cli paused collection."""
    global _paused
    if _paused:
        gc.freeze()
        gc.enable()
        _paused = False
