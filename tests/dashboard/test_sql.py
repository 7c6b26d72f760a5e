"""SQL literals and trace filters, checked by what the real Query RPC answers."""
import time

import pytest

from headroom_sidecar.dashboard.client import CommandFailed, ControlPlaneClient
from headroom_sidecar.dashboard.settings import DashboardSettings
from headroom_sidecar.dashboard.sql import TraceFilter, literal
from tests.dashboard.kit import AGENT, TRAFFIC


@pytest.fixture
def client(world):
    c = ControlPlaneClient(DashboardSettings(address=world.address))
    yield c
    c.close()


@pytest.mark.parametrize("value", ["plain", "it's", "'; DROP TABLE plans; --", "a''b", "ünï\\code",
                                   "", "%_"])
def test_string_literal_reads_back_exactly(client, value):
    assert client.query(f"SELECT {literal(value)} AS v")["v"].tolist() == [value]


@pytest.mark.parametrize("value", [0, -7, 2**62, 0.1, -1.5e-300, True, False])
def test_number_literals_read_back_exactly(client, value):
    assert client.query(f"SELECT {literal(value)} AS v")["v"].tolist() == [value]


@pytest.mark.parametrize("bad,error", [(float("nan"), ValueError), (float("inf"), ValueError),
                                       ("a\x00b", ValueError), (b"bytes", TypeError)])
def test_unsafe_literals_are_refused(bad, error):
    with pytest.raises(error):
        literal(bad)


def _count(client, f: TraceFilter, now_s=None) -> int:
    return int(client.query(f"SELECT count(*) AS n FROM requests r "
                            f"{f.request_where('r', now_s=now_s)}")["n"].iloc[0])


def test_trace_filter_narrows_requests(client):
    assert _count(client, TraceFilter(agent_id=AGENT)) == len(TRAFFIC)
    assert _count(client, TraceFilter(agent_id=AGENT, tenant="globex", route="/code")) == 1
    assert _count(client, TraceFilter(agent_id="x' OR TRUE OR '")) == 0
    recent = TraceFilter(agent_id=AGENT, since_s=600)
    assert _count(client, recent) == len(TRAFFIC)
    assert _count(client, recent, now_s=time.time() + 3600) == 0     # an hour later: all too old


def test_refused_sql_is_a_command_failure_not_unreachable(client):
    with pytest.raises(CommandFailed, match="read-only"):
        client.query("DELETE FROM plans")
