"""_prepare's fast path gives exactly what normalising every message would."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nurture.outbox.smtp_transport import _BARE_EOL, _DOT_AT_LINE_START, _prepare


def _reference(data: bytes) -> bytes:
    data = _DOT_AT_LINE_START.sub(b"..", _BARE_EOL.sub(b"\r\n", data))
    return data + (b"" if data.endswith(b"\r\n") else b"\r\n") + b".\r\n"


@settings(max_examples=2000)
@given(st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"\xc3\xa9"]), max_size=30))
def test_prepare_matches_full_normalisation(parts: list[bytes]) -> None:
    data = b"".join(parts)
    assert _prepare(data) == _reference(data)


def test_prepare_leaves_a_clean_message_alone_but_the_terminator() -> None:
    clean = b"Subject: hi\r\n\r\nline one\r\nsee example.com. ok\r\n"
    assert _prepare(clean) == clean + b".\r\n"
    assert _prepare(b"a\r\r\nb") == b"a\r\n\r\nb\r\n.\r\n"  # a CR before a CRLF is bare
