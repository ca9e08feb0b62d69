from __future__ import annotations

from pathlib import Path

import pytest

from bigtent.errors import ConfigError
from bigtent.secretfile import read_secret_bytes, read_secret_file


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"abc\n", "abc"),
        (b"  abc \r\n\n", "abc"),
        (b"ghp_x", "ghp_x"),
        ("päss\n".encode(), "päss"),
    ],
)
def test_the_contents_stripped(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "secret"
    path.write_bytes(content)
    assert read_secret_file(path, "token file") == expected
    assert read_secret_file(str(path), "token file", one_token=True) == expected
    assert read_secret_bytes(path, "token file") == expected.encode()


@pytest.mark.parametrize(
    ("content", "one_token", "message"),
    [
        (None, False, "cannot read token file {path}: No such file or directory"),
        (b"", False, "token file {path} is empty"),
        (b" \n\t\n", False, "token file {path} is empty"),
        (b"\xff\xfe", False, "token file {path} is not a text file"),
        (b"two\nlines\n", True, "token file {path} must hold one token (no whitespace)"),
    ],
)
def test_a_file_that_cannot_serve_says_what_it_is_for(
    tmp_path: Path, content: bytes | None, one_token: bool, message: str
) -> None:
    path = tmp_path / "secret"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        read_secret_file(path, "token file", one_token=one_token)
    assert info.value.message == message.format(path=path)
    assert info.value.exit_code == 2


def test_two_lines_are_fine_where_one_token_is_not_asked(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_text("-----BEGIN KEY-----\nabc\n-----END KEY-----\n")
    assert read_secret_file(path, "key").count("\n") == 2


def test_a_directory_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"^cannot read token file {tmp_path}: Is a directory"):
        read_secret_bytes(tmp_path, "token file")
