"""Where credentials come from: pgbouncer's auth_file format and auth_query's answer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pgmigrate_proxy.auth import scram
from pgmigrate_proxy.auth.authfile import AuthFileError, parse_auth_file
from pgmigrate_proxy.auth.authquery import credential_from_row
from pgmigrate_proxy.auth.credentials import UNKNOWN, Md5Hash, Plain, md5_hash

VERIFIER = scram.make_verifier("pencil", bytes(16)).text()


def test_auth_file_lines() -> None:
    text = f"""
# a comment
  ; another
"alice" "{VERIFIER}"
"bob" "md545f2603610af569b6155c45067268c6b" extra fields are ignored
"quo""ted" "pass ""word"" with spaces"
"alice2"	"s3cret"

"""
    users = parse_auth_file(text)
    assert users == {
        "alice": scram.ScramVerifier.parse(VERIFIER),
        "bob": Md5Hash("md545f2603610af569b6155c45067268c6b"),
        'quo"ted': Plain('pass "word" with spaces'),
        "alice2": Plain("s3cret"),
    }
    assert md5_hash("1234", "admin") == users["bob"]  # pgbouncer's documented example


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("alice s3cret", 'users.txt:2: expected "user" "password" (a double-quoted user name'),
        ('"alice"', "users.txt:2: expected"),
        ('"alice" "s3cret', "users.txt:2: expected"),  # no closing quote
        ('"alice" s3cret', "users.txt:2: expected"),
        ('"" "s3cret"', "users.txt:2: empty user name"),
        ('"alice" "s3cret"x', "users.txt:2: the password field must be followed by a blank"),
        ('"alice" "SCRAM-SHA-256$4096:xx$yy:zz"', "users.txt:2: malformed SCRAM-SHA-256 verifier"),
    ],
)
def test_auth_file_errors_name_the_line_and_not_the_secret(line: str, error: str) -> None:
    with pytest.raises(AuthFileError) as caught:
        parse_auth_file(f'"ok" "x"\n{line}\n', "users.txt")
    message = str(caught.value)
    assert message.startswith(error) and "\n" not in message
    assert "s3cret" not in message


def test_auth_query_rows() -> None:
    assert credential_from_row("alice", None) is UNKNOWN
    assert credential_from_row("alice", (None, None)) is UNKNOWN  # the function's "no role"
    assert credential_from_row("alice", ("alice", None)) is UNKNOWN  # expired or no password
    assert credential_from_row("alice", ("bob", VERIFIER)) is UNKNOWN
    assert credential_from_row("alice", ("alice", "SCRAM-SHA-256$bad")) is UNKNOWN
    verifier = credential_from_row("alice", ("alice", VERIFIER))
    assert verifier == scram.ScramVerifier.parse(VERIFIER)
    stored = md5_hash("pencil", "alice")
    assert credential_from_row("alice", ["alice", stored.text]) == stored


def test_auth_query_rows_with_a_validity_column() -> None:
    now = datetime(2026, 12, 6, tzinfo=UTC)
    row = ("alice", VERIFIER, now - timedelta(seconds=1))
    assert credential_from_row("alice", row, now=now) is UNKNOWN
    later = ("alice", VERIFIER, now + timedelta(days=1))
    assert credential_from_row("alice", later, now=now) != UNKNOWN
    assert credential_from_row("alice", ("alice", VERIFIER, None), now=now) != UNKNOWN
