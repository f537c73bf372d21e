"""How every command ends on a refused input (one line on stderr, exit status 1), and the refusal of a
model a flag names."""
import sys


def fail(error):
    """A refused input: one line on stderr, exit status 1."""
    print(f"error: {error}", file=sys.stderr)
    return 1


def model_file(flag, name):
    """The file of the model `name` given to `flag` (a builtin/ name, a name in the model folders or a
    .safetensors file's path: nodes/model_paths.model_file); InputError naming the flag otherwise."""
    from ..core.errors import InputError
    from ..nodes import model_paths  # here, not at the top: the parser is built without torch

    try:
        return model_paths.model_file(name)
    except ValueError as error:  # named by the flag, not by the node input ckpt_name
        raise InputError(flag, str(error).removeprefix("ckpt_name: ")) from None
