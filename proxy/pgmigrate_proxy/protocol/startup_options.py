"""The startup packet's `options` parameter read as PostgreSQL reads it: its `-c name=value`
and `--name=value` settings (sans-IO)."""

from __future__ import annotations


def startup_settings(options: str) -> tuple[dict[str, str], str | None]:
    """The `-c name=value` and `--name=value` settings of a startup `options` string (names
    lowercased, `-` read as `_`, as PostgreSQL reads them; `\\ ` is a space), and the first
    word that is no such setting (None: there is none)."""
    words = options.replace("\\ ", "\0").split()
    settings: dict[str, str] = {}
    index = 0
    while index < len(words):
        word = words[index]
        if word == "-c" and index + 1 < len(words):
            index += 1
            setting = words[index]
        elif (word.startswith("-c") and len(word) > 2) or word.startswith("--"):
            setting = word[2:]
        else:
            return settings, word.replace("\0", " ")
        name, equals, value = setting.partition("=")
        if not equals or not name:
            return settings, word.replace("\0", " ")
        settings[name.lower().replace("-", "_")] = value.replace("\0", " ")
        index += 1
    return settings, None
