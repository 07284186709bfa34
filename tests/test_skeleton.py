"""Skeletons: a filled skeleton is the full render, byte for byte (nurture.message.skeleton)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from nurture.config import PROJECT_ROOT, Settings
from nurture.message import skeleton
from nurture.message.compose import compose, compose_message
from nurture.message.mime import BodySkeleton, _body_part
from nurture.message.rendering import TemplateStore
from nurture.message.skeleton import cache_for, is_plain
from nurture.outbox.delivery import mailer_from_settings

SHIPPED = PROJECT_ROOT / "templates" / "emails"
NOW = datetime(2026, 3, 3, 10, 0, tzinfo=UTC)
SECRET = "k" * 32


def mailer(store: TemplateStore, *, track: bool = True) -> SimpleNamespace:
    return SimpleNamespace(
        store=store,
        from_address="Lumen <hello@lumen.example.com>",
        secret=SECRET,
        tracking_url="https://t.example.com/",
        track=track,
        unsubscribe_mailto="unsub@lumen.example.com",
        skeletons=True,
    )


def row(delivery: int, template: str, **values: Any) -> SimpleNamespace:
    fields: dict[str, Any] = {
        "id": delivery,
        "lead_id": delivery + 10_000,
        "step_id": "welcome",
        "template": template,
        "variant": None,
        "message_id": f"<nurture.{delivery}.welcome@lumen.example.com>",
        "attempts": 0,
        "campaign": "b2b-inbound",
        "campaign_from": None,
        "email": f"lead{delivery}@example.com",
        "first_name": "Dana",
        "last_name": "Whitfield",
        "company": "Brightwater Logistics",
        "source": "website",
        "country": "US",
        "lifecycle_stage": "lead",
        "attributes": {"industry": "Logistics", "favourite_category": "Garden", "city": "Oslo"},
    }
    fields.update(values)
    return SimpleNamespace(**fields)


def both(settings_: Any, one: Any) -> tuple[Any, Any]:
    """(full render, skeleton render) of one row."""
    full = compose(SimpleNamespace(**{**vars(settings_), "skeletons": False}), one, NOW)
    return full, compose(settings_, one, NOW)


SAMPLES: list[dict[str, Any]] = [
    {},
    {"first_name": None},
    {"first_name": ""},
    {"company": None, "last_name": None},
    {"first_name": "José María", "company": "Müller & Söhne <GmbH>"},
    {"first_name": 'O\'Brien "the" <b>bold</b>', "company": "A&amp;B"},
    {"first_name": "  padded  ", "company": "two  spaces"},
    {"first_name": "Zoë\u202e", "company": "tab\there"},
    {"first_name": "see https://evil.example.com/x", "company": "Acme"},
    {"first_name": "a" * 300, "company": "b" * 1200},
    {"first_name": "李小龙", "company": "東京株式会社"},
    {"attributes": {}},
    {"attributes": {"industry": "Health Care", "favourite_category": "Outdoor Living"}},
    {"attributes": {"industry": 42, "city": None}},
    {"lifecycle_stage": None, "country": ""},
]


@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("template", TemplateStore(SHIPPED).names())
def test_every_shipped_template_equals_the_full_render(template: str, track: bool) -> None:
    store = TemplateStore(SHIPPED)
    settings_ = mailer(store, track=track)
    for n, values in enumerate(SAMPLES):
        full, fast = both(settings_, row(100 + n, template, **values))
        assert full[2] is None, full[2]
        assert fast == full, (template, values)
    # Not vacuous: most of those leads came from a skeleton.
    assert cache_for(store).filled >= len(SAMPLES) // 2


lead_text = st.one_of(
    st.none(),
    st.just(""),
    st.text(max_size=40),
    st.text(alphabet="ab <>&\"';:/@#=é\u00a0\t", max_size=20),
    st.sampled_from(["Dana", "Acme & Co", "https://x.example.com", "&amp;", "a  b", "Ünïcode"]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    template=st.sampled_from(["b2b/welcome", "b2b/demo_offer", "retail/discount_a"]),
    first=lead_text,
    last=lead_text,
    company=lead_text,
    industry=lead_text,
    category=lead_text,
)
def test_fuzzed_lead_values_equal_the_full_render(
    template: str, first: Any, last: Any, company: Any, industry: Any, category: Any
) -> None:
    store = _FUZZ_STORE
    settings_ = mailer(store)
    one = row(
        7,
        template,
        first_name=first,
        last_name=last,
        company=company,
        attributes={"industry": industry, "favourite_category": category},
    )
    full, fast = both(settings_, one)
    assert fast == full


_FUZZ_STORE = TemplateStore(SHIPPED)


LAYOUT = """<html><body>{% block body %}{% endblock %}
<p><a href="{{ unsubscribe_url }}">Unsubscribe</a> &middot; Main St</p>
{% if open_pixel_url is defined %}<img src="{{ open_pixel_url }}" alt="">{% endif %}
</body></html>
"""

# Each body does something with a lead value beyond printing it.
TRICKY = {
    "upper": "{{ lead.first_name | upper }} and {{ lead.company }}",
    "length": "{% if lead.first_name|length > 4 %}long{% else %}short{% endif %}{{ lead.company }}",
    "compare": "{% if lead.country == 'US' %}Hi{% else %}Hello{% endif %} {{ lead.first_name }}",
    "member": "{% if lead.lifecycle_stage in ['lead'] %}warm{% endif %}{{ lead.first_name }}",
    "safe": "<p>{{ lead.company | safe }}</p>",
    "double": "<p>{{ lead.company | e | string | e }}</p>",
    "href": '<a href="https://shop.example.com/{{ lead.first_name }}">go</a> {{ lead.company }}',
    "style": '<div style="{{ lead.company }}">hidden?</div> {{ lead.first_name }}',
    "label": '<a href="mailto:help@example.com">{{ lead.company }}</a>',
    "index": "{{ lead.first_name[0] }}. {{ lead.company }}",
    "lookup": "{{ {'Dana': 'Hi Dana!'}.get(lead.first_name, 'Hi') }} {{ lead.company }}",
    "int": "{{ lead.company | int }} {{ lead.first_name }}",
    "iterate": "{% for key in lead %}{{ key }} {% endfor %}",
    "attrs": "{% for k, v in lead.attributes.items() %}{{ k }}={{ v }} {% endfor %}",
    "wordcount": "{{ lead.company | wordcount }} words, {{ lead.first_name }}",
    "tojson": "<script>var n = {{ lead.first_name | tojson }};</script>{{ lead.company }}",
    "entity": "<p>AT&{{ lead.company }}</p>",
    "full_name": "<p>{{ lead.full_name | default('friend') }}</p>",
    "truncate": "<p>{{ lead.company | truncate(9) }}</p>",
    "replace": "<p>{{ lead.company | replace(' ', '-') }}</p>",
    "attribute": "{{ lead.attributes.city | default('your city') }}",
    "text_url": (
        "<p>{{ lead.first_name }}</p>{% endblock %}{% block text %}"
        "See https://shop.example.com/{{ lead.first_name }} now, {{ lead.company }}\n"
        "{{ unsubscribe_url }}"
    ),
}

TRICKY_LEADS: list[dict[str, Any]] = [
    {},
    {"first_name": "Al", "country": "NO", "lifecycle_stage": "customer"},
    {"first_name": "Alexandra", "company": "display:none"},
    {"first_name": "Dana", "company": "help@example.com"},
    {"first_name": "Bo", "company": "mailto:help@example.com"},
    {"first_name": "Dana", "company": "12"},
    {"first_name": "Kim", "company": "amp; Co"},
    {"first_name": "Eve", "company": "lt;"},
    {"first_name": "Ann", "company": "Very Long Company Name"},
    {"first_name": "Ann", "company": "<b>x</b>", "attributes": {"city": "Bergen"}},
    {"first_name": None, "last_name": "Solo"},
]


@pytest.mark.parametrize("case", sorted(TRICKY))
def test_templates_beyond_plain_substitution_stay_exact(tmp_path: Path, case: str) -> None:
    (tmp_path / "layouts").mkdir()
    (tmp_path / "layouts" / "base.html.j2").write_text(LAYOUT)
    (tmp_path / "t.html.j2").write_text(
        '{% extends "layouts/base.html.j2" %}{% block subject %}Hi {{ lead.first_name'
        ' | default("there") }}{% endblock %}{% block body %}' + TRICKY[case] + "{% endblock %}"
    )
    store = TemplateStore(tmp_path)
    settings_ = mailer(store)
    # Every lead twice: the second meets the skeleton the first one built.
    for n, values in enumerate(TRICKY_LEADS * 2):
        full, fast = both(settings_, row(n + 1, "t", **values))
        assert fast == full, (case, values)


def test_a_failing_template_fails_the_same_way(tmp_path: Path) -> None:
    (tmp_path / "t.html.j2").write_text(
        "{% block subject %}Hi{% endblock %}<p>{{ lead.attributes.missing }}"
        ' <a href="{{ unsubscribe_url }}">u</a></p>'
    )
    settings_ = mailer(TemplateStore(tmp_path))
    full, fast = both(settings_, row(1, "t"))
    assert full[1] is None and "missing" in (full[2] or "")
    assert fast == full


def test_shapes_get_their_own_skeletons() -> None:
    """welcome.html.j2 tests ``lead.company``: with and without a company are two
    skeletons, and a thousand leads with names build no more."""
    store = TemplateStore(SHIPPED)
    settings_ = mailer(store)
    for n in range(200):
        company = None if n % 2 else f"Company {n}"
        message = compose_message(
            settings_, row(n, "b2b/welcome", first_name=f"N{n}", company=company), NOW
        )
        assert f"N{n}".encode() in message
    cache = cache_for(store)
    assert cache.built == 2
    assert cache.filled == 200


def test_lower_filter_is_one_skeleton_per_value() -> None:
    """demo_offer lowercases the industry: the industry becomes part of the shape."""
    store = TemplateStore(SHIPPED)
    settings_ = mailer(store)
    for n in range(60):
        industry = ["Retail", "Health Care", "Logistics"][n % 3]
        one = row(n, "b2b/demo_offer", first_name=f"N{n}", attributes={"industry": industry})
        assert industry.lower().encode() in compose_message(settings_, one, NOW)
    assert cache_for(store).built == 3


@pytest.mark.parametrize(
    ("value", "plain"),
    [
        ("Dana", True),
        ("Dana Lee", True),
        ("O'Brien & <Co>", True),
        ("", False),
        (" Dana", False),
        ("Dana  Lee", False),
        ("Dana\tLee", False),
        ("Dana\u00a0Lee", False),
        ("x\x1b", False),
        ("https://x.example.com", False),
        ("a\ue000b", False),
    ],
)
def test_plain_values(value: str, plain: bool) -> None:
    assert is_plain(value) is plain


def test_switched_off_by_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """NURTURE_SKELETONS=false reaches the mailer; a value that is no boolean is refused."""
    monkeypatch.setenv("NURTURE_SKELETONS", "false")
    assert Settings().skeletons is False
    assert mailer_from_settings(SHIPPED).skeletons is False
    monkeypatch.setenv("NURTURE_SKELETONS", "1")
    assert Settings().skeletons is True
    monkeypatch.setenv("NURTURE_SKELETONS", "sometimes")
    with pytest.raises(ValidationError):
        Settings()
    store = TemplateStore(SHIPPED)
    off = SimpleNamespace(**{**vars(mailer(store)), "skeletons": False})
    compose_message(off, row(1, "b2b/welcome"), NOW)
    assert cache_for(store).built == 0


PART_ALPHABET = "ab <>&=.\t\r\n\u00e9\u00b7"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    subtype=st.sampled_from(["plain", "html"]),
    runs=st.lists(st.text(alphabet=PART_ALPHABET, max_size=120), min_size=1, max_size=5),
    data=st.data(),
    pad=st.sampled_from([0, 0, 900, 1100]),
    styled=st.booleans(),
)
def test_a_prepared_mime_part_equals_the_part_built_from_the_whole_text(
    subtype: str, runs: list[str], data: st.DataObject, pad: int, styled: bool
) -> None:
    """BodySkeleton: 7bit, numeric references, quoted-printable line by line, base64 and
    lines past 998 octets all give the bytes _body_part gives for the joined text."""
    parts = (*runs[:-1], runs[-1] + "x" * pad)
    if styled:
        parts = ("<style>\u00e9</style>" + parts[0], *parts[1:])
    values = [data.draw(st.text(alphabet="ab<&\u00e9\r =", max_size=30)) for _ in parts[1:]]
    text = parts[0] + "".join(v + r for v, r in zip(values, parts[1:], strict=True))
    assert BodySkeleton(subtype, parts).part(values) == _body_part(subtype, text)


def test_past_the_cap_new_shapes_render_in_full(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A field used beyond printing makes one skeleton per value, at most MAX_SKELETONS;
    past that, leads are rendered in full without building anything."""
    (tmp_path / "t.html.j2").write_text(
        "{% block subject %}Hi{% endblock %}<p>{{ lead.first_name | upper }}"
        ' <a href="{{ unsubscribe_url }}">u</a></p>'
    )
    monkeypatch.setattr(skeleton, "MAX_SKELETONS", 3)
    store = TemplateStore(tmp_path)
    settings_ = mailer(store)
    for n in range(6):
        full, fast = both(settings_, row(n + 1, "t", first_name=f"name{n}"))
        assert fast == full
        assert f"NAME{n}".encode() in (fast[1] or b"")
    cache = cache_for(store)
    assert cache.built == 3
    assert cache.filled == 3
