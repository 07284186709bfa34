"""Fast, strict MIME building for rendered emails.

One tick builds thousands of messages, so this writes the RFC 5322 / RFC 2045 bytes
directly with the C-accelerated codecs in :mod:`binascii` instead of going through
:class:`email.message.EmailMessage` (measured in ``tests/test_mime.py``'s benchmark:
several times faster than the compat32 classes, which are themselves about twice as
fast as the default policy). The tests parse every shape back with the stdlib parser.

Header values are never cleaned up silently where it matters: CR, LF or NUL in any of
them raises :class:`HeaderInjectionError`. Other control characters (ESC, DEL, C1) and
the bidi embeddings, overrides and isolates are dropped from the Subject, display names
and other unstructured headers: they have no business in a header and can make one read
differently from what it says (the lead import drops them too; this is the second line).

International addresses: a Unicode domain goes as its A-label (IDNA 2008, computed by
email-validator) in the To header and, through :func:`envelope_address`, in RCPT TO. A
non-ASCII local part cannot be written in ASCII at all: the header then carries it as
UTF-8 (RFC 6532), and the transport sends it only to a server that offers SMTPUTF8.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping
from datetime import datetime
from email.utils import format_datetime, getaddresses
from functools import lru_cache

from nurture.errors import NurtureError
from nurture.message.rendering import RenderedEmail, strip_controls

__all__ = [
    "BodySkeleton",
    "HeaderInjectionError",
    "address_domain",
    "ascii_domain",
    "build_message",
    "envelope_address",
    "format_address",
    "message_id",
    "parse_message_id",
    "split_address",
    "strip_controls",
]


class HeaderInjectionError(NurtureError, ValueError):
    """A header value contains CR, LF or NUL, which would end or split the header."""


_FORBIDDEN = re.compile(r"[\r\n\x00]")
_PLAIN_STEP = re.compile(r"[A-Za-z0-9_-]+")
_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
# RFC 5322 atext: a display name made only of these (and spaces) needs no quoting.
_ATEXT_PHRASE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]+")
_HEADER_NAME = re.compile(r"[!-9;-~]+")
# Headers this module writes itself; a caller may not replace them through ``headers``.
_RESERVED = frozenset(
    {
        "content-type",
        "content-transfer-encoding",
        "mime-version",
        "message-id",
        "date",
        "from",
        "to",
        "subject",
        "list-unsubscribe",
        "list-unsubscribe-post",
    }
)
_ADDRESS_HEADERS = frozenset({"reply-to", "cc", "sender", "return-path"})
_MAX_LINE = 998
_HIGH_BYTES = bytes(range(128, 256))


def _check(name: str, value: str) -> str:
    if _FORBIDDEN.search(value):
        raise HeaderInjectionError(f"{name} contains a line break or NUL: {value!r}")
    return value


@lru_cache(maxsize=4096)
def ascii_domain(domain: str) -> str:
    """The domain as SMTP and RFC 5322 need it: ASCII as is, Unicode as A-labels.

    The conversion is email-validator's (UTS #46 mapping, then IDNA 2008), the one it
    reports as ``ascii_domain``; Python's ``idna`` codec implements IDNA 2003, which
    maps some names (``fa\u00df.de``) to a different domain.

    Raises:
        ValueError: the domain has no valid A-label form.
    """
    if domain.isascii():
        return domain
    # Imported here: most domains are ASCII, and email_validator is slow to import.
    from email_validator import EmailNotValidError, validate_email

    try:
        return validate_email("x@" + domain, check_deliverability=False).ascii_domain
    except EmailNotValidError as exc:
        raise ValueError(f"domain {domain!r} has no IDNA form: {exc}") from None


def envelope_address(addr: str) -> str:
    """``local@domain`` for MAIL FROM / RCPT TO, with the domain as A-labels.

    The local part is kept as is; a non-ASCII one still needs a server with SMTPUTF8.

    Raises:
        ValueError: no ``@``, or a domain without a valid A-label form.
    """
    local, at, domain = addr.rpartition("@")
    if not at or not local:
        raise ValueError(f"not an email address: {addr!r}")
    return f"{local}@{ascii_domain(domain)}"


def message_id(enrollment_id: int, step_id: str, domain: str) -> str:
    """The deterministic Message-ID of the delivery (enrollment, step).

    A retry of the same delivery gets the same Message-ID, and replies can be matched
    back to it with :func:`parse_message_id`.

    Args:
        enrollment_id: The enrollment's id.
        step_id: The step id; ids outside ``[A-Za-z0-9_-]`` are base32-encoded.
        domain: The sending domain, e.g. the From address's domain.

    Returns:
        ``"<nurture.{enrollment_id}.{step}@{domain}>"``
    """
    _check("step id", step_id)
    domain = _check("domain", domain).strip().lower()
    domain = ascii_domain(domain)
    if not _DOMAIN.fullmatch(domain):
        raise ValueError(f"invalid Message-ID domain {domain!r}")
    if not isinstance(enrollment_id, int) or enrollment_id < 0:
        raise ValueError(f"invalid enrollment id {enrollment_id!r}")
    if _PLAIN_STEP.fullmatch(step_id):
        step = step_id
    else:
        # "=" is atext but never in a plain step id, so the two forms cannot collide.
        step = "=" + base64.b32encode(step_id.encode("utf-8")).decode("ascii").rstrip("=")
    return f"<nurture.{enrollment_id}.{step}@{domain}>"


def parse_message_id(value: str) -> tuple[int, str] | None:
    """The (enrollment_id, step_id) behind a Message-ID from :func:`message_id`, or None."""
    match = re.fullmatch(r"\s*<?nurture\.([0-9]+)\.([^@\s]+)@[^>\s]+>?\s*", value)
    if match is None:
        return None
    step = match.group(2)
    if step.startswith("="):
        try:
            padded = step[1:] + "=" * (-len(step[1:]) % 8)
            step = base64.b32decode(padded).decode("utf-8")
        except (binascii.Error, ValueError):
            return None
    elif not _PLAIN_STEP.fullmatch(step):
        return None
    return int(match.group(1)), step


def format_address(name: str | None, addr: str) -> str:
    """A ``"Display Name" <addr>`` string (Unicode allowed) for ``build_message``.

    Raises:
        HeaderInjectionError: the name or address contains CR, LF or NUL.
    """
    _check("address", addr)
    if not name or not name.strip():
        return addr
    name = " ".join(strip_controls(_check("display name", name)).split())
    if _ATEXT_PHRASE.fullmatch(name):
        return f"{name} <{addr}>"
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}" <{addr}>'


# -- header encoding -----------------------------------------------------------------------


def _encoded_words(text: str) -> list[str]:
    """RFC 2047 ``=?utf-8?b?...?=`` words of at most 60 characters, split on characters."""
    words: list[str] = []
    chunk: list[str] = []
    size = 0
    # 36 bytes -> 48 base64 characters -> 60-character words: with "Subject: " in front
    # the first line stays under RFC 2047's 76 and RFC 5322's 78.
    limit = 36
    for char in text:
        width = len(char.encode("utf-8"))
        if size + width > limit and chunk:
            words.append(_b_word("".join(chunk)))
            chunk, size = [], 0
        chunk.append(char)
        size += width
    if chunk:
        words.append(_b_word("".join(chunk)))
    return words


def _b_word(text: str) -> str:
    return "=?utf-8?b?" + base64.b64encode(text.encode("utf-8")).decode("ascii") + "?="


def _fold(name: str, words: list[str]) -> str:
    """``Name: w1 w2 ...`` folded before a word so lines stay within 78 characters."""
    lines: list[str] = []
    line = name + ":"
    for word in words:
        if len(line) + 1 + len(word) > 78 and line != name + ":":
            lines.append(line)
            line = " " + word
        else:
            line += " " + word
    lines.append(line)
    for one in lines:
        if len(one) > _MAX_LINE:
            raise ValueError(f"{name} has a word longer than {_MAX_LINE} characters")
    return "\r\n".join(lines) + "\r\n"


def _unstructured(name: str, value: str) -> str:
    value = " ".join(strip_controls(_check(name, value)).split())
    words = value.split(" ") if value else []
    # A word too long for any line (a 1,200-character company name) goes as encoded words,
    # which may be split anywhere, instead of failing the message.
    fits = all(len(w) <= _MAX_LINE - len(name) - 2 for w in words)
    if value.isascii() and "=?" not in value and fits:
        return _fold(name, words)
    # Encoded words must be separated by folding whitespace, which decoders drop, so a
    # space that belongs to the text goes inside the word before it.
    return _fold(name, _encoded_words(value))


_NAME_ADDR = re.compile(r'\s*((?:[^<>"\\]|\\.)*?|"(?:[^"\\]|\\.)*")\s*<([^<>\s@]+@[^<>\s@]+)>\s*')
_BARE_ADDR = re.compile(r'\s*([^<>\s@",;]+@[^<>\s@",;]+)\s*')


def _split_address(value: str) -> tuple[str, str]:
    """(display name, address); the two common shapes without the slow general parser."""
    match = _NAME_ADDR.fullmatch(value)
    if match is not None:
        display = match.group(1)
        if display.startswith('"'):
            display = re.sub(r"\\(.)", r"\1", display[1:-1])
        return display, match.group(2)
    match = _BARE_ADDR.fullmatch(value)
    if match is not None:
        return "", match.group(1)
    found = getaddresses([value])
    if len(found) != 1:
        raise ValueError(f"expected one address, got {len(found)}: {value!r}")
    return found[0]


def split_address(value: str) -> tuple[str, str]:
    """``(display name, address)`` of one From-style value.

    Raises:
        ValueError: ``value`` holds no single address.
    """
    return _split_address(value)


def address_domain(value: str) -> str:
    """The domain of a From-style address (``Name <a@example.com>`` or ``a@example.com``),
    lower-cased; empty when ``value`` holds no address."""
    try:
        _, addr = _split_address(value)
    except ValueError:
        return ""
    return addr.rpartition("@")[2].strip().lower()


_DATE_LINES: dict[str, str] = {}


def _date_header(date: datetime) -> str:
    """The Date header line (one per tick: every message of it has the same date)."""
    # Keyed by the ISO text, which has the offset: equal instants in two zones are equal
    # (and equally hashed) datetimes, but their Date headers differ.
    key = date.isoformat()
    line = _DATE_LINES.get(key)
    if line is None:
        line = "Date: " + format_datetime(date) + "\r\n"
        if len(_DATE_LINES) < 64:
            _DATE_LINES[key] = line
    return line


@lru_cache(maxsize=256)
def _address(name: str, value: str) -> str:
    _check(name, value)
    display, addr = _split_address(value)
    if not addr or "@" not in addr:
        raise ValueError(f"{name}: not an email address: {value!r}")
    local, _, domain = addr.rpartition("@")
    # A non-ASCII local part stays UTF-8 (RFC 6532): only an SMTPUTF8 server takes it.
    angle = f"<{local}@{ascii_domain(domain)}>"
    display = " ".join(strip_controls(display).split())
    if not display:
        return _fold(name, [angle])
    if display.isascii() and "=?" not in display:
        if _ATEXT_PHRASE.fullmatch(display):
            return _fold(name, [*display.split(" "), angle])
        quoted = '"' + display.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return _fold(name, [quoted, angle])
    return _fold(name, [*_encoded_words(display), angle])


# -- bodies --------------------------------------------------------------------------------


def _crlf(text: str) -> str:
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.replace("\n", "\r\n")


# Elements whose content is raw text: a character reference inside them stays literal.
_RAW_TEXT = re.compile(r"<(style|script)\b[^>]*>(.*?)</\1\s*>", re.IGNORECASE | re.DOTALL)


def _html_as_ascii(html: str) -> str | None:
    """The HTML with every non-ASCII character as a numeric reference (``&#233;``), or None
    when a non-ASCII character sits in a ``<style>`` or ``<script>``, where a reference
    would not be decoded. A reference costs as many bytes as quoted-printable would, and a
    7bit part is built without re-encoding every line of the body."""
    if any(not m.group(2).isascii() for m in _RAW_TEXT.finditer(html)):
        return None
    return html.encode("ascii", "xmlcharrefreplace").decode("ascii")


def _body_part(subtype: str, text: str) -> bytes:
    """One text/* part: 7bit when ASCII (lines <= 998), else quoted-printable or base64.

    A mostly-ASCII HTML part is sent 7bit with numeric character references instead of
    quoted-printable; the document is the same for every reader.
    """
    text = _crlf(text)
    if not text.endswith("\r\n"):
        text += "\r\n"
    data = text.encode("utf-8")
    if _is_7bit(data):
        encoding, payload = "7bit", data
    else:
        high = len(data) - len(data.translate(None, _HIGH_BYTES))
        if high * 6 > len(data):
            # Quoted-printable triples every high byte; past 1 in 6 base64 is smaller.
            encoding = "base64"
            raw = base64.encodebytes(data)  # 76-character lines ending in LF
            payload = raw.replace(b"\n", b"\r\n")
        elif (
            subtype == "html"
            and (ascii_html := _html_as_ascii(text)) is not None
            and _is_7bit(referenced := ascii_html.encode("ascii"))
        ):
            encoding, payload = "7bit", referenced
        else:
            encoding = "quoted-printable"
            # With CRLF input, b2a_qp writes CRLF hard breaks and "=\r\n" soft breaks.
            payload = binascii.b2a_qp(data, quotetabs=False, istext=True, header=False)
    head = (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
        f"Content-Transfer-Encoding: {encoding}\r\n\r\n"
    ).encode("ascii")
    return head + payload


def _qp_line(line: str) -> bytes:
    """Quoted-printable of one CRLF-terminated line (b2a_qp works line by line)."""
    return binascii.b2a_qp(line.encode("utf-8"), quotetabs=False, istext=True, header=False)


_SLOT_MARK = "\ue000{}\ue001"
_SLOT_SPLIT = re.compile("\ue000([0-9]+)\ue001")


class BodySkeleton:
    """One text/* part of many messages that differ only in a few values, prepared once.

    The part's text is ``runs[0] + values[0] + runs[1] + ...``. :meth:`part` returns
    exactly ``_body_part(subtype, text)``: the static runs are line-ended, encoded and (for
    quoted-printable) converted line by line once, so a message costs a join. Values
    that are empty, non-ASCII, hold a line break (or ``<`` in HTML), or lines that could
    pass 998 octets, take the general path on the joined text.

    Args:
        subtype: ``plain`` or ``html``.
        runs: The static runs around the values (one more run than values).
    """

    def __init__(self, subtype: str, runs: tuple[str, ...]) -> None:
        self.subtype = subtype
        self.runs = runs
        self._mode = ""  # "" (general path), "7bit" or "qp"
        self._head = b""
        self._format = b""  # 7bit: head and static runs as one bytes %-format
        self._lines: list[bytes | tuple[tuple[str, ...], tuple[int, ...]]] = []
        crlf = [_crlf(run) for run in runs]
        if not crlf[-1] or any("\ue000" in r or "\ue001" in r for r in crlf):
            return
        if not crlf[-1].endswith("\r\n"):
            crlf[-1] += "\r\n"
        static = "".join(crlf)
        data = static.encode("utf-8")
        self._max_line = max(map(len, data.split(b"\r\n")))
        self._len = len(data)
        self._high = len(data) - len(data.translate(None, _HIGH_BYTES))
        if data.isascii():
            self._set("7bit", [r.encode("ascii") for r in crlf])
            return
        if subtype == "html" and _html_as_ascii(static) is not None:
            encoded = [r.encode("ascii", "xmlcharrefreplace") for r in crlf]
            self._max_line = max(map(len, b"".join(encoded).split(b"\r\n")))
            self._set("7bit", encoded)
            return
        # Quoted-printable, line by line: a line without a value is encoded once.
        marked = crlf[0] + "".join(_SLOT_MARK.format(i) + run for i, run in enumerate(crlf[1:]))
        chunk: list[bytes] = []
        for line in marked.split("\r\n")[:-1]:
            parts = _SLOT_SPLIT.split(line + "\r\n")
            if len(parts) == 1:
                chunk.append(_qp_line(parts[0]))
                continue
            if chunk:
                self._lines.append(b"".join(chunk))
                chunk = []
            self._lines.append((tuple(parts[0::2]), tuple(int(i) for i in parts[1::2])))
        if chunk:
            self._lines.append(b"".join(chunk))
        self._mode = "qp"
        self._head = _part_head(subtype, "quoted-printable")

    def _set(self, mode: str, encoded: list[bytes]) -> None:
        self._mode = mode
        self._head = _part_head(self.subtype, "7bit")
        self._format = self._head + b"%b".join(e.replace(b"%", b"%%") for e in encoded)

    def part(self, values: list[str]) -> bytes:
        """The encoded part (head and payload) for these values, one per slot in order."""
        mode = self._mode
        joined = "".join(values)
        if (
            not mode
            or not all(values)
            or not joined.isascii()
            or "\r" in joined
            or "\n" in joined
            or (self.subtype == "html" and "<" in joined)
        ):
            return self._general(values)
        size = len(joined)
        if mode == "7bit":
            if self._max_line + size > _MAX_LINE or self._high * 6 > self._len + size:
                return self._general(values)  # too long a line, or base64 for this one
            # One bytes %-format, in C: the static runs with %% escaped, %b between them.
            return self._format % tuple(v.encode("ascii") for v in values)
        if self._high * 6 > self._len + size:
            return self._general(values)  # base64 for this one
        out = [self._head]
        for line in self._lines:
            if isinstance(line, bytes):
                out.append(line)
                continue
            runs, slots = line
            pieces = [runs[0]]
            for slot, run in zip(slots, runs[1:], strict=True):
                pieces.append(values[slot])
                pieces.append(run)
            out.append(_qp_line("".join(pieces)))
        return b"".join(out)

    def _general(self, values: list[str]) -> bytes:
        text = [self.runs[0]]
        for value, run in zip(values, self.runs[1:], strict=True):
            text.append(value)
            text.append(run)
        return _body_part(self.subtype, "".join(text))


def _part_head(subtype: str, encoding: str) -> bytes:
    return (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
        f"Content-Transfer-Encoding: {encoding}\r\n\r\n"
    ).encode("ascii")


def _is_7bit(data: bytes) -> bool:
    """ASCII with no line over 998 octets (RFC 5322), CRLF line ends assumed."""
    return data.isascii() and max(map(len, data.split(b"\r\n"))) <= _MAX_LINE


def build_message(
    email: RenderedEmail,
    *,
    from_addr: str,
    to_addr: str,
    message_id: str,
    unsubscribe_url: str,
    unsubscribe_mailto: str | None = None,
    headers: Mapping[str, str] | None = None,
    date: datetime,
    bodies: tuple[bytes, bytes] | None = None,
) -> bytes:
    """The complete RFC 5322 message: multipart/alternative, text/plain then text/html.

    Args:
        email: The rendered subject, HTML and text.
        from_addr: ``addr`` or ``Display Name <addr>`` (Unicode names are encoded).
        to_addr: Same, for the recipient (see :func:`format_address`).
        message_id: From :func:`message_id`, angle brackets included.
        unsubscribe_url: The https one-click unsubscribe URL (RFC 8058).
        unsubscribe_mailto: An optional ``mailto:`` (or bare address) for unsubscribes.
        headers: Extra headers (e.g. ``Reply-To``, ``Feedback-ID``). They cannot
            replace the headers written here.
        date: An aware datetime for the Date header.
        bodies: The text and HTML parts already encoded (:class:`BodySkeleton`), exactly
            as they would be from ``email.text`` and ``email.html``.

    Returns:
        CRLF-terminated bytes, ready for ``smtplib.SMTP.sendmail``.

    Raises:
        HeaderInjectionError: a header value contains CR, LF or NUL.
        ValueError: a missing or malformed address, a naive date, a reserved header.
    """
    if date.tzinfo is None:
        raise ValueError("date must be timezone-aware")
    _check("Message-ID", message_id)
    if not (message_id.startswith("<") and message_id.endswith(">") and "@" in message_id):
        raise ValueError(f"Message-ID must look like <id@domain>: {message_id!r}")
    _check("List-Unsubscribe URL", unsubscribe_url)
    if not unsubscribe_url.startswith("https://") and not unsubscribe_url.startswith("http://"):
        raise ValueError(f"unsubscribe_url must be an http(s) URL: {unsubscribe_url!r}")
    unsubscribe = [f"<{unsubscribe_url}>"]
    if unsubscribe_mailto:
        _check("List-Unsubscribe mailto", unsubscribe_mailto)
        mailto = unsubscribe_mailto
        if not mailto.lower().startswith("mailto:"):
            mailto = "mailto:" + mailto
        unsubscribe.insert(0, f"<{mailto}>,")
    if any(" " in u for u in unsubscribe) or any(not u.isascii() for u in unsubscribe):
        raise ValueError("List-Unsubscribe URLs must be ASCII without spaces")

    parts = [
        _date_header(date),
        _address("From", from_addr),
        _address("To", to_addr),
        _unstructured("Subject", email.subject),
        "Message-ID: " + message_id + "\r\n",
        "MIME-Version: 1.0\r\n",
        _fold("List-Unsubscribe", unsubscribe),
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n",
    ]
    for name, value in (headers or {}).items():
        _check("header name", name)
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"invalid header name {name!r}")
        if name.lower() in _RESERVED:
            raise ValueError(f"header {name!r} is set by build_message and cannot be replaced")
        if name.lower() in _ADDRESS_HEADERS:
            parts.append(_address(name, value))
        else:
            parts.append(_unstructured(name, value))
    # The boundary starts with "=_", which can appear in neither quoted-printable (where
    # "=" is followed by hex or a line break) nor base64; 7bit parts are checked below.
    boundary = "=_nurture_" + hashlib.blake2b(message_id.encode(), digest_size=12).hexdigest()
    if bodies is not None:
        text_part, html_part = bodies
    else:
        text_part = _body_part("plain", email.text)
        html_part = _body_part("html", email.html)
    marker = ("--" + boundary).encode("ascii")
    if marker in text_part or marker in html_part:
        raise ValueError("a body contains the MIME boundary")
    parts.append(f'Content-Type: multipart/alternative;\r\n boundary="{boundary}"\r\n\r\n')
    # ASCII but for a non-ASCII local part in To (RFC 6532), which needs SMTPUTF8 anyway.
    head = "".join(parts).encode("utf-8")
    return b"".join(
        (
            head,
            marker,
            b"\r\n",
            text_part,
            b"\r\n",
            marker,
            b"\r\n",
            html_part,
            b"\r\n",
            marker,
            b"--\r\n",
        )
    )
