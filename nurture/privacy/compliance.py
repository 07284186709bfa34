"""Compliance lint: marketing templates must carry the unsubscribe link and, when one is
configured (``postal_address`` in ``consent.yaml``), the sender's postal address (CAN-SPAM).

The unsubscribe check is :meth:`nurture.message.rendering.TemplateStore.lint`'s; this module adds
the address. Each email template is rendered with the sample lead, as lint does, and the
address must appear in its HTML and (if the template has its own) text body, as written
in ``consent.yaml``: put it in the footer partial or the brand.
"""

from __future__ import annotations

import html
from collections.abc import Iterable

from nurture.message.rendering import LintProblem, TemplateStore, sample_context


def _normal(text: str) -> str:
    return " ".join(html.unescape(text).split())


def postal_address_problems(
    store: TemplateStore, postal_address: str | None, names: Iterable[str] | None = None
) -> list[LintProblem]:
    """One error per template whose rendered email lacks ``postal_address``.

    Templates that do not render are left to the ordinary lint, which reports why.
    """
    if not postal_address or not postal_address.strip():
        return []
    wanted = _normal(postal_address)
    problems = []
    for name in names if names is not None else store.names():
        try:
            email = store.render(name, sample_context())
        except Exception:  # a broken template: lint's syntax and render checks say why
            continue
        missing = [
            part
            for part, body in (("HTML", email.html), ("text", email.text))
            if wanted not in _normal(body)
        ]
        if missing:
            problems.append(
                LintProblem(
                    store.root.joinpath(f"{name}.html.j2").as_posix(),
                    None,
                    f"no postal address in the {' and '.join(missing)} body: CAN-SPAM needs "
                    f"{postal_address!r} (consent.yaml postal_address) in every marketing email",
                    "error",
                )
            )
    return problems
