"""Modules whose weights are about to be loaded: built on the meta device, without initialising them.

Construction runs each layer's weight initialisation (nn.Linear's kaiming_uniform_, nn.Embedding's
normal_, ...). On the meta device that computes nothing, but some of those ops (normal_) go through
torch's Python reference implementations, whose first call imports torch._dynamo: about 1.8 s of a
2-core CPU run's start, for weights that the checkpoint replaces anyway. `empty_modules()` builds on
the meta device and skips those fills; shapes, dtypes and parameter registration are unchanged.
"""
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode

# In-place fills that modules call on their weights (Tensor methods by name: torch passes TensorBase's
# methods as often as Tensor's); torch.nn.init's functions are skipped whole. A meta tensor scaled by a
# number is the same meta tensor, and torch.randn / torch.rand give empty meta tensors: their meta
# kernels live in Python too (a transformer's init scales random draws).
_FILLS = {"normal_", "uniform_", "random_", "zero_", "fill_"}
_SCALINGS = {"div", "mul", "__truediv__", "__mul__"}
_FACTORIES = {torch.randn: torch.empty, torch.rand: torch.empty}


def _is_fill(func):
    return getattr(func, "__name__", None) in _FILLS or getattr(func, "__module__", None) == "torch.nn.init"


class _SkipFills(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = next(iter([*args, *kwargs.values()]), None)  # the tensor filled: first, positional or not
        if _is_fill(func) and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        if (getattr(func, "__name__", None) in _SCALINGS and len(args) == 2 and isinstance(args[0], torch.Tensor)
                and args[0].is_meta and isinstance(args[1], (int, float))):
            return args[0]
        return _FACTORIES.get(func, func)(*args, **kwargs)


@contextmanager
def empty_modules():
    """Modules constructed inside are on the meta device with uninitialised parameters: load them with
    `module.load_state_dict(state, assign=True)` (or use them only for their shapes)."""
    with torch.device("meta"), _SkipFills():
        yield
