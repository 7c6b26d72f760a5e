"""What the server offers the components built on it (trials, rollout, loop): the agent messages
they subscribe to and the link that reaches connected agents.

Its own module so that those components depend on this protocol, not on controlplane/server.py:
the wiring (controlplane/app.py) hands them the server's state, and server.py imports none of them.
"""
from __future__ import annotations

import enum
from typing import Callable, Protocol


class InboundKind(enum.Enum):
    """Agent messages other components subscribe to (AgentMessage oneof field names)."""
    PLAN_STATUS = "plan_status"
    TRIAL_RESULT = "trial_result"
    HELLO = "hello"   # after registration: the agent's active plan settles a restart's rollouts


# callback(agent_id, message): message is pb.PlanStatus, pb.TrialResult or pb.AgentHello.
InboundCallback = Callable[[str, object], None]


class AgentLink(Protocol):
    """controlplane.server.ServerState as its subscribers see it (all methods thread-safe)."""

    def send_to_agent(self, agent_id: str, message) -> bool: ...

    def connected_agents(self) -> list[str]: ...

    def verified_agents(self) -> list[str]: ...

    def on(self, kind: InboundKind, callback: InboundCallback) -> None: ...
