"""The pure human/machine classifier: request signals, per-delivery signals, counted flags."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nurture.engagement.classify import (
    ClassifyConfig,
    Engagement,
    classify_delivery,
    counted_flags,
    is_honeypot,
    network_of,
    request_reasons,
    request_reasons_from_payload,
    user_agent_reason,
)
from nurture.spec.rules import HUMAN, MACHINE

SENT = datetime(2026, 3, 3, 10, 0, tzinfo=UTC)
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/122.0.0.0 Safari/537.36"
)
APPLE_MAIL = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"
)
IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148"
)
OUTLOOK = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/122.0.0.0 Safari/537.36 Edg/122.0.0.0"
)


@pytest.mark.parametrize(
    ("agent", "name"),
    [
        (
            "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com "
            "GoogleImageProxy)",
            "GoogleImageProxy",
        ),
        ("Barracuda Sentinel (EE)", "Barracuda"),
        ("Mozilla/5.0 (compatible; Proofpoint URL Defense)", "Proofpoint"),
        ("Mimecast URL Protect", "Mimecast"),
        ("Microsoft Office Existence Discovery", "MSOffice"),
        ("Mozilla/4.0 (compatible; ms-office; MSOffice 16)", "MSOffice"),
        ("Mozilla/5.0 (compatible; SafeLinks)", "SafeLinks"),
        (
            "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html",
            "YahooMailProxy",
        ),
    ],
)
def test_gateway_and_proxy_agents_are_machines(agent: str, name: str) -> None:
    assert user_agent_reason(agent) == f"user-agent:{name}"


@pytest.mark.parametrize("agent", ["python-requests/2.31.0", "curl/8.5.0", "Go-http-client/1.1"])
def test_scripts_are_machines_through_crawlerdetect(agent: str) -> None:
    reason = user_agent_reason(agent)
    assert reason is not None and reason.startswith("user-agent:")


@pytest.mark.parametrize("agent", [CHROME, APPLE_MAIL, IPHONE, OUTLOOK])
def test_browsers_and_mail_clients_are_not(agent: str) -> None:
    assert user_agent_reason(agent) is None


def test_an_empty_agent_is_a_machine_but_an_unknown_one_is_no_signal() -> None:
    assert request_reasons(user_agent="  ") == ["user-agent:empty"]
    assert request_reasons(user_agent=None) == []
    assert request_reasons_from_payload({}) == []
    assert request_reasons_from_payload(None) == []


def test_networks() -> None:
    assert network_of("17.58.101.12") == "apple-mpp"
    assert network_of("::ffff:17.1.2.3") == "apple-mpp"
    assert network_of("66.249.84.21") == "google-image-proxy"
    # iCloud Private Relay egress (here an Akamai block) is people browsing: not listed.
    assert network_of("172.224.226.5") is None
    assert network_of("203.0.113.9") is None
    assert network_of("2001:db8::1") is None
    assert network_of("not an address") is None
    assert network_of("") is None


def test_request_reasons_combine_in_a_fixed_order() -> None:
    assert request_reasons(method="head", prefetch=True, user_agent=CHROME, ip="17.0.0.1") == [
        "head-request",
        "prefetch",
        "network:apple-mpp",
    ]
    assert request_reasons(method="GET", user_agent=CHROME, ip="198.51.100.4") == []


def test_payload_values_of_the_wrong_type_are_ignored() -> None:
    assert (
        request_reasons_from_payload(
            {"method": 1, "prefetch": "yes", "user_agent": ["x"], "ip": 17}
        )
        == []
    )
    assert request_reasons_from_payload(
        {"method": "HEAD", "prefetch": True, "user_agent": CHROME, "ip": "17.2.3.4"}
    ) == ["head-request", "prefetch", "network:apple-mpp"]


def test_honeypot_urls() -> None:
    assert is_honeypot("https://t.example.com/_nurture/hp")
    assert is_honeypot("https://t.example.com/track/_nurture/hp?x=1")
    assert not is_honeypot("https://shop.example.com/_nurture/hp/more")
    assert not is_honeypot("https://shop.example.com/")
    assert not is_honeypot(None)
    assert not is_honeypot("http://[bad")


def ev(i: int, kind: str, seconds: float, url: str | None = None, *reasons: str) -> Engagement:
    return Engagement(i, kind, SENT + timedelta(seconds=seconds), url, tuple(reasons))


def test_too_fast_opens_and_clicks() -> None:
    verdicts = classify_delivery(
        SENT,
        [ev(1, "opened", 1.5), ev(2, "opened", 2.0), ev(3, "clicked", 4.2, "https://a"),
         ev(4, "clicked", 5.0, "https://b")],
    )  # fmt: skip
    assert verdicts[1].reason == "too-fast:1.5s"
    assert verdicts[2].engagement == HUMAN
    assert verdicts[3].reason == "too-fast:4.2s"
    assert verdicts[4].engagement == HUMAN and verdicts[4].reason is None
    # Without a send time there is no timing signal; a threshold of None turns it off.
    assert classify_delivery(None, [ev(1, "opened", 0)])[1].engagement == HUMAN
    config = ClassifyConfig(click_within=None)
    assert (
        classify_delivery(SENT, [ev(1, "clicked", 0, "https://a")], config)[1].engagement == HUMAN
    )


def test_a_honeypot_hit_marks_its_burst_but_not_the_person_later() -> None:
    hp = "https://t.example/_nurture/hp"
    events = [
        ev(1, "opened", 30),
        ev(2, "clicked", 30.2, "https://a"),
        ev(3, "clicked", 31, hp),
        ev(4, "clicked", 85, "https://b"),  # within 60 s of the hit
        ev(5, "clicked", 3600, "https://a"),  # the person, an hour later
    ]
    verdicts = classify_delivery(SENT, events)
    assert verdicts[3].reason == "honeypot"
    assert {verdicts[i].reason for i in (1, 2, 4)} == {"honeypot-burst"}
    assert verdicts[5].engagement == HUMAN


def test_a_link_burst_needs_three_distinct_links_within_a_second() -> None:
    base = [ev(1, "clicked", 60, "https://a"), ev(2, "clicked", 60.5, "https://b")]
    assert all(v.engagement == HUMAN for v in classify_delivery(SENT, base).values())
    same = [*base, ev(3, "clicked", 60.9, "https://b")]
    assert all(v.engagement == HUMAN for v in classify_delivery(SENT, same).values())
    late = [*base, ev(3, "clicked", 61.6, "https://c")]  # 1.1 s after the first
    assert all(v.engagement == HUMAN for v in classify_delivery(SENT, late).values())
    burst = [*base, ev(3, "clicked", 61.0, "https://c"), ev(4, "opened", 60.7)]
    verdicts = classify_delivery(SENT, burst)
    assert {i: v.reason for i, v in verdicts.items()} == {
        1: "link-burst",
        2: "link-burst",
        3: "link-burst",
        4: "link-burst",
    }


def test_request_reasons_come_first_and_reasons_are_not_repeated() -> None:
    verdicts = classify_delivery(SENT, [ev(1, "opened", 1, None, "head-request", "head-request")])
    assert verdicts[1].reasons == ("head-request", "too-fast:1.0s")
    assert verdicts[1].reason == "head-request,too-fast:1.0s"


def test_counted_flags_pick_the_first_open_and_the_first_click_per_link() -> None:
    events = [
        ev(1, "opened", 1),  # machine: too fast
        ev(2, "opened", 100),
        ev(3, "opened", 200),
        ev(4, "clicked", 300, "https://a"),
        ev(5, "clicked", 400, "https://a"),
        ev(6, "clicked", 500, "https://b"),
    ]
    verdicts = classify_delivery(SENT, events)
    flags = counted_flags(events, verdicts)
    assert flags == {
        1: (False, True),
        2: (True, False),
        3: (False, False),
        4: (True, True),
        5: (False, False),
        6: (True, True),
    }


URLS = st.sampled_from(
    ["https://a", "https://b", "https://c", "https://d", "https://t/_nurture/hp"]
)
EVENT = st.tuples(
    st.sampled_from(["opened", "clicked"]),
    st.floats(min_value=-5, max_value=600, allow_nan=False),
    URLS,
    st.lists(st.sampled_from(["head-request", "prefetch", "network:apple-mpp"]), max_size=2),
)


def _events(raw: list[tuple[str, float, str, list[str]]]) -> list[Engagement]:
    return [
        ev(i, kind, round(sec, 3), url if kind == "clicked" else None, *reasons)
        for i, (kind, sec, url, reasons) in enumerate(raw, start=1)
    ]


@settings(max_examples=200, deadline=None)
@given(st.lists(EVENT, max_size=12), st.randoms(use_true_random=False))
def test_verdicts_do_not_depend_on_arrival_order(raw: list, rng: object) -> None:
    events = _events(raw)
    shuffled = list(events)
    rng.shuffle(shuffled)  # type: ignore[attr-defined]
    assert classify_delivery(SENT, events) == classify_delivery(SENT, shuffled)


@settings(max_examples=200, deadline=None)
@given(st.lists(EVENT, min_size=1, max_size=12), st.integers(min_value=0, max_value=11))
def test_a_later_event_never_turns_a_machine_back_into_a_person(raw: list, cut: int) -> None:
    events = _events(raw)
    before = classify_delivery(SENT, events[: cut % len(events)])
    after = classify_delivery(SENT, events)
    for i, verdict in before.items():
        if verdict.engagement == MACHINE:
            assert after[i].engagement == MACHINE
            assert set(verdict.reasons) <= set(after[i].reasons)


@settings(max_examples=200, deadline=None)
@given(st.lists(EVENT, max_size=12))
def test_one_counted_event_per_open_and_per_link(raw: list) -> None:
    events = _events(raw)
    verdicts = classify_delivery(SENT, events)
    flags = counted_flags(events, verdicts)
    groups: dict[tuple[str, str | None], list[Engagement]] = {}
    for e in events:
        groups.setdefault((e.type, e.url), []).append(e)
    for members in groups.values():
        assert sum(flags[e.id][1] for e in members) == 1
        humans = [e for e in members if verdicts[e.id].engagement == HUMAN]
        counted = [e for e in members if flags[e.id][0]]
        assert len(counted) == (1 if humans else 0)
        assert all(verdicts[e.id].engagement == HUMAN for e in counted)
        if counted:  # the earliest person's event
            assert counted[0] == min(humans, key=lambda e: (e.occurred_at, e.id))
    # Any event scored in human mode is a person's.
    assert all(verdicts[i].engagement == HUMAN for i, (h, _) in flags.items() if h)


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="burst_links"):
        ClassifyConfig(burst_links=1)
    with pytest.raises(ValueError, match="click_within"):
        ClassifyConfig(click_within=timedelta(seconds=-1))
