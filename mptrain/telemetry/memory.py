"""Peak training memory.

CUDA: the caching allocator's `max_memory_allocated`. CPU (no allocator
statistics): the bytes the training step must hold at its peak — parameters,
gradients, optimizer state and master weights, plus the tensors autograd saves
for backward (counted by saved-tensor hooks, each storage once, parameters not
twice). Both are named in summary.json.
"""

from __future__ import annotations

import contextlib

import torch

from mptrain.precision.stepper import plain_tensors

CUDA_METHOD = "torch.cuda.max_memory_allocated"
CPU_METHOD = "params+grads+optimizer state+master weights+saved-for-backward tensors (saved_tensors_hooks)"


def _storage_key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr())


def tensor_bytes(tensors, seen: set | None = None) -> int:
    seen = set() if seen is None else seen
    total = 0
    for t in (plain for tensor in tensors for plain in plain_tensors(tensor)):  # quantized optimizer states: their parts
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


class PeakMemory:
    def __init__(self, device: torch.device):
        self.device = device
        self.method = CUDA_METHOD if device.type == "cuda" else CPU_METHOD
        self.peak = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    @contextlib.contextmanager
    def measure_step(self, state_tensors):
        """Wrap one training step; on CPU count what it saves for backward (the peak of a step)."""
        if self.device.type == "cuda":
            yield
            return
        seen: set = set()
        saved = [0]

        def pack(t):
            key = _storage_key(t)
            if key not in seen:
                seen.add(key)
                saved[0] += t.untyped_storage().nbytes()
            return t

        tensor_bytes(state_tensors(), seen)  # weights a layer saves are state, not counted twice
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        # after the step grads, optimizer state and masters all exist
        self.peak = max(self.peak, tensor_bytes(state_tensors()) + saved[0])

    def read(self) -> int:
        if self.device.type == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        return self.peak
