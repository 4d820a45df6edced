"""How a blocker's query is reported: the django-pgactivity context, redaction, truncation."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from pgmigrate_proxy.guard.blockers import (
    MASK,
    QUERY_LIMIT,
    BackendState,
    parse_pga_context,
    redact_query,
    report_query,
    strip_pga_context,
)

# --- pga_context ---------------------------------------------------------------------------------

CONTEXTS = [
    ('/*pga_context={"url": "/x", "n": 3}*/\nSELECT 1', {"url": "/x", "n": 3}),
    ('  /*pga_context={"a": {"b": [1, 2]}}*/\nSELECT 1', {"a": {"b": [1, 2]}}),
    ('/*pga_context={"a": 1}*/SELECT 1', {"a": 1}),
    ("SELECT 1", None),
    ('SELECT 1 /*pga_context={"a": 1}*/', None),  # only a leading comment counts
    ('/*pga_context={"a": 1', None),  # cut short by track_activity_query_size
    ("/*pga_context={not json}*/\nSELECT 1", None),
    ("/*pga_context={}*/\nSELECT 1", {}),
    ("/*pga_context=[1]*/\nSELECT 1", None),
    ("", None),
    (None, None),
]


@pytest.mark.parametrize(("query", "context"), CONTEXTS)
def test_parse_pga_context(query: str | None, context: dict[str, Any] | None) -> None:
    assert parse_pga_context(query) == context


def test_pga_context_too_deep_is_ignored() -> None:
    depth = 100_000
    assert parse_pga_context("/*pga_context={" + '"a":' + "[" * depth + "]" * depth + "}*/") is None


def test_context_comment_is_stripped_from_the_reported_query() -> None:
    assert strip_pga_context('/*pga_context={"a": 1}*/\nSELECT 1') == "SELECT 1"
    assert report_query('/*pga_context={"a": 1}*/\nSELECT 1') == "SELECT 1"
    assert report_query("SELECT 1 /*pga_context={}*/") == "SELECT 1 /*pga_context={}*/"


def test_report_query_cuts_to_the_limit() -> None:
    assert report_query("SELECT " + "x" * 1000) == ("SELECT " + "x" * 1000)[:QUERY_LIMIT]
    assert report_query(None) == ""


# --- redaction -----------------------------------------------------------------------------------

REDACTIONS = [
    ("ALTER ROLE bob PASSWORD 'hunter2'", "ALTER ROLE bob PASSWORD '***'"),
    ("CREATE ROLE bob LOGIN ENCRYPTED password 'a''b' VALID UNTIL 'infinity'",
     "CREATE ROLE bob LOGIN ENCRYPTED password '***' VALID UNTIL 'infinity'"),
    ("ALTER USER bob PASSWORD E'a\\'b'", "ALTER USER bob PASSWORD '***'"),
    ("ALTER USER bob PASSWORD $pw$it's$pw$", "ALTER USER bob PASSWORD '***'"),
    ("ALTER ROLE bob PASSWORD 'cut sho", "ALTER ROLE bob PASSWORD '***'"),
    ("ALTER ROLE bob PASSWORD NULL", "ALTER ROLE bob PASSWORD NULL"),
    ("CREATE USER MAPPING FOR bob SERVER s OPTIONS (user 'bob', password 'hunter2')",
     "CREATE USER MAPPING FOR bob SERVER s OPTIONS (user 'bob', password '***')"),
    ("CREATE SUBSCRIPTION s CONNECTION 'host=db password=hunter2 dbname=x' PUBLICATION p",
     "CREATE SUBSCRIPTION s CONNECTION 'host=db password=*** dbname=x' PUBLICATION p"),
    ("SELECT dblink_connect('host=db password = ''hu nt\\''er2'' dbname=x')",
     "SELECT dblink_connect('host=db password = *** dbname=x')"),
    ("SELECT dblink('postgresql://bob:hunter2@db/x?sslpassword=key&a=1', 'SELECT 1')",
     "SELECT dblink('postgresql://bob:***@db/x?sslpassword=***&a=1', 'SELECT 1')"),
    ("SELECT * FROM users WHERE password = 'hunter2'", "SELECT * FROM users WHERE password = ***"),
    ("SELECT password FROM users", "SELECT password FROM users"),
    ("UPDATE t SET n = n + 1 WHERE id = 'x'", "UPDATE t SET n = n + 1 WHERE id = 'x'"),
]  # fmt: skip


@pytest.mark.parametrize(("query", "redacted"), REDACTIONS)
def test_redact_query(query: str, redacted: str) -> None:
    assert redact_query(query) == redacted


def sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def conninfo_value(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


secrets_st = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00"), min_size=8, max_size=40
).filter(lambda s: s.strip() == s and len(set(s)) > 3)


@given(secrets_st, st.sampled_from(["CREATE ROLE u PASSWORD {}", "ALTER USER u WITH PASSWORD {}"]))
def test_role_password_never_reported(secret: str, template: str) -> None:
    assume(secret not in template and MASK not in secret)
    query = template.format(sql_literal(secret))
    assert secret not in redact_query(query)
    assert secret not in report_query("/*pga_context={}*/\n" + query)


@given(secrets_st)
def test_quoted_conninfo_password_never_reported(secret: str) -> None:
    assume(MASK not in secret)
    conninfo = f"host=db password={conninfo_value(secret)} dbname=x"
    query = f"SELECT dblink_connect({sql_literal(conninfo)})"
    assume(secret not in query.replace(sql_literal(conninfo), ""))
    # nor in what the redacted form keeps of the conninfo (a secret such as "password")
    assume(secret not in f"SELECT dblink_connect('host=db password={MASK} dbname=x')")
    assert secret not in redact_query(query)


@given(st.text("abcdefXYZ0123456789!#%+-./:?@^_~", min_size=8, max_size=30))
def test_bare_conninfo_password_never_reported(secret: str) -> None:
    query = f"CREATE SUBSCRIPTION s CONNECTION 'host=db password={secret} port=5' PUBLICATION p"
    assume(secret not in query.replace(secret, ""))
    assert secret not in redact_query(query)


@pytest.mark.parametrize(
    ("text", "state"),
    [("idle in transaction", BackendState.IDLE_IN_TRANSACTION), ("active", BackendState.ACTIVE),
     ("starting", BackendState.STARTING), (None, None), ("", None), ("something new", None)],
)  # fmt: skip
def test_backend_state_parse(text: str | None, state: BackendState | None) -> None:
    assert BackendState.parse(text) is state


def test_only_idle_in_transaction_states_resist_a_cancel() -> None:
    assert {s for s in BackendState if s.idle_in_transaction} == {
        BackendState.IDLE_IN_TRANSACTION,
        BackendState.IDLE_IN_TRANSACTION_ABORTED,
    }
