"""A server connection PostgreSQL closed cannot change hands, and the client is told a
connection failure (08006), as a direct client would be, not an internal error (XX000): seen
under the busy bench, a pooled client whose server was terminated while idle in the pool."""

from __future__ import annotations

import pytest
from pgmigrate_proxy.errors import ServerBusy, ServerLost
from pgmigrate_proxy.protocol.sqlstate import SqlState
from pgmigrate_proxy.runtime.backend import ServerConnection


def test_a_lost_server_refuses_to_change_hands_with_a_connection_failure() -> None:
    server = ServerConnection()  # no transport: as after connection_lost
    with pytest.raises(ServerLost) as raised:
        server.detach()
    assert raised.value.sqlstate is SqlState.CONNECTION_FAILURE
    assert isinstance(raised.value, ServerBusy)  # (what the pool's callers already catch)
