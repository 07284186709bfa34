"""MIME building: parsed back with the stdlib, non-ASCII round trips, header injection."""

from __future__ import annotations

import smtplib
from datetime import UTC, datetime, timedelta, timezone
from email import message_from_bytes, message_from_string, policy
from email.message import EmailMessage

import pytest

from nurture.config import PROJECT_ROOT
from nurture.message.mime import (
    HeaderInjectionError,
    build_message,
    envelope_address,
    format_address,
    message_id,
    parse_message_id,
    strip_controls,
)
from nurture.message.rendering import RenderedEmail, TemplateStore, sample_context
from tests.servers import SmtpSink

DATE = datetime(2026, 3, 3, 10, 0, tzinfo=UTC)
UNSUB = "https://track.example.com/u/tok-123"
EMAIL = RenderedEmail(
    subject="Your first dashboard",
    html='<p>Hi Dana,</p>\n<p><a href="https://lumen.example.com/x?a=1&amp;b=2">Open</a></p>\n',
    text="Hi Dana,\n\nOpen (https://lumen.example.com/x?a=1&b=2)\n",
)


def build(email: RenderedEmail = EMAIL, **overrides: object) -> bytes:
    """build_message with sensible defaults."""
    kwargs: dict[str, object] = {
        "from_addr": "Lumen Analytics <hello@lumen.example.com>",
        "to_addr": "dana@example.com",
        "message_id": message_id(7, "welcome", "lumen.example.com"),
        "unsubscribe_url": UNSUB,
        "unsubscribe_mailto": "unsubscribe@lumen.example.com",
        "date": DATE,
    }
    kwargs.update(overrides)
    return build_message(email, **kwargs)  # type: ignore[arg-type]


def parse(data: bytes) -> EmailMessage:
    """Parse with the modern stdlib policy and insist on no defects anywhere."""
    msg = message_from_bytes(data, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    for part in msg.walk():
        assert not part.defects, part.defects
    return msg


def content(part: EmailMessage) -> str:
    """A text part's decoded content with LF line ends."""
    return str(part.get_content()).replace("\r\n", "\n")


def test_headers_and_parts_parse_back() -> None:
    data = build()
    msg = parse(data)
    assert msg["Date"].datetime == DATE
    assert msg["From"].addresses[0].display_name == "Lumen Analytics"
    assert msg["From"].addresses[0].addr_spec == "hello@lumen.example.com"
    assert msg["To"] == "dana@example.com"
    assert msg["Subject"] == "Your first dashboard"
    assert msg["Message-ID"] == "<nurture.7.welcome@lumen.example.com>"
    assert msg["MIME-Version"] == "1.0"
    assert msg["List-Unsubscribe"] == f"<mailto:unsubscribe@lumen.example.com>, <{UNSUB}>"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert [p.get_content_charset() for p in parts] == ["utf-8", "utf-8"]
    assert content(parts[0]) == EMAIL.text  # type: ignore[arg-type]
    assert content(parts[1]) == EMAIL.html  # type: ignore[arg-type]


def test_output_is_strict_rfc5322_bytes() -> None:
    store = TemplateStore(PROJECT_ROOT / "templates" / "emails")
    for name in store.names():
        data = build(store.render(name, sample_context()))
        assert data.isascii()
        assert b"\n" not in data.replace(b"\r\n", b"")  # no bare LF
        assert b"\r" not in data.replace(b"\r\n", b"")  # no bare CR
        head, _, _ = data.partition(b"\r\n\r\n")
        assert all(len(line) <= 78 for line in head.split(b"\r\n"))
        assert all(len(line) <= 998 for line in data.split(b"\r\n"))
        parts = list(parse(data).iter_parts())
        html = store.render(name, sample_context()).html
        # Non-ASCII characters travel as numeric references: the same document.
        sent = content(parts[1]).rstrip("\n")  # type: ignore[arg-type]
        assert sent == html.encode("ascii", "xmlcharrefreplace").decode()


def test_non_ascii_subject_and_names_round_trip() -> None:
    subject = "Grüße, Zoë — 15% de réduction sur tout 🌿 " * 3
    email = RenderedEmail(subject=subject.strip(), html="<p>Größe</p>", text="Größe\n")
    data = build(
        email,
        from_addr="Fern & Field Société <hello@fernfield.example.com>",
        to_addr=format_address("Zoë O'Brien, Jr.", "zoe@example.com"),
        headers={"Reply-To": "Zoë Support <help@fernfield.example.com>", "X-Campaign": "été"},
    )
    head = data.partition(b"\r\n\r\n")[0]
    assert b"=?utf-8?b?" in head
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    msg = parse(data)
    assert msg["Subject"] == subject.strip()
    assert msg["From"].addresses[0].display_name == "Fern & Field Société"
    to = msg["To"].addresses[0]
    assert (to.display_name, to.addr_spec) == ("Zoë O'Brien, Jr.", "zoe@example.com")
    assert msg["Reply-To"].addresses[0].display_name == "Zoë Support"
    assert msg["X-Campaign"] == "été"
    assert [content(p) for p in msg.iter_parts()] == ["Größe\n", "<p>Größe</p>\n"]  # type: ignore[arg-type]


def test_quoted_display_names_and_idna_domains() -> None:
    data = build(to_addr=format_address('Ann "The Boss" Lee', "ann@bücher.example"))
    to = parse(data)["To"].addresses[0]
    assert to.display_name == 'Ann "The Boss" Lee'
    assert to.addr_spec == "ann@xn--bcher-kva.example"
    # IDNA 2008 (email-validator's ascii_domain), not Python's IDNA 2003 codec: "ß" stays.
    data = build(to_addr="hans@faß.example")
    assert parse(data)["To"].addresses[0].addr_spec == "hans@xn--fa-hia.example"
    # A non-ASCII local part goes as UTF-8 (RFC 6532); only an SMTPUTF8 server takes it.
    data = build(to_addr="Zoë <zoë@bücher.example>")
    assert "To: =?utf-8?b?Wm/Dqw==?= <zoë@xn--bcher-kva.example>\r\n".encode() in data
    # The stdlib reads header bytes as ASCII; an RFC 6532 reader decodes UTF-8 first.
    utf8 = message_from_string(data.decode("utf-8"), policy=policy.SMTPUTF8)
    to = utf8["To"].addresses[0]
    assert (to.display_name, to.addr_spec) == ("Zoë", "zoë@xn--bcher-kva.example")
    assert envelope_address("zoë@bücher.example") == "zoë@xn--bcher-kva.example"
    assert envelope_address("a@example.com") == "a@example.com"
    with pytest.raises(ValueError, match="IDNA"):
        envelope_address("a@exa mple\u00e9.com")
    with pytest.raises(ValueError):
        build(to_addr="a@example.com, b@example.com")
    with pytest.raises(ValueError):
        build(to_addr="not an address")


HOSTILE = "\x1b[31mEve\x7f\x85\u202egnp.exe\u2066\u2069\x07"


def test_control_and_bidi_characters_never_reach_a_header() -> None:
    """ESC, DEL, C1 controls and bidi overrides are dropped; TAB becomes a space."""
    email = RenderedEmail(subject=f"Hi {HOSTILE}\tthere", html="<p>x</p>", text="x")
    data = build(email, to_addr=format_address(f"Dana {HOSTILE}", "dana@example.com"))
    head = data.partition(b"\r\n\r\n")[0].decode("ascii")
    msg = parse(data)
    assert msg["Subject"] == "Hi [31mEvegnp.exe there"
    assert msg["To"].addresses[0].display_name == "Dana [31mEvegnp.exe"
    for value in [head, str(msg["Subject"]), str(msg["To"])]:
        assert not any(ord(c) < 32 and c not in "\r\n" for c in value)
        assert not set(value) & set("\x7f\x85\u202e\u2066\u2069")
    assert strip_controls("a\tb\nc\x00") == "a\tb\nc\x00"  # refused elsewhere, not hidden


def test_mostly_ascii_html_goes_7bit_with_character_references() -> None:
    html = "<p>Grüße from Zoë · 15% off " + "and more words " * 20 + "</p>"
    data = build(RenderedEmail(subject="s", html=html, text="Grüße " + "x" * 200))
    _, text_part, html_part, _ = data.split(b"--=_nurture_")
    assert b"Content-Transfer-Encoding: quoted-printable" in text_part
    assert b"Content-Transfer-Encoding: 7bit" in html_part
    sent = content(list(parse(data).iter_parts())[1])  # type: ignore[arg-type]
    assert sent == html.replace("ü", "&#252;").replace("ß", "&#223;").replace(
        "ë", "&#235;").replace("·", "&#183;") + "\n"  # fmt: skip
    # In a <style> a reference would stay literal: that HTML keeps its characters.
    styled = '<style>p::before { content: "·"; }</style>' + html
    data = build(RenderedEmail(subject="s", html=styled, text="x"))
    assert b"Content-Transfer-Encoding: quoted-printable" in data.split(b"--=_nurture_")[2]
    assert content(list(parse(data).iter_parts())[1]) == styled + "\n"  # type: ignore[arg-type]


def test_mostly_non_latin_bodies_use_base64() -> None:
    text = "こんにちは、ダナさん。最初のダッシュボードを作りましょう。\n" * 20
    data = build(RenderedEmail(subject="件名", html=f"<p>{text}</p>", text=text))
    assert b"Content-Transfer-Encoding: base64" in data
    msg = parse(data)
    assert msg["Subject"] == "件名"
    assert content(next(msg.iter_parts())) == text  # type: ignore[arg-type]


def test_ascii_short_lines_stay_7bit_and_long_lines_use_qp() -> None:
    short = build(RenderedEmail(subject="s", html="<p>hi</p>", text="hi"))
    assert short.count(b"Content-Transfer-Encoding: 7bit") == 2
    long_html = "<p>" + "word " * 400 + "</p>"
    data = build(RenderedEmail(subject="s", html=long_html, text="hi"))
    assert b"Content-Transfer-Encoding: quoted-printable" in data
    assert content(list(parse(data).iter_parts())[1]) == long_html + "\n"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "overrides",
    [
        {"email": RenderedEmail(subject="Hi\r\nBcc: victim@example.com", html="x", text="x")},
        {"email": RenderedEmail(subject="Hi\nthere", html="x", text="x")},
        {"email": RenderedEmail(subject="Hi\x00", html="x", text="x")},
        {"from_addr": "Evil\r\nBcc: v@example.com <a@example.com>"},
        {"to_addr": "Dana <dana@example.com>\nBcc: v@example.com"},
        {"message_id": "<a@b>\r\nX-Evil: 1"},
        {"unsubscribe_url": UNSUB + "\r\nX-Evil: 1"},
        {"unsubscribe_mailto": "u@example.com\nX-Evil: 1"},
        {"headers": {"X-Campaign": "ok\r\nBcc: v@example.com"}},
        {"headers": {"X-Evil\r\nBcc": "v@example.com"}},
    ],
)
def test_cr_lf_nul_in_any_header_is_refused(overrides: dict[str, object]) -> None:
    email = overrides.pop("email", EMAIL)
    with pytest.raises(HeaderInjectionError):
        build(email, **overrides)  # type: ignore[arg-type]


def test_format_address_refuses_line_breaks() -> None:
    with pytest.raises(HeaderInjectionError):
        format_address("Dana\r\nBcc: x@example.com", "dana@example.com")
    assert format_address(None, "a@example.com") == "a@example.com"
    assert format_address("  Dana   Lee ", "a@example.com") == "Dana Lee <a@example.com>"


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        build(date=datetime(2026, 3, 3, 10))
    with pytest.raises(ValueError, match="cannot be replaced"):
        build(headers={"Subject": "other"})
    with pytest.raises(ValueError, match="header name"):
        build(headers={"Bad Name": "x"})
    with pytest.raises(ValueError):
        build(unsubscribe_url="javascript:alert(1)")
    with pytest.raises(ValueError):
        build(message_id="no-brackets@example.com")


def test_date_keeps_its_offset() -> None:
    tz = timezone(timedelta(hours=-5))
    msg = parse(build(date=DATE.astimezone(tz)))
    assert msg["Date"].datetime == DATE
    assert str(msg["Date"]).endswith("-0500")


def test_message_id_is_deterministic_and_reversible() -> None:
    first = message_id(42, "case-study", "Lumen.Example.com")
    assert first == message_id(42, "case-study", "lumen.example.com")
    assert first == "<nurture.42.case-study@lumen.example.com>"
    assert first != message_id(42, "demo-offer", "lumen.example.com")
    assert first != message_id(43, "case-study", "lumen.example.com")
    assert parse_message_id(first) == (42, "case-study")
    odd = message_id(5, "étape 2/ok", "lumen.example.com")
    assert odd.startswith("<nurture.5.=") and odd.isascii() and " " not in odd
    assert parse_message_id(odd) == (5, "étape 2/ok")
    assert parse_message_id("<CAF=abc@mail.gmail.com>") is None
    # Same delivery, same bytes: a retry is byte-identical.
    assert build() == build()
    with pytest.raises(ValueError):
        message_id(1, "s", "bad domain")
    with pytest.raises(HeaderInjectionError):
        message_id(1, "s\r\n", "example.com")


def test_a_built_message_goes_through_real_smtp(smtp_server: SmtpSink) -> None:
    email = RenderedEmail(
        subject="Zoë, here is 15% off", html="<p>.leading dot</p>\n.\n", text=".\nok\n"
    )
    data = build(email, to_addr=format_address("Zoë", "zoe@example.com"))
    with smtplib.SMTP(smtp_server.host, smtp_server.port, timeout=10) as client:
        client.sendmail("bounces@lumen.example.com", ["zoe@example.com"], data)
    smtp_server.wait_for(1)
    recipient, received = smtp_server.messages[0]
    assert recipient == "zoe@example.com"
    assert received["Subject"] == "Zoë, here is 15% off"
    assert received["Message-ID"] == "<nurture.7.welcome@lumen.example.com>"
    parts = list(received.iter_parts())
    assert content(parts[0]) == ".\nok\n"  # type: ignore[arg-type]
    assert content(parts[1]) == "<p>.leading dot</p>\n.\n"  # type: ignore[arg-type]
