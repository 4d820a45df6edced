"""auth_query: the default query (pgbouncer's, schema-qualified), the SECURITY DEFINER function
the README recommends instead of reading pg_authid directly, and the rule that turns the
query's answer into a stored credential or UNKNOWN.

The query takes the user name as `$1` and returns one row `(user name, password)`; no row, a
NULL user name or a NULL password mean "no usable credential" (no such role, NOLOGIN, no
password, or `VALID UNTIL` in the past: the default query and the function return a NULL
password then). Run it on the admin connection with `$1` bound as a parameter, e.g. through a
`psycopg.RawCursor` (which takes `$1` placeholders as they are): never format the name in.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from pgmigrate_proxy.auth.credentials import UNKNOWN, StoredCredential, Unknown, parse_stored
from pgmigrate_proxy.auth.scram import ScramError

#: pgbouncer's default auth_query, with pg_catalog written out so that no search_path (nor a
#: temporary table named pg_authid) can change what it reads. Reading pg_authid needs a
#: superuser: prefer the function below.
DEFAULT_AUTH_QUERY = (
    "SELECT rolname, CASE WHEN rolvaliduntil < pg_catalog.now() THEN NULL ELSE rolpassword END "
    "FROM pg_catalog.pg_authid WHERE rolname = $1 AND rolcanlogin"
)

#: The auth_query that calls the SECURITY DEFINER function of LOOKUP_FUNCTION_SQL.
FUNCTION_AUTH_QUERY = "SELECT rolname, rolpassword FROM pgmigrate_auth.lookup($1)"

#: The recommended setup, run once by a superuser in the database the admin connection uses
#: (the function runs with its owner's rights, so it must be owned by a superuser; SET
#: search_path pins what its names mean; only the admin role may call it). Replace
#: pgmigrate_admin with the role of `admin_upstream`.
LOOKUP_FUNCTION_SQL = """\
CREATE SCHEMA pgmigrate_auth;
REVOKE ALL ON SCHEMA pgmigrate_auth FROM PUBLIC;
CREATE FUNCTION pgmigrate_auth.lookup(p_user text, OUT rolname text, OUT rolpassword text)
RETURNS record
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT a.rolname::text,
         CASE WHEN a.rolvaliduntil < pg_catalog.now() THEN NULL ELSE a.rolpassword END
  FROM pg_catalog.pg_authid AS a
  WHERE a.rolname = p_user AND a.rolcanlogin
$$;
REVOKE ALL ON FUNCTION pgmigrate_auth.lookup(text) FROM PUBLIC;
GRANT USAGE ON SCHEMA pgmigrate_auth TO pgmigrate_admin;
GRANT EXECUTE ON FUNCTION pgmigrate_auth.lookup(text) TO pgmigrate_admin;
"""


def credential_from_row(
    user: str, row: Sequence[object] | None, *, now: datetime | None = None
) -> StoredCredential | Unknown:
    """The stored credential of `user` from auth_query's first row (None: no row), or UNKNOWN.

    A custom query may return a third column, the role's `rolvaliduntil`: given `now`, a
    role whose validity has passed is UNKNOWN too (the default query checks it in SQL, with the
    server's clock). A row for another name, or a password that is not text, is UNKNOWN; so is
    a malformed verifier (PostgreSQL would refuse it as well).
    """
    if row is None or len(row) < 2:
        return UNKNOWN
    name, password = row[0], row[1]
    if name != user or not isinstance(password, str) or not password:
        return UNKNOWN
    valid_until = row[2] if len(row) > 2 else None
    if isinstance(valid_until, datetime) and now is not None and valid_until < now:
        return UNKNOWN
    try:
        return parse_stored(password)
    except ScramError:
        return UNKNOWN
