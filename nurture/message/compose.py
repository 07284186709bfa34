"""One delivery's message bytes: tracking links, render (from a skeleton when one fits), MIME."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from html import escape
from typing import Any, Protocol

from nurture.message import skeleton
from nurture.message.mime import HeaderInjectionError, build_message
from nurture.message.rendering import RenderedEmail, TemplateStore, lead_context
from nurture.message.tokens import tracking_links

#: The path of the honeypot target on the tracking service; no person can see its link.
HONEYPOT_PATH = "/_nurture/hp"

__all__ = ["ComposeSettings", "Rendered", "compose", "compose_message", "with_honeypot"]

# A link no person can see or reach: no text, hidden in every client (mso-hide for
# Outlook's Word engine), out of the tab order and the accessibility tree. Only machines
# that fetch every href of a message (security gateways) follow it.
_HONEYPOT = (
    '<a href="{href}" aria-hidden="true" tabindex="-1" style="display:none !important;'
    "mso-hide:all;font-size:0;line-height:0;max-height:0;max-width:0;opacity:0;"
    'overflow:hidden;visibility:hidden"></a>'
)

#: (delivery id, message bytes, None), or (delivery id, None, why it cannot be sent).
Rendered = tuple[int, bytes | None, str | None]


class ComposeSettings(Protocol):
    """What composing needs from a mailer (:class:`nurture.outbox.delivery.Mailer` has it all)."""

    @property
    def store(self) -> TemplateStore: ...
    @property
    def from_address(self) -> str: ...
    @property
    def secret(self) -> str: ...
    @property
    def tracking_url(self) -> str: ...
    @property
    def track(self) -> bool: ...
    @property
    def unsubscribe_mailto(self) -> str | None: ...
    @property
    def skeletons(self) -> bool: ...


def compose_message(settings: ComposeSettings, row: Any, now: datetime) -> bytes:
    """The RFC 5322 bytes for one claimed delivery row (see ``delivery.load_deliveries`` columns).

    Raises:
        RenderError: the template failed for this lead.
        HeaderInjectionError: a header value would contain a line break.
    """
    links = tracking_links(settings.tracking_url, row.id, row.lead_id, settings.secret)
    unsubscribe_url = links.unsubscribe_url  # an HMAC per access: sign it once
    lead = {
        "email": row.email,
        "first_name": row.first_name,
        "last_name": row.last_name,
        "company": row.company,
        "source": row.source,
        "country": row.country,
        "lifecycle_stage": row.lifecycle_stage,
        "attributes": row.attributes or {},
    }
    extra = {"open_pixel_url": links.open_pixel_url} if settings.track else {}
    ctx = lead_context(
        lead,
        unsubscribe_url=unsubscribe_url,
        campaign=row.campaign,
        step=row.step_id,
        extra=extra,
    )
    rendered = None
    parts = None
    honeypot_target = settings.tracking_url.rstrip("/") + HONEYPOT_PATH if settings.track else None
    if settings.skeletons:
        filled = skeleton.cache_for(settings.store).render(
            row.template,
            ctx,
            links=links,
            track=settings.track,
            honeypot_url=honeypot_target,
            decorate=_decorate,
        )
        if filled is not None:
            rendered, parts = filled
    if rendered is None:
        rendered = settings.store.render(
            row.template, ctx, link_rewriter=links.rewrite if settings.track else None
        )
        honeypot = links.click_url(honeypot_target) if honeypot_target is not None else None
        rendered = _decorate(rendered, honeypot)
    return build_message(
        rendered,
        from_addr=getattr(row, "campaign_from", None) or settings.from_address,
        to_addr=row.email,
        message_id=row.message_id,
        unsubscribe_url=unsubscribe_url,
        unsubscribe_mailto=settings.unsubscribe_mailto,
        date=now,
        bodies=parts,
    )


def _decorate(rendered: RenderedEmail, honeypot: str | None) -> RenderedEmail:
    """What follows the render: the honeypot link in the HTML (the text part never has it)."""
    if honeypot is not None and rendered.html:
        return replace(rendered, html=with_honeypot(rendered.html, honeypot))
    return rendered


def with_honeypot(html: str, url: str) -> str:
    """``html`` with the invisible honeypot link to ``url``, just before ``</body>``."""
    anchor = _HONEYPOT.format(href=escape(url, quote=True))
    end = html.rfind("</body>")
    if end < 0:
        end = html.lower().rfind("</body>")
    if end < 0:
        return html + anchor
    return html[:end] + anchor + html[end:]


def compose(settings: ComposeSettings, row: Any, now: datetime) -> Rendered:
    """Like :func:`compose_message`, but a failure becomes the reason instead of raising."""
    try:
        return row.id, compose_message(settings, row, now), None
    except HeaderInjectionError as exc:
        return row.id, None, f"header injection refused: {exc}"
    except Exception as exc:  # a template error must park the row, not stall the outbox
        return row.id, None, f"render failed: {type(exc).__name__}: {exc}"
