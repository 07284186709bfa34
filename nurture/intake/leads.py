"""Lead import: stream a CSV or JSON Lines file into ``leads``, in set-based batches.

The import reads records one at a time, validates and normalises each one, and upserts
them ``batch_size`` at a time: one ``SELECT`` of the emails that already exist (to count
inserted vs updated), at most a few statements for the accounts, and one ``INSERT ... ON
CONFLICT (email) DO UPDATE`` executemany, all in one transaction per batch. Memory stays
bounded by the batch, whatever the file size, except for the dedupe set below.

Decisions worth knowing:

* **Formats.** ``.jsonl``/``.ndjson`` are JSON Lines, ``.csv``/``.txt`` are CSV, and any
  other name is sniffed (a first non-blank character ``{`` means JSON Lines). CSV needs a
  header row; the delimiter (``,``, ``;`` or TAB) is the one that occurs most often in the
  header line. Quoted fields may contain newlines; ``line`` in the rejects file is always
  the physical line where the record starts.
* **Encoding.** Files are read as UTF-8, with or without a BOM, and never guessed as
  cp1252: a guess silently corrupts names. Bytes that are not UTF-8 only reject the record
  that holds them ("not valid UTF-8"), so the rest of the file still loads, and they are
  written back to the rejects file byte for byte (``surrogateescape``), so nothing is
  lost. A UTF-16 file (a common Excel export) fails as a whole with a one-line message.
* **Dedupe across batches.** A set of the 64-bit ``hash()`` of every normalised email seen
  so far (about 70 MB per million distinct emails). It only decides how a row is
  *counted*: the upsert itself is keyed on the real email, so a hash collision (odds about
  3e-8 for a million rows) can at worst count one new lead as a duplicate, never lose or
  mix up data. Duplicates inside one file merge: the later row wins per non-empty field,
  and ``attributes`` merge key by key.
* **Update semantics.** An upsert only writes the fields a row actually has: empty cells
  keep what is stored. ``source`` from ``--source`` is a default for *new* leads only; a
  ``source`` column overwrites. ``attributes`` merge into the stored ones. ``updated``
  counts every existing lead that a row matched, changed or not.
* **Accounts.** A ``company``/``account`` value links the lead to an account: by the
  email's domain when it is a company domain (``accounts.domain`` is unique, so this is an
  upsert), else (free-mail addresses) by exact account name, creating the account if
  none has that name. Two concurrent imports may both create a name-only account.
* **Speed.** email-validator dominates the cost. Its domain-syntax step is memoised per
  import process (see :func:`_domain_cached`; identical results), the lead upsert is
  compiled once and sent as 500-row ``VALUES`` statements, and the per-row Python is
  kept lean. ``python -m benchmarks.import_bench --rows 100000`` measures it against
  email-validator alone.
* **Column names** match case-, space-, ``_``- and ``-``-insensitively (``E-mail``,
  ``First Name``, ``surname``, ``tz``...). Every other column goes into ``attributes``
  under a snake_case key (``Job Title`` -> ``job_title``).
"""

from __future__ import annotations

import codecs
import csv
import json
import operator
import re
import types
import zoneinfo
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, NamedTuple, cast

from email_validator import EmailNotValidError, EmailUndeliverableError, validate_email
from email_validator.deliverability import validate_email_deliverability
from sqlalchemy import ColumnElement, Connection, Engine, Table, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from nurture.errors import NurtureError
from nurture.spec.consent import BASES
from nurture.spec.touchpoints import Touchpoint
from nurture.store.consent import split_topics
from nurture.store.models import Account, Lead
from nurture.store.sql import insert_for

__all__ = [
    "ImportResult",
    "LeadFileError",
    "UpsertCounts",
    "import_leads",
    "normalise_email",
    "upsert_lead_rows",
]

MAX_EMAIL = 320
MAX_TEXT = 255  # names, company, owner: the column widths
MAX_ATTRIBUTE = 10_000  # one attribute value; a longer cell is almost surely a broken quote
MAX_RECORD = 1_000_000  # one JSON Lines record
DNS_TIMEOUT = 5  # seconds per domain with --check-deliverability

# Header (lower-cased, without spaces, "_" and "-") -> lead field.
ALIASES: dict[str, str] = {
    "email": "email",
    "emailaddress": "email",
    "firstname": "first_name",
    "givenname": "first_name",
    "lastname": "last_name",
    "surname": "last_name",
    "familyname": "last_name",
    "company": "company",
    "account": "company",
    "timezone": "timezone",
    "tz": "timezone",
    "country": "country",
    "source": "source",
    "lifecyclestage": "lifecycle_stage",
    "owner": "owner",
    "consenttopics": "consent_topics",
    "consenttopic": "consent_topics",
    "consentbasis": "consent_basis",
    "lawfulbasis": "consent_basis",
    "consenttextversion": "consent_text_version",
    "consentversion": "consent_text_version",
    "consentat": "consent_at",
}
# Consent columns: validated with the row, stored as consent records, never lead fields.
CONSENT_FIELDS = ("consent_topics", "consent_basis", "consent_text_version", "consent_at")
TEXT_LIMITS = {
    "first_name": MAX_TEXT,
    "last_name": MAX_TEXT,
    "company": MAX_TEXT,
    "owner": MAX_TEXT,
    "lifecycle_stage": 32,
}


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


TOUCHPOINTS = frozenset(t.value for t in Touchpoint)
COUNTRIES = _words(
    """
    AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO
    BQ BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ
    DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP
    GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG
    KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML
    MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE
    PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL
    SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM
    US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW
    """
)
COUNTRY_HINTS = {"UK": "GB", "EN": "GB", "EL": "GR"}
# Addresses here belong to a person, not a company, so their domain names no account.
FREE_MAIL = _words(
    """
    gmail.com googlemail.com yahoo.com yahoo.co.uk yahoo.fr ymail.com hotmail.com
    hotmail.co.uk hotmail.fr outlook.com live.com msn.com icloud.com me.com mac.com aol.com
    gmx.com gmx.de gmx.net web.de proton.me protonmail.com pm.me mail.com zoho.com
    yandex.ru yandex.com mail.ru qq.com 163.com 126.com orange.fr free.fr laposte.net
    t-online.de libero.it btinternet.com comcast.net fastmail.com hey.com tutanota.com
    """
)
LEADS = cast(Table, Lead.__table__)
ACCOUNTS = cast(Table, Account.__table__)
_json_any = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_quote = json.encoder.encode_basestring  # the C string quoter json itself uses


def _json(attrs: dict[str, Any]) -> str:
    """Compact JSON for ``attributes``; CSV values are all strings, which we quote directly.

    The general encoder costs about five times more per row, a tenth of a CSV import.
    """
    try:
        return "{" + ",".join([_quote(k) + ":" + _quote(v) for k, v in attrs.items()]) + "}"
    except TypeError:  # a number, list or object from JSON Lines
        return _json_any(attrs)


_BAD_CHARS = re.compile("[\x00\udc80-\udcff]")
_SQUASH = re.compile(r"[\s_\-]+")
_SNAKE = re.compile(r"[^0-9a-z]+")


class LeadFileError(NurtureError):
    """The file as a whole cannot be imported (missing, unreadable, no email column...)."""


class _Reject(Exception):
    """One record cannot be loaded; ``field`` is the column at fault, if there is one."""

    def __init__(self, column: str, reason: str) -> None:
        super().__init__(reason)
        self.field = column
        self.reason = reason


@dataclass
class ImportResult:
    """What an import did. ``read == inserted + updated + duplicates + rejected``."""

    read: int = 0
    inserted: int = 0
    updated: int = 0
    duplicates: int = 0
    rejected: int = 0
    consents: int = 0  # consent records that changed (consent columns or the file's basis)
    rejects_path: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        """The counts as the JSON object ``nurture leads import --json`` prints."""
        return {
            "read": self.read,
            "inserted": self.inserted,
            "updated": self.updated,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "consents": self.consents,
            "rejects_path": str(self.rejects_path) if self.rejects_path else None,
        }


class UpsertCounts(NamedTuple):
    """Result of :func:`upsert_lead_rows`."""

    inserted: int
    updated: int
    merged: int  # rows folded into an earlier row with the same email


# --------------------------------------------------------------------------- values


def _domain_cached(func: Callable[..., Any]) -> Callable[..., Any]:
    """email-validator's own ``validate_email``, with its domain-syntax step memoised.

    Checking the domain (IDNA and Unicode tables) is about two thirds of the library's
    time, and a lead list has few distinct domains. So we run the library's very code
    with that one pure, syntax-only step behind an LRU cache: results are identical (a
    test compares them). Should a future version rename the step, the plain function is
    used.
    """
    step = func.__globals__.get("validate_email_domain_name")
    if step is None or "validate_email_domain_name" not in func.__code__.co_names:
        return func
    namespace = {**func.__globals__, "validate_email_domain_name": lru_cache(maxsize=8192)(step)}
    clone = types.FunctionType(
        func.__code__, namespace, func.__name__, func.__defaults__, func.__closure__
    )
    clone.__kwdefaults__ = func.__kwdefaults__
    return clone


_validate = _domain_cached(validate_email)


def normalise_email(
    value: str,
    *,
    check_deliverability: bool = False,
    dns_resolver: Any = None,
    dns_cache: dict[str, str | None] | None = None,
) -> str:
    """Validate an address with email-validator and return it normalised and lower-cased.

    Args:
        value: the address as typed.
        check_deliverability: also look the domain up in DNS (MX, then A/AAAA).
        dns_resolver: a ``dns.resolver.Resolver``; default: the system's, with a timeout.
        dns_cache: domain -> error (or None when deliverable), shared across calls so a
            list with many addresses per domain asks DNS once per domain.

    Raises:
        EmailNotValidError: with a human-readable reason.
    """
    valid = _validate(value, check_deliverability=False)
    if check_deliverability:
        cache = {} if dns_cache is None else dns_cache
        domain = valid.ascii_domain
        if domain not in cache:
            try:
                if dns_resolver is None:
                    validate_email_deliverability(domain, valid.domain, timeout=DNS_TIMEOUT)
                else:
                    validate_email_deliverability(domain, valid.domain, dns_resolver=dns_resolver)
                cache[domain] = None
            except EmailUndeliverableError as exc:
                cache[domain] = str(exc)
        error = cache[domain]
        if error is not None:
            raise EmailUndeliverableError(error)
    return valid.normalized.lower()


@lru_cache(maxsize=1)
def _zones() -> dict[str, str]:
    return {name.lower(): name for name in zoneinfo.available_timezones()}


def _timezone(value: str) -> str:
    zone = _zones().get(value.lower())
    if zone is None:
        raise _Reject("timezone", f"unknown time zone {value!r} (expected e.g. Europe/Paris)")
    return zone


def _country(value: str) -> str:
    code = value.upper()
    if code in COUNTRIES:
        return code
    hint = COUNTRY_HINTS.get(code)
    more = f"; did you mean {hint}?" if hint else ""
    raise _Reject("country", f"{value!r} is not an ISO-3166 alpha-2 country code{more}")


def _source(value: str) -> str:
    src = value.lower()
    if src not in TOUCHPOINTS:
        raise _Reject(
            "source", f"unknown source {value!r} (one of {', '.join(sorted(TOUCHPOINTS))})"
        )
    return src


def _squash(header: str) -> str:
    return _SQUASH.sub("", header.strip().lower())


def _attribute_key(header: str, index: int) -> str:
    key = _SNAKE.sub("_", header.strip().lower()).strip("_")
    return key or f"column_{index + 1}"


# Characters that no name, company or owner needs and that can reach a header (a name in
# To, any value in a Subject): control characters other than TAB (C0, DEL, C1) and the
# bidi embeddings, overrides and isolates (U+202A-202E, U+2066-2069), which make a line
# read differently from what it is. Dropped from those fields at import.
_HEADER_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# The same for attribute values, but line breaks stay: an attribute may be a note.
_TEXT_UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _text(name: str, limit: int, lower: bool = False) -> Callable[[str], str]:
    def check(value: str) -> str:
        if _HEADER_UNSAFE.search(value):
            value = _HEADER_UNSAFE.sub("", value).strip()
        if len(value) > limit:
            raise _Reject(name, f"longer than {limit} characters")
        return value.lower() if lower else value

    return check


CHECKS: dict[str, Callable[[str], str]] = {
    "timezone": _timezone,
    "country": _country,
    "source": _source,
    "first_name": _text("first_name", MAX_TEXT),
    "last_name": _text("last_name", MAX_TEXT),
    "company": _text("company", MAX_TEXT),
    "owner": _text("owner", MAX_TEXT),
    "lifecycle_stage": _text("lifecycle_stage", 32, lower=True),
    "consent_topics": lambda v: _consent_topics(v),
    "consent_basis": lambda v: _consent_basis(v),
    "consent_text_version": _text("consent_text_version", 64),
    "consent_at": lambda v: _consent_at(v),
}


def _consent_topics(value: str) -> str:
    topics = split_topics(value)
    for topic in topics:
        if topic != "*" and not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", topic):
            raise _Reject("consent_topics", f"bad topic {topic!r}")
    return " ".join(topics)


def _consent_basis(value: str) -> str:
    basis = value.strip().lower().replace(" ", "_").replace("-", "_")
    basis = {"legitimate_interests": "legitimate_interest"}.get(basis, basis)
    if basis not in BASES:
        raise _Reject("consent_basis", f"unknown lawful basis {value!r}; expected one of {BASES}")
    return basis


def _consent_at(value: str) -> str:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _Reject("consent_at", f"{value!r} is not an ISO 8601 date-time") from None
    if parsed.tzinfo is None:
        raise _Reject("consent_at", f"{value!r} needs a UTC offset, e.g. 2026-03-03T10:00:00Z")
    return parsed.isoformat()


def _clean(fields: dict[str, Any], attrs: dict[str, Any], opts: _Options) -> dict[str, Any]:
    """Validate one record's mapped values in place; return the lead row or raise."""
    email = fields.get("email")
    if email is None:
        raise _Reject("email", "missing email")
    if len(email) > MAX_EMAIL:
        raise _Reject("email", f"longer than {MAX_EMAIL} characters")
    emptied = []
    for name, value in fields.items():
        if name != "email":
            fields[name] = CHECKS[name](value)
            if not fields[name]:  # nothing but control characters: as if the cell were empty
                emptied.append(name)
    for name in emptied:
        del fields[name]
    for key, value in attrs.items():
        if isinstance(value, str):
            if len(value) > MAX_ATTRIBUTE:
                raise _Reject(key, f"longer than {MAX_ATTRIBUTE} characters")
            if _TEXT_UNSAFE.search(value):
                attrs[key] = _TEXT_UNSAFE.sub("", value)
    # The email goes last: it is by far the dearest check, and cheap ones may reject first.
    try:
        if opts.check_deliverability:
            fields["email"] = normalise_email(
                email,
                check_deliverability=True,
                dns_resolver=opts.dns_resolver,
                dns_cache=opts.dns_cache,
            )
        else:
            fields["email"] = _validate(email, check_deliverability=False).normalized.lower()
    except EmailNotValidError as exc:
        raise _Reject("email", f"invalid email {email!r}: {exc}") from None
    fields["attributes"] = attrs
    return fields


def _merge(into: dict[str, Any], later: Mapping[str, Any]) -> None:
    """Fold a later row for the same email into ``into``: later non-empty values win."""
    for key, value in later.items():
        if key == "attributes":
            into["attributes"] = {**into.get("attributes", {}), **value}
        elif value is not None:
            into[key] = value


# --------------------------------------------------------------------------- readers


@dataclass
class _Options:
    check_deliverability: bool = False
    dns_resolver: Any = None
    # Per import, so a long-lived worker does not keep DNS answers forever.
    dns_cache: dict[str, str | None] = field(default_factory=dict)


class _Record(NamedTuple):
    line: int
    raw: list[str]  # the original cells, for the rejects file
    fields: dict[str, Any] | None  # None: rejected while reading (see error)
    attrs: dict[str, Any]
    error: _Reject | None


@dataclass
class _Source:
    """An open input: its records and the column names the rejects file repeats."""

    records: Iterator[_Record]
    reject_header: list[str]
    handle: IO[str]
    columns: dict[str, str] = field(default_factory=dict)  # lead field -> column as named


def _open(path: Path) -> _Source:
    try:
        with path.open("rb") as probe:
            head = probe.read(65_536)
    except OSError as exc:
        raise LeadFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise LeadFileError(f"{path} is UTF-16; save it as UTF-8 (CSV UTF-8) and import again")
    text = head.decode("utf-8-sig", errors="surrogateescape")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        jsonl = True
    elif suffix in (".csv", ".txt", ".tsv"):
        jsonl = False
    else:
        jsonl = text.lstrip().startswith("{")
    handle = path.open(encoding="utf-8-sig", errors="surrogateescape", newline="")
    if jsonl:
        return _Source(_jsonl_records(handle), ["record"], handle)
    try:
        return _csv_source(path, handle, text)
    except BaseException:
        handle.close()
        raise


def _sniff_delimiter(text: str) -> str:
    first = text.split("\n", 1)[0]
    counts = {d: first.count(d) for d in (",", ";", "\t")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def _csv_source(path: Path, handle: IO[str], head: str) -> _Source:
    delimiter = _sniff_delimiter(head)
    reader = csv.reader(handle, delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise LeadFileError(
            f"{path} is empty: expected a header row with an email column"
        ) from None
    except csv.Error as exc:
        raise LeadFileError(f"{path}: cannot parse the header row: {exc}") from None
    if _BAD_CHARS.search("".join(header)):
        raise LeadFileError(f"{path}: the header row is not valid UTF-8 text")
    header = [h.strip() for h in header]
    plan: list[tuple[int, str, bool]] = []  # (cell index, target, is attribute)
    owner: dict[tuple[str, bool], str] = {}
    for i, name in enumerate(header):
        target = ALIASES.get(_squash(name))
        is_attr = target is None
        key = _attribute_key(name, i) if target is None else target
        if (key, is_attr) in owner:
            raise LeadFileError(
                f"{path}: columns {owner[key, is_attr]!r} and {name!r} both map to {key!r}"
            )
        owner[key, is_attr] = name
        plan.append((i, key, is_attr))
    if ("email", False) not in owner:
        found = ", ".join(repr(h) for h in header) or "none"
        raise LeadFileError(f"{path}: no email column (columns found: {found})")
    columns = {key: header[i] for i, key, _ in plan}
    return _Source(_csv_records(reader, header, plan), header, handle, columns)


def _csv_records(
    reader: Any, header: list[str], plan: list[tuple[int, str, bool]]
) -> Iterator[_Record]:
    width = len(header)
    field_plan = [(i, key) for i, key, is_attr in plan if not is_attr]
    attr_plan = [(i, key) for i, key, is_attr in plan if is_attr]
    last = reader.line_num
    while True:
        start = last + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            last = reader.line_num
            yield _Record(start, [], None, {}, _Reject("", f"cannot parse: {exc}"))
            continue
        last = reader.line_num
        if len(row) != width:
            if not "".join(row).strip():
                continue  # a blank line: nothing to load, nothing to lose
            hint = ""
            if last > start:
                hint = f" (the record spans lines {start}-{last}: an unclosed quote?)"
            reason = f"expected {width} cells as in the header, found {len(row)}{hint}"
            yield _Record(start, row, None, {}, _Reject("", reason))
            continue
        joined = "".join(row)
        if "\x00" in joined or (not joined.isascii() and _BAD_CHARS.search(joined)):
            yield _Record(start, row, None, {}, _bad_cells(row, header))
            continue
        fields: dict[str, Any] = {}
        for i, key in field_plan:
            value = row[i].strip()
            if value:
                fields[key] = value
        attrs: dict[str, Any] = {}
        for i, key in attr_plan:
            value = row[i].strip()
            if value:
                attrs[key] = value
        if not fields and not attrs:
            continue  # only delimiters and blanks
        yield _Record(start, row, fields, attrs, None)


def _bad_cells(row: Sequence[str], names: Sequence[str]) -> _Reject:
    for i, cell in enumerate(row):
        name = names[i] if i < len(names) else ""
        if "\x00" in cell:
            return _Reject(name, "contains a NUL character")
        if _BAD_CHARS.search(cell):
            return _Reject(name, "not valid UTF-8 (fix the file's encoding)")
    return _Reject("", "contains a NUL character")  # pragma: no cover - caller checked


def _jsonl_records(handle: IO[str]) -> Iterator[_Record]:
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        raw = [line.rstrip("\r\n")]
        if "\\u0000" in line or "\x00" in line:
            yield _Record(number, raw, None, {}, _Reject("", "contains a NUL character"))
            continue
        if not line.isascii() and _BAD_CHARS.search(line):
            reason = "not valid UTF-8 (fix the file's encoding)"
            yield _Record(number, raw, None, {}, _Reject("", reason))
            continue
        if len(line) > MAX_RECORD:
            reason = f"record longer than {MAX_RECORD:,} characters"
            yield _Record(number, raw, None, {}, _Reject("", reason))
            continue
        try:
            obj = json.loads(line, parse_constant=_no_constant)
        except ValueError as exc:
            yield _Record(number, raw, None, {}, _Reject("", f"invalid JSON: {exc}"))
            continue
        if not isinstance(obj, dict):
            reason = f"expected a JSON object, found {type(obj).__name__}"
            yield _Record(number, raw, None, {}, _Reject("", reason))
            continue
        if "\\u" in line and _has_surrogate(obj):
            # "\ud800" decodes to a lone surrogate, which no database driver can encode.
            reason = "contains an unpaired surrogate (a \\uD800-\\uDFFF escape)"
            yield _Record(number, raw, None, {}, _Reject("", reason))
            continue
        try:
            fields, attrs = _map_object(obj)
        except _Reject as exc:
            yield _Record(number, raw, None, {}, exc)
            continue
        yield _Record(number, raw, fields, attrs, None)


def _has_surrogate(obj: Any) -> bool:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _no_constant(name: str) -> Any:
    # NaN and Infinity parse in Python but are not JSON, and PostgreSQL's jsonb rejects them.
    raise ValueError(f"{name} is not valid JSON")


def _map_object(obj: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    fields: dict[str, Any] = {}
    attrs: dict[str, Any] = {}
    for i, (name, value) in enumerate(obj.items()):
        if value is None or value == "":
            continue
        target = ALIASES.get(_squash(name))
        if target is None:
            if isinstance(value, str):
                value = value.strip()
                if not value:
                    continue
            attrs[_attribute_key(name, i)] = value
            continue
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise _Reject(name, f"expected text, found {type(value).__name__}")
        text = str(value).strip()
        if text:
            if target in fields:
                raise _Reject(name, f"{target!r} given twice")
            fields[target] = text
    return fields, attrs


# --------------------------------------------------------------------------- rejects


def _neutralise(cell: str) -> str:
    # Spreadsheets run cells that start with these as formulas (CSV injection).
    if cell and cell[0] in "=+-@\t\r":
        return "'" + cell
    return cell


class _RejectsWriter:
    """Opens the rejects file on the first reject, so a clean import leaves no file."""

    def __init__(self, path: Path, header: Sequence[str], columns: Mapping[str, str]) -> None:
        self.path = path
        self.header = list(header)
        self.columns = columns
        self._handle: IO[str] | None = None
        self._writer: Any = None

    def write(self, line: int, error: _Reject, raw: Sequence[str]) -> None:
        if self._writer is None:
            try:
                # surrogateescape writes undecodable input bytes back unchanged.
                self._handle = self.path.open(
                    "w", encoding="utf-8", errors="surrogateescape", newline=""
                )
            except OSError as exc:
                msg = f"cannot write the rejects file {self.path}: {exc.strerror or exc}"
                raise LeadFileError(msg) from None
            self._writer = csv.writer(self._handle)
            self._writer.writerow(["line", "field", "reason", *map(_neutralise, self.header)])
        column = self.columns.get(error.field, error.field)
        cells = [str(line), _neutralise(column), _neutralise(error.reason)]
        self._writer.writerow(cells + [_neutralise(c) for c in raw])

    def close(self) -> Path | None:
        if self._handle is None:
            return None
        self._handle.close()
        return self.path


# --------------------------------------------------------------------------- upsert


def _lead_upsert(dialect: str, source_given: bool, stage_given: bool) -> Any:
    """``INSERT ... ON CONFLICT (email) DO UPDATE`` writing only what the rows carry.

    ``source`` and ``lifecycle_stage`` are NOT NULL, so a new lead gets a default; rows
    that did not name one must not overwrite the stored value with that default, hence
    one statement variant per combination (a batch is split by it).
    """
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(LEADS)
    new = stmt.excluded
    c = LEADS.c
    attributes: ColumnElement[Any]
    if dialect == "postgresql":
        attributes = c.attributes.op("||")(new.attributes)
    else:
        attributes = func.json_patch(c.attributes, new.attributes)
    keep: dict[str, Any] = {
        name: func.coalesce(new[name], c[name])
        for name in ("first_name", "last_name", "account_id", "timezone", "country", "owner")
    }
    if source_given:
        keep["source"] = new.source
    if stage_given:
        keep["lifecycle_stage"] = new.lifecycle_stage
    return stmt.on_conflict_do_update(
        index_elements=[c.email],
        set_={**keep, "attributes": attributes, "updated_at": new.updated_at},
    )


class _AccountCache:
    """Account ids an import already resolved, so later batches skip the lookups.

    Bounded: past ``limit`` entries it starts over, costing only repeated lookups.
    """

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self.by_domain: dict[str, int] = {}
        self.by_name: dict[str, int] = {}

    def remember(self, by_domain: dict[str, int], by_name: dict[str, int]) -> None:
        if len(self.by_domain) + len(self.by_name) > self.limit:
            self.by_domain.clear()
            self.by_name.clear()
        self.by_domain.update(by_domain)
        self.by_name.update(by_name)


def _account_ids(
    conn: Connection,
    rows: Iterable[dict[str, Any]],
    now: datetime,
    cache: _AccountCache | None = None,
) -> None:
    """Set ``account_id`` on every row with a ``company``: set-based, a few statements."""
    cache = cache or _AccountCache()
    by_domain: dict[str, str] = {}
    by_name: set[str] = set()
    wanted: list[tuple[dict[str, Any], str | None, str]] = []
    for row in rows:
        company = row.get("company")
        if not company:
            continue
        domain: str | None = row["email"].rpartition("@")[2]
        if domain in FREE_MAIL:
            domain = None
            if company not in cache.by_name:
                by_name.add(company)
        elif domain not in cache.by_domain:
            by_domain[domain] = company  # type: ignore[index]
        wanted.append((row, domain, company))
    if not wanted:
        return
    accounts = ACCOUNTS
    ids_by_domain: dict[str, int] = {}
    ids_by_name: dict[str, int] = {}
    if by_domain:
        insert = insert_for(conn, accounts).on_conflict_do_nothing(
            index_elements=[accounts.c.domain]
        )
        conn.execute(
            insert,
            [
                {"name": name, "domain": domain, "created_at": now, "updated_at": now}
                for domain, name in by_domain.items()
            ],
        )
        found = conn.execute(
            select(accounts.c.domain, accounts.c.id).where(accounts.c.domain.in_(by_domain))
        )
        ids_by_domain = {d: i for d, i in found}
    if by_name:
        query = (
            select(accounts.c.name, func.min(accounts.c.id))
            .where(accounts.c.name.in_(by_name))
            .group_by(accounts.c.name)
        )
        ids_by_name = {n: i for n, i in conn.execute(query)}
        missing = by_name - ids_by_name.keys()
        if missing:
            conn.execute(
                accounts.insert(),
                [{"name": n, "created_at": now, "updated_at": now} for n in sorted(missing)],
            )
            ids_by_name = {n: i for n, i in conn.execute(query)}
    cache.remember(ids_by_domain, ids_by_name)
    for row, domain, company in wanted:
        if domain:
            row["account_id"] = ids_by_domain.get(domain) or cache.by_domain[domain]
        else:
            row["account_id"] = ids_by_name.get(company) or cache.by_name[company]


# In the table's column order, which is the compiled statement's parameter order.
_LEAD_KEYS = (
    "email", "first_name", "last_name", "account_id", "source", "timezone", "country",
    "lifecycle_stage", "owner", "attributes", "behaviour_score", "fit_score",
    "created_at", "updated_at",
)  # fmt: skip
CHUNK = 500  # rows per multi-row INSERT: 500 x 14 parameters stays far below every limit


@dataclass
class _Prepared:
    """The lead upsert compiled once, then run as multi-row VALUES on the DB-API cursor.

    SQLAlchemy's per-row parameter processing cost more than SQLite's own work, and one
    statement per 500 rows beats executemany on both databases, so we compile a one-row
    statement with positional parameters, repeat its VALUES group, and apply the column
    types' bind processors ourselves (the constant ones, ``now``, once per batch).
    """

    head: str  # up to and including "VALUES "
    group: str  # one row's "(?, ?, ...)"
    tail: str  # " ON CONFLICT ..."
    order: list[str]  # one row's parameter names, in placeholder order
    processors: dict[str, Callable[[Any], Any]]
    defaults: dict[str, Any]  # scalar column defaults the compiler added

    def sql(self, rows: int) -> str:
        return self.head + ", ".join([self.group] * rows) + self.tail


@lru_cache(maxsize=16)
def _prepare(dialect: Any, source_given: bool, stage_given: bool) -> _Prepared:
    compile_as = dialect
    if not dialect.positional:
        # psycopg takes "%s" too; a positional twin lets us flatten rows into one tuple.
        compile_as = type(dialect)(paramstyle="format")
    stmt = _lead_upsert(dialect.name, source_given, stage_given)
    compiled = stmt.compile(dialect=compile_as, column_keys=list(_LEAD_KEYS))
    order = list(compiled.positiontup or [])
    head, values = compiled.string.split(" VALUES ", 1)
    group, tail = values.split(" ON CONFLICT ", 1)
    mark = "?" if compile_as.paramstyle == "qmark" else "%s"
    one_group = group.startswith("(") and group.endswith(")") and group.count(mark) == len(order)
    if not one_group or mark in tail:  # we can only repeat a VALUES group with every bind
        raise RuntimeError(f"lead upsert: unexpected SQL {compiled.string!r}")
    processors: dict[str, Callable[[Any], Any]] = {}
    defaults: dict[str, Any] = {}
    columns = LEADS.c
    for name, bind in compiled.binds.items():
        proc = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if proc is not None:
            processors[name] = proc
        if name not in _LEAD_KEYS:
            default = columns[name].default if name in columns else None
            if default is None or not default.is_scalar:
                raise RuntimeError(f"lead upsert: no value for column {name!r}")
            defaults[name] = default.arg
    return _Prepared(head + " VALUES ", group, " ON CONFLICT " + tail, order, processors, defaults)


def _upsert(
    conn: Connection,
    rows: Sequence[dict[str, Any]],
    now: datetime,
    default_source: str,
    cache: _AccountCache | None = None,
) -> set[str]:
    """Upsert rows with distinct emails; return the emails that existed before."""
    if not rows:
        return set()
    existing = _existing(conn, [row["email"] for row in rows])
    _account_ids(conn, rows, now, cache)
    groups: dict[tuple[bool, bool], list[dict[str, Any]]] = {}
    for row in rows:
        key = (row.get("source") is not None, row.get("lifecycle_stage") is not None)
        groups.setdefault(key, []).append(row)
    for (source_given, stage_given), group in groups.items():
        _insert_rows(
            conn, _prepare(conn.dialect, source_given, stage_given), group, now, default_source
        )
    return existing


def _insert_rows(
    conn: Connection,
    prep: _Prepared,
    rows: list[dict[str, Any]],
    now: datetime,
    default_source: str,
) -> None:
    constants = {"behaviour_score": 0.0, "fit_score": 0.0, "created_at": now, "updated_at": now}
    constants.update(prep.defaults)
    for name, value in constants.items():
        if name in prep.processors:
            constants[name] = prep.processors[name](value)
    # attributes are JSON-encoded here (see _json); any other processor runs per row.
    per_row = [
        (n, p) for n, p in prep.processors.items() if n not in constants and n != "attributes"
    ]
    empty = _json({})
    # Sorted keys touch the email index's pages in order.
    rows = sorted(rows, key=operator.itemgetter("email"))
    fast = prep.order == list(_LEAD_KEYS) and not per_row
    pick = operator.itemgetter(*prep.order)
    tail = tuple(constants[name] for name in _LEAD_KEYS[-4:])
    for start in range(0, len(rows), CHUNK):
        flat: list[Any] = []
        chunk = rows[start : start + CHUNK]
        for row in chunk:
            get = row.get
            attrs = get("attributes")
            if fast:  # the common case, in _LEAD_KEYS order, without an intermediate dict
                flat += (
                    row["email"],
                    get("first_name"),
                    get("last_name"),
                    get("account_id"),
                    get("source") or default_source,
                    get("timezone"),
                    get("country"),
                    get("lifecycle_stage") or "subscriber",
                    get("owner"),
                    _json(attrs) if attrs else empty,
                )
                flat += tail
                continue
            values = {
                "email": row["email"],
                "first_name": get("first_name"),
                "last_name": get("last_name"),
                "account_id": get("account_id"),
                "timezone": get("timezone"),
                "country": get("country"),
                "owner": get("owner"),
                "source": get("source") or default_source,
                "lifecycle_stage": get("lifecycle_stage") or "subscriber",
                "attributes": _json(attrs) if attrs else empty,
                **constants,
            }
            for name, proc in per_row:
                values[name] = proc(values[name])
            flat.extend(pick(values))
        conn.exec_driver_sql(prep.sql(len(chunk)), tuple(flat))


def _existing(conn: Connection, emails: Sequence[str]) -> set[str]:
    """The emails among ``emails`` that are already leads (plain SQL: compiling a
    2,000-item IN with SQLAlchemy cost more than running it)."""
    mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
    found: set[str] = set()
    for start in range(0, len(emails), CHUNK * 2):
        part = tuple(emails[start : start + CHUNK * 2])
        sql = f"SELECT email FROM leads WHERE email IN ({', '.join([mark] * len(part))})"
        found.update(conn.exec_driver_sql(sql, part).scalars())
    return found


def upsert_lead_rows(
    session: Session,
    rows: Iterable[Mapping[str, Any]],
    now: datetime,
    *,
    default_source: str = Touchpoint.import_.value,
) -> UpsertCounts:
    """Upsert already-valid lead rows by email, set-based, in the session's transaction.

    Each row is a mapping with ``email`` (normalised, see :func:`normalise_email`) and any
    of ``first_name``, ``last_name``, ``company``, ``source``, ``timezone``, ``country``,
    ``lifecycle_stage``, ``owner``, ``attributes`` (a dict). Missing or ``None`` values keep
    what is stored. Rows sharing an email merge, the later one winning per field. Call it
    with a few thousand rows at a time.

    Returns:
        How many leads were inserted and updated, and how many rows were merged.
    """
    merged: dict[str, dict[str, Any]] = {}
    count = 0
    for row in rows:
        count += 1
        email = row["email"]
        if email in merged:
            _merge(merged[email], row)
        else:
            merged[email] = {**row, "attributes": dict(row.get("attributes") or {})}
    existing = _upsert(session.connection(), list(merged.values()), now, default_source)
    return UpsertCounts(len(merged) - len(existing), len(existing), count - len(merged))


# --------------------------------------------------------------------------- import


def _row_consent(
    row: dict[str, Any], file_basis: str | None, file_topics: list[str]
) -> tuple[list[str], str, str | None, str | None] | None:
    """Take the consent columns out of a clean row: (topics, basis, text version, time)."""
    own = {k: row.pop(k) for k in CONSENT_FIELDS if k in row}
    basis = own.get("consent_basis") or file_basis
    topics = own["consent_topics"].split() if "consent_topics" in own else file_topics
    if basis is None:
        if topics:
            raise _Reject("consent_topics", "consent topics without a consent_basis")
        return None
    return topics or ["*"], basis, own.get("consent_text_version"), own.get("consent_at")


def _record_import_consents(
    session: Session,
    consents: Mapping[str, tuple[list[str], str, str | None, str | None]],
    file_name: str,
    now: datetime,
) -> int:
    from nurture.store.consent import ConsentIn, record_consents

    ids: dict[str, int] = {}
    emails = list(consents)
    for start in range(0, len(emails), CHUNK):
        part = emails[start : start + CHUNK]
        for email, lead_id in session.execute(
            select(Lead.email, Lead.id).where(Lead.email.in_(part))
        ):
            ids[email] = lead_id
    changes = [
        ConsentIn(
            lead_id=ids[email],
            topic=topic,
            basis=basis,
            source_kind="import",
            source=file_name,
            text_version=version,
            occurred_at=datetime.fromisoformat(when) if when else None,
        )
        for email, (topics, basis, version, when) in consents.items()
        if email in ids
        for topic in topics
    ]
    return record_consents(session, changes, now)


def import_leads(
    engine: Engine,
    path: str | Path,
    *,
    now: datetime,
    source: str = Touchpoint.import_.value,
    rejects_path: str | Path | None = None,
    check_deliverability: bool = False,
    batch_size: int = 2000,
    dns_resolver: Any = None,
    progress: Callable[[ImportResult], None] | None = None,
    consent_basis: str | None = None,
    consent_topics: Sequence[str] | None = None,
    erased_keys: Sequence[str] = (),
) -> ImportResult:
    """Stream a CSV or JSON Lines file of leads into the database.

    Args:
        engine: the database.
        path: the CSV (header row required) or JSON Lines file.
        now: the instant stamped on created and updated leads.
        source: the touchpoint for new leads whose record names none.
        rejects_path: where to write rejected records (default ``<name>.rejects.csv``
            next to the input); only created when something is rejected.
        check_deliverability: also check each email domain in DNS (cached per domain).
        batch_size: records per transaction.
        dns_resolver: a ``dns.resolver.Resolver`` for the deliverability check.
        progress: called with the running result after each batch.
        consent_basis: the lawful basis of every row of the file that names none in a
            ``consent_basis`` column; recorded for ``consent_topics`` (default ``*``, every
            topic) with the file's name as the source.
        consent_topics: the topics ``consent_basis`` covers for rows without their own
            ``consent_topics`` column.
        erased_keys: the hash keys of erasure (``NURTURE_SECRET_KEY``); a new lead whose
            address was erased before is suppressed again (see :mod:`nurture.privacy.erasure`).

    Returns:
        The counts, and the rejects file if there was any reject.

    Raises:
        LeadFileError: the file is missing, unreadable, not UTF-8 text, or has no email
            column. Batches committed before a late failure stay committed.
    """
    path = Path(path)
    try:
        default_source = _source(source) if source else Touchpoint.import_.value
        file_basis = _consent_basis(consent_basis) if consent_basis else None
        file_topics = _consent_topics(" ".join(consent_topics or [])).split()
    except _Reject as exc:
        raise ValueError(exc.reason) from None
    consents: dict[str, tuple[list[str], str, str | None, str | None]] = {}
    target = Path(rejects_path) if rejects_path else path.with_name(f"{path.stem}.rejects.csv")
    if target.resolve() == path.resolve():
        raise LeadFileError(f"the rejects file {target} would overwrite the input")
    opts = _Options(check_deliverability, dns_resolver)
    result = ImportResult()
    opened = _open(path)
    rejects = _RejectsWriter(target, opened.reject_header, opened.columns)
    seen: set[int] = set()
    pending: dict[str, dict[str, Any]] = {}
    carried: set[str] = set()  # pending emails already upserted by an earlier batch
    accounts = _AccountCache()

    def flush() -> None:
        with Session(engine) as session, session.begin():
            existing = _upsert(
                session.connection(), list(pending.values()), now, default_source, accounts
            )
            if consents:
                result.consents += _record_import_consents(session, consents, path.name, now)
                consents.clear()
            if erased_keys:
                from nurture.store.suppression import resuppress

                new = [e for e in pending if e not in existing and e not in carried]
                resuppress(session, new, erased_keys, now)
        for email in pending:
            if email in carried:
                continue
            if email in existing:
                result.updated += 1
            else:
                result.inserted += 1
        pending.clear()
        carried.clear()
        if progress is not None:
            progress(result)

    try:
        for record in opened.records:
            result.read += 1
            try:
                if record.error is not None:
                    raise record.error
                assert record.fields is not None
                row = _clean(record.fields, record.attrs, opts)
                consent = _row_consent(row, file_basis, file_topics)
            except _Reject as exc:
                result.rejected += 1
                rejects.write(record.line, exc, record.raw)
                continue
            email = row["email"]
            if consent is not None:
                consents[email] = consent
            digest = hash(email)
            if digest in seen:
                result.duplicates += 1
                earlier = pending.get(email)
                if earlier is not None:
                    _merge(earlier, row)
                else:
                    pending[email] = row
                    carried.add(email)
            else:
                seen.add(digest)
                pending[email] = row
            if len(pending) >= batch_size:
                flush()
        if pending:
            flush()
    except UnicodeError as exc:  # pragma: no cover - surrogateescape decodes anything
        raise LeadFileError(f"{path}: cannot decode: {exc}") from None
    except OSError as exc:
        raise LeadFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    finally:
        opened.handle.close()
        result.rejects_path = rejects.close()
    return result
