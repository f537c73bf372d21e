"""The torch device a command was asked to run on, checked before any work."""
import torch

from .errors import InputError


def usable_device(name):
    """torch.device(name) once a tensor can be made on it; InputError naming --device otherwise."""
    try:
        chosen = torch.device(name)
        torch.empty(0, device=chosen)
    except (RuntimeError, AssertionError, ValueError) as error:
        raise InputError("--device", f"device {name[:80]!r} cannot be used: {str(error).splitlines()[0][:200]}") from None
    return chosen
