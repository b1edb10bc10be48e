"""Peak tensor memory of a piece of code, on any device, from inside one process.

On a GPU, `torch.cuda.max_memory_allocated` answers this; on a CPU the process's resident set
mixes the allocator's caches, the interpreter and every case of a side-by-side benchmark. So
this counts what the code's tensors hold: every storage created by an operator while the mode
is active is added when it appears and subtracted when it is freed (a weak reference to the
storage), and the peak of that sum is kept. Tensors that existed before (weights, optimizer
states of earlier steps) are not counted: the caller adds them (`resident_bytes`).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorMemory(TorchDispatchMode):
    """`with PeakTensorMemory() as m: ...` then `m.peak` (bytes above what existed before)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        if self._refs.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # An output that shares an input's storage (a view, an in-place or `out=` result) is
        # no new memory.
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for value in tree_flatten(out)[0]:
            if not isinstance(value, torch.Tensor):
                continue
            storage = value.untyped_storage()
            key, nbytes = id(storage), storage.nbytes()
            if nbytes == 0 or key in self._refs or storage.data_ptr() in inputs:
                continue
            self._refs[key] = weakref.ref(storage, lambda _, k=key, n=nbytes: self._freed(k, n))
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out


def resident_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
                   ) -> int:
    """Bytes of a module's parameters and buffers (shared ones once), its gradients, and an
    optimizer's state."""
    seen, total = set(), 0

    def add(tensor: torch.Tensor) -> None:
        nonlocal total
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()

    for tensor in [*module.parameters(), *module.buffers()]:
        add(tensor)
        if tensor.grad is not None:
            add(tensor.grad)
    if optimizer is not None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.numel() > 1:
                    add(value)
    return total
