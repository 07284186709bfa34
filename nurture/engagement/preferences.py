"""The preference centre: the unsubscribe page with a toggle per topic.

``GET /u/{token}`` (the signed unsubscribe link of every email) shows one checkbox per
topic of ``consent.yaml``, ticked where the lead may be mailed under it now, and an
"unsubscribe from everything" choice. It needs no JavaScript (the page's CSP allows
none). ``POST`` with ``scope=topics`` saves the toggles as consent records (a ticked topic
is granted with basis ``consent``, an unticked one withdrawn; source ``preferences``);
``scope=all`` unsubscribes from everything (suppression), as before.

An RFC 8058 one-click POST (``List-Unsubscribe=One-Click``, what a mail client's
"Unsubscribe" button sends) unsubscribes from **everything**: the person pressed
unsubscribe in their mail client, and that is what CAN-SPAM, Gmail and Yahoo expect it to
mean. The topics are for people who open the page.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from nurture.spec.consent import ALL_TOPICS, ConsentSpec
from nurture.store.consent import ConsentIn, record_consents
from nurture.store.db import session_scope
from nurture.store.models import Consent, ConsentStatus

SAVED = "preferences_saved"


def topic_states(engine: Engine, lead_id: int, spec: ConsentSpec) -> dict[str, bool]:
    """Whether the lead may be mailed under each topic now (what the page ticks)."""
    with session_scope(engine) as session:
        return _states(session, lead_id, spec.topic_bases())


def _states(session: Session, lead_id: int, topics: Mapping[str, Sequence[str]]) -> dict[str, bool]:
    rows = {
        topic: (status, basis)
        for topic, status, basis in session.execute(
            select(Consent.topic, Consent.status, Consent.basis).where(Consent.lead_id == lead_id)
        )
    }
    out = {}
    everything = rows.get(ALL_TOPICS)
    for name, bases in topics.items():
        own = rows.get(name)
        if own is not None and own[0] == ConsentStatus.withdrawn.value:
            out[name] = False
            continue
        granted = [r for r in (own, everything) if r and r[0] == ConsentStatus.granted.value]
        out[name] = any(basis in bases for _, basis in granted)
    return out


def page_body(spec: ConsentSpec, states: Mapping[str, bool] | None, hello: str, who: str) -> str:
    """The preference centre's HTML body (everything escaped; a plain form, no script).

    ``states`` is ``None`` when the database could not say in time: the boxes are then
    unticked and the page says so, and saving still works.
    """
    boxes = []
    for name, topic in spec.topics.items():
        ticked = " checked" if states and states.get(name) else ""
        label = html.escape(topic.label or name)
        about = (
            f'<br><span class="muted">{html.escape(topic.description)}</span>'
            if topic.description
            else ""
        )
        boxes.append(
            f'<p><label><input type="checkbox" name="topic" value="{html.escape(name)}"'
            f' id="topic-{html.escape(name)}"{ticked}> {label}</label>{about}</p>'
        )
    unknown = (
        ""
        if states is not None
        else '<p class="muted">Your current choices could not be loaded just now.</p>'
    )
    return (
        f"<h1>Email preferences</h1>{hello}<p>Choose what {who} gets from us.</p>{unknown}"
        '<form method="post">'
        "<fieldset><legend>Topics</legend>"
        + "".join(boxes)
        + '<button type="submit" name="scope" value="topics" id="save">Save my choices'
        "</button></fieldset>"
        "<fieldset><legend>Or stop everything</legend>"
        '<button type="submit" name="scope" value="all" id="unsubscribe-all">'
        "Unsubscribe from all marketing email</button></fieldset></form>"
        '<p class="muted">You will still get messages you asked for, such as receipts and '
        "password resets.</p>"
    )


def parse_choice(body: bytes, spec: ConsentSpec) -> dict[str, bool] | None:
    """The topic toggles a ``scope=topics`` form post asks for; ``None`` for anything else
    (``scope=all``, the legacy form without a scope, or RFC 8058 one-click)."""
    from urllib.parse import parse_qs

    try:
        form = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=200)
    except (UnicodeDecodeError, ValueError):
        return None
    if form.get("scope") != ["topics"]:
        return None
    chosen = set(form.get("topic", []))
    return {name: name in chosen for name in spec.topics}


def apply_preferences(
    session: Session,
    lead_id: int,
    choices: Mapping[str, Any],
    at: datetime,
    meta: Mapping[str, Any],
    topics: Mapping[str, Sequence[str]],
) -> int:
    """Record the saved toggles as consent changes: only toggles that change what may be
    mailed become records (and events); ``topics`` are the topics with their bases."""
    now = _states(session, lead_id, topics)
    changes: Sequence[ConsentIn] = [
        ConsentIn(
            lead_id,
            topic,
            "consent",
            ConsentStatus.granted.value if on else ConsentStatus.withdrawn.value,
            "preferences",
            "preference centre",
            None,
            meta.get("ip"),
            meta.get("user_agent"),
            at,
        )
        for topic, on in choices.items()
        if isinstance(on, bool) and topic in topics and now.get(topic) != on
    ]
    return record_consents(session, changes, at)
