"""Real bytes a model holds: every parameter and buffer, shared storage counted once."""
from __future__ import annotations

import itertools

from torch import nn


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (int8 = 1 byte each); tied weights counted once."""
    seen, total = set(), 0
    for t in itertools.chain(model.parameters(), model.buffers()):
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key in seen or storage.data_ptr() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total
