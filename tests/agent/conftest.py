import socket

import pytest


@pytest.fixture
def dead_target():
    """An address nobody listens on: a bound socket without listen() refuses connections."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()
