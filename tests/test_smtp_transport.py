"""The SMTP transport against real SMTP servers on 127.0.0.1 (aiosmtpd)."""

from __future__ import annotations

import logging
import socketserver
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from nurture.outbox.smtp_transport import (
    Outcome,
    Outgoing,
    SendResult,
    SmtpConfig,
    SmtpSender,
    is_hard_bounce,
)
from tests.servers import PASSWORD, RecordingServer, SmtpSink, free_port

FAST = 0.001  # seconds of backoff: real retries, short waits


def message(key: int, recipient: str | None = None, body: bytes = b"Hello.\r\n") -> Outgoing:
    rcpt = recipient or f"lead{key}@example.com"
    data = (
        f"From: Nurture <hello@nurture.example>\r\nTo: {rcpt}\r\n"
        f"Subject: Step {key}\r\nMessage-ID: <{key}@nurture.example>\r\n\r\n"
    ).encode() + body
    return Outgoing(key=key, sender="hello@nurture.example", recipient=rcpt, data=data)


def by_key(results: list[SendResult]) -> dict[int, SendResult]:
    assert len({r.key for r in results}) == len(results), "one result per message"
    return {r.key: r for r in results}


@pytest.fixture(params=[False, True], ids=["lockstep", "pipelining"])
def server(request: pytest.FixtureRequest) -> Iterator[RecordingServer]:
    srv = RecordingServer(pipelining=request.param)
    srv.controller.start()
    yield srv
    srv.controller.stop()


def sink_config(sink: SmtpSink) -> SmtpConfig:
    return SmtpConfig.from_url(sink.url)


# -- configuration ------------------------------------------------------------------------


def test_from_url_schemes_ports_and_credentials() -> None:
    plain = SmtpConfig.from_url("smtp://mail.example.com")
    assert (plain.host, plain.port, plain.security, plain.username) == (
        "mail.example.com",
        25,
        "plain",
        None,
    )
    tls = SmtpConfig.from_url(f"smtp+starttls://mailer:{PASSWORD}@mail.example.com")
    assert (tls.port, tls.security, tls.username) == (587, "starttls", "mailer")
    assert tls.password is not None and tls.password.get_secret_value() == PASSWORD
    ssl_ = SmtpConfig.from_url("smtps://u%40x.org:p%3Ass@127.0.0.1:2465?timeout=5")
    assert (ssl_.port, ssl_.security, ssl_.username, ssl_.timeout) == (2465, "ssl", "u@x.org", 5)
    assert ssl_.password == SecretStr("p:ss")
    wrapped = SmtpConfig.from_url(SecretStr("smtp://h:2525"))
    assert (wrapped.host, wrapped.port) == ("h", 2525)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (f"http://mailer:{PASSWORD}@host", "scheme must be one of"),
        (f"smtp://mailer:{PASSWORD}@:25", "no host"),
        (f"smtp://mailer:{PASSWORD}@host:notaport", "port must be a number"),
        (f"smtp://mailer:{PASSWORD}@host:25?timeout=soon", "timeout must be a number"),
    ],
)
def test_from_url_errors_are_clear_and_hide_the_password(url: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        SmtpConfig.from_url(url)
    assert message in str(info.value)
    assert "mailer:***@" in str(info.value)
    assert PASSWORD not in str(info.value)
    assert PASSWORD not in repr(info.value)


def test_password_never_in_repr_or_str() -> None:
    config = SmtpConfig.from_url(f"smtps://mailer:{PASSWORD}@mail.example.com")
    plain_password = SmtpConfig("h", 25, "plain", "u", PASSWORD)  # type: ignore[arg-type]
    with SmtpSender(config) as sender:
        for text in (repr(config), str(config), repr(sender), str(sender), repr(plain_password)):
            assert PASSWORD not in text
        assert "mailer" in repr(config)
    assert isinstance(plain_password.password, SecretStr)


@pytest.mark.parametrize(
    ("code", "reply", "hard"),
    [
        (550, "5.1.1 <x@example.com>: Recipient address rejected: User unknown", True),
        (550, "No such user here", True),
        (551, "User not local", True),
        (553, "Mailbox name not allowed", True),
        (554, "5.1.2 bad destination system address", True),
        (550, "5.2.1 mailbox disabled", True),
        (550, "5.7.1 Message rejected as spam", False),
        (552, "5.3.4 Message size exceeds fixed limit", False),
        (552, "5.2.2 Mailbox full", False),
        (552, "Requested mail action aborted: exceeded storage", False),
        (554, "Transaction failed: policy", False),
        (554, "5.7.1 Relay access denied", False),
        (451, "4.1.1 try again", False),
    ],
)
def test_hard_bounce_mapping(code: int, reply: str, hard: bool) -> None:
    assert is_hard_bounce(code, reply) is hard
    assert is_hard_bounce(code, reply.encode()) is hard


# -- throughput and reuse -------------------------------------------------------------------


def test_200_messages_over_4_connections_arrive_exactly_once(server: RecordingServer) -> None:
    seen: list[tuple[int, str]] = []
    lock = threading.Lock()

    def record(result: SendResult) -> None:
        with lock:
            seen.append((result.key, threading.current_thread().name))

    messages = [message(i) for i in range(200)]
    with SmtpSender(server.config(), connections=4, on_result=record) as sender:
        results = sender.send_batch(messages)
        assert server.handler.sessions == 4
        # A second batch reuses the same four connections.
        more = sender.send_batch([message(i) for i in range(200, 260)])
        assert server.handler.sessions == 4

    outcome = by_key(results + more)
    assert len(outcome) == 260
    assert all(r.outcome is Outcome.sent and r.code == 250 for r in outcome.values())
    assert Counter(server.handler.recipients()) == Counter(
        f"lead{i}@example.com" for i in range(260)
    )
    assert sorted(k for k, _ in seen) == list(range(260))
    assert {name for _, name in seen} <= {f"smtp-sender-{i}" for i in range(4)}
    assert len({name for _, name in seen}) > 1, "the connections worked in parallel"


def test_content_arrives_intact_with_crlf_and_dot_stuffing(server: RecordingServer) -> None:
    body = b".starts with a dot\n..two dots\nbare LF line\r\nlast line without newline"
    with SmtpSender(server.config(), connections=1) as sender:
        [result] = sender.send_batch([message(1, body=body)])
    assert result.outcome is Outcome.sent
    [(_, raw)] = server.handler.messages
    assert raw.endswith(
        b".starts with a dot\r\n..two dots\r\nbare LF line\r\nlast line without newline\r\n"
    )
    assert b"\r\n" in raw and raw.count(b"\n") == raw.count(b"\r\n")


def test_stock_fixture_server_receives_a_batch(smtp_server: SmtpSink) -> None:
    batch = [message(i) for i in range(20)] + [message(20, "jürgen@bücher.example")]
    with SmtpSender(sink_config(smtp_server), connections=2) as sender:
        results = sender.send_batch(batch)
    assert {r.outcome for r in results} == {Outcome.sent}
    smtp_server.wait_for(21)
    assert sorted(smtp_server.recipients()) == sorted(m.recipient for m in batch)


# -- classification ---------------------------------------------------------------------------


def test_451_once_then_success_is_sent_once(smtp_server: SmtpSink) -> None:
    calls: Counter[str] = Counter()

    def flaky(address: str) -> str | None:
        calls[address] += 1
        if address == "lead3@example.com" and calls[address] == 1:
            return "451 4.3.0 try later"
        return None

    smtp_server.rcpt_hook = flaky
    with SmtpSender(sink_config(smtp_server), connections=2, backoff_base=FAST) as sender:
        results = by_key(sender.send_batch([message(i) for i in range(6)]))
    assert results[3].outcome is Outcome.sent
    assert calls["lead3@example.com"] == 2
    smtp_server.wait_for(6)
    assert Counter(smtp_server.recipients())["lead3@example.com"] == 1
    assert len(smtp_server.recipients()) == 6


def test_permanent_451_ends_as_retry_later_after_max_attempts(smtp_server: SmtpSink) -> None:
    calls: Counter[str] = Counter()

    def busy(address: str) -> str | None:
        calls[address] += 1
        return "451 4.3.0 try later" if address == "lead1@example.com" else None

    smtp_server.rcpt_hook = busy
    with SmtpSender(
        sink_config(smtp_server), connections=2, max_attempts=3, backoff_base=FAST
    ) as s:
        results = by_key(s.send_batch([message(i) for i in range(5)]))
    bad = results[1]
    assert (bad.outcome, bad.code, bad.hard_bounce) == (Outcome.retry_later, 451, False)
    assert bad.detail is not None and "try later" in bad.detail
    assert calls["lead1@example.com"] == 3
    assert all(results[k].outcome is Outcome.sent for k in (0, 2, 3, 4))


def test_550_511_is_rejected_as_hard_bounce_without_retry(smtp_server: SmtpSink) -> None:
    calls: Counter[str] = Counter()

    def unknown(address: str) -> str | None:
        calls[address] += 1
        return "550 5.1.1 no such user" if address == "ghost@example.com" else None

    smtp_server.rcpt_hook = unknown
    with SmtpSender(sink_config(smtp_server), connections=1, backoff_base=FAST) as sender:
        results = by_key(sender.send_batch([message(1, "ghost@example.com"), message(2)]))
    ghost = results[1]
    assert (ghost.outcome, ghost.code, ghost.hard_bounce) == (Outcome.rejected, 550, True)
    assert ghost.detail is not None and "5.1.1 no such user" in ghost.detail
    assert calls["ghost@example.com"] == 1
    # The connection was RSET and carried the next message.
    assert results[2].outcome is Outcome.sent
    smtp_server.wait_for(1)
    assert smtp_server.recipients() == ["lead2@example.com"]


@pytest.mark.parametrize(
    ("reply", "code"),
    [("552 5.3.4 message too big", 552), ("554 5.7.1 rejected by content policy", 554)],
)
def test_content_rejection_at_data_is_not_a_hard_bounce(
    smtp_server: SmtpSink, reply: str, code: int
) -> None:
    smtp_server.data_hook = lambda envelope: reply if "lead1@" in envelope.rcpt_tos[0] else None
    with SmtpSender(sink_config(smtp_server), connections=1, backoff_base=FAST) as sender:
        results = by_key(sender.send_batch([message(i) for i in range(3)]))
    assert (results[1].outcome, results[1].code, results[1].hard_bounce) == (
        Outcome.rejected,
        code,
        False,
    )
    assert results[0].outcome is results[2].outcome is Outcome.sent
    smtp_server.wait_for(2)
    assert sorted(smtp_server.recipients()) == ["lead0@example.com", "lead2@example.com"]


def test_rejections_in_both_modes(server: RecordingServer) -> None:
    server.handler.rcpt_hook = lambda a: "550 5.1.1 unknown" if a.startswith("ghost") else None
    server.handler.data_hook = lambda a: "552 5.3.4 too big" if a.startswith("big") else None
    batch = [message(1, "ghost@example.com"), message(2, "big@example.com"), message(3)]
    with SmtpSender(server.config(), connections=1, backoff_base=FAST) as sender:
        results = by_key(sender.send_batch(batch))
    assert (results[1].outcome, results[1].hard_bounce) == (Outcome.rejected, True)
    assert (results[2].outcome, results[2].hard_bounce) == (Outcome.rejected, False)
    assert results[3].outcome is Outcome.sent
    assert server.handler.recipients() == ["lead3@example.com"]
    assert server.handler.sessions == 1, "rejections do not cost a connection"


def test_sender_refused_is_never_a_hard_bounce(server: RecordingServer) -> None:
    server.handler.mail_hook = lambda a: "553 5.1.8 sender domain does not exist"
    with SmtpSender(server.config(), connections=1, backoff_base=FAST) as sender:
        [result] = sender.send_batch([message(1)])
    assert (result.outcome, result.code, result.hard_bounce) == (Outcome.rejected, 553, False)


def test_bad_envelope_is_rejected_and_the_batch_goes_on(server: RecordingServer) -> None:
    batch = [
        message(1, "evil@example.com\r\nRCPT TO:<victim@example.com>"),
        message(2, "ünïcode@example.com"),  # aiosmtpd does not offer SMTPUTF8
        message(3),
    ]
    with SmtpSender(server.config(), connections=1, backoff_base=FAST) as sender:
        results = by_key(sender.send_batch(batch))
    assert results[1].outcome is Outcome.rejected and not results[1].hard_bounce
    assert results[2].outcome is Outcome.rejected and "SMTPUTF8" in (results[2].detail or "")
    assert results[3].outcome is Outcome.sent
    assert server.handler.recipients() == ["lead3@example.com"]


# -- connection trouble -----------------------------------------------------------------------


def test_server_down_gives_retry_later_for_all_quickly() -> None:
    config = SmtpConfig("127.0.0.1", free_port(), "plain", timeout=2)
    started = time.monotonic()
    with SmtpSender(config, connections=4, max_attempts=3, backoff_base=0.05) as sender:
        results = sender.send_batch([message(i) for i in range(200)])
    elapsed = time.monotonic() - started
    assert len(by_key(results)) == 200
    assert {r.outcome for r in results} == {Outcome.retry_later}
    assert all("connect to 127.0.0.1" in (r.detail or "") for r in results)
    # 200 messages x 3 tries with backoff would take ~10 s: the batch gives up at once
    # when the server cannot be reached, after one message's worth of retries.
    assert elapsed < 3


class _Busy(socketserver.BaseRequestHandler):
    """Greets with 421 and hangs up: a server that refuses every session."""

    count = 0

    def handle(self) -> None:
        type(self).count += 1
        self.request.sendall(b"421 4.3.2 too busy, try later\r\n")


def test_refused_sessions_are_not_retried_per_message() -> None:
    _Busy.count = 0
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Busy) as tcp:
        thread = threading.Thread(target=tcp.serve_forever, args=(0.01,), daemon=True)
        thread.start()
        config = SmtpConfig("127.0.0.1", tcp.server_address[1], "plain")
        with SmtpSender(config, connections=4, max_attempts=3, backoff_base=FAST) as sender:
            results = sender.send_batch([message(i) for i in range(100)])
        tcp.shutdown()
    assert {(r.outcome, r.code) for r in results} == {(Outcome.retry_later, 421)}
    assert _Busy.count <= 4 * 3


def test_hang_up_after_data_is_unknown_and_never_resent(server: RecordingServer) -> None:
    dropped: Counter[str] = Counter()

    def drop_once(rcpt: str) -> bool:
        if rcpt in ("lead4@example.com", "lead7@example.com") and not dropped[rcpt]:
            dropped[rcpt] += 1
            return True
        return False

    server.handler.drop_hook = drop_once
    with SmtpSender(server.config(), connections=1, max_attempts=3, backoff_base=FAST) as sender:
        results = by_key(sender.send_batch([message(i) for i in range(10)]))
    # The server may have kept a message whose reply was lost: it is reported, not resent.
    assert {k for k, r in results.items() if r.outcome is Outcome.unknown} == {4, 7}
    assert all(r.outcome is Outcome.sent for k, r in results.items() if k not in (4, 7))
    assert sum(dropped.values()) == 2  # each was tried once only
    assert server.handler.recipients() == [
        f"lead{i}@example.com" for i in range(10) if i not in (4, 7)
    ]
    assert server.handler.sessions == 3  # the first one plus one per hang-up


def test_hang_up_after_data_is_not_retried(server: RecordingServer) -> None:
    tries: list[str] = []

    def hang_up(rcpt: str) -> bool:
        tries.append(rcpt)
        return rcpt == "lead1@example.com"

    server.handler.drop_hook = hang_up
    with SmtpSender(server.config(), connections=1, max_attempts=3, backoff_base=FAST) as sender:
        results = by_key(sender.send_batch([message(i) for i in range(3)]))
    assert results[1].outcome is Outcome.unknown
    assert tries.count("lead1@example.com") == 1
    assert "after end of DATA" in (results[1].detail or "")
    assert results[0].outcome is results[2].outcome is Outcome.sent
    assert server.handler.recipients() == ["lead0@example.com", "lead2@example.com"]


def test_421_drops_the_connection_and_reconnects(server: RecordingServer) -> None:
    count = Counter[str]()

    def shutting_down(address: str) -> str | None:
        count["mail"] += 1
        return "421 4.3.2 service shutting down" if count["mail"] == 3 else None

    server.handler.mail_hook = shutting_down
    with SmtpSender(server.config(), connections=1, backoff_base=FAST) as sender:
        results = by_key(sender.send_batch([message(i) for i in range(5)]))
    assert all(r.outcome is Outcome.sent for r in results.values())
    assert server.handler.recipients() == [f"lead{i}@example.com" for i in range(5)]
    assert server.handler.sessions == 2


def test_connection_closed_while_idle_is_reopened_for_free(server: RecordingServer) -> None:
    # max_attempts=1: the dead connection must not use up the message's only try.
    with SmtpSender(server.config(), connections=1, max_attempts=1) as sender:
        first = sender.send_batch([message(i) for i in range(4)])
        server.hang_up_all()
        second = sender.send_batch([message(i) for i in range(4, 8)])
    assert {r.outcome for r in first + second} == {Outcome.sent}
    assert server.handler.recipients() == [f"lead{i}@example.com" for i in range(8)]
    assert server.handler.sessions == 2


def test_failing_callback_does_not_stop_the_batch(
    server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(result: SendResult) -> None:
        if result.key == 2:
            raise RuntimeError("database is gone")

    with (
        caplog.at_level(logging.ERROR, logger="nurture.outbox.smtp_transport"),
        SmtpSender(server.config(), connections=1, on_result=explode) as sender,
    ):
        results = by_key(sender.send_batch([message(i) for i in range(5)]))
    assert all(r.outcome is Outcome.sent for r in results.values())
    assert len(server.handler.recipients()) == 5, "message 2 was not resent"
    assert "on_result failed for delivery 2" in caplog.text


@pytest.mark.parametrize("security", ["starttls", "ssl"])
def test_tls_never_falls_back_to_clear_text(server: RecordingServer, security: str) -> None:
    # The test server speaks plain SMTP only: no STARTTLS offered, no TLS handshake.
    config = SmtpConfig("127.0.0.1", server.port, security, timeout=5)  # type: ignore[arg-type]
    with SmtpSender(config, connections=2, backoff_base=FAST) as sender:
        results = sender.send_batch([message(i) for i in range(20)])
    assert {r.outcome for r in results} == {Outcome.retry_later}
    expected = "STARTTLS" if security == "starttls" else "TLS failed"
    assert all(expected in (r.detail or "") for r in results)
    assert server.handler.messages == []


# -- authentication ---------------------------------------------------------------------------


@pytest.fixture
def auth_server() -> Iterator[RecordingServer]:
    srv = RecordingServer(pipelining=False, auth=True)
    srv.controller.start()
    yield srv
    srv.controller.stop()


def test_auth_with_the_right_password_sends(auth_server: RecordingServer) -> None:
    config = auth_server.config(username="mailer", password=SecretStr(PASSWORD))
    with SmtpSender(config, connections=2) as sender:
        results = sender.send_batch([message(i) for i in range(10)])
    assert {r.outcome for r in results} == {Outcome.sent}
    assert auth_server.handler.logins == 2  # once per connection, not per message


def test_wrong_password_parks_the_batch_and_never_leaks(
    auth_server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "wr0ng-" + PASSWORD
    config = SmtpConfig.from_url(f"smtp://mailer:{wrong}@127.0.0.1:{auth_server.port}")
    with (
        caplog.at_level(logging.DEBUG),
        SmtpSender(config, connections=2, backoff_base=FAST) as sender,
    ):
        results = sender.send_batch([message(i) for i in range(50)])
    assert {(r.outcome, r.code) for r in results} == {(Outcome.retry_later, 535)}
    assert auth_server.handler.messages == []
    # A bad password will not get better by retrying each message.
    assert auth_server.handler.logins <= 2 * 3
    for text in [repr(r) for r in results] + [caplog.text, repr(sender), repr(config)]:
        assert wrong not in text
        assert PASSWORD not in text
