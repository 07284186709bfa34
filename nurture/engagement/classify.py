"""Tell people from machines: classify opens and clicks as ``human`` or ``machine``.

Two kinds of signal, both pure functions here (no I/O, no clock):

* **Per request** (:func:`request_reasons`): a HEAD request or a prefetch hint, a user
  agent that ``crawlerdetect`` or our short list of mail gateways and image proxies
  names, an address in a known proxy or gateway network (package data
  ``machine_networks.txt``), an explicitly empty user agent.
* **Per delivery** (:func:`classify_delivery`), over all opens and clicks of one message:
  engagement within seconds of the send, a hit on the invisible honeypot link (which
  marks the whole burst around it), and many distinct links hit within one second.

An event is ``machine`` when any signal fires; its reasons are stored beside it. Set
signals only ever add reasons as more events arrive, so a burst recognised on its third
click also marks the first two. :func:`counted_flags` then picks, per delivery, the one
open and the one click per distinct link that scoring counts.
"""

from __future__ import annotations

import ipaddress
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "ENGAGEMENT_TYPES",
    "HONEYPOT_PATH",
    "HUMAN",
    "MACHINE",
    "ClassifyConfig",
    "Engagement",
    "Verdict",
    "classify_delivery",
    "counted_flags",
    "is_honeypot",
    "merge_reasons",
    "network_of",
    "request_reasons",
    "request_reasons_from_payload",
    "user_agent_reason",
]

HUMAN = "human"
MACHINE = "machine"
#: The event types that are classified; every other type has no engagement class.
ENGAGEMENT_TYPES = ("opened", "clicked")
#: The path of the honeypot target on the tracking service; no person can see its link.
HONEYPOT_PATH = "/_nurture/hp"
MAX_REASON = 255

# Mail security gateways and image proxies by user agent, beyond crawlerdetect's list
# (which already knows GoogleImageProxy, Barracuda Sentinel and "Microsoft Office"
# discovery agents). Lowercase substrings, each with the name its reason carries.
_GATEWAY_AGENTS = (
    ("googleimageproxy", "GoogleImageProxy"),
    ("ggpht.com", "GoogleImageProxy"),
    ("yahoomailproxy", "YahooMailProxy"),
    ("safelinks", "SafeLinks"),
    ("msoffice", "MSOffice"),
    ("microsoft office", "MSOffice"),
    ("mimecast", "Mimecast"),
    ("proofpoint", "Proofpoint"),
    ("urldefense", "Proofpoint"),
    ("barracuda", "Barracuda"),
    ("ciscosecureemail", "CiscoSecureEmail"),
    ("ironport", "CiscoSecureEmail"),
)


@dataclass(frozen=True)
class ClassifyConfig:
    """Thresholds of the per-delivery signals.

    Attributes:
        open_within: An open this soon after the send is a machine's (privacy proxies
            and gateways fetch at delivery). ``None`` turns the signal off.
        click_within: A click this soon after the send is a machine's.
        honeypot_window: Events of a delivery within this distance of a honeypot hit
            belong to the same burst, and are machine.
        burst_links: Distinct links of one message hit within ``burst_window`` that make
            a link burst.
        burst_window: See ``burst_links``.
        flood_events: This many opens and clicks of one delivery in one recorded batch,
            within ``flood_window`` of each other, are a flood (someone hammering a link):
            they are marked machine (``flood``) without re-reading the delivery's history,
            so hammering one link cannot make recording slower and slower.
        flood_window: See ``flood_events``.
    """

    open_within: timedelta | None = timedelta(seconds=2)
    click_within: timedelta | None = timedelta(seconds=5)
    honeypot_window: timedelta = timedelta(seconds=60)
    burst_links: int = 3
    burst_window: timedelta = timedelta(seconds=1)
    flood_events: int = 20
    flood_window: timedelta = timedelta(seconds=60)

    def __post_init__(self) -> None:
        if self.burst_links < 2:
            raise ValueError(f"burst_links must be at least 2, got {self.burst_links}")
        for name in ("open_within", "click_within"):
            value = getattr(self, name)
            if value is not None and value < timedelta(0):
                raise ValueError(f"{name} must not be negative, got {value}")
        if self.honeypot_window < timedelta(0) or self.burst_window < timedelta(0):
            raise ValueError("windows must not be negative")


@lru_cache(maxsize=1)
def _networks() -> tuple[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network], ...]:
    text = resources.files("nurture").joinpath("data/machine_networks.txt").read_text("utf-8")
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, cidr = line.partition(" ")
        try:
            out.append((name, ipaddress.ip_network(cidr.strip())))
        except ValueError as exc:  # package data: a bad line is a bug, say where
            raise ValueError(f"machine_networks.txt line {number}: {exc}") from exc
    return tuple(out)


@lru_cache(maxsize=4096)
def network_of(ip: str) -> str | None:
    """The name of the known machine network holding ``ip``, or None (also for non-IPs)."""
    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for name, network in _networks():
        if address.version == network.version and address in network:
            return name
    return None


_detector_lock = threading.Lock()
_detector: Any = None


@lru_cache(maxsize=4096)
def user_agent_reason(user_agent: str) -> str | None:
    """``user-agent:<name>`` when the agent is a gateway, proxy, crawler or script; else None.

    An empty agent is a machine's too (browsers and mail clients always send one).
    """
    agent = user_agent.strip()
    if not agent:
        return "user-agent:empty"
    lowered = agent.lower()
    for needle, name in _GATEWAY_AGENTS:
        if needle in lowered:
            return f"user-agent:{name}"
    global _detector
    # crawlerdetect keeps the last match on the instance: one caller at a time.
    with _detector_lock:
        if _detector is None:
            from crawlerdetect import CrawlerDetect

            _detector = CrawlerDetect()
        if _detector.isCrawler(agent[:1000]):
            match = str(_detector.getMatches() or "crawler")
            return f"user-agent:{match[:64]}"
    return None


def request_reasons(
    *,
    method: str | None = None,
    prefetch: bool = False,
    user_agent: str | None = None,
    ip: str | None = None,
) -> list[str]:
    """The machine signals of one request (empty: nothing says machine).

    ``user_agent=None`` means unknown (an imported event), not empty.
    """
    reasons: list[str] = []
    if method is not None and method.upper() == "HEAD":
        reasons.append("head-request")
    if prefetch:
        reasons.append("prefetch")
    if user_agent is not None:
        reason = user_agent_reason(user_agent)
        if reason is not None:
            reasons.append(reason)
    if ip:
        network = network_of(ip)
        if network is not None:
            reasons.append(f"network:{network}")
    return reasons


def request_reasons_from_payload(payload: Mapping[str, Any] | None) -> list[str]:
    """:func:`request_reasons` from an event payload (``method``, ``prefetch``,
    ``user_agent``, ``ip``, as the tracking service records them); bad types are ignored."""
    if not payload:
        return []

    def text(key: str) -> str | None:
        value = payload.get(key)
        return value if isinstance(value, str) else None

    return request_reasons(
        method=text("method"),
        prefetch=payload.get("prefetch") is True,
        user_agent=text("user_agent"),
        ip=text("ip"),
    )


def is_honeypot(url: str | None) -> bool:
    """Whether a clicked URL is the honeypot target."""
    if not url:
        return False
    try:
        path = urlsplit(url).path
    except ValueError:
        return False
    return path.endswith(HONEYPOT_PATH)


@dataclass(frozen=True)
class Engagement:
    """One open or click of a delivery, as the per-delivery signals see it."""

    id: int
    type: str
    occurred_at: datetime
    url: str | None = None
    request_reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class Verdict:
    """An event's class and why."""

    engagement: str
    reasons: tuple[str, ...]

    @property
    def reason(self) -> str | None:
        """The reasons as stored: comma-separated, at most 255 characters; None for human."""
        if not self.reasons:
            return None
        return ",".join(self.reasons)[:MAX_REASON]


_ORDER = ("head-request", "prefetch", "user-agent", "network", "too-fast", "honeypot",
          "honeypot-burst", "link-burst")  # fmt: skip


def merge_reasons(*groups: Iterable[str]) -> tuple[str, ...]:
    """Reasons without repeats, in one canonical order (request signals first)."""
    unique = dict.fromkeys(r for group in groups for r in group if r)

    def rank(reason: str) -> int:
        kind = reason.split(":", 1)[0]
        return _ORDER.index(kind) if kind in _ORDER else len(_ORDER)

    return tuple(sorted(unique, key=rank))


def _verdict(reasons: Iterable[str]) -> Verdict:
    unique = merge_reasons(reasons)
    return Verdict(MACHINE if unique else HUMAN, unique)


def _seconds(delta: timedelta) -> str:
    return f"{delta.total_seconds():.1f}s"


def classify_delivery(
    sent_at: datetime | None, events: Sequence[Engagement], config: ClassifyConfig | None = None
) -> dict[int, Verdict]:
    """Classify every open and click of one delivery, by request and set signals.

    Args:
        sent_at: When the delivery was sent (None: unknown, no timing signal).
        events: All its opens and clicks known so far, in any order.
        config: Thresholds (defaults: :class:`ClassifyConfig`).

    Returns:
        A verdict per event id.
    """
    config = config or ClassifyConfig()
    reasons: dict[int, list[str]] = {e.id: list(e.request_reasons) for e in events}
    ordered = sorted(events, key=lambda e: (e.occurred_at, e.id))

    if sent_at is not None:
        for e in ordered:
            limit = config.click_within if e.type == "clicked" else config.open_within
            if limit is not None and e.occurred_at - sent_at < limit:
                reasons[e.id].append(f"too-fast:{_seconds(e.occurred_at - sent_at)}")

    hits = [e for e in ordered if e.type == "clicked" and is_honeypot(e.url)]
    for e in hits:
        reasons[e.id].append("honeypot")
    if hits:
        window = config.honeypot_window
        for e in ordered:
            if any(abs(e.occurred_at - h.occurred_at) <= window for h in hits if h.id != e.id):
                reasons[e.id].append("honeypot-burst")

    # Link bursts: a sliding window over the clicks in time order.
    clicks = [e for e in ordered if e.type == "clicked" and e.url]
    start = 0
    urls: Counter[str] = Counter()
    spans: list[tuple[datetime, datetime]] = []
    for e in clicks:
        urls[e.url or ""] += 1
        while e.occurred_at - clicks[start].occurred_at > config.burst_window:
            first = clicks[start].url or ""
            urls[first] -= 1
            if not urls[first]:
                del urls[first]
            start += 1
        if len(urls) >= config.burst_links:
            spans.append((clicks[start].occurred_at, e.occurred_at))
    if spans:
        for e in ordered:
            if any(lo <= e.occurred_at <= hi for lo, hi in spans):
                reasons[e.id].append("link-burst")
    return {i: _verdict(r) for i, r in reasons.items()}


def counted_flags(
    events: Sequence[Engagement], verdicts: Mapping[int, Verdict]
) -> dict[int, tuple[bool, bool]]:
    """Which events scoring counts: ``(counted_human, counted_any)`` per event id.

    One open per delivery and one click per distinct link per delivery: the earliest
    one, among human events (``counted_human``) or among all (``counted_any``).
    """
    first_any: dict[tuple[str, str | None], int] = {}
    first_human: dict[tuple[str, str | None], int] = {}
    for e in sorted(events, key=lambda e: (e.occurred_at, e.id)):
        key = (e.type, e.url if e.type == "clicked" else None)
        first_any.setdefault(key, e.id)
        if verdicts[e.id].engagement == HUMAN:
            first_human.setdefault(key, e.id)
    any_ids = set(first_any.values())
    human_ids = set(first_human.values())
    return {e.id: (e.id in human_ids, e.id in any_ids) for e in events}
