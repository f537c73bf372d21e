"""The one exception type for a user's mistake.

`InputError` names the input it is about: a file, a command-line flag (`--steps`), a node input
(`cfg`) or a field of a file's header (`model.safetensors: num_timesteps`). It is a ValueError, so
code that already treats ValueError as "the user's input is wrong" keeps working. The command line
prints it as one line with a non-zero exit; ComfyUI shows it as the node's error; any other
exception is an internal bug and keeps its traceback.
"""


class InputError(ValueError):
    """A bad input, refused before any expensive work; `name` is the input, `reason` what is wrong."""

    def __init__(self, name, reason):
        self.name, self.reason = str(name), str(reason)
        super().__init__(f"{self.name}: {self.reason}")
