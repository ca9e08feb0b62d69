"""Secret files: the one reader of every credential given as a file (``token_file``,
``*_file`` config keys, ``--token-file``, a forge's token and GitHub App key).

A secret is read when it is needed (at start, or per connection for files that rotate), never
kept in a config model. Surrounding whitespace is stripped (a trailing newline is how editors
and ``echo`` write files); an unreadable or empty file is a ``ConfigError`` that names what the
file is for (``what``: a config key or a flag) and the path, never the contents:

- ``cannot read WHAT PATH: REASON``
- ``WHAT PATH is not a text file``
- ``WHAT PATH is empty``
- ``WHAT PATH must hold one token (no whitespace)`` (``one_token=True``)
"""

from __future__ import annotations

from pathlib import Path

from bigtent.errors import ConfigError


def read_secret_bytes(path: Path | str, what: str) -> bytes:
    """The file's bytes, stripped of surrounding whitespace; ConfigError when it cannot be
    read or holds nothing but whitespace."""
    try:
        data = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if not data:
        raise ConfigError(f"{what} {path} is empty")
    return data


def read_secret_file(path: Path | str, what: str, *, one_token: bool = False) -> str:
    """The file's text, stripped; with ``one_token`` it must also hold no inner whitespace
    (a bearer token: a second line would otherwise travel in a header)."""
    data = read_secret_bytes(path, what)
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not a text file") from exc
    if one_token and any(c.isspace() for c in text):
        raise ConfigError(f"{what} {path} must hold one token (no whitespace)")
    return text
