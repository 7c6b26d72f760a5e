"""Control commands from the control plane (plans, rollbacks, trials), run in arrival order on
their own thread, so a slow plan never delays the exporter's acks or its batches."""
from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Optional

from headroom_sidecar.agent import wire

log = logging.getLogger("headroom.exporter")

OnControl = Callable[[wire.ControlCommand], None]


class ControlDispatcher:
    """put() never blocks; close() lets the commands already queued run, then ends the thread."""

    def __init__(self, on_control: Optional[OnControl]):
        self._on_control = on_control
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="headroom-export-control",
                                        daemon=True)
        self._thread.start()

    def put(self, command: wire.ControlCommand) -> None:
        self._commands.put(command)

    def close(self) -> None:
        self._commands.put(None)

    def _run(self) -> None:
        while True:
            command = self._commands.get()
            if command is None:
                return
            if self._on_control is None:
                log.warning("headroom exporter: no on_control handler; ignored %s",
                            type(command).__name__)
                continue
            try:
                self._on_control(command)
            except Exception:   # a failing handler must not stop the commands after it
                log.exception("headroom exporter: on_control failed for %s", type(command).__name__)
