"""Model files for tests: a copy of a model file with its tensors or its metadata edited."""
import json

from safetensors.torch import load_file, save_file

from ..core.checkpoint import METADATA_KEY, read_header


def edited_copy(source, target, edit_tensors=None, edit_metadata=None):
    """Write `target`: the model file `source` with edit_tensors({key: tensor}) and edit_metadata(our
    metadata dict) applied, each returning the new value. Returns `target`."""
    tensors = load_file(source)
    metadata = read_header(source).metadata
    tensors = edit_tensors(tensors) if edit_tensors else tensors
    metadata = edit_metadata(dict(metadata)) if edit_metadata else metadata
    save_file(tensors, target, metadata={METADATA_KEY: json.dumps(metadata)})
    return target
