"""The example pictures the shipped workflows load (the pack's input/*.png), put where ComfyUI's
LoadImage looks, so every shipped workflow runs on first open.

A file already there is never replaced (it may be the user's own picture of the same name): each
copy is created exclusively (open mode "x"), which fails if the name exists.
"""
import logging
import os
from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "input"


def copy_example_inputs(input_dir, examples_dir=EXAMPLES_DIR):
    """Copy each examples_dir/*.png missing from `input_dir` into it; the names copied, sorted."""
    input_dir = Path(input_dir)
    input_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for source in sorted(Path(examples_dir).glob("*.png")):
        target = input_dir / source.name
        if os.path.lexists(target):
            continue
        data = source.read_bytes()
        try:
            with open(target, "xb") as out:  # FileExistsError if the name appeared meanwhile: it stays
                out.write(data)
        except FileExistsError:
            continue
        copied.append(source.name)
    return copied


def install_into_comfyui():
    """Copy the example inputs into ComfyUI's input folder (folder_paths.get_input_directory(), which
    follows --base-directory and --input-directory) and say so in one log line; the names copied."""
    import folder_paths

    input_dir = folder_paths.get_input_directory()
    try:
        copied = copy_example_inputs(input_dir)
    except OSError as error:  # a read-only input folder must not keep the nodes from loading
        logging.warning("ldm_nodes: could not copy the example inputs into %s: %s", input_dir, error)
        return []
    if copied:
        logging.info("ldm_nodes: copied the example inputs %s into %s (files of the same name are never "
                     "replaced)", ", ".join(copied), input_dir)
    return copied
