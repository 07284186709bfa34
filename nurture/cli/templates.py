"""``nurture templates``: lint and preview the email templates."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from nurture.cli.common import console, fail, json_option, print_json

if TYPE_CHECKING:
    from nurture.message.rendering import LintProblem, TemplateStore


def _store() -> TemplateStore:
    from nurture.config import get_settings
    from nurture.message.rendering import TemplateStore

    root = Path(get_settings().templates)
    if not root.is_dir():
        fail(f"templates folder {root} does not exist (set NURTURE_TEMPLATES)")
    return TemplateStore(root)


@click.group()
def templates() -> None:
    """Lint and preview the email templates (NURTURE_TEMPLATES)."""


def _postal_address() -> str | None:
    from nurture.config import get_settings
    from nurture.spec.consent import load_consent
    from nurture.spec.schema import SpecErrors

    folder = Path(get_settings().campaigns)
    path = next((p for p in (folder / "consent.yaml", folder / "consent.yml") if p.exists()), None)
    try:
        return load_consent(path).postal_address
    except SpecErrors as exc:
        fail("invalid consent spec:\n" + "\n".join(f"  {e}" for e in exc.errors))


@templates.command("lint")
@click.argument("names", nargs=-1)
@click.option(
    "--postal-address",
    default=None,
    help="The postal address every marketing email must show (CAN-SPAM) "
    "[default: postal_address in NURTURE_CAMPAIGNS/consent.yaml, if set].",
)
@json_option
def lint(names: tuple[str, ...], postal_address: str | None, as_json: bool) -> None:
    """Check syntax, undefined variables, the unsubscribe link, the postal address and
    subject length.

    Checks NAMES (e.g. b2b/welcome), or every template when none is given. Prints
    ``file:line: severity: message`` per problem and exits 1 on any error. With a postal
    address configured (consent.yaml ``postal_address``), an email that does not show it
    is an error.
    """
    from nurture.privacy.compliance import postal_address_problems

    store = _store()
    checked = list(names) or store.names()
    problems: list[LintProblem] = []
    if names:
        for name in names:
            problems.extend(store.lint(name))
    else:
        problems = store.lint()
    address = postal_address if postal_address is not None else _postal_address()
    problems.extend(postal_address_problems(store, address, checked))
    errors = sum(1 for p in problems if p.severity == "error")
    warnings = len(problems) - errors
    if as_json:
        print_json(
            {
                "checked": checked,
                "errors": errors,
                "warnings": warnings,
                "problems": [
                    {"file": p.file, "line": p.line, "severity": p.severity, "message": p.message}
                    for p in problems
                ],
            }
        )
    else:
        for problem in problems:
            click.echo(str(problem))
        colour = "red" if errors else ("yellow" if warnings else "green")
        console.print(
            f"[{colour}]{len(checked)} template(s) checked: "
            f"{errors} error(s), {warnings} warning(s)[/]",
            highlight=False,
        )
    if errors:
        raise SystemExit(1)


def _lead_mapping(email: str) -> dict[str, Any]:
    from sqlalchemy import select

    from nurture.cli.common import engine
    from nurture.store.db import session_scope
    from nurture.store.models import Account, Lead

    wanted = email.strip().lower()
    with session_scope(engine()) as session:
        row = session.execute(
            select(Lead, Account.name)
            .outerjoin(Account, Lead.account_id == Account.id)
            .where(Lead.email == wanted)
        ).first()
        if row is None:
            fail(f"no lead with email {wanted!r} in the database")
        lead, account_name = row
        return {
            "id": lead.id,
            "email": lead.email,
            "first_name": lead.first_name,
            "last_name": lead.last_name,
            "account_name": account_name,
            "country": lead.country,
            "timezone": lead.timezone,
            "lifecycle_stage": lead.lifecycle_stage,
            "owner": lead.owner,
            "grade": lead.grade,
            "behaviour_score": lead.behaviour_score,
            "fit_score": lead.fit_score,
            "source": lead.source,
            "attributes": dict(lead.attributes or {}),
        }


@templates.command("preview")
@click.argument("name")
@click.option("--lead", "lead_email", metavar="EMAIL", help="Render for this lead.")
@click.option("--sample", is_flag=True, help="Render for the built-in sample lead.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".nurture/preview"),
    show_default=True,
    help="Folder for the .html and .eml files.",
)
@json_option
def preview(name: str, lead_email: str | None, sample: bool, out: Path, as_json: bool) -> None:
    """Render NAME and write <name>.html and <name>.eml (the full MIME message)."""
    from nurture.config import get_settings
    from nurture.message.mime import build_message, format_address, message_id
    from nurture.message.rendering import SAMPLE_LEAD, RenderError, lead_context

    if bool(lead_email) == sample:
        fail("give exactly one of --lead EMAIL or --sample")
    store = _store()
    if not store.exists(name):
        fail(f"no template {name!r} under {store.root}")
    settings = get_settings()
    lead = dict(SAMPLE_LEAD) if sample else _lead_mapping(lead_email or "")
    base = settings.tracking_url.rstrip("/")
    unsubscribe_url = f"{base}/unsubscribe/preview"
    context = lead_context(
        lead, unsubscribe_url=unsubscribe_url, campaign="preview", step="preview"
    )
    try:
        email = store.render(name, context)
    except RenderError as exc:
        fail(str(exc))
    domain = settings.from_address.rpartition("@")[2].rstrip(">").strip() or "localhost"
    full_name = " ".join(p for p in (lead.get("first_name"), lead.get("last_name")) if p)
    try:
        data = build_message(
            email,
            from_addr=settings.from_address,
            to_addr=format_address(full_name or None, str(lead["email"])),
            message_id=message_id(0, "preview", domain),
            unsubscribe_url=unsubscribe_url,
            # A preview is run by a person at a terminal, so the wall clock is right here.
            date=datetime.now(UTC),
        )
    except ValueError as exc:
        fail(f"cannot build the message: {exc}")
    html_path = out / f"{name}.html"
    eml_path = out / f"{name}.eml"
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(email.html, encoding="utf-8")
    eml_path.write_bytes(data)
    if as_json:
        print_json({"subject": email.subject, "html": str(html_path), "eml": str(eml_path)})
    else:
        click.echo(f"Subject: {email.subject}")
        click.echo(str(html_path))
        click.echo(str(eml_path))
