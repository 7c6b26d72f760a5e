"""Per-layer attention and MLP time within a traced request.

On CPU, perf_counter_ns around the module (its kernels run synchronously). On CUDA the host
returns before the kernels finish, so a pair of CUDA events brackets the module on the stream
and the elapsed times are read once, at the request's end.
"""
from __future__ import annotations

import enum
import time

import numpy as np
import torch


class Part(enum.IntEnum):
    ATTN = 0
    MLP = 1


class HostTimer:
    def __init__(self, num_layers: int):
        self._total_ns = np.zeros((len(Part), num_layers), dtype=np.int64)
        self._start_ns = np.zeros((len(Part), num_layers), dtype=np.int64)

    def start(self, part: Part, layer: int) -> None:
        self._start_ns[part, layer] = time.perf_counter_ns()

    def stop(self, part: Part, layer: int) -> None:
        self._total_ns[part, layer] += time.perf_counter_ns() - self._start_ns[part, layer]

    def totals_ms(self) -> np.ndarray:
        """[2, L] float32: row Part.ATTN, row Part.MLP."""
        return (self._total_ns / 1e6).astype(np.float32)


class CudaEventTimer:
    def __init__(self, num_layers: int, device: torch.device):
        self._device = device
        self._open: dict[tuple[int, int], torch.cuda.Event] = {}
        self._pairs: list[tuple[int, int, torch.cuda.Event, torch.cuda.Event]] = []
        self._num_layers = num_layers

    def start(self, part: Part, layer: int) -> None:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self._device))
        self._open[(part, layer)] = ev

    def stop(self, part: Part, layer: int) -> None:
        start = self._open.pop((part, layer), None)
        if start is None:
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record(torch.cuda.current_stream(self._device))
        self._pairs.append((part, layer, start, end))

    def totals_ms(self) -> np.ndarray:
        out = np.zeros((len(Part), self._num_layers), dtype=np.float32)
        if self._pairs:
            self._pairs[-1][3].synchronize()  # events on one stream complete in order
        for part, layer, start, end in self._pairs:
            out[part, layer] += start.elapsed_time(end)
        return out


def make_timer(num_layers: int, device: torch.device):
    if device.type == "cuda":
        return CudaEventTimer(num_layers, device)
    return HostTimer(num_layers)
