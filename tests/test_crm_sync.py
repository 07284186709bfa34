"""Pull-back end to end: a deal won in the CRM stops the lead's sequence on the next tick."""

from __future__ import annotations

from datetime import datetime, timedelta

from nurture.connectors.hubspot import HubSpotConnector
from sqlalchemy import Engine, select

from nurture.crm.sync import sync_stage_changes
from nurture.store.db import session_scope
from nurture.store.models import Delivery, Enrollment, Lead
from nurture.tick import tick
from tests.fakes.harness import Sleeps
from tests.fakes.hubspot import FakeHubSpot
from tests.helpers import add_leads, campaign, mailer, programme
from tests.servers import SmtpSink

WELCOME = campaign("""
name: crm-welcome
audience: {field: source, op: eq, value: website}
steps:
  - {id: welcome, template: b2b/welcome}
  - {id: case-study, wait: 2d, template: b2b/case_study_roi}
exit_when:
  any:
    - {field: lifecycle_stage, op: in, value: [customer]}
promote:
  when: {score: behaviour, op: gte, value: 0}
  to: {connector: hubspot, stage: mql}
""")


def test_a_won_deal_comes_back_and_stops_the_sequence(
    engine: Engine, smtp_server: SmtpSink, now: datetime
) -> None:
    clock = {"t": now}
    with FakeHubSpot(clock=lambda: clock["t"]) as fake:
        assert fake.server is not None
        conn = HubSpotConnector(
            token="hs-token",
            base_url=fake.server.url,
            pipeline="default",
            deal_stage="appointmentscheduled",
            sleep=Sleeps(),
        )
        add_leads(
            engine,
            now,
            {"email": "ada@acme.example", "first_name": "Ada"},
            {"email": "ben@globex.example", "first_name": "Ben"},
        )
        prog = programme(WELCOME)
        m = mailer(smtp_server.url)
        first = tick(engine, now, prog, m, worker="t", connectors={"hubspot": conn})
        assert first.promotions.pushed == 2 and first.send.sent == 2
        assert len(fake.objects["contacts"]) == 2 and len(fake.objects["deals"]) == 2

        # Sales wins Ada's deal in HubSpot the next day.
        ada_deal = next(
            d["id"]
            for d in fake.objects["deals"].values()
            if d["properties"]["dealname"].startswith("Ada")
        )
        clock["t"] = now + timedelta(days=1)
        fake.set_property("deals", ada_deal, dealstage="closedwon")
        pulled = sync_stage_changes(engine, conn, prog.pipeline, now + timedelta(days=1))
        assert [(m.email, m.from_stage, m.to_stage) for m in pulled.moves] == [
            ("ada@acme.example", "mql", "customer")
        ]

        # Two days on, Ben gets the case study; Ada's sequence has exited instead.
        later = tick(
            engine, now + timedelta(days=2), prog, m, worker="t", connectors={"hubspot": conn}
        )
        assert later.send.sent == 1
        with session_scope(engine) as session:
            sent = session.execute(
                select(Lead.email, Delivery.step_id).join(Lead, Lead.id == Delivery.lead_id)
            ).all()
            status = dict(
                session.execute(
                    select(Lead.email, Enrollment.status).join(Lead, Lead.id == Enrollment.lead_id)
                ).all()
            )
        assert ("ben@globex.example", "case-study") in sent
        assert ("ada@acme.example", "case-study") not in sent
        assert status == {"ada@acme.example": "exited", "ben@globex.example": "completed"}
        # Nothing was pushed twice.
        assert len(fake.objects["contacts"]) == 2 and len(fake.objects["deals"]) == 2
