"""Skeletons: render a template once per shape of lead data, then fill it per lead.

Almost all of a nurture email is the same for every recipient of a step. A *skeleton* is
one render of (template, campaign, step, tracking settings) for one *shape* of the lead
data, made with stand-ins (sentinels) for the per-lead values and the tracking URLs. Its
subject, HTML and text are cut at the sentinels into static runs and slots. Per lead the
slots are filled (a value escaped, a token signed) and the runs joined: no Jinja, no
link rewriting and no HTML-to-text conversion.

Exactness, and how it is kept:

- **Shape.** Only the lead fields a render actually reads count. A field read as a
  plain string (non-empty, single spaces, no control characters, no ``://``) is a
  slot. ``None``, ``""``, numbers and other types are part of the shape: the skeleton
  holds the real value, and another value gets another skeleton.
- **Probes.** A slot's stand-in is a ``str`` subclass that records every operation a
  template does on it other than printing it, ``default`` and a truth test. A field
  that is compared, looked up, measured, cut or case-changed (``| lower``) becomes part
  of the shape (one skeleton per distinct value, at most :data:`MAX_SKELETONS` per
  template and step); a template that iterates over the lead gets no skeleton at all.
- **Placement.** A value inside a tag, a comment, a link's URL or a URL of the text body
  would decide what gets tracked or hidden: no skeleton for that shape.
- **Checks.** Before a skeleton is used, it is filled with two families of awkward
  values (markup characters, several words, non-ASCII, other lengths) and with the lead
  it was built for, and each fill must equal the full render byte for byte. Otherwise
  the shape is rendered in full, always.
- **Per lead.** A lead whose slot values are not plain (see above), or that puts a
  ``:`` or ``@`` into a link's label (the text body compares a label with its URL), is
  rendered in full.

What stays out of reach of the checks: a template that transforms the result of joining
a lead value with other text (``(lead.first_name ~ "")|length``). The probes only see
operations on the value itself; the two check families catch such a template only when
their results differ. ``NURTURE_SKELETONS=false`` (``Mailer.skeletons``) turns skeletons off.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from markupsafe import escape

from nurture.message.mime import BodySkeleton, _body_part
from nurture.message.rendering import (
    _INVISIBLE,
    _TEXT_URL,
    _TOKEN,
    RenderedEmail,
    TemplateStore,
)
from nurture.message.tokens import click_token

__all__ = ["MAX_SKELETONS", "Skeleton", "SkeletonCache", "is_plain"]

#: Skeletons kept per (template, campaign, step): beyond it a new shape renders in full.
MAX_SKELETONS = 256

_OPEN, _CLOSE = "\ue000", "\ue001"
_SLOT = re.compile("\ue000([0-9]+)\ue001")
_STRAY = re.compile("[\ue000\ue001]")
# A static run that ends inside a character reference would join with the value after it.
_OPEN_REFERENCE = re.compile(r"&[#0-9A-Za-z]*\Z")
_LINK_EDGE = re.compile(r"<(/?)a(?=[\s>/])", re.IGNORECASE)
_ABSENT = object()


def is_plain(value: str) -> bool:
    """Whether a lead value can fill a slot: non-empty, single inner spaces only, no
    control characters, no ``://`` (a URL in lead data must stay untracked text)."""
    return (
        bool(value)
        and value == " ".join(value.split())
        and "://" not in value
        and "\x00" not in value
        and _INVISIBLE.search(value) is None
        and _STRAY.search(value) is None
    )


# -- probes ----------------------------------------------------------------------------------


class _Build:
    """What one probe render learned: paths read, paths used beyond printing, a veto."""

    def __init__(self) -> None:
        self.read: list[tuple[str, ...]] = []
        self.tainted: set[tuple[str, ...]] = set()
        self.broken: str | None = None


class _Probe(str):
    """The stand-in for one plain string value: its text is a sentinel."""

    _build: _Build
    _path: tuple[str, ...]

    def __bool__(self) -> bool:  # a plain value is never empty
        return True

    def strip(self, chars: str | None = None) -> str:
        if chars is None:
            return self  # a plain value has nothing to strip (``default`` asks)
        self._taint()
        return str.strip(self, chars)

    def __format__(self, spec: str) -> str:
        if spec:
            self._taint()
        return str.__format__(self, spec)

    def _taint(self) -> None:
        self._build.tainted.add(self._path)


_BENIGN = frozenset(
    {
        "__new__",
        "__init__",
        "__getattribute__",
        "__setattr__",
        "__delattr__",
        "__str__",
        "__class__",
        "__init_subclass__",
        "__subclasshook__",
        "__dir__",
        "__reduce__",
        "__reduce_ex__",
        "__getnewargs__",
        "__sizeof__",
        "__doc__",
        "__bool__",
        "strip",
        "__format__",
        "__add__",
    }
)


def _tainting(name: str) -> Callable[..., Any]:
    original = getattr(str, name)

    def method(self: _Probe, *args: Any, **kwargs: Any) -> Any:
        self._taint()
        return original(self, *args, **kwargs)

    method.__name__ = name
    return method


for _name in dir(str):
    if _name not in _BENIGN and callable(getattr(str, _name)):
        setattr(_Probe, _name, _tainting(_name))
# Numeric conversions read the text without calling a str method.
for _name in ("__int__", "__float__", "__index__", "__complex__"):

    def _number(self: _Probe, *args: Any, _name: str = _name) -> Any:
        self._taint()
        raise ValueError(f"{_name} of a lead value")

    setattr(_Probe, _name, _number)


class _Recorder(dict[str, Any]):
    """A lead mapping that hands out probes and records which keys a render reads."""

    def __init__(
        self,
        data: Mapping[str, Any],
        path: tuple[str, ...],
        build: _Build,
        literal: frozenset[tuple[str, ...]],
        slots: _Slots,
    ) -> None:
        super().__init__(data)
        self._path = path
        self._build = build
        self._literal = literal
        self._slots = slots

    def _value(self, key: str, value: Any) -> Any:
        path = (*self._path, key)
        if isinstance(value, dict) and path not in self._literal:
            return _Recorder(value, path, self._build, self._literal, self._slots)
        self._build.read.append(path)
        if type(value) is str and path not in self._literal and is_plain(value):
            return self._slots.probe(path, self._build)
        return value

    def __getitem__(self, key: str) -> Any:
        if not isinstance(key, str):
            self._build.broken = "a lead mapping indexed by a non-string"
            return dict.__getitem__(self, key)
        if not dict.__contains__(self, key):
            self._build.read.append((*self._path, key))
            raise KeyError(key)
        return self._value(key, dict.__getitem__(self, key))

    def get(self, key: str, default: Any = None) -> Any:
        if isinstance(key, str) and dict.__contains__(self, key):
            return self._value(key, dict.__getitem__(self, key))
        if isinstance(key, str):
            self._build.read.append((*self._path, key))
        else:
            self._build.broken = "a lead mapping indexed by a non-string"
        return default

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self._build.read.append((*self._path, key))
        else:
            self._build.broken = "a lead mapping searched for a non-string"
        return dict.__contains__(self, key)

    def _whole(self, *args: Any, **kwargs: Any) -> Any:
        self._build.broken = "the template reads a lead mapping as a whole"
        raise TypeError("a lead mapping read as a whole")

    __iter__ = __len__ = __eq__ = __ne__ = __repr__ = __reversed__ = _whole
    keys = items = values = copy = __or__ = __ror__ = _whole
    __hash__ = None

    def __bool__(self) -> bool:
        self._build.broken = "the template tests a lead mapping for emptiness"
        return dict.__len__(self) > 0


class _Slots:
    """Numbered sentinels and what each one stands for."""

    def __init__(self) -> None:
        self.kinds: list[tuple[str, Any]] = []

    def _next(self, kind: str, what: Any) -> str:
        self.kinds.append((kind, what))
        return f"{_OPEN}{len(self.kinds) - 1}{_CLOSE}"

    def probe(self, path: tuple[str, ...], build: _Build) -> _Probe:
        made = _Probe(self._next("lead", path))
        made._build = build
        made._path = path
        return made

    def token(self, what: Any) -> str:
        return self._next("token", what)


# -- skeletons -------------------------------------------------------------------------------

#: One compiled output: (static runs, slot ids); len(runs) == len(slots) + 1.
_Cut = tuple[tuple[str, ...], tuple[int, ...]]


@dataclass(frozen=True)
class Skeleton:
    """One render cut into static runs and slots.

    Attributes:
        subject: Runs and slots of the subject (values raw).
        html: Runs and slots of the HTML body (values escaped).
        text: Runs and slots of the text body (values raw).
        kinds: Per slot id, ``("lead", path)`` or ``("token", what)`` where ``what`` is
            ``"unsubscribe"``, ``"open"`` or ``("click", url)`` (the honeypot is a click).
        in_label: Lead paths printed inside a link's label.
        text_part: The text body's MIME part, prepared.
        html_part: The HTML body's MIME part, prepared.
    """

    subject: _Cut
    html: _Cut
    text: _Cut
    kinds: tuple[tuple[str, Any], ...]
    in_label: frozenset[tuple[str, ...]]
    text_part: BodySkeleton
    html_part: BodySkeleton


def _cut(text: str) -> _Cut | None:
    parts = _SLOT.split(text)
    runs = tuple(parts[0::2])
    if any(_STRAY.search(run) for run in runs):
        return None  # a sentinel was cut or changed: the value was transformed
    return runs, tuple(int(i) for i in parts[1::2])


def _join(cut: _Cut, values: list[str]) -> str:
    runs, slots = cut
    out = [runs[0]]
    for slot, run in zip(slots, runs[1:], strict=True):
        out.append(values[slot])
        out.append(run)
    return "".join(out)


def _lead_slots_placed_safely(skeleton: Skeleton) -> bool:
    """No lead slot inside a tag, comment or doctype of the HTML, in a URL of the text,
    or right after an unfinished character reference."""
    kinds = skeleton.kinds
    html = _join(skeleton.html, [f"{_OPEN}{i}{_CLOSE}" for i in range(len(kinds))])
    for match in _TOKEN.finditer(html):
        for slot in _SLOT.findall(match.group(0)):
            if kinds[int(slot)][0] == "lead":
                return False
    text = _join(skeleton.text, [f"{_OPEN}{i}{_CLOSE}" for i in range(len(kinds))])
    for match in _TEXT_URL.finditer(text):
        for slot in _SLOT.findall(match.group(0)):
            if kinds[int(slot)][0] == "lead":
                return False
    for runs, slots in (skeleton.html, skeleton.text, skeleton.subject):
        for run, slot in zip(runs, slots, strict=False):
            if kinds[slot][0] == "lead" and _OPEN_REFERENCE.search(run):
                return False
    # A click target built from a lead value would make the value decide what is tracked.
    return not any(
        kind == "token" and isinstance(what, tuple) and _STRAY.search(what[1])
        for kind, what in kinds
    )


def _labels(html_cut: _Cut, kinds: list[tuple[str, Any]]) -> frozenset[tuple[str, ...]]:
    """Lead paths whose slot sits between an ``<a>`` and its ``</a>``."""
    inside = False
    found = set()
    runs, slots = html_cut
    for run, slot in zip(runs, slots, strict=False):
        for match in _LINK_EDGE.finditer(run):
            inside = not match.group(1)
        kind, what = kinds[slot]
        if inside and kind == "lead":
            found.add(what)
    return frozenset(found)


# -- the cache -------------------------------------------------------------------------------


class _Plan:
    """What is known about one (template, campaign, step, tracking) across its skeletons."""

    def __init__(self) -> None:
        self.fields: tuple[tuple[str, ...], ...] = ()
        self.literal: frozenset[tuple[str, ...]] = frozenset()
        self.skeletons: dict[tuple[Any, ...], Skeleton | None] = {}
        self.off: str | None = None  # why this template never gets a skeleton


def _lookup(lead: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = lead
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return _ABSENT
        value = value[key]
    return value


def _literal_key(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return (type(value).__name__, value)
    try:
        return ("json", json.dumps(value, sort_keys=True, default=repr))
    except (TypeError, ValueError):
        return ("repr", repr(value))


class SkeletonCache:
    """The skeletons of one template store (one per store, shared by every mailer that uses it).

    Args:
        store: The templates.
    """

    def __init__(self, store: TemplateStore) -> None:
        self.store = store
        self._plans: dict[tuple[Any, ...], _Plan] = {}
        self._lock = threading.Lock()
        self.built = 0  # skeletons built (checked or not)
        self.filled = 0  # messages made from a skeleton

    def _key(self, plan: _Plan, lead: Mapping[str, Any]) -> tuple[Any, ...] | None:
        parts: list[Any] = []
        for path in plan.fields:
            value = _lookup(lead, path)
            if value is _ABSENT:
                parts.append(("absent",))
            elif path in plan.literal or type(value) is not str:
                parts.append(_literal_key(value))
            elif is_plain(value):
                parts.append(("s",))
            elif value == "":
                parts.append(("str", ""))
            else:
                return None  # not a plain value: this lead renders in full
        return tuple(parts)

    def render(
        self,
        name: str,
        context: Mapping[str, Any],
        *,
        links: Any,
        track: bool,
        honeypot_url: str | None,
        decorate: Callable[[RenderedEmail, str | None], RenderedEmail],
    ) -> tuple[RenderedEmail, tuple[bytes, bytes]] | None:
        """The filled skeleton for this lead and its encoded text and HTML parts, or None
        when it must be rendered in full.

        Args:
            name: The template name.
            context: The full render context (from :func:`lead_context`) with the real
                tokens' URLs; ``context["lead"]`` is the lead mapping.
            links: The delivery's :class:`~nurture.message.tokens.TrackingLinks`.
            track: Whether links are rewritten and the pixel is shown.
            honeypot_url: The honeypot's target (tracking on), or None.
            decorate: What compose does after the render (the honeypot link).
        """
        plan_key = (name, context.get("campaign"), context.get("step"), track, links.base_url)
        with self._lock:
            plan = self._plans.get(plan_key)
            if plan is None:
                plan = self._plans[plan_key] = _Plan()
        if plan.off is not None:
            return None
        lead = context["lead"]
        key = self._key(plan, lead)
        if key is None:
            return None
        skeleton = plan.skeletons.get(key, _ABSENT)
        if skeleton is _ABSENT:
            if len(plan.skeletons) >= MAX_SKELETONS:
                return None  # a field with too many values: building would cost more
            skeleton = self._build(plan, name, context, links, track, honeypot_url, decorate)
        if skeleton is None:
            return None
        assert isinstance(skeleton, Skeleton)
        values = _values(skeleton, lead, links, context)
        if values is None:
            return None
        raw, escaped = values
        self.filled += 1
        email = RenderedEmail(
            subject=_join(skeleton.subject, raw),
            html=_join(skeleton.html, escaped),
            text=_join(skeleton.text, raw),
        )
        return email, _parts(skeleton, raw, escaped)

    def _build(
        self,
        plan: _Plan,
        name: str,
        context: Mapping[str, Any],
        links: Any,
        track: bool,
        honeypot_url: str | None,
        decorate: Callable[[RenderedEmail, str | None], RenderedEmail],
    ) -> Skeleton | None:
        """Build (and check) the skeleton for this lead's shape; None if it has none."""
        lead = context["lead"]
        for _ in range(8):  # each round learns fields or literals; a template has few
            build = _Build()
            slots = _Slots()
            probe_lead = _Recorder(lead, (), build, plan.literal, slots)
            probe_ctx = dict(context)
            probe_ctx["lead"] = probe_lead
            base = links.base_url.rstrip("/")
            unsubscribe = f"{base}/u/{slots.token('unsubscribe')}"
            probe_ctx["unsubscribe_url"] = unsubscribe
            if "open_pixel_url" in context:
                probe_ctx["open_pixel_url"] = f"{base}/o/{slots.token('open')}.gif"
            clicks: dict[str, str] = {}

            def click(
                url: str, clicks: dict[str, str] = clicks, slots: _Slots = slots, base: str = base
            ) -> str:
                if url not in clicks:
                    clicks[url] = f"{base}/c/{slots.token(('click', url))}"
                return clicks[url]

            try:
                email = self.store.render(name, probe_ctx, link_rewriter=click if track else None)
                honeypot = click(honeypot_url) if honeypot_url is not None else None
                email = decorate(email, honeypot)
            except Exception:
                if build.broken is None and not build.tainted:
                    return None  # the template fails for this lead: the full render says why
                email = None
            if build.broken is not None:
                plan.off = build.broken
                return None
            fields = tuple(dict.fromkeys((*plan.fields, *build.read)))
            literal = plan.literal | build.tainted
            if fields != plan.fields or literal != plan.literal:
                with self._lock:
                    # Old keys were made over other fields: drop them.
                    plan.skeletons.clear()
                    plan.fields, plan.literal = fields, literal
            if build.tainted:
                continue  # render again with those fields as part of the shape
            if email is None:
                return None
            key = self._key(plan, lead)
            if key is None:
                return None
            skeleton = _skeleton(email, slots)
            if skeleton is not None and not self._checks(
                skeleton, name, context, links, track, honeypot_url, decorate
            ):
                skeleton = None
            with self._lock:
                if len(plan.skeletons) < MAX_SKELETONS:
                    plan.skeletons[key] = skeleton
                self.built += 1
            return skeleton
        return None

    def _checks(
        self,
        skeleton: Skeleton,
        name: str,
        context: Mapping[str, Any],
        links: Any,
        track: bool,
        honeypot_url: str | None,
        decorate: Callable[[RenderedEmail, str | None], RenderedEmail],
    ) -> bool:
        """Fill with the lead itself and two families of awkward values; compare each
        with the full render."""
        lead = context["lead"]
        paths = sorted({what for kind, what in skeleton.kinds if kind == "lead"})
        families: list[Mapping[str, Any]] = [lead]
        for n, pattern in enumerate(("Zq <&>\"' é{i}", "{i}&amp; O'Brien-Smith ü {i}{i}")):
            other = _deep_copy(lead)
            for i, path in enumerate(paths):
                _assign(other, path, pattern.format(i=i * 7 + n))
            families.append(other)
        for values in families:
            try:
                expected = self._full(name, context, values, links, track, honeypot_url, decorate)
            except Exception:
                return False
            filled = _values(skeleton, values, links, context)
            if filled is None or _fill(skeleton, values, links, context) != expected:
                return False
            parts = (_body_part("plain", expected.text), _body_part("html", expected.html))
            if _parts(skeleton, *filled) != parts:
                return False
        return True

    def _full(
        self,
        name: str,
        context: Mapping[str, Any],
        lead: Mapping[str, Any],
        links: Any,
        track: bool,
        honeypot_url: str | None,
        decorate: Callable[[RenderedEmail, str | None], RenderedEmail],
    ) -> RenderedEmail:
        ctx = dict(context)
        ctx["lead"] = lead
        email = self.store.render(name, ctx, link_rewriter=links.rewrite if track else None)
        honeypot = links.click_url(honeypot_url) if honeypot_url is not None else None
        return decorate(email, honeypot)


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    return value


def _assign(target: dict[str, Any], path: tuple[str, ...], value: str) -> None:
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def _skeleton(email: RenderedEmail, slots: _Slots) -> Skeleton | None:
    subject, html, text = _cut(email.subject), _cut(email.html), _cut(email.text)
    if subject is None or html is None or text is None:
        return None
    kinds = tuple(slots.kinds)
    skeleton = Skeleton(
        subject,
        html,
        text,
        kinds,
        _labels(html, slots.kinds),
        BodySkeleton("plain", text[0]),
        BodySkeleton("html", html[0]),
    )
    if not _lead_slots_placed_safely(skeleton):
        return None
    return skeleton


def _after(url: str, marker: str) -> str:
    return url[url.rindex(marker) + len(marker) :]


def _values(
    skeleton: Skeleton, lead: Mapping[str, Any], links: Any, context: Mapping[str, Any]
) -> tuple[list[str], list[str]] | None:
    """Per slot id, the raw and the HTML-escaped value for one lead, or None when a value
    in a link label could change the text body (see the module docs)."""
    raw: list[str] = []
    escaped: list[str] = []
    for kind, what in skeleton.kinds:
        if kind == "lead":
            value = _lookup(lead, what)
            if what in skeleton.in_label and (":" in value or "@" in value):
                return None
            raw.append(value)
            escaped.append(str(escape(value)))
            continue
        if what == "unsubscribe":  # signed once by the caller, for the header too
            value = _after(context["unsubscribe_url"], "/u/")
        elif what == "open":
            value = _after(context["open_pixel_url"], "/o/")[:-4]
        else:
            value = click_token(links.delivery_id, what[1], links.secret)
        raw.append(value)
        escaped.append(value)  # token characters need no escaping
    return raw, escaped


def _fill(
    skeleton: Skeleton, lead: Mapping[str, Any], links: Any, context: Mapping[str, Any]
) -> RenderedEmail | None:
    """The skeleton filled for one lead (its values must give the skeleton's shape)."""
    values = _values(skeleton, lead, links, context)
    if values is None:
        return None
    raw, escaped = values
    return RenderedEmail(
        subject=_join(skeleton.subject, raw),
        html=_join(skeleton.html, escaped),
        text=_join(skeleton.text, raw),
    )


def _parts(skeleton: Skeleton, raw: list[str], escaped: list[str]) -> tuple[bytes, bytes]:
    """The encoded text and HTML parts (what ``build_message`` makes of the filled bodies)."""
    return (
        skeleton.text_part.part([raw[i] for i in skeleton.text[1]]),
        skeleton.html_part.part([escaped[i] for i in skeleton.html[1]]),
    )


_CACHES: weakref.WeakKeyDictionary[TemplateStore, SkeletonCache] = weakref.WeakKeyDictionary()
_CACHES_LOCK = threading.Lock()


def cache_for(store: TemplateStore) -> SkeletonCache:
    """The skeleton cache of ``store`` (made on first use, dropped with the store)."""
    with _CACHES_LOCK:
        cache = _CACHES.get(store)
        if cache is None:
            cache = _CACHES[store] = SkeletonCache(store)
        return cache
