"""The dashboard's only way to the data: the control plane's Admin and Query RPCs, through
proto/ only (the dashboard imports nothing from controlplane/).

Two failure kinds the pages tell apart:
- Unreachable: nothing answered (no server, network, deadline). The page says so and stays up.
- CommandFailed: the control plane answered with a refusal (a plan in the wrong state, a bad
  argument); its message is shown as it is, since it says what and why.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Optional

import grpc
import pandas as pd

from headroom_sidecar.dashboard.settings import DashboardSettings
from headroom_sidecar.proto import headroom_pb2 as pb
from headroom_sidecar.proto import headroom_pb2_grpc
from headroom_sidecar.proto.client import AdminClient, reply_json
from headroom_sidecar.proto.credentials import ClientCredentials
from headroom_sidecar.proto.query_result import decode_result

# Status codes that mean "no answer": the channel is rebuilt before the next call, so a control
# plane that comes back is seen at once instead of after gRPC's reconnect backoff.
_NO_ANSWER = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.CANCELLED}
_PING_TIMEOUT_S = 2.0
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class Unreachable(Exception):
    """The control plane did not answer."""


class CommandFailed(Exception):
    """The control plane answered with an error status; `message` is its own words."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


class ControlPlaneClient:
    """AdminClient and the Query RPC with deadlines; thread-safe (Streamlit sessions share it).

    The Query RPC is called on its stub rather than through QueryClient, whose errors fold
    UNAVAILABLE into "failed": here "nobody answered" and "the SQL was refused" must differ."""

    def __init__(self, settings: DashboardSettings, credentials: Optional[ClientCredentials] = None):
        """credentials: the operator's certificate or token; None = from HEADROOM_TLS_CA,
        HEADROOM_TLS_CERT, HEADROOM_TLS_KEY, HEADROOM_TOKEN, HEADROOM_LOCAL_TOKEN."""
        self.settings = settings
        self.address = settings.address
        self.credentials = credentials or ClientCredentials.resolve()
        self._lock = threading.Lock()
        self._admin: Optional[AdminClient] = None
        self._channel: Optional[grpc.Channel] = None

    # ------------------------------------------------------------------ channels
    def _clients(self) -> tuple[AdminClient, headroom_pb2_grpc.HeadroomStub]:
        with self._lock:
            if self._admin is None:
                self._admin = AdminClient(self.address, actor=self.settings.operator,
                                          timeout_s=self.settings.timeout_s,
                                          credentials=self.credentials)
                options = [("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES)]
                self._channel = self.credentials.channel(self.address, options=options)
            return self._admin, headroom_pb2_grpc.HeadroomStub(self._channel)

    def reset(self) -> None:
        with self._lock:
            admin, channel, self._admin, self._channel = self._admin, self._channel, None, None
        if admin is not None:
            admin.close()
        if channel is not None:
            channel.close()

    close = reset

    # ------------------------------------------------------------------ calls
    def admin(self, call: Callable[[AdminClient], Any]) -> Any:
        """One typed Admin call as the configured operator (read methods ignore the identity),
        e.g. admin(lambda a: a.show_plan(plan_id)); the reply as proto.client.reply_json."""
        admin, _ = self._clients()
        try:
            return reply_json(call(admin))
        except grpc.RpcError as e:
            raise self._failure(e.code(), e.details() or "", "admin call") from None

    def query(self, sql: str, max_rows: int = 0, timeout_s: Optional[float] = None) -> pd.DataFrame:
        """Read-only SQL through the Query RPC, as a DataFrame (SQL NULL -> None/NaN)."""
        _, stub = self._clients()
        try:
            reply = stub.Query(pb.QueryRequest(sql=sql, max_rows=max_rows),
                               timeout=timeout_s or self.settings.timeout_s)
        except grpc.RpcError as e:
            raise self._failure(e.code(), e.details() or "", "query") from None
        return decode_result(reply.table).to_pandas()

    def ping(self) -> Optional[str]:
        """None when the control plane answers a trivial query, else why not."""
        try:
            self.query("SELECT 1 AS ok", timeout_s=_PING_TIMEOUT_S)
            return None
        except (Unreachable, CommandFailed) as e:
            return str(e)

    def _failure(self, code: grpc.StatusCode, details: str, command: str) -> Exception:
        if code in _NO_ANSWER:
            self.reset()
            return Unreachable(f"{self.address}: {details or code.name}")
        return CommandFailed(code.name, details or f"{command} failed")
