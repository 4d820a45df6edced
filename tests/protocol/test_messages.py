"""messages.py against schema.py: byte-for-byte agreement, round trips, DecodeError on bad input."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable
from typing import Any

import pytest
from construct import ConstructError
from hypothesis import given
from hypothesis import strategies as st
from pgmigrate_proxy.protocol import schema
from pgmigrate_proxy.protocol.messages import (
    Authentication,
    BackendKeyData,
    CancelRequest,
    DecodeError,
    ErrorResponse,
    GSSENCRequest,
    NegotiateProtocolVersion,
    ParameterStatus,
    Query,
    ReadyForQuery,
    SASLInitialResponse,
    SSLRequest,
    StartupMessage,
    decode_startup_packet,
    fatal,
    startup_packet_length,
    terminate,
)
from pgmigrate_proxy.protocol.types import (
    MAX_STARTUP_PACKET,
    PROTOCOL_3_0,
    PROTOCOL_3_2,
    AuthCode,
    RequestCode,
    TransactionStatus,
)

# Strings as the wire carries them: any text without NUL (surrogates cannot be UTF-8).
TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=20)
NAME = TEXT.filter(bool)
INT32 = st.integers(0, 2**31 - 1)
SECRET = st.binary(min_size=4, max_size=256)
FIELD_CODE = st.sampled_from("SVCMDHPpqWstcdnFLR")


def _payload(data: bytes) -> bytes:
    return data[5:]


# --- startup packets ----------------------------------------------------------------------------


@given(
    protocol=st.sampled_from([PROTOCOL_3_0, PROTOCOL_3_2]),
    parameters=st.dictionaries(NAME, TEXT, max_size=5),
)
def test_startup_message(protocol: int, parameters: dict[str, str]) -> None:
    message = StartupMessage(protocol, parameters)
    packet = message.encode()
    assert packet == schema.build("StartupMessage", protocol=protocol, parameters=parameters)
    assert decode_startup_packet(packet) == message
    assert StartupMessage.decode(packet) == message
    assert startup_packet_length(packet) == len(packet) or len(packet) > MAX_STARTUP_PACKET


def test_ssl_and_gssenc_requests() -> None:
    for message, name in ((SSLRequest(), "SSLRequest"), (GSSENCRequest(), "GSSENCRequest")):
        packet = message.encode()
        assert packet == schema.build(name)
        assert decode_startup_packet(packet) == message
        schema.parse(name, packet)


@given(process_id=INT32, secret_key=SECRET)
def test_cancel_request(process_id: int, secret_key: bytes) -> None:
    message = CancelRequest(process_id, secret_key)
    packet = message.encode()
    assert packet == schema.build("CancelRequest", process_id=process_id, secret_key=secret_key)
    assert decode_startup_packet(packet) == message


@pytest.mark.parametrize("key_size", [4, 32, 256])
def test_cancel_request_key_sizes(key_size: int) -> None:
    """Protocol 3.0 keys are 4 bytes; 3.2 allows up to 256 (PostgreSQL 18 sends 32)."""
    key = bytes(i % 251 for i in range(key_size))
    packet = CancelRequest(1234, key).encode()
    assert decode_startup_packet(packet) == CancelRequest(1234, key)


@pytest.mark.parametrize("key_size", [0, 3, 257])
def test_cancel_request_bad_key_sizes(key_size: int) -> None:
    body = struct.pack("!II", RequestCode.CANCEL_REQUEST, 1234) + b"k" * key_size
    with pytest.raises(DecodeError):
        decode_startup_packet(struct.pack("!I", len(body) + 4) + body)
    with pytest.raises(ConstructError):
        schema.parse("CancelRequest", struct.pack("!I", len(body) + 4) + body)


def _packet(body: bytes) -> bytes:
    return struct.pack("!I", len(body) + 4) + body


STARTUP_BODY_OK = struct.pack("!I", PROTOCOL_3_0) + b"user\0bob\0database\0app\0\0"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (struct.pack("!I", PROTOCOL_3_0) + b"user\0bob\0", "no final terminator"),
        (struct.pack("!I", PROTOCOL_3_0) + b"user\0bob", "value not terminated"),
        (struct.pack("!I", PROTOCOL_3_0) + b"user\0\0", "name without value"),
        (struct.pack("!I", PROTOCOL_3_0) + b"user", "name not terminated"),
        (struct.pack("!I", PROTOCOL_3_0), "no terminator at all"),
        (struct.pack("!I", PROTOCOL_3_0) + b"a\0b\0\0\0c\0d\0\0", "empty name in the middle"),
        (struct.pack("!I", 2 << 16) + b"user\0bob\0\0", "protocol 2.0"),
        (struct.pack("!I", 4 << 16) + b"user\0bob\0\0", "protocol 4.0"),
        (struct.pack("!I", RequestCode.SSL_REQUEST) + b"x", "SSLRequest with extra bytes"),
        (struct.pack("!I", RequestCode.GSSENC_REQUEST) + b"xy", "GSSENCRequest with extra bytes"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_startup_packets(body: bytes, problem: str) -> None:
    with pytest.raises(DecodeError):
        decode_startup_packet(_packet(body))


def test_startup_without_parameters() -> None:
    packet = _packet(struct.pack("!I", PROTOCOL_3_0) + b"\0")
    assert decode_startup_packet(packet) == StartupMessage(PROTOCOL_3_0, {})


def test_startup_protocol_3_2() -> None:
    packet = _packet(struct.pack("!I", PROTOCOL_3_2) + b"user\0bob\0\0")
    assert decode_startup_packet(packet) == StartupMessage(PROTOCOL_3_2, {"user": "bob"})


def test_startup_unknown_minor_version_is_a_startup_message() -> None:
    """3.x with an unknown minor: PostgreSQL answers NegotiateProtocolVersion, not an error."""
    packet = _packet(struct.pack("!I", (3 << 16) | 99) + b"user\0bob\0\0")
    assert decode_startup_packet(packet) == StartupMessage((3 << 16) | 99, {"user": "bob"})


@pytest.mark.parametrize("size", range(8))
def test_startup_packet_shorter_than_8(size: int) -> None:
    packet = _packet(STARTUP_BODY_OK)[:size]
    with pytest.raises(DecodeError):
        decode_startup_packet(packet)
    with pytest.raises(DecodeError):
        StartupMessage.decode(packet)


@pytest.mark.parametrize(
    ("length", "expected"),
    [(8, 8), (MAX_STARTUP_PACKET, MAX_STARTUP_PACKET), (7, None), (0, None), (10001, None)],
)
def test_startup_packet_length(length: int, expected: int | None) -> None:
    data = struct.pack("!I", length)
    if expected is None:
        with pytest.raises(DecodeError):
            startup_packet_length(data)
    else:
        assert startup_packet_length(data) == expected


@pytest.mark.parametrize("size", range(4))
def test_startup_packet_length_needs_four_bytes(size: int) -> None:
    assert startup_packet_length(b"\x00\x00\x00\x08"[:size]) is None


# --- typed messages: encode agrees with schema.build, decode with schema's layout ---------------


@given(code=st.sampled_from(list(AuthCode)), data=st.binary(max_size=40))
def test_authentication_generic(code: AuthCode, data: bytes) -> None:
    message = Authentication(code, data)
    raw = message.encode()
    assert raw == schema.build("Authentication", code=code, data=data)
    assert Authentication.decode(_payload(raw)) == message


def test_authentication_specific_layouts() -> None:
    auth, code = Authentication, AuthCode
    cases: list[tuple[str, dict[str, bytes], Authentication]] = [
        ("AuthenticationOk", {}, auth(code.OK)),
        ("AuthenticationCleartextPassword", {}, auth(code.CLEARTEXT_PASSWORD)),
        ("AuthenticationMD5Password", {"salt": b"salt"}, auth(code.MD5_PASSWORD, b"salt")),
        ("AuthenticationSASLContinue", {"data": b"r=a"}, auth(code.SASL_CONTINUE, b"r=a")),
        ("AuthenticationSASLFinal", {"data": b"v=x"}, auth(code.SASL_FINAL, b"v=x")),
        ("AuthenticationGSSContinue", {"data": b"tok"}, auth(code.GSS_CONTINUE, b"tok")),
    ]
    for name, fields, message in cases:
        raw = schema.build(name, **fields)
        assert message.encode() == raw
        assert Authentication.decode(_payload(raw)) == message
        schema.parse(name, message.encode())


@given(mechanisms=st.lists(NAME, max_size=4))
def test_authentication_sasl(mechanisms: list[str]) -> None:
    message = Authentication.sasl(mechanisms)
    raw = message.encode()
    assert raw == schema.build("AuthenticationSASL", mechanisms=mechanisms)
    decoded = Authentication.decode(_payload(raw))
    assert decoded == message
    assert decoded.mechanisms == mechanisms


def test_mechanisms_of_other_codes_and_malformed_lists() -> None:
    assert Authentication(AuthCode.OK).mechanisms == []
    for data in (b"", b"SCRAM-SHA-256", b"SCRAM-SHA-256\0"):
        with pytest.raises(DecodeError):
            _ = Authentication(AuthCode.SASL, data).mechanisms


@given(mechanism=NAME, data=st.one_of(st.none(), st.binary(max_size=40)))
def test_sasl_initial_response(mechanism: str, data: bytes | None) -> None:
    raw = schema.build("SASLInitialResponse", mechanism=mechanism, data=data)
    assert SASLInitialResponse.decode(_payload(raw)) == SASLInitialResponse(mechanism, data or b"")


@given(process_id=INT32, secret_key=SECRET)
def test_backend_key_data(process_id: int, secret_key: bytes) -> None:
    message = BackendKeyData(process_id, secret_key)
    raw = message.encode()
    assert raw == schema.build("BackendKeyData", process_id=process_id, secret_key=secret_key)
    assert BackendKeyData.decode(_payload(raw)) == message


@given(name=TEXT, value=TEXT)
def test_parameter_status(name: str, value: str) -> None:
    message = ParameterStatus(name, value)
    raw = message.encode()
    assert raw == schema.build("ParameterStatus", name=name, value=value)
    assert ParameterStatus.decode(_payload(raw)) == message


@pytest.mark.parametrize("status", list(TransactionStatus))
def test_ready_for_query(status: TransactionStatus) -> None:
    message = ReadyForQuery(status)
    raw = message.encode()
    assert raw == schema.build("ReadyForQuery", status=status)
    assert ReadyForQuery.decode(_payload(raw)) == message


@given(newest_minor=st.integers(0, 10), unrecognized=st.lists(NAME, max_size=4))
def test_negotiate_protocol_version(newest_minor: int, unrecognized: list[str]) -> None:
    message = NegotiateProtocolVersion(newest_minor, tuple(unrecognized))
    raw = message.encode()
    assert raw == schema.build(
        "NegotiateProtocolVersion", newest_minor=newest_minor, unrecognized=unrecognized
    )
    assert NegotiateProtocolVersion.decode(_payload(raw)) == message


@given(fields=st.dictionaries(FIELD_CODE, TEXT, max_size=6), notice=st.booleans())
def test_error_and_notice_response(fields: dict[str, str], notice: bool) -> None:
    message = ErrorResponse(fields, notice)
    raw = message.encode()
    name = "NoticeResponse" if notice else "ErrorResponse"
    assert raw == schema.build(name, fields=fields)
    assert ErrorResponse.decode(_payload(raw), notice) == message


def test_error_response_build_and_properties() -> None:
    error = ErrorResponse.build("ERROR", "42P01", "no such table", extra={"hint": "create it"})
    assert (error.severity, error.code, error.message) == ("ERROR", "42P01", "no such table")
    assert schema.parse("ErrorResponse", error.encode()).fields == {
        "S": "ERROR", "V": "ERROR", "C": "42P01", "M": "no such table", "H": "create it",
    }  # fmt: skip
    assert ErrorResponse({"S": "FATAL"}).severity == "FATAL"  # no V field: the localized one


@given(sql=TEXT)
def test_query(sql: str) -> None:
    message = Query(sql)
    raw = message.encode()
    assert raw == schema.build("Query", sql=sql)
    assert Query.decode(_payload(raw)) == message


def test_terminate_and_fatal() -> None:
    assert terminate() == schema.build("Terminate")
    raw = fatal("08P01", "bad message", detail="byte 3")
    assert schema.parse("ErrorResponse", raw).fields == {
        "S": "FATAL", "V": "FATAL", "C": "08P01", "M": "bad message", "D": "byte 3",
    }  # fmt: skip


# --- bad input: DecodeError and nothing else ----------------------------------------------------

DECODERS: dict[str, Callable[[bytes], object]] = {
    "Authentication": Authentication.decode,
    "AuthenticationSASL.mechanisms": lambda p: Authentication.decode(p).mechanisms,
    "SASLInitialResponse": SASLInitialResponse.decode,
    "BackendKeyData": BackendKeyData.decode,
    "ParameterStatus": ParameterStatus.decode,
    "ReadyForQuery": ReadyForQuery.decode,
    "NegotiateProtocolVersion": NegotiateProtocolVersion.decode,
    "ErrorResponse": ErrorResponse.decode,
    "Query": Query.decode,
    "StartupMessage": StartupMessage.decode,
    "decode_startup_packet": decode_startup_packet,
    "startup_packet_length": startup_packet_length,
}


@pytest.mark.parametrize("name", DECODERS)
@given(data=st.binary(max_size=64))
def test_random_bytes_raise_only_decode_error(name: str, data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        DECODERS[name](data)


VALID_PAYLOADS = {
    "SASLInitialResponse": schema.build_payload(
        "SASLInitialResponse", mechanism="SCRAM-SHA-256", data=b"n,,n=,r=nonce"
    ),
    "BackendKeyData": schema.build_payload("BackendKeyData", process_id=7, secret_key=b"k" * 32),
    "ParameterStatus": schema.build_payload("ParameterStatus", name="TimeZone", value="UTC"),
    "ReadyForQuery": schema.build_payload("ReadyForQuery", status=TransactionStatus.IN_TRANSACTION),
    "NegotiateProtocolVersion": schema.build_payload(
        "NegotiateProtocolVersion", newest_minor=0, unrecognized=["_pq_.a", "_pq_.b"]
    ),
    "Query": schema.build_payload("Query", sql="SELECT 1"),
    "StartupMessage": schema.build(
        "StartupMessage", protocol=PROTOCOL_3_0, parameters={"user": "u"}
    ),
}


@pytest.mark.parametrize("name", VALID_PAYLOADS)
def test_every_truncation_raises_decode_error(name: str) -> None:
    """These layouts have a fixed end: any strict prefix is malformed."""
    payload = VALID_PAYLOADS[name]
    decode = DECODERS[name]
    for size in range(len(payload)):
        if name == "BackendKeyData" and size >= 8:
            continue  # a shorter key is still a key (3.0 keys are 4 bytes)
        with pytest.raises(DecodeError):
            decode(payload[:size])


@pytest.mark.parametrize("name", ["ErrorResponse", "Authentication"])
def test_truncations_never_raise_anything_else(name: str) -> None:
    payload = schema.build_payload(
        "ErrorResponse", fields={"S": "ERROR", "C": "XX000", "M": "boom"}
    ) if name == "ErrorResponse" else schema.build_payload(
        "AuthenticationSASL", mechanisms=["SCRAM-SHA-256"]
    )  # fmt: skip
    for size in range(len(payload)):
        try:
            decoded = DECODERS[name](payload[:size])
            if isinstance(decoded, Authentication):
                _ = decoded.mechanisms
        except DecodeError:
            pass


def test_trailing_bytes_are_rejected() -> None:
    for name in ("SASLInitialResponse", "ReadyForQuery", "NegotiateProtocolVersion", "Query"):
        with pytest.raises(DecodeError):
            DECODERS[name](VALID_PAYLOADS[name] + b"\1")


ORACLE: dict[str, tuple[Callable[[bytes], object], Callable[[Any], object]]] = {
    "ParameterStatus": (ParameterStatus.decode, lambda c: ParameterStatus(c.name, c.value)),
    "ReadyForQuery": (ReadyForQuery.decode, lambda c: ReadyForQuery(TransactionStatus(c.status))),
    "Query": (Query.decode, lambda c: Query(c.sql)),
    "BackendKeyData": (BackendKeyData.decode, lambda c: BackendKeyData(c.process_id, c.secret_key)),
    "NegotiateProtocolVersion": (
        NegotiateProtocolVersion.decode,
        lambda c: NegotiateProtocolVersion(c.newest_minor, tuple(c.unrecognized)),
    ),
    "SASLInitialResponse": (
        SASLInitialResponse.decode,
        lambda c: SASLInitialResponse(c.mechanism, c.data or b""),
    ),
}


@pytest.mark.parametrize("name", ORACLE)
@given(data=st.binary(max_size=48))
def test_what_the_schema_accepts_messages_decodes_alike(name: str, data: bytes) -> None:
    decode, from_container = ORACLE[name]
    try:
        parsed = schema.parse_payload(name, data)
    except (ConstructError, UnicodeDecodeError):
        return
    assert decode(data) == from_container(parsed)
