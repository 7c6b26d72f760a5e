"""The undo log: every change the executor makes to a model, so it can be reversed exactly.

Rollback restores the original module objects themselves (not copies), so the restored
model computes with the very same tensors and is bitwise identical to the unoptimised one.
Originals that a swap removes from the live model are parked on the host CPU, where they
take no accelerator memory, and moved back (an exact copy) on rollback.

`reverted()` undoes every step for the duration of a block and redoes it on exit, with the
same objects both ways, so the applied state comes back without re-running the transforms.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

_MISSING = object()


def module_device(module: nn.Module) -> torch.device | None:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return None


@dataclass
class _Swap:
    parent: nn.Module
    name: str
    old: nn.Module
    old_device: torch.device | None  # where `old` lived before it was parked


@dataclass
class _SetAttr:
    obj: Any
    name: str
    old: Any   # _MISSING if the attribute did not exist


class UndoLog:
    def __init__(self, park_device: str | torch.device = "cpu"):
        self.park_device = torch.device(park_device)
        self._steps: list[_Swap | _SetAttr] = []

    def __len__(self) -> int:
        return len(self._steps)

    def swap(self, parent: nn.Module, name: str, new: nn.Module, *, park: bool = True) -> nn.Module:
        """parent.<name> = new; returns the old module. `park=False` when `new` still uses the
        old module's children (moving them would move live weights)."""
        old = parent.get_submodule(name)
        device = module_device(old)
        self._steps.append(_Swap(parent, name, old, device))
        setattr(parent, name, new)
        if park and device is not None and device != self.park_device:
            old.to(self.park_device)
        return old

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        self._steps.append(_SetAttr(obj, name, getattr(obj, name, _MISSING)))
        setattr(obj, name, value)

    def del_attr(self, obj: Any, name: str) -> None:
        self._steps.append(_SetAttr(obj, name, getattr(obj, name)))
        delattr(obj, name)

    def undo(self) -> None:
        """Reverses every step, newest first; the log is empty afterwards."""
        while self._steps:
            _revert(self._steps.pop())

    @contextlib.contextmanager
    def reverted(self) -> Iterator[None]:
        """The state before every step inside the block; the steps' own objects back on exit."""
        redo: list[tuple[_Swap | _SetAttr, Any, bool]] = []
        try:
            for step in reversed(self._steps):
                redo.append(_revert(step))
            yield
        finally:
            for step, current, unparked in reversed(redo):
                _reapply(step, current, unparked, self.park_device)


def _owner(step: _Swap | _SetAttr) -> Any:
    return step.obj if isinstance(step, _SetAttr) else step.parent


def _put(obj: Any, name: str, value: Any) -> None:
    """obj.<name> = value, or no such attribute when value is _MISSING."""
    if value is not _MISSING:
        setattr(obj, name, value)
    elif hasattr(obj, name):
        delattr(obj, name)


def _revert(step: _Swap | _SetAttr) -> tuple[_Swap | _SetAttr, Any, bool]:
    """Puts `step.old` back; returns (step, what was there, whether `old` left the park)."""
    current = getattr(_owner(step), step.name, _MISSING)
    unparked = False
    if isinstance(step, _Swap) and step.old_device is not None \
            and module_device(step.old) != step.old_device:
        step.old.to(step.old_device)
        unparked = True
    _put(_owner(step), step.name, step.old)
    return step, current, unparked


def _reapply(step: _Swap | _SetAttr, current: Any, unparked: bool, park: torch.device) -> None:
    _put(_owner(step), step.name, current)
    if unparked:
        step.old.to(park)
