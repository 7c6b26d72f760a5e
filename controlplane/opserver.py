"""The operator port: Query and the Admin RPCs on a gRPC server and event loop of their own.

Why apart from the agents' port: there, every call is read, handed to a worker and answered
through the event loop that also carries every agent's stream, so with a thousand agents an
operator's call waited behind their traffic (`bench/fleet.py`, 1,000 agents, README: Query
p99 289.4 ms there with `--operators-on agent`, 54.0 ms here). Here a second grpc.aio server
runs on its own loop thread with its own worker threads; only grpc's poller is shared (a
synchronous grpc.server was tried here first and slowed the agents' port). The agents' port
keeps serving Query/Admin too.

TLS: clients present no certificate here; operators authenticate with a signed token
(controlplane/auth.py). Without TLS (loopback): the same check as the agents' port.
"""
from __future__ import annotations

from typing import Optional, Sequence

import grpc

from headroom_sidecar.controlplane.aiohost import AioHost
from headroom_sidecar.controlplane.auth import ServerAuth


class OperatorServer:
    def __init__(self, handler: grpc.GenericRpcHandler, max_workers: int,
                 options: Sequence[tuple]):
        # stream_workers=1: no agent stream here; the pool starts no thread unless used.
        self._host = AioHost(max_workers, 1, options)
        self._host.on_loop(lambda: self._host.server.add_generic_rpc_handlers((handler,)))
        self.port = -1

    def listen(self, auth: ServerAuth, port: int, host: str) -> int:
        """Binds host:port (0 = a free one); the bound port, OSError if none."""
        try:
            self.port = self._host.listen(auth, port, host, require_client_cert=False)
        except OSError as e:
            raise OSError(f"operator port: {e}") from None
        return self.port

    def start(self) -> None:
        self._host.start()

    def stop(self, grace_s: Optional[float]) -> None:
        """Calls still running get grace_s, then the loop and its threads end."""
        self._host.stop(grace_s)
