"""SCRAM-SHA-256 and md5 between the proxy's two sides in memory: RFC 7677's example, the
ClientKey recovered from a proof and reused to log in, wrong passwords and unknown users that
look the same, channel binding, malformed messages."""

from __future__ import annotations

import pytest
from pgmigrate_proxy.auth import scram
from pgmigrate_proxy.auth.backend import LoginFailed, ServerLogin
from pgmigrate_proxy.auth.credentials import (
    UNKNOWN,
    LoginSecret,
    Md5Hash,
    MockVerifiers,
    Plain,
    StoredCredential,
    Unknown,
    md5_hash,
)
from pgmigrate_proxy.auth.frontend import AuthStep, ClientAuthenticator, Outcome
from pgmigrate_proxy.auth.scram import ScramKeys, ScramVerifier
from pgmigrate_proxy.protocol.framing import HEADER, HEADER_SIZE
from pgmigrate_proxy.protocol.messages import Authentication, ErrorResponse
from pgmigrate_proxy.protocol.types import AuthCode, BackendType

SALT = bytes(range(16))
MOCKS = MockVerifiers()


def frames(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    while data:
        mtype, length = HEADER.unpack_from(data)
        out.append((mtype, data[HEADER_SIZE : 1 + length]))
        data = data[1 + length :]
    return out


def run(
    authenticator: ClientAuthenticator, login: ServerLogin
) -> tuple[AuthStep, list[tuple[int, bytes]]]:
    """Drive both sides until the authenticator decides; every frame it sent, in order."""
    sent = frames(authenticator.start())
    pending = list(sent)
    while True:
        mtype, payload = pending.pop(0)
        assert mtype == BackendType.AUTHENTICATION
        answer = login.receive(Authentication.decode(payload))
        if not answer:
            continue
        ((ftype, fpayload),) = frames(answer)
        step = authenticator.receive(ftype, fpayload)
        replies = frames(step.reply)
        sent += replies
        if step.outcome is not Outcome.PENDING:
            for rtype, rpayload in replies:
                if rtype == BackendType.AUTHENTICATION:
                    login.receive(Authentication.decode(rpayload))
            return step, sent
        pending += replies


def login_as(
    credential: StoredCredential | Unknown,
    secret: LoginSecret,
    user: str = "alice",
    allow_md5: bool = True,
) -> tuple[AuthStep, list[tuple[int, bytes]]]:
    authenticator = ClientAuthenticator(user, credential, MOCKS, allow_md5=allow_md5)
    return run(authenticator, ServerLogin(user, secret))


def test_rfc7677_example() -> None:
    """RFC 7677, section 3: user "user", password "pencil"."""
    salt = scram.unb64("W22ZaJ0SNY7soEsUEjb6gQ==")
    salted = scram.salted_password("pencil", salt, 4096)
    client_first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO"
    server_first = (
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    without_proof = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    auth_message = f"{client_first_bare},{server_first},{without_proof}".encode()
    client_key = scram.client_key(salted)
    proof = scram.xor(client_key, scram.hmac256(scram.h(client_key), auth_message))
    assert scram.b64(proof) == "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    signature = scram.hmac256(scram.server_key(salted), auth_message)
    assert scram.b64(signature) == "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_verifier_text_round_trip() -> None:
    verifier = scram.make_verifier("pencil", SALT)
    assert ScramVerifier.parse(verifier.text()) == verifier
    assert verifier.text().startswith("SCRAM-SHA-256$4096:AAECAwQFBgcICQoLDA0ODw==$")


@pytest.mark.parametrize(
    "text",
    [
        "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA",  # keys too short
        "SCRAM-SHA-256$x:c2FsdA==$" + "A" * 44 + ":" + "A" * 44,
        "SCRAM-SHA-256$4096:c2FsdA==",
        "SCRAM-SHA-1$4096:c2FsdA==$a:b",
    ],
)
def test_malformed_verifiers(text: str) -> None:
    with pytest.raises(scram.ScramError):
        ScramVerifier.parse(text)


def test_saslprep() -> None:
    """RFC 4013's examples, and PostgreSQL's fallback to the raw bytes."""
    assert scram.saslprep("I\u00adX") == b"IX"
    assert scram.saslprep("\u2168") == b"IX"
    assert scram.saslprep("user") == b"user"
    assert scram.saslprep("\u00aa") == b"a"
    assert scram.saslprep("a\u0007") == b"a\x07"  # prohibited: unchanged, as pg_saslprep does
    assert scram.saslprep("\u0627\u0031") == "\u0627\u0031".encode()  # bidi rule: unchanged


def test_scram_login_recovers_the_client_key_and_logs_in_with_it() -> None:
    verifier = scram.make_verifier("pencil", SALT)
    step, sent = login_as(verifier, Plain("pencil"))
    assert step.outcome is Outcome.ACCEPTED
    codes = [Authentication.decode(p).code for t, p in sent]
    assert codes == [AuthCode.SASL, AuthCode.SASL_CONTINUE, AuthCode.SASL_FINAL, AuthCode.OK]
    salted = scram.salted_password("pencil", SALT, 4096)
    assert step.secret == ScramKeys(scram.client_key(salted), verifier.server_key, SALT, 4096)
    # the recovered keys log in again, and the server signature they check is right
    assert isinstance(step.secret, ScramKeys)
    again, _ = login_as(verifier, step.secret)
    assert again.outcome is Outcome.ACCEPTED and again.secret == step.secret


def refusal(step: AuthStep) -> ErrorResponse:
    assert step.outcome is Outcome.REFUSED
    ((mtype, payload),) = frames(step.reply)
    assert mtype == BackendType.ERROR_RESPONSE
    return ErrorResponse.decode(payload)


def test_wrong_password_and_unknown_user_get_the_same_exchange_and_error() -> None:
    verifier = scram.make_verifier("pencil", SALT)
    wrong, wrong_sent = login_as(verifier, Plain("crayon"))
    unknown, unknown_sent = login_as(UNKNOWN, Plain("crayon"))
    assert refusal(wrong) == refusal(unknown)
    error = refusal(unknown)
    assert (error.severity, error.code) == ("FATAL", "28P01")
    assert error.message == 'password authentication failed for user "alice"'
    assert [t for t, _ in wrong_sent] == [t for t, _ in unknown_sent]
    # the fake server-first-message: same shape, same iteration count as the real one
    real_first = Authentication.decode(wrong_sent[1][1]).data.decode()
    fake_first = Authentication.decode(unknown_sent[1][1]).data.decode()
    assert real_first.split(",i=")[1] == fake_first.split(",i=")[1] == "4096"
    assert len(real_first) == len(fake_first)


def test_unknown_users_get_a_stable_salt_per_name_and_fail_even_with_its_keys() -> None:
    mocks = MockVerifiers()
    assert mocks.verifier("bob") == mocks.verifier("bob")
    assert mocks.verifier("bob").salt != mocks.verifier("carol").salt
    assert MockVerifiers().verifier("bob").salt != mocks.verifier("bob").salt  # per process
    fake = mocks.verifier("bob")
    # a client that somehow held the fake keys still fails: the exchange is doomed
    keys = ScramKeys(b"\0" * 32, fake.server_key, fake.salt, fake.iterations)
    step = run(ClientAuthenticator("bob", UNKNOWN, mocks), ServerLogin("bob", keys))[0]
    assert refusal(step).code == "28P01"


def test_md5_login_with_the_stored_hash_both_ways() -> None:
    stored = md5_hash("pencil", "alice")
    assert stored.text == "md5" + __import__("hashlib").md5(b"pencilalice").hexdigest()
    step, sent = login_as(stored, stored)
    assert step.outcome is Outcome.ACCEPTED and step.secret == stored
    assert [Authentication.decode(p).code for _, p in sent] == [AuthCode.MD5_PASSWORD, 0]
    assert login_as(stored, Plain("pencil"))[0].outcome is Outcome.ACCEPTED
    assert refusal(login_as(stored, Plain("crayon"))[0]).code == "28P01"


def test_md5_hash_where_only_scram_is_allowed_fails_like_a_wrong_password() -> None:
    stored = md5_hash("pencil", "alice")
    step, sent = login_as(stored, Plain("pencil"), allow_md5=False)
    assert Authentication.decode(sent[0][1]).code == AuthCode.SASL
    assert refusal(step).message == 'password authentication failed for user "alice"'


def test_clear_text_password_is_checked_with_scram_and_logs_in_with_itself() -> None:
    step, _ = login_as(Plain("pencil"), Plain("pencil"))
    assert step.outcome is Outcome.ACCEPTED and step.secret == Plain("pencil")
    assert refusal(login_as(Plain("pencil"), Plain("crayon"))[0]).code == "28P01"


def test_server_login_refuses_what_its_secret_cannot_answer() -> None:
    keys = ScramKeys(b"k" * 32, b"s" * 32, SALT, 4096)
    with pytest.raises(LoginFailed, match="md5"):
        ServerLogin("alice", keys).receive(Authentication(AuthCode.MD5_PASSWORD, b"salt"))
    with pytest.raises(LoginFailed, match="SCRAM"):
        ServerLogin("alice", Md5Hash("md5" + "0" * 32)).receive(
            Authentication.sasl(["SCRAM-SHA-256"])
        )
    with pytest.raises(LoginFailed, match="method 3"):
        ServerLogin("alice", keys).receive(Authentication(AuthCode.CLEARTEXT_PASSWORD))


def test_server_login_notices_a_changed_password_and_a_wrong_server_signature() -> None:
    verifier = scram.make_verifier("pencil", SALT)
    keys = verifier.keys(scram.client_key(scram.salted_password("pencil", SALT, 4096)))
    changed = scram.make_verifier("pencil", bytes(16))
    with pytest.raises(LoginFailed, match="password has changed"):
        login_as(changed, keys)
    impostor = ScramVerifier(4096, SALT, verifier.stored_key, b"x" * 32)
    with pytest.raises(LoginFailed, match="signature"):
        login_as(impostor, keys)


END_POINT = bytes(range(32))


def test_channel_binding_plus() -> None:
    verifier = scram.make_verifier("pencil", SALT)
    auth = ClientAuthenticator("alice", verifier, MOCKS, tls_end_point=END_POINT)
    login = ServerLogin("alice", Plain("pencil"), tls=True, channel_binding=END_POINT)
    step, sent = run(auth, login)
    assert Authentication.decode(sent[0][1]).mechanisms == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
    assert step.outcome is Outcome.ACCEPTED
    # another channel's hash: the binding check fails
    auth = ClientAuthenticator("alice", verifier, MOCKS, tls_end_point=END_POINT)
    login = ServerLogin("alice", Plain("pencil"), tls=True, channel_binding=b"other")
    error = refusal(run(auth, login)[0])
    assert (error.code, error.message) == ("08P01", "SCRAM channel binding check failed")


def test_client_that_could_bind_but_thinks_the_server_cannot_is_refused_when_it_can() -> None:
    verifier = scram.make_verifier("pencil", SALT)
    auth = ClientAuthenticator("alice", verifier, MOCKS, tls_end_point=END_POINT)
    auth.start()
    initial = scram_initial(b"y,,n=,r=abcdef")
    error = refusal(auth.receive(ord("p"), initial))
    assert (error.code, error.message) == ("08P01", "SCRAM channel binding negotiation error")
    # without -PLUS on offer, "y" is fine
    plain = ClientAuthenticator("alice", verifier, MOCKS)
    plain.start()
    assert plain.receive(ord("p"), initial).outcome is Outcome.PENDING


def scram_initial(data: bytes, mechanism: str = "SCRAM-SHA-256") -> bytes:
    from pgmigrate_proxy.protocol import schema

    return schema.build_payload("SASLInitialResponse", mechanism=mechanism, data=data)


@pytest.mark.parametrize(
    ("mtype", "payload", "message"),
    [
        (ord("p"), scram_initial(b"n,,n=,r=abc", "SCRAM-SHA-1"), "invalid SASL authentication"),
        (ord("p"), scram_initial(b"n,a=bob,n=,r=abc"), "authorization identity"),
        (ord("p"), scram_initial(b"x,,n=,r=abc"), "malformed SCRAM message"),
        (ord("p"), scram_initial(b"n,,r=abc"), "malformed SCRAM message"),
        (ord("p"), scram_initial(b"n,,n=,r=a,bc"), "malformed SCRAM message"),
        (ord("p"), b"\xff", "malformed message"),
        (ord("Q"), b"SELECT 1\0", "expected SASL response, got message type 81"),
    ],
)
def test_malformed_client_messages_are_protocol_violations(
    mtype: int, payload: bytes, message: str
) -> None:
    auth = ClientAuthenticator("alice", scram.make_verifier("pencil", SALT), MOCKS)
    auth.start()
    error = refusal(auth.receive(mtype, payload))
    assert error.code == "08P01" and message in error.message


def test_malformed_client_final_and_a_message_after_the_end() -> None:
    auth = ClientAuthenticator("alice", scram.make_verifier("pencil", SALT), MOCKS)
    auth.start()
    assert auth.receive(ord("p"), scram_initial(b"n,,n=,r=abc")).outcome is Outcome.PENDING
    error = refusal(auth.receive(ord("p"), b"c=biws,r=abcXYZ,p=notbase64!"))
    assert error.code == "08P01"
    assert refusal(auth.receive(ord("p"), b"")).message == "unexpected authentication message"
