"""The line-cached html_to_text gives exactly the one-pass conversion, on any input."""

from __future__ import annotations

import random

from nurture.config import PROJECT_ROOT
from nurture.message.rendering import (
    TemplateStore,
    _compile_line,
    _html_to_text_whole,
    html_to_text,
    sample_context,
)

FRAGMENTS = [
    "<p>",
    "</p>",
    "<div>",
    "</div>",
    '<div style="display:none">',
    '<div\n style="display: none">',
    "<span>",
    "</span>",
    "<br>",
    "<br/>",
    '<a href="https://x.example.com/a?b=1&amp;c=2">',
    "<a\nhref='https://y.example.com'>",
    '<a href="mailto:hi@example.com">',
    "</a>",
    '<img alt="logo" src="x.png">',
    '<img\n alt="two\nlines">',
    "<li>",
    "<hr>",
    "<head>",
    "</head>",
    "<style>a{b:c}</style>",
    "<!-- note -->",
    "<!-- open\ncomment -->",
    "<!--",
    "-->",
    "<!DOCTYPE html>",
    "<![CDATA[x]]>",
    "<?xml?>",
    '<td title="a > b">',
    '<td title="a\n> b">',
    "a < b",
    "<b",
    "&amp; &nbsp;&#8203;",
    "Hello",
    " world ",
    "\n",
    "\n\n",
    "  \t",
    "\xa0",
    "Dana",
    "",
]


def test_shipped_templates_convert_the_same_either_way() -> None:
    store = TemplateStore(PROJECT_ROOT / "templates" / "emails")
    for name in store.names():
        body = store.render(name, sample_context()).html
        assert html_to_text(body) == _html_to_text_whole(body), name
        # Twice: the second conversion comes from the line cache.
        assert html_to_text(body) == _html_to_text_whole(body), name


def test_random_html_converts_the_same_either_way() -> None:
    rng = random.Random(9)
    cached = 0
    for _ in range(5000):
        body = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 25)))
        cached += None not in map(_compile_line, body.split("\n"))
        assert html_to_text(body) == _html_to_text_whole(body), repr(body)
        assert html_to_text(body) == _html_to_text_whole(body), repr(body)
    # Both paths were exercised: the line cache, and the fallback for tags across lines.
    assert 1000 < cached < 4000, cached
