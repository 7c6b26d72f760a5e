"""A grpc.aio server on an event loop of its own thread, usable from synchronous code.

Threads, whatever the number of connected agents: the loop's thread, grpc's poller, up to
`max_workers` for Query/Admin calls (the aio server runs sync handlers in this migration pool)
and up to `stream_workers` that handle agent messages off the loop.
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Coroutine, Optional, Sequence

import grpc

from headroom_sidecar.controlplane.auth import AuthMode, ServerAuth

_STOP_S = 10.0   # longest wait for the loop to finish stopping the server


class AioHost:
    def __init__(self, max_workers: int, stream_workers: int, options: Sequence[tuple]):
        self.operator_pool = ThreadPoolExecutor(max_workers, thread_name_prefix="headroom-operator")
        self.stream_pool = ThreadPoolExecutor(stream_workers, thread_name_prefix="headroom-stream")
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="headroom-cp-loop")
        self._thread.start()
        self.server: grpc.aio.Server = self.call(self._make(list(options)))

    async def _make(self, options: list) -> grpc.aio.Server:
        return grpc.aio.server(migration_thread_pool=self.operator_pool, options=options)

    def call(self, coro: Coroutine, timeout_s: Optional[float] = None) -> Any:
        """Runs `coro` on the loop; its result here (from any thread but the loop's)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def on_loop(self, fn: Callable[[], Any]) -> Any:
        """fn() on the loop's thread: the aio server's setup calls are made there."""
        async def run():
            return fn()
        return self.call(run())

    def listen(self, auth: ServerAuth, port: int, host: str, require_client_cert: bool) -> int:
        """Adds one listening port (TLS in TLS mode); the bound port number, OSError if none."""
        target = f"{bind_host(host)}:{port}"
        try:
            if auth.mode is AuthMode.TLS:
                creds = auth.credentials(require_client_cert)
                bound = self.on_loop(lambda: self.server.add_secure_port(target, creds))
            else:
                bound = self.on_loop(lambda: self.server.add_insecure_port(target))
        except RuntimeError as e:
            bound, reason = 0, str(e)
        else:
            reason = "address in use or not available"
        if not bound:
            raise OSError(f"control plane cannot listen on {target}: {reason}")
        return bound

    def start(self) -> None:
        self.call(self.server.start())

    def stop(self, grace_s: Optional[float]) -> None:
        """Stops serving (calls still running get grace_s), then the loop and the pools."""
        if self.loop.is_closed():
            return
        try:
            self.call(self.server.stop(grace_s), timeout_s=(grace_s or 0) + _STOP_S)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(_STOP_S)
            if not self._thread.is_alive():
                self.loop.close()
            # Stream workers finish their message (a closed session refuses new work at once).
            self.stream_pool.shutdown(wait=True, cancel_futures=True)
            self.operator_pool.shutdown(wait=True, cancel_futures=True)


def bind_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
