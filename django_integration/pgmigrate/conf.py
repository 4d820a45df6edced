"""The PGMIGRATE_* settings as read from Django's settings, each with its default (unchecked)."""

from __future__ import annotations

import datetime as dt

from django.conf import settings

from pgmigrate import actions

#: PGMIGRATE_PROXY values: detect an external proxy, else start one inside migrate.
PROXY_AUTO = "auto"
PROXY_EMBEDDED = "embedded"
PROXY_EXTERNAL = "external"
PROXY_MODES = (PROXY_AUTO, PROXY_EMBEDDED, PROXY_EXTERNAL)


def _get(name: str, default: object) -> object:
    return getattr(settings, name, default)


def blocking_action() -> object:
    """What to do with the sessions that block a migration: pgmigrate.Terminate, .Show, .Cancel,
    None, an instance with filters, or a custom pgmigrate.BlockingAction."""
    return _get("PGMIGRATE_BLOCKING_ACTION", actions.Terminate)


def blocking_action_interval() -> object:
    """How often a custom BlockingAction's worker runs (a timedelta)."""
    return _get("PGMIGRATE_BLOCKING_ACTION_INTERVAL", dt.timedelta(seconds=1))


def lock_timeout() -> object:
    """The overall budget for each statement to get its locks (the proxy's lock_budget)."""
    return _get("PGMIGRATE_LOCK_TIMEOUT", None)


def migrate_lock_timeout() -> object:
    """How long a migrate waits for another one on the same database; None: as long as it
    takes."""
    return _get("PGMIGRATE_MIGRATE_LOCK_TIMEOUT", None)


def patch_migrate() -> object:
    """True when `migrate` is django-pgmigrate's command, False for Django's own."""
    return _get("PGMIGRATE_PATCH_MIGRATE", True)


def proxy() -> object:
    """ "auto" (external when the database is a pgmigrate-proxy, else embedded), "embedded"
    or "external"."""
    return _get("PGMIGRATE_PROXY", PROXY_AUTO)


def autocommit() -> object:
    """True: the migration connection is a migration session (each statement its own
    transaction, RunPython atomic); False: Django's transactions reach PostgreSQL."""
    return _get("PGMIGRATE_AUTOCOMMIT", True)


def attempt_timeout() -> object:
    """The lock_timeout of one attempt (the proxy's lock_timeout); None: the proxy's."""
    return _get("PGMIGRATE_ATTEMPT_TIMEOUT", None)


def retry_delay() -> object:
    """The first pause after an attempt timed out; None: the proxy's."""
    return _get("PGMIGRATE_RETRY_DELAY", None)


def retry_max_delay() -> object:
    """The longest pause between attempts; None: the proxy's."""
    return _get("PGMIGRATE_RETRY_MAX_DELAY", None)


def max_hold() -> object:
    """How long Show keeps a statement out of the lock queue; None: the proxy's."""
    return _get("PGMIGRATE_MAX_HOLD", None)


def min_transaction_age() -> object:
    """Spare blockers whose transaction is younger than this; None: the proxy's."""
    return _get("PGMIGRATE_MIN_TRANSACTION_AGE", None)


def users() -> object:
    """Act only on blockers of these users (glob patterns); None: the proxy's."""
    return _get("PGMIGRATE_USERS", None)


def exclude_users() -> object:
    """Never act on blockers of these users (glob patterns); None: the proxy's."""
    return _get("PGMIGRATE_EXCLUDE_USERS", None)


def exclude_application_names() -> object:
    """Never act on blockers with these application_names (globs); None: the proxy's."""
    return _get("PGMIGRATE_EXCLUDE_APPLICATION_NAMES", None)
