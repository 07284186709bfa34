"""``nurture doctor``: is this deployment's configuration healthy? One line per check."""

from __future__ import annotations

import os
import sys

import click

from nurture.cli.common import console, json_option, print_json, shown

_MARK = {"ok": "[green]ok  [/]", "fail": "[bold red]FAIL[/]", "skip": "[dim]skip[/]"}


@click.command()
@click.option(
    "--work-pool", default="nurture", show_default=True, help="The Prefect work pool to expect."
)
@click.option(
    "--crm",
    "crms",
    multiple=True,
    help="Also check this connector (those the campaigns promote to are always checked).",
)
@click.option(
    "--timeout", default=10.0, show_default=True, help="Seconds each network check may take."
)
@json_option
def doctor(work_pool: str, crms: tuple[str, ...], timeout: float, as_json: bool) -> None:
    """Check the settings a deployment depends on; exit 1 if any check fails.

    The secret key; the database (reachable, migrated to head); SMTP (EHLO, STARTTLS,
    AUTH); IMAP when NURTURE_IMAP_URL is set; the tracking service's /healthz; each CRM
    the campaigns promote to (one authenticated call); the Prefect API at PREFECT_API_URL,
    its work pool and the concurrency limits the flows take slots of.
    """
    from nurture.config import get_settings
    from nurture.doctor import PrefectApi, run_checks

    # The CLI is the edge: the environment is read here and handed to the checks.
    prefect = PrefectApi.from_env(os.environ, work_pool=work_pool)
    checks = run_checks(get_settings(), prefect, crms=crms, timeout=timeout)
    failed = any(c.failed for c in checks)
    if as_json:
        print_json(
            {
                "ok": not failed,
                "checks": [
                    {"name": c.name, "status": c.status, "detail": c.detail} for c in checks
                ],
            }
        )
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            console.print(
                f"{_MARK[c.status]} {shown(c.name.ljust(width))}  {shown(c.detail)}",
                highlight=False,
                soft_wrap=True,
            )
    if failed:
        sys.exit(1)
