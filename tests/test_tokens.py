"""Signed tracking tokens: round trips, purposes, expiry, and tamper resistance."""

from __future__ import annotations

import string
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nurture.message.tokens import (
    TokenError,
    click_token,
    open_token,
    sign,
    tracking_links,
    unsubscribe_token,
    verify,
    verify_click,
    verify_open,
    verify_unsubscribe,
)

SECRET = "test-secret-0123456789"
NOW = datetime(2026, 3, 3, 10, 0, tzinfo=UTC)
URL = "https://shop.example.com/pricing?utm_source=nurture&plan=pro#compare"


def test_round_trip_and_url_safe() -> None:
    token = sign({"d": 42, "x": "héllo"}, SECRET, purpose="open")
    assert set(token) <= set(string.ascii_letters + string.digits + "-_")
    assert verify(token, SECRET, purpose="open", max_age=None, now=NOW) == {"d": 42, "x": "héllo"}


def test_tokens_are_compact() -> None:
    # Dozens of links per email: an open token stays short, a click token adds ~4/3 of the URL.
    assert len(open_token(123_456_789, SECRET)) <= 45
    assert len(unsubscribe_token(123_456_789, 987_654_321, SECRET)) <= 64
    assert len(click_token(1, URL, SECRET)) <= len(URL) * 4 // 3 + 45


def test_purposes_are_separated() -> None:
    token = open_token(7, SECRET)
    assert verify_open(token, SECRET) == 7
    with pytest.raises(TokenError):
        verify(token, SECRET, purpose="unsubscribe", max_age=None, now=NOW)
    with pytest.raises(TokenError):
        verify_click(token, SECRET)


def test_wrong_secret_rejected() -> None:
    with pytest.raises(TokenError):
        verify_open(open_token(7, SECRET), "another-secret")


def test_click_token_binds_the_exact_url() -> None:
    delivery_id, url = verify_click(click_token(9, URL, SECRET), SECRET)
    assert (delivery_id, url) == (9, URL)


@pytest.mark.parametrize(
    "target",
    ["javascript:alert(1)", "data:text/html,hi", "//evil.example", "/relative", "ftp://x.example",
     "https://ok.example/\r\nSet-Cookie: a=b"],
)  # fmt: skip
def test_click_token_refuses_non_web_targets(target: str) -> None:
    with pytest.raises(ValueError):
        click_token(1, target, SECRET)


def test_unsubscribe_token_carries_delivery_and_lead() -> None:
    assert verify_unsubscribe(unsubscribe_token(3, 4, SECRET), SECRET) == (3, 4)


def test_expiry_with_issue_time() -> None:
    token = sign({"d": 1}, SECRET, purpose="login", issued_at=NOW)
    day = timedelta(days=1)
    assert verify(token, SECRET, purpose="login", max_age=day, now=NOW + day)["d"] == 1
    with pytest.raises(TokenError, match="expired"):
        verify(token, SECRET, purpose="login", max_age=day, now=NOW + day + timedelta(seconds=1))
    with pytest.raises(TokenError, match="future"):
        verify(token, SECRET, purpose="login", max_age=day, now=NOW - timedelta(hours=1))
    no_iat = sign({"d": 1}, SECRET, purpose="login")
    with pytest.raises(TokenError, match="no issue time"):
        verify(no_iat, SECRET, purpose="login", max_age=day, now=NOW)


def test_delivery_tokens_do_not_expire() -> None:
    # An unsubscribe link in a years-old email still works (CAN-SPAM: at least 30 days).
    token = unsubscribe_token(3, 4, SECRET)
    assert verify(token, SECRET, purpose="unsubscribe", max_age=None, now=NOW.replace(year=2040))


def test_reserved_and_bad_payloads() -> None:
    with pytest.raises(ValueError):
        sign({"iat": 1}, SECRET, purpose="open")
    with pytest.raises(ValueError):
        sign({"flag": True}, SECRET, purpose="open")
    with pytest.raises(ValueError):
        sign({"d": 1}, SECRET, purpose="Bad Purpose")
    with pytest.raises(ValueError):
        sign({"d": 1}, "", purpose="open")


@pytest.mark.parametrize("junk", ["", "a", "!" * 40, "x" * 9000, "é" * 30])
def test_malformed_tokens(junk: str) -> None:
    with pytest.raises(TokenError):
        verify_open(junk, SECRET)


TOKENS = [
    open_token(1, SECRET),
    click_token(2, URL, SECRET),
    unsubscribe_token(3, 4, SECRET),
]


@settings(max_examples=400, deadline=None)
@given(
    which=st.sampled_from(range(len(TOKENS))),
    position=st.integers(min_value=0),
    replacement=st.one_of(
        st.sampled_from(string.ascii_letters + string.digits + "-_=.+/"), st.characters()
    ),
)
def test_any_single_character_change_is_rejected(
    which: int, position: int, replacement: str
) -> None:
    token = TOKENS[which]
    position %= len(token)
    if token[position] == replacement:
        replacement = "A" if token[position] != "A" else "B"
    tampered = token[:position] + replacement + token[position + 1 :]
    purpose = ("open", "click", "unsubscribe")[which]
    with pytest.raises(TokenError):
        verify(tampered, SECRET, purpose=purpose, max_age=None, now=NOW)


@settings(max_examples=200, deadline=None)
@given(which=st.sampled_from(range(len(TOKENS))), cut=st.integers(min_value=1, max_value=30))
def test_truncation_and_extension_are_rejected(which: int, cut: int) -> None:
    token = TOKENS[which]
    purpose = ("open", "click", "unsubscribe")[which]
    for variant in (token[:-cut], token[cut:], token + "A" * cut, "A" * cut + token):
        with pytest.raises(TokenError):
            verify(variant, SECRET, purpose=purpose, max_age=None, now=NOW)


def test_the_last_base64_character_is_not_malleable() -> None:
    # base64 of 16 bytes leaves 4 spare bits in the last character; a decoder would map
    # "...A" and "...B" to the same MAC bytes. The MAC is compared as text, so neither passes.
    token = open_token(1, SECRET)
    for ch in string.ascii_letters + string.digits + "-_":
        if ch != token[-1]:
            with pytest.raises(TokenError):
                verify_open(token[:-1] + ch, SECRET)


def test_tracking_links() -> None:
    links = tracking_links("https://t.example.com/", 11, 22, SECRET)
    assert SECRET not in repr(links)
    pixel = links.open_pixel_url
    assert pixel.startswith("https://t.example.com/o/") and pixel.endswith(".gif")
    assert verify_open(pixel.removeprefix("https://t.example.com/o/")[:-4], SECRET) == 11
    unsub = links.unsubscribe_url
    assert verify_unsubscribe(unsub.rsplit("/", 1)[1], SECRET) == (11, 22)
    click = links.click_url(URL)
    assert click == links.rewrite(URL)
    assert verify_click(click.rsplit("/", 1)[1], SECRET) == (11, URL)
    for untouched in ("mailto:sales@example.com", "tel:+15551234", "#top"):
        assert links.rewrite(untouched) == untouched
    with pytest.raises(ValueError):
        links.click_url("javascript:alert(1)")


def test_delivery_tokens_are_what_sign_writes() -> None:
    # click/open/unsubscribe tokens write their JSON by hand for speed: it must stay the
    # exact payload sign() produces, quotes, backslashes and non-ASCII included.
    from nurture.message.tokens import click_token, open_token, sign, unsubscribe_token

    secret = "s3cret"
    for url in ("https://a.example/x?y=1&z=2", 'https://b.example/"q"\\é/\u2028'):
        assert click_token(7, url, secret) == sign({"d": 7, "u": url}, secret, purpose="click")
    assert open_token(8, secret) == sign({"d": 8}, secret, purpose="open")
    assert unsubscribe_token(9, 10, secret) == sign(
        {"d": 9, "l": 10}, secret, purpose="unsubscribe"
    )
