"""Handshake: what the proxy forwards, rewrites or refuses during authentication."""

from __future__ import annotations

import pytest
from pgmigrate_proxy.protocol import schema
from pgmigrate_proxy.protocol.framing import frame
from pgmigrate_proxy.protocol.handshake import (
    SCRAM_PLUS,
    ChannelBindingMismatch,
    Handshake,
    HandshakeOutcome,
)
from pgmigrate_proxy.protocol.messages import BackendKeyData, ParameterStatus
from pgmigrate_proxy.protocol.types import PROXY_PARAMETER, FrontendType, TransactionStatus

PROXY_KEY = bytes(range(32))
ANNOUNCE = (ParameterStatus(PROXY_PARAMETER, "2.0.0"),)


def _handshake(*, server_tls: bool = False) -> Handshake:
    return Handshake(secret_key=PROXY_KEY, announce=ANNOUNCE, server_tls=server_tls)


def _backend(handshake: Handshake, name: str, /, **fields: object) -> bytes:
    return handshake.backend(schema.TYPES[name], schema.build_payload(name, **fields))


def _frontend(handshake: Handshake, name: str, /, **fields: object) -> bytes:
    return handshake.frontend(schema.TYPES[name], schema.build_payload(name, **fields))


@pytest.mark.parametrize(
    ("offered", "kept"),
    [
        (["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"], ["SCRAM-SHA-256"]),
        (["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"], ["SCRAM-SHA-256"]),
        (
            ["X-FIRST", SCRAM_PLUS, "SCRAM-SHA-256", "Z-LAST"],
            ["X-FIRST", "SCRAM-SHA-256", "Z-LAST"],
        ),
        (["SCRAM-SHA-256"], ["SCRAM-SHA-256"]),
    ],
)
def test_sasl_loses_channel_binding_only(offered: list[str], kept: list[str]) -> None:
    out = _backend(_handshake(), "AuthenticationSASL", mechanisms=offered)
    assert out == schema.build("AuthenticationSASL", mechanisms=kept)


@pytest.mark.parametrize(
    ("name", "fields"),
    [
        ("AuthenticationOk", {}),
        ("AuthenticationCleartextPassword", {}),
        ("AuthenticationMD5Password", {"salt": b"\x01\x02\x03\x04"}),
        ("AuthenticationSASLContinue", {"data": b"r=abc,s=salt,i=4096"}),
        ("AuthenticationSASLFinal", {"data": b"v=proof"}),
        ("ParameterStatus", {"name": "server_version", "value": "15.4"}),
        ("NoticeResponse", {"fields": {"S": "NOTICE", "M": "hi"}}),
    ],
)
def test_other_messages_pass_unchanged(name: str, fields: dict[str, object]) -> None:
    handshake = _handshake()
    assert _backend(handshake, name, **fields) == schema.build(name, **fields)
    assert handshake.outcome is HandshakeOutcome.AUTHENTICATING


@pytest.mark.parametrize("server_key", [b"\xaa\xbb\xcc\xdd", bytes(32)])
def test_backend_key_data_carries_the_proxy_secret(server_key: bytes) -> None:
    """Held until ReadyForQuery (the pool may give the client another server meanwhile)."""
    handshake = _handshake()
    assert _backend(handshake, "BackendKeyData", process_id=4242, secret_key=server_key) == b""
    assert handshake.server_key == BackendKeyData(4242, server_key)
    out = _backend(handshake, "ReadyForQuery", status=TransactionStatus.IDLE)
    key = schema.build("BackendKeyData", process_id=4242, secret_key=PROXY_KEY)
    assert out.startswith(key)


def test_the_announced_pid_is_the_server_the_client_gets() -> None:
    handshake = _handshake()
    _backend(handshake, "BackendKeyData", process_id=4242, secret_key=b"abcd")
    handshake.announced_pid = 777
    out = _backend(handshake, "ReadyForQuery", status=TransactionStatus.IDLE)
    assert out.startswith(schema.build("BackendKeyData", process_id=777, secret_key=PROXY_KEY))
    assert handshake.server_key == BackendKeyData(4242, b"abcd")  # the login server's own


def test_announce_precedes_the_first_ready_for_query() -> None:
    handshake = _handshake()
    _backend(handshake, "AuthenticationOk")
    _backend(handshake, "ParameterStatus", name="TimeZone", value="UTC")
    _backend(handshake, "BackendKeyData", process_id=1, secret_key=b"abcd")
    out = _backend(handshake, "ReadyForQuery", status=TransactionStatus.IDLE)
    announce = schema.build("ParameterStatus", name=PROXY_PARAMETER, value="2.0.0")
    key = schema.build("BackendKeyData", process_id=1, secret_key=PROXY_KEY)
    ready = schema.build("ReadyForQuery", status=TransactionStatus.IDLE)
    assert out == key + announce + ready
    assert handshake.outcome is HandshakeOutcome.READY
    assert handshake.server_parameters == {"TimeZone": "UTC"}


def test_error_response_fails_the_handshake() -> None:
    handshake = _handshake()
    fields = {"S": "FATAL", "V": "FATAL", "C": "28P01", "M": "password authentication failed"}
    out = _backend(handshake, "ErrorResponse", fields=fields)
    assert out == schema.build("ErrorResponse", fields=fields)
    assert handshake.outcome is HandshakeOutcome.FAILED


def _offer_sasl(handshake: Handshake) -> None:
    _backend(handshake, "AuthenticationSASL", mechanisms=["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])


def _initial(gs2: bytes) -> dict[str, object]:
    return {"mechanism": "SCRAM-SHA-256", "data": gs2 + b"n=,r=rOprNGfwEbeRWgbNEkqO"}


def test_gs2_flag_y_over_a_tls_server_link_is_refused() -> None:
    handshake = _handshake(server_tls=True)
    _offer_sasl(handshake)
    with pytest.raises(ChannelBindingMismatch, match="channel binding"):
        _frontend(handshake, "SASLInitialResponse", **_initial(b"y,,"))


@pytest.mark.parametrize(("server_tls", "gs2"), [(False, b"y,,"), (True, b"n,,"), (False, b"n,,")])
def test_gs2_flags_that_pass(server_tls: bool, gs2: bytes) -> None:
    handshake = _handshake(server_tls=server_tls)
    _offer_sasl(handshake)
    fields = _initial(gs2)
    assert _frontend(handshake, "SASLInitialResponse", **fields) == schema.build(
        "SASLInitialResponse", **fields
    )


def test_only_the_initial_response_is_checked() -> None:
    handshake = _handshake(server_tls=True)
    _offer_sasl(handshake)
    _frontend(handshake, "SASLInitialResponse", **_initial(b"n,,"))
    _backend(handshake, "AuthenticationSASLContinue", data=b"r=abc")
    assert _frontend(handshake, "SASLResponse", data=b"y,,c=biws") == schema.build(
        "SASLResponse", data=b"y,,c=biws"
    )


def test_a_password_before_any_sasl_offer_is_not_checked() -> None:
    handshake = _handshake(server_tls=True)
    _backend(handshake, "AuthenticationCleartextPassword")
    out = _frontend(handshake, "PasswordMessage", password="y,,secret")
    assert out == schema.build("PasswordMessage", password="y,,secret")


def test_a_malformed_initial_response_is_left_to_the_server() -> None:
    handshake = _handshake(server_tls=True)
    _offer_sasl(handshake)
    garbage = b"garbage-without-terminator"
    out = handshake.frontend(FrontendType.PASSWORD_MESSAGE, garbage)
    assert out == frame(FrontendType.PASSWORD_MESSAGE, garbage)


def test_client_message_cap_follows_postgres() -> None:
    """PG_MAX_AUTH_TOKEN_LENGTH until asked for SCRAM (PG_MAX_SASL_MESSAGE_LENGTH), then none."""
    handshake = _handshake()
    assert handshake.max_client_message == 65535
    _backend(handshake, "AuthenticationSASL", mechanisms=["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])
    assert handshake.max_client_message == 1024
    _backend(handshake, "AuthenticationOk")
    assert handshake.max_client_message is None


def test_client_message_cap_for_other_sasl_mechanisms() -> None:
    handshake = _handshake()
    _backend(handshake, "AuthenticationSASL", mechanisms=["OAUTHBEARER"])
    assert handshake.max_client_message == 65535
