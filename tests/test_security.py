"""Security promises that cut across modules: header injection at send time, and secrets
that never show in reprs, logs or exceptions."""

from __future__ import annotations

import logging
from datetime import datetime

import pytest
from sqlalchemy import Engine

from nurture.config import Settings
from nurture.smtp_transport import SmtpConfig
from nurture.tick import tick
from tests.helpers import add_leads, campaign, mailer, programme
from tests.servers import SmtpSink

HELLO = campaign("""
name: hello
audience: {field: source, op: eq, value: website}
steps:
  - {id: one, template: b2b/welcome}
""")


def test_cr_lf_in_lead_fields_never_becomes_a_header(
    engine: Engine, smtp_server: SmtpSink, now: datetime
) -> None:
    evil = "Eve\r\nBcc: victim@example.com"
    add_leads(
        engine,
        now,
        {"email": "ok@example.com", "first_name": "Ok"},
        {"email": "evil@example.com", "first_name": evil, "last_name": evil},
    )
    m = mailer(smtp_server.url)
    tick(engine, now, programme(HELLO), m, worker="sec")
    m.sender.close()
    # Lead values only reach headers through the subject, which is flattened to one line;
    # the envelope goes to the lead's own address and nowhere else.
    assert sorted(smtp_server.recipients()) == ["evil@example.com", "ok@example.com"]
    for _, msg in smtp_server.messages:
        assert msg.get("Bcc") is None
        assert "\n" not in str(msg["Subject"]) and "\r" not in str(msg["Subject"])
        assert "victim" not in str(msg["To"])


def test_settings_and_smtp_config_never_show_secrets(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(
        smtp_url="smtp://mailer:hunter2-smtp@mail.example:587",  # type: ignore[arg-type]
        secret_key="hunter2-signing",  # type: ignore[arg-type]
        webhook_secret="hunter2-webhook",  # type: ignore[arg-type]
    )
    config = SmtpConfig.from_url(settings.smtp_url)
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("nurture").info("settings %s %r %s", settings, settings, config)
    shown = " ".join([repr(settings), str(settings), repr(config), str(config), caplog.text])
    assert "hunter2" not in shown
    with pytest.raises(ValueError) as excinfo:
        SmtpConfig.from_url("smtp://mailer:hunter2-smtp@mail.example:notaport")
    assert "hunter2" not in str(excinfo.value)
