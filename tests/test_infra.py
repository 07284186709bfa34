"""The test infrastructure itself: both databases migrate, the SMTP sink receives."""

from __future__ import annotations

import smtplib

from sqlalchemy import Engine, inspect

from tests.servers import SmtpSink


def test_schema_has_every_table(engine: Engine) -> None:
    tables = set(inspect(engine).get_table_names())
    expected = {
        "accounts",
        "leads",
        "campaigns",
        "enrollments",
        "deliveries",
        "events",
        "score_snapshots",
        "stage_transitions",
        "suppressions",
        "crm_links",
        "promotions",
    }
    assert expected <= tables


def test_smtp_sink_receives(smtp_server: SmtpSink) -> None:
    with smtplib.SMTP(smtp_server.host, smtp_server.port) as client:
        client.sendmail("a@example.com", ["b@example.com"], b"Subject: hi\r\n\r\nbody\r\n")
    smtp_server.wait_for(1)
    assert smtp_server.recipients() == ["b@example.com"]
