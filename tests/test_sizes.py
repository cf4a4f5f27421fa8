"""Byte counts as people write them and read them (``ema_average.output.sizes``)."""

from __future__ import annotations

import pytest

from ema_average.errors import ConfigurationError
from ema_average.output.sizes import format_bytes, parse_size


@pytest.mark.parametrize(
    ("text", "value"),
    [("512MB", 512 * 10**6), ("4GiB", 4 * 2**30), ("1.5G", 15 * 10**8), ("1000", 1000), ("64KiB", 65536)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["lots", "-1GB", "0"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_size(text)


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 * 2**30, "5.0 GiB"), (2**50, "1024.0 TiB")],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text
