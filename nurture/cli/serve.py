"""``nurture serve``: the tracking service under uvicorn."""

from __future__ import annotations

from datetime import UTC, datetime

import click

from nurture.cli.common import engine, err_console


def _now() -> datetime:
    return datetime.now(UTC)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option("--port", default=8080, show_default=True, type=int, help="TCP port.")
@click.option(
    "--max-body", default=None, type=int, help="Largest request body (NURTURE_TRACKING_MAX_BODY)."
)
@click.option(
    "--access-log/--no-access-log",
    default=False,
    show_default=True,
    help="Log each request. Off by default: paths carry tracking tokens.",
)
def serve(host: str, port: int, max_body: int | None, access_log: bool) -> None:
    """Run the tracking service: open pixel, clicks, unsubscribe, webhooks, event intake.

    Clicks, opens and unsubscribes are answered at once and spooled to files under
    NURTURE_SPOOL_DIR (default .nurture/spool), which a background writer drains into the
    database; a restart replays what was left. Tokens are verified with every key in
    NURTURE_SECRET_KEY (comma-separated, for rotation); the development key is refused
    unless NURTURE_ENV=development. The bounce webhook needs NURTURE_WEBHOOK_SECRET; POST /events
    accepts the comma-separated bearer keys in NURTURE_INGEST_KEYS.
    """
    import uvicorn

    from nurture.config import DEV_SECRET_KEY, get_settings
    from nurture.engagement.tracking import create_app

    settings = get_settings()
    secrets = settings.secret_keys()
    if DEV_SECRET_KEY in secrets:
        err_console.print(
            "[bold yellow]warning:[/] NURTURE_SECRET_KEY is the public development key "
            "(allowed by NURTURE_ENV=development); anyone can forge tracking links."
        )
    webhook_secret = (
        settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
    ) or None
    raw_keys = settings.ingest_keys.get_secret_value() if settings.ingest_keys else ""
    keys = [k.strip() for k in raw_keys.split(",") if k.strip()]
    if webhook_secret is None:
        err_console.print("note: NURTURE_WEBHOOK_SECRET unset; /webhooks/bounces answers 503")
    if not keys:
        err_console.print("note: NURTURE_INGEST_KEYS unset; POST /events answers 401")
    from nurture.cli.common import fail
    from nurture.spec.consent import load_consent
    from nurture.spec.schema import SpecErrors

    folder = settings.campaigns
    path = next((p for p in (folder / "consent.yaml", folder / "consent.yml") if p.exists()), None)
    try:
        consent = load_consent(path)  # forms (POST /forms/{form}) and double opt-in
    except SpecErrors as exc:
        fail("invalid consent spec:\n" + "\n".join(f"  {e}" for e in exc.errors))
    app = create_app(
        engine(),
        secret=secrets,
        clock=_now,
        webhook_secret=webhook_secret,
        ingest_keys=keys,
        max_body=max_body or settings.tracking_max_body,
        spool_dir=settings.spool_dir,
        record_in_process=settings.spool_recorder == "process",
        consent=consent,
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        access_log=access_log,
        server_header=False,
        # The app reads X-Forwarded-For itself (first hop, only from a local proxy).
        proxy_headers=False,
    )
