"""The operator port: Query and the Admin RPCs served by a synchronous gRPC server of their own.

Why apart from the agents' port: there, every call is read, handed to a worker and answered
through the event loop that also carries every agent's stream, so with a thousand agents an
operator's call waited behind their traffic (bench/fleet.py, 1,000 agents: Query p99 ~500 ms
although the query itself ran in under 100 ms). This server has its own completion queue and
threads; the loop is not on its path. The agents' port keeps serving Query/Admin too.

TLS: clients present no certificate here; operators authenticate with a signed token
(controlplane/auth.py). Without TLS (loopback): the same check as the agents' port.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import grpc

from headroom_sidecar.controlplane.aiohost import bind_host
from headroom_sidecar.controlplane.auth import AuthMode, ServerAuth


class OperatorServer:
    def __init__(self, handler: grpc.GenericRpcHandler, max_workers: int,
                 options: Sequence[tuple]):
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="headroom-opport")
        self.server = grpc.server(self._pool, handlers=(handler,), options=list(options))
        self.port = -1

    def listen(self, auth: ServerAuth, port: int, host: str) -> int:
        """Binds host:port (0 = a free one); the bound port, OSError if none."""
        target = f"{bind_host(host)}:{port}"
        try:
            if auth.mode is AuthMode.TLS:
                bound = self.server.add_secure_port(target, auth.credentials(False))
            else:
                bound = self.server.add_insecure_port(target)
        except RuntimeError as e:
            raise OSError(f"operator port cannot listen on {target}: {e}") from None
        if not bound:
            raise OSError(f"operator port cannot listen on {target}: address in use or "
                          "not available")
        self.port = bound
        return bound

    def start(self) -> None:
        self.server.start()

    def stop(self, grace_s: Optional[float]) -> None:
        """Calls still running get grace_s, then the threads end."""
        self.server.stop(grace_s).wait()
        self._pool.shutdown(wait=True, cancel_futures=True)
