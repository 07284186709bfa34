"""A campaign's ``from:`` sets the From header of its mail and the domain of its
Message-IDs; a campaign without it sends as NURTURE_FROM (the mailer's address)."""

from __future__ import annotations

import json
from datetime import datetime
from email.utils import parseaddr
from pathlib import Path

import pytest
from sqlalchemy import Engine

from nurture.spec.schema import SpecErrors, load_campaign
from nurture.tick import tick
from tests.helpers import add_leads, campaign, mailer, programme
from tests.servers import SmtpSink

OWN_FROM = campaign("""
name: sales-voice
from: "Sam at Lumen <sam@sales.lumen.example>"
audience: {field: attributes.type, op: eq, value: b2b}
steps:
  - {id: hello, template: b2b/welcome}
""")
DEFAULT_FROM = campaign("""
name: house-voice
audience: {field: attributes.type, op: eq, value: retail}
steps:
  - {id: hello, template: retail/welcome}
""")


def test_from_sets_the_header_and_the_message_id_domain(
    engine: Engine, smtp_server: SmtpSink, now: datetime
) -> None:
    add_leads(
        engine,
        now,
        *({"email": f"b{i}@acme.example", "attributes": {"type": "b2b"}} for i in range(3)),
        *({"email": f"r{i}@shop.example", "attributes": {"type": "retail"}} for i in range(3)),
    )
    # Chunks of 2: each chunk mixes or splits the two campaigns' senders.
    m = mailer(smtp_server.url)
    try:
        result = tick(
            engine, now, programme(OWN_FROM, DEFAULT_FROM), m, worker="from-test", batch_size=2
        )
    finally:
        m.sender.close()
    assert result.send.sent == 6
    seen: dict[str, set[tuple[str, str]]] = {}
    for recipient, msg in smtp_server.messages:
        domain = msg["Message-ID"].strip("<>").rpartition("@")[2]
        seen.setdefault(recipient, set()).add((str(msg["From"]), domain))
    for i in range(3):
        assert seen[f"b{i}@acme.example"] == {
            ("Sam at Lumen <sam@sales.lumen.example>", "sales.lumen.example")
        }
        ((header, domain),) = seen[f"r{i}@shop.example"]
        assert (header, domain) == (m.from_address, parseaddr(m.from_address)[1].split("@")[1])


BAD_FROM = [
    "not an address",
    "Sam <sam@>",
    "a@b.example\r\nBcc: x@y.example",
    "x@y.example, z@w.example",
]


@pytest.mark.parametrize("value", BAD_FROM)
def test_a_bad_from_is_a_located_spec_error(value: str, tmp_path: Path) -> None:
    path = tmp_path / "bad-from.yaml"
    path.write_text(
        "name: bad-from\n"
        f"from: {json.dumps(value)}\n"
        "audience: {field: source, op: eq, value: x}\n"
        "steps:\n  - {id: a, template: b2b/welcome}\n"
    )
    with pytest.raises(SpecErrors) as info:
        load_campaign(path)
    assert any("bad-from.yaml:2: from" in str(e) for e in info.value.errors), info.value.errors
