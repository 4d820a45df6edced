"""The migration connection's route: the upstream conninfo and the swapped settings."""

from __future__ import annotations

from typing import Any

from pgmigrate import route
from psycopg.conninfo import conninfo_to_dict

SETTINGS: dict[str, Any] = {
    "ENGINE": "django.db.backends.postgresql",
    "NAME": "shop",
    "USER": "app",
    "PASSWORD": "s3cret word",
    "HOST": "db.internal",
    "PORT": "5433",
    "OPTIONS": {
        "sslmode": "verify-full",
        "sslrootcert": "/etc/ssl/root.crt",
        "connect_timeout": 5,
        "application_name": "shop-migrate",
        "options": "-c search_path=shop",
        "pool": True,
    },
}


def test_upstream_carries_the_real_settings() -> None:
    assert conninfo_to_dict(route.upstream_conninfo(SETTINGS)) == {
        "host": "db.internal",
        "port": "5433",
        "dbname": "shop",
        "user": "app",
        "password": "s3cret word",
        "sslmode": "verify-full",
        "sslrootcert": "/etc/ssl/root.crt",
        "connect_timeout": "5",
    }


def test_upstream_leaves_out_what_is_unset() -> None:
    minimal = {"NAME": "", "USER": "", "PASSWORD": "", "HOST": "", "PORT": "", "OPTIONS": {}}
    assert conninfo_to_dict(route.upstream_conninfo(minimal)) == {"dbname": "postgres"}


def test_embedded_hop() -> None:
    swapped = route.session_settings(SETTINGS, "-c pgmigrate.role=migrate", ("127.0.0.1", 40123))
    assert swapped == {
        **SETTINGS,
        "HOST": "127.0.0.1",
        "PORT": "40123",
        "OPTIONS": {
            "application_name": "shop-migrate",
            "options": "-c search_path=shop -c pgmigrate.role=migrate",
            "sslmode": "disable",
            "gssencmode": "disable",
        },
    }
    assert SETTINGS["OPTIONS"]["options"] == "-c search_path=shop"  # a copy


def test_external_hop_keeps_everything_but_adds_options() -> None:
    plain = {**SETTINGS, "OPTIONS": {"sslmode": "require", "pool": {"min_size": 2}}}
    assert route.session_settings(plain, "-c pgmigrate.role=migrate", None) == {
        **plain,
        "OPTIONS": {"sslmode": "require", "options": "-c pgmigrate.role=migrate"},
    }
