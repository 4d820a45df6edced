"""pgbouncer's auth_file format: one `"user" "password"` pair a line, parsed into stored
credentials.

Each line holds at least two fields in double quotes, a user name and then a password in clear
text, an md5 hash (`md5` + md5hex(password + user)) or a SCRAM-SHA-256 verifier; `""` inside a
field is one double quote; what follows the second field is ignored, as pgbouncer ignores it.
Blank lines and lines whose first non-blank character is `#` or `;` are comments. Anything
else is an AuthFileError whose message is one line naming the file and line (and never the
line's text, which may hold a password).
"""

from __future__ import annotations

from pgmigrate_proxy.auth.credentials import StoredCredential, parse_stored
from pgmigrate_proxy.auth.scram import ScramError


class AuthFileError(ValueError):
    """A line of the auth_file that is not `"user" "password"`: `file:line: what is wrong`."""


def _field(line: str, pos: int) -> tuple[str, int] | None:
    """The quoted field starting at line[pos] (after blanks) and the index after it."""
    while pos < len(line) and line[pos] in " \t":
        pos += 1
    if pos >= len(line) or line[pos] != '"':
        return None
    value: list[str] = []
    pos += 1
    while pos < len(line):
        char = line[pos]
        if char == '"':
            if line[pos + 1 : pos + 2] == '"':
                value.append('"')
                pos += 2
                continue
            return "".join(value), pos + 1
        value.append(char)
        pos += 1
    return None  # no closing quote


def parse_line(line: str) -> tuple[str, str] | None:
    """(user, password field) of one line; None for a comment or blank line.

    Raises ValueError (without the line's text) when the line has another shape."""
    stripped = line.strip()
    if not stripped or stripped[0] in "#;":
        return None
    user = _field(line, 0)
    if user is None:
        raise ValueError('expected "user" "password" (a double-quoted user name first)')
    password = _field(line, user[1])
    if password is None:
        raise ValueError('expected "user" "password" (a double-quoted password after the user)')
    if not user[0]:
        raise ValueError("empty user name")
    rest = line[password[1] :]
    if rest and rest[0] not in " \t\r\n":
        raise ValueError("the password field must be followed by a blank or the line's end")
    return user[0], password[0]


def parse_auth_file(text: str, name: str = "auth_file") -> dict[str, StoredCredential]:
    """The credentials of an auth_file's text, by user; `name` is what errors call the file.

    A user listed twice keeps its last line."""
    users: dict[str, StoredCredential] = {}
    for number, line in enumerate(text.splitlines(), 1):
        try:
            parsed = parse_line(line)
            if parsed is None:
                continue
            users[parsed[0]] = parse_stored(parsed[1])
        except ScramError as exc:
            raise AuthFileError(f"{name}:{number}: malformed SCRAM-SHA-256 verifier") from exc
        except ValueError as exc:
            raise AuthFileError(f"{name}:{number}: {exc}") from exc
    return users
