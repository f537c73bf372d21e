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

# in-place fills that modules call on their weights directly; torch.nn.init's functions are skipped whole
_FILLS = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_}


def _is_fill(func):
    return func in _FILLS or getattr(func, "__module__", None) == "torch.nn.init"


class _SkipFills(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = next(iter([*args, *kwargs.values()]), None)  # the tensor filled: first, positional or not
        if _is_fill(func) and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)


@contextmanager
def empty_modules():
    """Modules constructed inside are on the meta device with uninitialised parameters: load them with
    `module.load_state_dict(state, assign=True)` (or use them only for their shapes)."""
    with torch.device("meta"), _SkipFills():
        yield
