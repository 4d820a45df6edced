"""The wire layouts of the PostgreSQL protocol, declared once with construct: the codec of the
messages off the hot path, and the test oracle of the rest.

Layouts follow the PostgreSQL docs, "Message Formats", names verbatim. messages.py decodes and
builds with them the messages that pass a few times per statement or per connection
(ErrorResponse / NoticeResponse, NegotiateProtocolVersion, CancelRequest, SSLRequest,
GSSENCRequest, SASLInitialResponse, AuthenticationSASL); where a layout would cost measurable
time it keeps struct and says why (messages.py's header). The relay's hot path never runs
construct (DESIGN.md, section 3).

- `PACKETS`: startup packets (no type byte): StartupMessage, SSLRequest, GSSENCRequest,
  CancelRequest.
- `LAYOUTS` / `TYPES`: the payload layout and type byte of every typed message.
- `build(name, **fields)` / `parse(name, data)`: a whole frame or packet, parsed strictly (every
  byte accounted for); `build_payload` / `parse_payload`: the payload after the 5-byte header.

Conventions: strings are `str` (UTF-8); a nullable value (Bind parameter, DataRow column,
FunctionCall argument and result) is `bytes` or None for the -1 length; Describe and Close
`kind` is b"S" or b"P"; ErrorResponse / NoticeResponse `fields` and StartupMessage
`parameters` are dicts in wire order.
"""

from __future__ import annotations

from typing import Any, cast

from construct import (
    Bytes,
    Check,
    Const,
    Container,
    ExprAdapter,
    FocusedSeq,
    GreedyBytes,
    If,
    Int8ub,
    Int16sb,
    Int16ub,
    Int32sb,
    Int32ub,
    NullTerminated,
    OneOf,
    Prefixed,
    PrefixedArray,
    Rebuild,
    RepeatUntil,
    Struct,
    Terminated,
    this,
)

from pgmigrate_proxy.protocol.types import (
    AuthCode,
    BackendType,
    FrontendType,
    RequestCode,
    TransactionStatus,
)

# --- shared pieces ----------------------------------------------------------------------------

#: A NUL-terminated string. Decoded leniently (invalid UTF-8 replaced, as the hand-written
#: codecs did): a server with another encoding must not turn its error into a DecodeError.
_TEXT = ExprAdapter(
    NullTerminated(GreedyBytes),
    lambda obj, ctx: obj.decode("utf-8", "replace"),
    lambda obj, ctx: obj.encode("utf-8"),
)

#: A list of strings closed by an empty one (AuthenticationSASL's mechanisms).
_STRING_LIST = ExprAdapter(
    RepeatUntil(lambda obj, lst, ctx: obj == "", _TEXT),
    lambda obj, ctx: list(obj[:-1]),
    lambda obj, ctx: [*obj, ""],
)

#: Int32 length then that many bytes; length -1 is NULL (None).
_NULLABLE = ExprAdapter(
    Struct(
        "length" / Rebuild(Int32sb, lambda ctx: -1 if ctx.data is None else len(ctx.data)),
        Check(this.length >= -1),
        "data" / If(this.length >= 0, Bytes(this.length)),
    ),
    lambda obj, ctx: obj.data,
    lambda obj, ctx: {"data": obj},
)

#: Int16 count then that many Int16 format codes (0 text, 1 binary).
_FORMATS = PrefixedArray(Int16ub, Int16ub)

#: name/value string pairs closed by an empty name (StartupMessage), as a dict.
_PARAMETERS = ExprAdapter(
    RepeatUntil(
        lambda obj, lst, ctx: obj["name"] == "",
        Struct("name" / _TEXT, "value" / If(this.name != "", _TEXT)),
    ),
    lambda obj, ctx: {p.name: p.value for p in obj[:-1]},
    lambda obj, ctx: (
        [{"name": k, "value": v} for k, v in obj.items()] + [{"name": "", "value": None}]
    ),
)

#: code byte + string fields closed by a zero byte (ErrorResponse, NoticeResponse), as a dict.
_FIELDS = ExprAdapter(
    RepeatUntil(
        lambda obj, lst, ctx: obj["code"] == 0,
        Struct("code" / Int8ub, "value" / If(this.code != 0, _TEXT)),
    ),
    lambda obj, ctx: {chr(f.code): f.value for f in obj[:-1]},
    lambda obj, ctx: (
        [{"code": ord(k), "value": v} for k, v in obj.items()] + [{"code": 0, "value": None}]
    ),
)

_KIND = OneOf(Bytes(1), (b"S", b"P"))  # Describe / Close: a prepared Statement or a Portal
_COPY_RESPONSE = Struct("format" / Int8ub, "column_formats" / _FORMATS)
_EMPTY = Struct()


def _auth(code: AuthCode, *fields: Any) -> Any:
    return Struct("code" / Const(int(code), Int32ub), *fields)


def _packet(*fields: Any) -> Any:
    """A startup packet: Int32 length (counting itself), then the fields, nothing after."""
    return Prefixed(Int32ub, Struct(*fields, Terminated), includelength=True)


# --- startup packets --------------------------------------------------------------------------

PACKETS: dict[str, Any] = {
    "StartupMessage": _packet(
        "protocol" / Int32ub,
        Check(lambda ctx: ctx.protocol >> 16 == 3),
        "parameters" / _PARAMETERS,
    ),
    "SSLRequest": _packet(Const(int(RequestCode.SSL_REQUEST), Int32ub)),
    "GSSENCRequest": _packet(Const(int(RequestCode.GSSENC_REQUEST), Int32ub)),
    "CancelRequest": _packet(
        Const(int(RequestCode.CANCEL_REQUEST), Int32ub),
        "process_id" / Int32ub,
        "secret_key" / GreedyBytes,  # 4 bytes in protocol 3.0, up to 256 in 3.2
        Check(lambda ctx: 4 <= len(ctx.secret_key) <= 256),
    ),
}

# --- typed messages: (type byte, payload layout) ----------------------------------------------

B = BackendType
F = FrontendType
R = BackendType.AUTHENTICATION

_BACKEND: dict[str, tuple[int, Any]] = {
    "Authentication": (R, Struct("code" / Int32ub, "data" / GreedyBytes)),
    "AuthenticationOk": (R, _auth(AuthCode.OK)),
    "AuthenticationKerberosV5": (R, _auth(AuthCode.KERBEROS_V5)),
    "AuthenticationCleartextPassword": (R, _auth(AuthCode.CLEARTEXT_PASSWORD)),
    "AuthenticationMD5Password": (R, _auth(AuthCode.MD5_PASSWORD, "salt" / Bytes(4))),
    "AuthenticationGSS": (R, _auth(AuthCode.GSS)),
    "AuthenticationGSSContinue": (R, _auth(AuthCode.GSS_CONTINUE, "data" / GreedyBytes)),
    "AuthenticationSSPI": (R, _auth(AuthCode.SSPI)),
    "AuthenticationSASL": (R, _auth(AuthCode.SASL, "mechanisms" / _STRING_LIST)),
    "AuthenticationSASLContinue": (R, _auth(AuthCode.SASL_CONTINUE, "data" / GreedyBytes)),
    "AuthenticationSASLFinal": (R, _auth(AuthCode.SASL_FINAL, "data" / GreedyBytes)),
    "BackendKeyData": (
        B.BACKEND_KEY_DATA,
        Struct(
            "process_id" / Int32ub,
            "secret_key" / GreedyBytes,  # 4 bytes in protocol 3.0, up to 256 in 3.2
            Check(lambda ctx: 4 <= len(ctx.secret_key) <= 256),
        ),
    ),
    "BindComplete": (B.BIND_COMPLETE, _EMPTY),
    "CloseComplete": (B.CLOSE_COMPLETE, _EMPTY),
    "CommandComplete": (B.COMMAND_COMPLETE, Struct("tag" / _TEXT)),
    "CopyInResponse": (B.COPY_IN_RESPONSE, _COPY_RESPONSE),
    "CopyOutResponse": (B.COPY_OUT_RESPONSE, _COPY_RESPONSE),
    "CopyBothResponse": (B.COPY_BOTH_RESPONSE, _COPY_RESPONSE),
    "DataRow": (B.DATA_ROW, Struct("columns" / PrefixedArray(Int16ub, _NULLABLE))),
    "EmptyQueryResponse": (B.EMPTY_QUERY_RESPONSE, _EMPTY),
    "ErrorResponse": (B.ERROR_RESPONSE, Struct("fields" / _FIELDS)),
    "FunctionCallResponse": (B.FUNCTION_CALL_RESPONSE, Struct("result" / _NULLABLE)),
    "NegotiateProtocolVersion": (
        B.NEGOTIATE_PROTOCOL_VERSION,
        Struct("newest_minor" / Int32ub, "unrecognized" / PrefixedArray(Int32ub, _TEXT)),
    ),
    "NoData": (B.NO_DATA, _EMPTY),
    "NoticeResponse": (B.NOTICE_RESPONSE, Struct("fields" / _FIELDS)),
    "NotificationResponse": (
        B.NOTIFICATION_RESPONSE,
        Struct("process_id" / Int32ub, "channel" / _TEXT, "payload" / _TEXT),
    ),
    "ParameterDescription": (
        B.PARAMETER_DESCRIPTION,
        Struct("type_oids" / PrefixedArray(Int16ub, Int32ub)),
    ),
    "ParameterStatus": (B.PARAMETER_STATUS, Struct("name" / _TEXT, "value" / _TEXT)),
    "ParseComplete": (B.PARSE_COMPLETE, _EMPTY),
    "PortalSuspended": (B.PORTAL_SUSPENDED, _EMPTY),
    "ReadyForQuery": (
        B.READY_FOR_QUERY,
        Struct("status" / OneOf(Int8ub, [int(s) for s in TransactionStatus])),
    ),
    "RowDescription": (
        B.ROW_DESCRIPTION,
        Struct(
            "fields"
            / PrefixedArray(
                Int16ub,
                Struct(
                    "name" / _TEXT,
                    "table_oid" / Int32ub,
                    "column_number" / Int16sb,
                    "type_oid" / Int32ub,
                    "type_size" / Int16sb,  # negative: variable-width
                    "type_modifier" / Int32sb,
                    "format" / Int16ub,
                ),
            )
        ),
    ),
}  # fmt: skip

_FRONTEND: dict[str, tuple[int, Any]] = {
    "Bind": (
        F.BIND,
        Struct(
            "portal" / _TEXT,
            "statement" / _TEXT,
            "parameter_formats" / _FORMATS,
            "parameters" / PrefixedArray(Int16ub, _NULLABLE),
            "result_formats" / _FORMATS,
        ),
    ),
    "Close": (F.CLOSE, Struct("kind" / _KIND, "name" / _TEXT)),
    "CopyData": (F.COPY_DATA, Struct("data" / GreedyBytes)),  # also sent by the backend
    "CopyDone": (F.COPY_DONE, _EMPTY),  # also sent by the backend
    "CopyFail": (F.COPY_FAIL, Struct("message" / _TEXT)),
    "Describe": (F.DESCRIBE, Struct("kind" / _KIND, "name" / _TEXT)),
    "Execute": (F.EXECUTE, Struct("portal" / _TEXT, "max_rows" / Int32ub)),  # 0: no limit
    "Flush": (F.FLUSH, _EMPTY),
    "FunctionCall": (
        F.FUNCTION_CALL,
        Struct(
            "function_oid" / Int32ub,
            "argument_formats" / _FORMATS,
            "arguments" / PrefixedArray(Int16ub, _NULLABLE),
            "result_format" / Int16ub,
        ),
    ),
    "GSSResponse": (F.PASSWORD_MESSAGE, Struct("data" / GreedyBytes)),
    "Parse": (
        F.PARSE,
        Struct(
            "statement" / _TEXT,
            "query" / _TEXT,
            "parameter_types" / PrefixedArray(Int16ub, Int32ub),
        ),
    ),
    "PasswordMessage": (F.PASSWORD_MESSAGE, Struct("password" / _TEXT)),
    "Query": (F.QUERY, Struct("sql" / _TEXT)),
    "SASLInitialResponse": (F.PASSWORD_MESSAGE, Struct("mechanism" / _TEXT, "data" / _NULLABLE)),
    "SASLResponse": (F.PASSWORD_MESSAGE, Struct("data" / GreedyBytes)),
    "Sync": (F.SYNC, _EMPTY),
    "Terminate": (F.TERMINATE, _EMPTY),
}

_ALL = _BACKEND | _FRONTEND

#: Type byte of each typed message.
TYPES: dict[str, int] = {name: int(t) for name, (t, _) in _ALL.items()}

#: Payload layout (after the 5-byte header) of each typed message; nothing may follow it.
LAYOUTS: dict[str, Any] = {
    name: FocusedSeq("body", "body" / layout, Terminated) for name, (_, layout) in _ALL.items()
}

#: Whole-frame layout of each typed message: type byte, Int32 length counting itself, payload.
MESSAGES: dict[str, Any] = {
    name: FocusedSeq(
        "body",
        Const(bytes([TYPES[name]])),
        "body" / Prefixed(Int32ub, LAYOUTS[name], includelength=True),
    )
    for name in _ALL
}

_WHOLE: dict[str, Any] = {
    name: FocusedSeq("m", "m" / con, Terminated) for name, con in (MESSAGES | PACKETS).items()
}


def build(name: str, /, **fields: Any) -> bytes:
    """The whole frame (or startup packet) of message `name` with these fields."""
    return cast(bytes, _WHOLE[name].build(fields))


def parse(name: str, data: bytes) -> Container:
    """Decode the whole frame (or startup packet) of message `name`, strictly.

    Raises construct.ConstructError when data is not exactly one such message.
    """
    return _WHOLE[name].parse(data)


def build_payload(name: str, /, **fields: Any) -> bytes:
    """The payload (no type byte, no length) of typed message `name` with these fields."""
    return cast(bytes, LAYOUTS[name].build(fields))


def parse_payload(name: str, payload: bytes) -> Container:
    """Decode the payload of typed message `name`; every byte must belong to the layout."""
    return LAYOUTS[name].parse(payload)


__all__ = [
    "LAYOUTS",
    "MESSAGES",
    "PACKETS",
    "TYPES",
    "build",
    "build_payload",
    "parse",
    "parse_payload",
]
