"""Templates: sandboxed rendering, text fallback, link rewriting, lint, and the CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jinja2.sandbox import SecurityError

from nurture.cli import cli
from nurture.config import PROJECT_ROOT, get_settings
from nurture.message.rendering import (
    SAMPLE_LEAD,
    RenderError,
    TemplateStore,
    html_to_text,
    lead_context,
    rewrite_links,
    sample_context,
)
from nurture.message.tokens import tracking_links
from nurture.store.db import session_scope
from nurture.store.models import Account, Lead

SHIPPED = PROJECT_ROOT / "templates" / "emails"
UNSUB = "https://track.example.com/u/tok-123"

LAYOUT = """<html><head><style>p { color: red; }</style><title>{{ self.subject() }}</title></head>
<body><div style="display:none">{% block preheader %}{% endblock %}</div>
{% block body %}{% endblock %}
<p><a href="{{ unsubscribe_url }}">Unsubscribe</a> &middot; 1 Main St, Springfield</p>
{% if open_pixel_url is defined and open_pixel_url %}
<img src="{{ open_pixel_url }}" width="1" height="1" alt="">{% endif %}
</body></html>
"""


def write(root: Path, files: dict[str, str]) -> Path:
    """Write a template tree under ``root``."""
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A small template folder with a layout, a partial and two emails."""
    return write(
        tmp_path / "emails",
        {
            "layouts/base.html.j2": LAYOUT,
            "partials/sig.html.j2": "<p>Maya, {{ lead.company | default('Acme') }}</p>\n",
            "hello.html.j2": (
                '{% extends "layouts/base.html.j2" %}\n'
                "{% block subject %}  Hi {{ lead.first_name | default('there') }}\n"
                " & welcome {% endblock %}\n"
                "{% block preheader %}Secret preheader{% endblock %}\n"
                "{% block body %}<p>Hello {{ lead.first_name | default('there') }},</p>\n"
                '<p>Read <a href="https://docs.example.com/start?a=1&amp;b=2">the guide</a>'
                ' or <a href="mailto:help@example.com">email us</a>.<br>Thanks</p>\n'
                '{% include "partials/sig.html.j2" %}{% endblock %}\n'
            ),
            "plain.html.j2": (
                '{% extends "layouts/base.html.j2" %}\n'
                "{% block subject %}Plain for {{ lead.first_name | default('you') }}"
                "{% endblock %}\n"
                "{% block body %}<p>Body {{ lead.first_name }}</p>{% endblock %}\n"
                "{% block text %}\n"
                "Hi {{ lead.first_name | default('there') }} & co,\n"
                "  see https://docs.example.com/x?a=1&param=2.\n"
                "Unsubscribe: {{ unsubscribe_url }}\n"
                "{% endblock %}\n"
            ),
        },
    )


def ctx(**lead: object) -> dict[str, object]:
    """A lead context with the given lead fields."""
    return lead_context(
        {"email": "a@example.com", **lead}, unsubscribe_url=UNSUB, campaign="c1", step="s1"
    )


# -- rendering ---------------------------------------------------------------------------


def test_render_gives_subject_html_and_generated_text(tree: Path) -> None:
    email = TemplateStore(tree).render("hello", ctx(first_name="Dana", company="Brightwater"))
    assert email.subject == "Hi Dana & welcome"
    assert "<p>Hello Dana,</p>" in email.html
    assert "Maya, Brightwater" in email.html
    text = email.text
    assert "Hello Dana," in text
    assert "the guide (https://docs.example.com/start?a=1&b=2)" in text
    assert "email us (help@example.com)" in text
    assert "Unsubscribe (" + UNSUB + ")" in text
    assert "Secret preheader" not in text  # display:none
    assert "color: red" not in text  # <style>
    assert ".<br>" not in text and "\nThanks" in text
    assert "1 Main St" in text


def test_text_block_is_used_verbatim_when_present(tree: Path) -> None:
    email = TemplateStore(tree).render("plain", ctx(first_name="O'Neil"))
    # Plain text: nothing is HTML-escaped, and "&param" is not read as an entity.
    assert email.text.startswith("Hi O'Neil & co,\n")
    assert "  see https://docs.example.com/x?a=1&param=2.\n" in email.text
    assert email.subject == "Plain for O'Neil"
    assert "Body O&#39;Neil" in email.html


def test_lead_values_are_escaped_in_html_and_plain_in_the_subject(tree: Path) -> None:
    evil = "<script>alert(1)</script>"
    email = TemplateStore(tree).render("hello", ctx(first_name=evil))
    assert "<script>alert" not in email.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in email.html
    assert email.subject == f"Hi {evil} & welcome"


def test_line_breaks_in_a_subject_are_collapsed(tree: Path) -> None:
    email = TemplateStore(tree).render("hello", ctx(first_name="Dana\r\nBcc: x@evil.example"))
    assert "\r" not in email.subject and "\n" not in email.subject
    assert email.subject == "Hi Dana Bcc: x@evil.example & welcome"


@pytest.mark.parametrize("first_name", [None, "", "   "])
def test_missing_names_fall_back(tree: Path, first_name: str | None) -> None:
    email = TemplateStore(tree).render("hello", ctx(first_name=first_name))
    assert email.subject == "Hi there & welcome"
    assert "Hello there," in email.html
    assert "None" not in email.html


def test_strict_undefined_raises_with_file_and_line(tmp_path: Path) -> None:
    root = write(
        tmp_path,
        {"layouts/base.html.j2": LAYOUT, "bad.html.j2": _email("<p>{{ lead.nickname }}</p>")},
    )
    with pytest.raises(RenderError) as info:
        TemplateStore(root).render("bad", ctx(first_name="A"))
    assert info.value.line == 3
    assert info.value.file is not None and info.value.file.endswith("bad.html.j2")
    assert "nickname" in str(info.value)


def test_sandbox_blocks_class_walks(tmp_path: Path) -> None:
    root = write(
        tmp_path,
        {
            "layouts/base.html.j2": LAYOUT,
            "escape.html.j2": _email("{{ ''.__class__.__mro__[1].__subclasses__() }}"),
        },
    )
    with pytest.raises(RenderError) as info:
        TemplateStore(root).render("escape", ctx())
    assert isinstance(info.value.__cause__, SecurityError)
    assert "subclasses" not in str(info.value).replace("__subclasses__()", "")
    problems = TemplateStore(root).lint("escape")
    assert [(p.severity, p.line) for p in problems] == [("error", 3)]
    assert "sandbox" in problems[0].message


def test_immutable_sandbox_refuses_mutation(tmp_path: Path) -> None:
    root = write(
        tmp_path,
        {
            "layouts/base.html.j2": LAYOUT,
            "mutate.html.j2": _email("{{ lead.attributes.update({'x': 1}) }}"),
        },
    )
    context = ctx(attributes={"a": 1})
    with pytest.raises(RenderError):
        TemplateStore(root).render("mutate", context)
    assert context["lead"]["attributes"] == {"a": 1}  # type: ignore[index]


def test_unknown_template_and_bad_names(tree: Path) -> None:
    store = TemplateStore(tree)
    with pytest.raises(RenderError, match="no template"):
        store.render("nope", ctx())
    assert not store.exists("../etc/passwd")
    assert not store.exists("layouts/base")
    with pytest.raises(ValueError):
        store.render("../hello", ctx())


def test_names_lists_sendable_templates_only(tree: Path) -> None:
    store = TemplateStore(tree)
    assert store.names() == ["hello", "plain"]
    assert store.exists("hello") and not store.exists("partials/sig")


def test_open_pixel_only_when_given(tree: Path) -> None:
    store = TemplateStore(tree)
    assert "<img" not in store.render("hello", ctx()).html
    context = ctx()
    context["open_pixel_url"] = "https://track.example.com/o/abc.gif"
    assert (
        '<img src="https://track.example.com/o/abc.gif" width="1"'
        in store.render("hello", context).html
    )


# -- link rewriting ------------------------------------------------------------------------


def _signer(url: str) -> str:
    return "https://track.example.com/c/SIG?u=" + url.replace("&", "%26")


def test_link_rewriter_signs_links_but_not_unsubscribe_or_mailto(tree: Path) -> None:
    store = TemplateStore(tree, link_rewriter=_signer)
    email = store.render("hello", ctx(first_name="Dana"))
    # The target URL was decoded (&amp; -> &) before signing and re-escaped after.
    signed = "https://track.example.com/c/SIG?u=https://docs.example.com/start?a=1%26b=2"
    assert f'href="{signed}"' in email.html
    assert f'href="{UNSUB}"' in email.html
    assert 'href="mailto:help@example.com"' in email.html
    assert 'href="https://docs.example.com' not in email.html
    assert f"the guide ({signed})" in email.text
    assert f"Unsubscribe ({UNSUB})" in email.text


def test_per_render_rewriter_and_text_block_urls(tree: Path) -> None:
    store = TemplateStore(tree)
    email = store.render("plain", ctx(), link_rewriter=lambda u: "https://t.example.com/r")
    assert "see https://t.example.com/r." in email.text  # the full stop is not the URL's
    assert f"Unsubscribe: {UNSUB}" in email.text
    assert store.render("plain", ctx()).text.count("https://docs.example.com/x") == 1


def test_rewrite_links_only_touches_real_href_attributes() -> None:
    body = (
        '<a title="x href=https://no.example.com" data-href="https://no.example.com" '
        "href='https://yes.example.com/a?b=1&amp;c=2'>go</a>"
        '<link href="https://fonts.example.com/css">'
        '<a href="#top">top</a><A HREF=https://upper.example.com>u</A><p>href="https://t.example.com"</p>'
    )
    seen: list[str] = []

    def rewriter(url: str) -> str:
        seen.append(url)
        return "https://r.example.com/?x=1&y=2"

    out = rewrite_links(body, rewriter, keep=None)
    assert seen == ["https://yes.example.com/a?b=1&c=2", "https://upper.example.com"]
    assert 'data-href="https://no.example.com"' in out
    assert 'href="https://r.example.com/?x=1&amp;y=2">go</a>' in out
    assert '<link href="https://fonts.example.com/css">' in out
    assert '<p>href="https://t.example.com"</p>' in out


# -- only the template's own links are signed ----------------------------------------------

EVIL = "https://evil.example/phish?x=1"


def test_a_url_in_lead_data_is_never_signed(tree: Path) -> None:
    """The open redirect: a lead whose company or name holds a URL gets it as text only."""
    root = write(
        tree,
        {
            "leaky.html.j2": (
                '{% extends "layouts/base.html.j2" %}\n'
                "{% block subject %}Hi {{ lead.first_name }}{% endblock %}\n"
                "{% block body %}<p>{{ lead.company }}</p>"
                '<a href="{{ lead.attributes.site }}">their site</a>'
                '<a href="https://docs.example.com/start">ours</a>{% endblock %}\n'
                "{% block text %}Hi {{ lead.first_name }} from {{ lead.company }}\n"
                "Ours: https://docs.example.com/start\n"
                "Unsubscribe: {{ unsubscribe_url }}{% endblock %}\n"
            )
        },
    )
    seen: list[str] = []

    def signer(url: str) -> str:
        seen.append(url)
        return _signer(url)

    lead = {"first_name": EVIL, "company": EVIL, "attributes": {"site": EVIL}}
    email = TemplateStore(root).render("leaky", ctx(**lead), link_rewriter=signer)
    assert seen == ["https://docs.example.com/start"] * 2
    # Printed as escaped text (and left alone where the template put it in an href).
    assert "<p>https://evil.example/phish?x=1</p>" in email.html
    assert 'href="https://evil.example/phish?x=1"' in email.html
    assert f"Hi {EVIL} from {EVIL}\n" in email.text
    assert "SIG?u=https://evil" not in email.html + email.text


def test_template_urls_decide_by_literal_and_closed_authority(tmp_path: Path) -> None:
    root = write(
        tmp_path / "t",
        {
            "x.html.j2": (
                '{% set site = "https://brand.example.com" %}'
                '<a href="https://shop.example.com/c/{{ slug }}">c</a>'
                '<a href="https://a.example.com/q?x=1&amp;y={{ y }}">q</a>'
                "{{ f('https://api.example.com/v1?c=' ~ campaign) }} {{ site }}"
                "{# https://comment.example.com/ #}"
                "{% raw %}see https://raw.example.com/x.{% endraw %}"
            )
        },
    )
    urls = TemplateStore(root).urls
    tracked = [
        "https://shop.example.com/c/",
        "https://shop.example.com/c/shoes",
        "https://shop.example.com/c/x@evil.example",  # '@' after the path: still shop
        "https://a.example.com/q?x=1&y=2",  # unescaped form of &amp;
        "https://a.example.com/q?x=1&amp;y=",
        "https://api.example.com/v1?c=spring",
        "https://brand.example.com",
        "https://brand.example.com/pricing",  # the authority closes right after the literal
        "https://brand.example.com?ref=1",
        "https://raw.example.com/x",  # the full stop is sentence punctuation
    ]
    untracked = [
        "https://brand.example.com.evil.example/",
        "https://brand.example.com@evil.example/",
        "https://brand.example.com:8443/",
        "https://brand.example.co",
        "https://evil.example/https://shop.example.com/c/",
        "https://comment.example.com/",
        "https://shop.example.com/other",
        "https://shop.example.com/c/a\x1bb",  # a control character could not be signed
        "http://shop.example.com/c/",
    ]
    assert [u for u in tracked if u not in urls] == []
    assert [u for u in untracked if u in urls] == []
    assert urls.hosts() == {
        "shop.example.com",
        "a.example.com",
        "api.example.com",
        "brand.example.com",
        "raw.example.com",
    }


def test_lint_warns_about_a_link_that_will_not_be_tracked(tree: Path) -> None:
    root = write(
        tree,
        {
            "site.html.j2": (
                '{% extends "layouts/base.html.j2" %}\n'
                "{% block subject %}Hi{% endblock %}\n"
                "{% block body %}"
                "<a href=\"{{ lead.attributes.site | default('https://x.example.com/a') }}\">"
                'theirs</a><a href="https://docs.example.com/start">ours</a>{% endblock %}\n'
            )
        },
    )
    problems = TemplateStore(root).lint("site")
    assert problems == []  # the sample lead has no site: the default is a literal, tracked
    write(root, {"site.html.j2": (
        '{% extends "layouts/base.html.j2" %}\n'
        "{% block subject %}Hi{% endblock %}\n"
        '{% block body %}<a href="https://{{ lead.attributes.industry | lower }}.example.com/">'
        "x</a>{% endblock %}\n"
    )})  # fmt: skip
    [problem] = TemplateStore(root).lint("site")
    assert problem.severity == "warning"
    assert "'https://logistics.example.com/' will not be tracked" in problem.message


def _tracked(store: TemplateStore, name: str, context: dict[str, object]) -> list[str]:
    """The URLs the store signed when rendering ``name`` with a real click-token signer."""
    links = tracking_links("https://track.example.com", 7, 3, "k" * 32)
    seen: list[str] = []

    def signer(url: str) -> str:
        seen.append(url)
        return links.rewrite(url)

    store.render(name, context, link_rewriter=signer)
    return seen


@pytest.mark.parametrize("name", TemplateStore(SHIPPED).names())
def test_shipped_templates_still_track_every_link(name: str) -> None:
    """Signing only template literals tracks exactly what signing every URL tracked."""

    class Everything:
        def __contains__(self, url: object) -> bool:
            return True

    store = TemplateStore(SHIPPED)
    before = TemplateStore(SHIPPED)
    before._urls = Everything()  # type: ignore[assignment]  # the old rule: every URL
    context = sample_context()
    now = _tracked(store, name, context)
    assert now == _tracked(before, name, context)
    assert now  # every shipped email has tracked links
    assert {urlsplit(u).hostname for u in now} <= {"lumen.example.com", "fernfield.example.com"}


_HOSTILE_URLS = st.sampled_from(
    [
        EVIL,
        "http://evil.example",
        "https://lumen.example.com.evil.example/",
        "https://lumen.example.com@evil.example/x",
        "https://fernfield.example.com:1@evil.example",
        "//evil.example/x",
        "javascript:alert(1)",
        "https://evil.example/\x1b[31m",
        "<a href='https://evil.example'>x</a>",
        '"><a href="https://evil.example/">',
        "{{ lead.email }} https://evil.example {% if 1 %}x{% endif %}",
        "see https://evil.example/a.",
        "/../../@evil.example",
        "outdoor@evil.example",
        "\u202ehttps://evil.example\u2066",
    ]
)
_LEAD_VALUE = st.one_of(
    _HOSTILE_URLS,
    st.builds(
        "".join,
        st.lists(st.one_of(_HOSTILE_URLS, st.text(max_size=20)), min_size=1, max_size=4),
    ),
    st.text(max_size=60),
)
_TEXT_FIELDS = ("first_name", "last_name", "company", "account_name", "job_title", "owner")
_ATTRIBUTES = ("industry", "favourite_category", "city", "company", "job_title", "site")


_SHIPPED_STORE = TemplateStore(SHIPPED)
# The links of each shipped email that no lead value takes part in: the same for two
# unrelated leads.
_FIXED_LINKS = {
    name: set(_tracked(_SHIPPED_STORE, name, sample_context()))
    & set(_tracked(_SHIPPED_STORE, name, ctx(attributes={"favourite_category": "Tea"})))
    for name in _SHIPPED_STORE.names()
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(TemplateStore(SHIPPED).names()),
    fields=st.fixed_dictionaries({k: _LEAD_VALUE for k in _TEXT_FIELDS}),
    attributes=st.fixed_dictionaries({k: _LEAD_VALUE for k in _ATTRIBUTES}),
    local=st.sampled_from(["dana", "https", "evil.example", "a+https://evil.example"]),
)
def test_fuzz_lead_fields_never_choose_a_tracked_host(
    name: str, fields: dict[str, str], attributes: dict[str, str], local: str
) -> None:
    store = _SHIPPED_STORE
    lead = {"email": f"{local}@example.com", **fields, "attributes": attributes}
    context = lead_context(lead, unsubscribe_url=UNSUB, campaign="c1", step="s1")
    signed = _tracked(store, name, context)
    hosts = {urlsplit(u).hostname for u in signed}
    assert hosts <= store.urls.hosts() - {"www.w3.org"}
    assert not any("evil" in (h or "") for h in hosts)
    # Every link the template wrote whole is still tracked, whatever the lead holds.
    assert set(_FIXED_LINKS[name]) <= set(signed)


def test_html_to_text_details() -> None:
    text = html_to_text(
        "<html><head><title>T</title></head><body>"
        "<span style='display: none'>hidden <span>too</span></span>"
        "<h1>Title</h1><ul><li>one</li><li>two</li></ul>"
        '<p>a &amp; b <a href="https://x.example.com/?a=1&param=2">x</a></p>'
        '<a href="https://img.example.com"><img src="i.png" alt="Logo"></a>'
        '<p><a href="https://same.example.com">https://same.example.com</a></p>'
        "<script>var x = '<p>';</script>end</body></html>"
    )
    assert text == (
        "Title\n\n- one\n- two\n\na & b x (https://x.example.com/?a=1&param=2)\n\n"
        "Logo (https://img.example.com)\n\nhttps://same.example.com\n\nend\n"
    )


# -- lint ----------------------------------------------------------------------------------


def _email(body: str, subject: str = "Hello {{ lead.first_name | default('there') }}") -> str:
    return (
        '{% extends "layouts/base.html.j2" %}\n'
        f"{{% block subject %}}{subject}{{% endblock %}}\n"
        f"{{% block body %}}{body}{{% endblock %}}\n"
    )


def test_lint_names_file_and_line_of_an_undefined_variable(tmp_path: Path) -> None:
    root = write(
        tmp_path,
        {
            "layouts/base.html.j2": LAYOUT,
            "oops.html.j2": _email("<p>Hi</p>\n\n<p>{{ lead.favourite_colour }}</p>"),
        },
    )
    problems = TemplateStore(root).lint()
    assert len(problems) == 1
    problem = problems[0]
    assert problem.file.endswith("oops.html.j2")
    assert problem.line == 5
    assert problem.severity == "error"
    assert "favourite_colour" in problem.message
    assert str(problem).endswith(":5: error: " + problem.message)


def test_lint_points_into_the_partial_that_fails(tmp_path: Path) -> None:
    root = write(
        tmp_path,
        {
            "layouts/base.html.j2": LAYOUT,
            "partials/card.html.j2": "<div>\n<b>{{ product.name }}</b>\n</div>\n",
            "uses.html.j2": _email('{% include "partials/card.html.j2" %}'),
        },
    )
    [problem] = TemplateStore(root).lint("uses")
    assert problem.file.endswith("partials/card.html.j2")
    assert problem.line == 2
    assert "product" in problem.message


def test_lint_rejects_a_missing_unsubscribe_link(tmp_path: Path) -> None:
    layout = LAYOUT.replace('<a href="{{ unsubscribe_url }}">Unsubscribe</a>', "")
    root = write(
        tmp_path,
        {"layouts/base.html.j2": layout, "nounsub.html.j2": "\n\n" + _email("<p>Hi</p>")},
    )
    [problem] = TemplateStore(root).lint("nounsub")
    assert problem.file.endswith("nounsub.html.j2")
    assert problem.line == 5  # the body block, where the link belongs
    assert problem.severity == "error"
    assert "unsubscribe" in problem.message


def test_lint_syntax_errors_anywhere(tmp_path: Path) -> None:
    root = write(
        tmp_path,
        {
            "layouts/base.html.j2": LAYOUT,
            "partials/unused.html.j2": "ok\n{% if %}\n",
            "broken.html.j2": _email("<p>{% for x in %}</p>"),
        },
    )
    problems = {(Path(p.file).name, p.line) for p in TemplateStore(root).lint()}
    assert problems == {("unused.html.j2", 2), ("broken.html.j2", 3)}
    assert all(p.severity == "error" for p in TemplateStore(root).lint())


def test_lint_subject_length_and_missing_subject(tmp_path: Path) -> None:
    root = write(
        tmp_path,
        {
            "layouts/base.html.j2": LAYOUT,
            "long.html.j2": _email("<p>x</p>", subject="A" * 79),
            "longish.html.j2": _email("<p>x</p>", subject="A" * 61),
            "ok.html.j2": _email("<p>x</p>", subject="A" * 60),
            "empty.html.j2": _email("<p>x</p>", subject="{{ '' }}  "),
            "none.html.j2": '{% extends "layouts/base.html.j2" %}\n{% block body %}x{% endblock %}',
        },
    )
    store = TemplateStore(root)
    found = {Path(p.file).name: (p.severity, p.line) for p in store.lint()}
    assert found == {
        "long.html.j2": ("error", 2),
        "longish.html.j2": ("warning", 2),
        "empty.html.j2": ("error", 2),
        "none.html.j2": ("error", 1),
    }


def test_every_shipped_template_lints_clean() -> None:
    store = TemplateStore(SHIPPED)
    assert store.names() == [
        "b2b/breakup",
        "b2b/case_study_roi",
        "b2b/case_study_story",
        "b2b/demo_offer",
        "b2b/welcome",
        "lifecycle/cross_sell_forecasting",
        "lifecycle/expansion_followup",
        "lifecycle/onboarding_help",
        "lifecycle/onboarding_setup",
        "lifecycle/onboarding_tips",
        "lifecycle/onboarding_welcome",
        "lifecycle/recycled_checkin",
        "lifecycle/recycled_whats_new",
        "lifecycle/reengage_checkin",
        "lifecycle/reengage_last_call",
        "lifecycle/referral_ask",
        "lifecycle/referral_reminder",
        "lifecycle/upsell_plan",
        "retail/bestsellers",
        "retail/discount_a",
        "retail/discount_b",
        "retail/last_chance",
        "retail/welcome",
    ]
    assert store.lint() == []


@pytest.mark.parametrize("name", TemplateStore(SHIPPED).names())
def test_shipped_templates_render_for_a_bare_lead(name: str) -> None:
    """A lead with nothing but an email still gets a sensible email."""
    email = TemplateStore(SHIPPED).render(name, ctx())
    assert email.subject and len(email.subject) <= 78
    for part in (email.subject, email.html, email.text):
        assert "None" not in part
        assert " ," not in part and "Hi ," not in part
    assert UNSUB in email.html and UNSUB in email.text
    assert "1418 NW Lovejoy" in email.text or "500 Howard Street" in email.text


def test_lead_context_shape() -> None:
    context = lead_context(
        {"email": "x@example.com", "first_name": "Ann", "last_name": "Lee", "account_name": "Co"},
        unsubscribe_url=UNSUB,
        campaign="camp",
        step="s",
        extra={"variant": "b", "lead": "ignored"},
    )
    lead = context["lead"]
    assert lead["company"] == "Co" and lead["full_name"] == "Ann Lee"
    assert lead["attributes"] == {} and lead["owner"] is None
    assert context["variant"] == "b" and context["campaign"] == "camp"
    assert sample_context()["lead"]["first_name"] == SAMPLE_LEAD["first_name"]


# -- CLI -----------------------------------------------------------------------------------


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """Point the settings at a temporary database; yields the database file."""
    db = tmp_path / "cli.db"
    monkeypatch.setenv("NURTURE_DATABASE_URL", f"sqlite:///{db}")
    monkeypatch.setenv("NURTURE_TRACKING_URL", "https://track.example.com")
    get_settings.cache_clear()
    yield db
    get_settings.cache_clear()


def test_cli_lint_shipped_templates_passes(settings_env: Path) -> None:
    result = CliRunner().invoke(cli, ["templates", "lint"])
    assert result.exit_code == 0, result.output
    assert "23 template(s) checked: 0 error(s)" in result.output


def test_cli_lint_reports_file_line_and_exits_1(
    settings_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write(
        tmp_path / "t",
        {
            "layouts/base.html.j2": LAYOUT,
            "oops.html.j2": _email("<p>\n{{ lead.shoe_size }}</p>"),
            "fine.html.j2": _email("<p>fine</p>"),
        },
    )
    monkeypatch.setenv("NURTURE_TEMPLATES", str(root))
    get_settings.cache_clear()
    runner = CliRunner()
    result = runner.invoke(cli, ["templates", "lint"])
    assert result.exit_code == 1
    assert "oops.html.j2:4: error: undefined variable" in result.output
    result = runner.invoke(cli, ["templates", "lint", "fine"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["templates", "lint", "oops", "--json"])
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert data["errors"] == 1 and data["checked"] == ["oops"]
    assert data["problems"][0]["line"] == 4


def test_cli_preview_sample_writes_html_and_eml(settings_env: Path, tmp_path: Path) -> None:
    out = tmp_path / "preview"
    result = CliRunner().invoke(
        cli, ["templates", "preview", "retail/welcome", "--sample", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    html_file, eml_file = out / "retail/welcome.html", out / "retail/welcome.eml"
    assert str(html_file) in result.output and str(eml_file) in result.output
    assert "Fern &amp; Field makes durable goods" in html_file.read_text()
    msg = message_from_bytes(eml_file.read_bytes(), policy=policy.default)
    assert isinstance(msg, EmailMessage)
    assert msg["Subject"] == "Welcome to Fern & Field: 10% off your first order"
    assert msg["To"].addresses[0].addr_spec == SAMPLE_LEAD["email"]
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]


def test_cli_preview_for_a_lead_from_the_database(settings_env: Path, tmp_path: Path) -> None:
    from nurture.store.db import get_engine

    engine = get_engine()
    now = datetime(2026, 3, 3, 10, tzinfo=UTC)
    with session_scope(engine) as session:
        account = Account(name="Zoë & Co", created_at=now, updated_at=now)
        session.add(account)
        session.flush()
        session.add(
            Lead(
                email="zoe@example.com",
                first_name="Zoë",
                last_name="<b>Ng</b>",
                account_id=account.id,
                attributes={"industry": "Retail"},
                created_at=now,
                updated_at=now,
            )
        )
    out = tmp_path / "p"
    runner = CliRunner()
    result = runner.invoke(
        cli,
        [
            "templates",
            "preview",
            "b2b/demo_offer",
            "--lead",
            " ZOE@Example.com ",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Subject: Zoë, want a 20-minute walkthrough?" in result.output
    html = (out / "b2b/demo_offer.html").read_text()
    assert "Zoë &amp; Co" in html and "sample data from retail" in html
    msg = message_from_bytes((out / "b2b/demo_offer.eml").read_bytes(), policy=policy.default)
    assert msg["To"].addresses[0].display_name == "Zoë <b>Ng</b>"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"

    result = runner.invoke(
        cli, ["templates", "preview", "b2b/demo_offer", "--lead", "ghost@example.com"]
    )
    assert result.exit_code == 1
    assert "no lead with email 'ghost@example.com'" in result.output
    result = runner.invoke(cli, ["templates", "preview", "b2b/demo_offer"])
    assert result.exit_code == 1 and "exactly one of" in result.output
    result = runner.invoke(cli, ["templates", "preview", "b2b/nope", "--sample"])
    assert result.exit_code == 1 and "no template" in result.output
