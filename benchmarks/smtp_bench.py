"""SMTP delivery throughput: ``SmtpSender`` against plain smtplib on the same connections.

Run: ``python -m benchmarks.smtp_bench --messages 10000 --connections 4 --sink smtp-sink``.

Both sides send the same prebuilt messages to the same sink over the same number of
connections, opened inside the timed section. The floor is plain smtplib: one thread per
connection calling ``sendmail`` in a loop. The target is ``SmtpSender`` >= 0.7x the floor.

Sinks: ``aiosmtpd`` (a separate Python process; it caps near 1k msg/s on a small machine,
which hides the client's cost) and ``smtp-sink`` (Postfix's fast C sink, from Debian's
``postfix`` package; it offers PIPELINING). ``--host/--port`` use a server already running.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import Any

from nurture.outbox.smtp_transport import Outcome, Outgoing, SmtpConfig, SmtpSender

FLOOR = 0.7
SENDER = "hello@nurture.example"
FIRST = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Margaret", "Linus", "Ken"]

_TEXT = """Hi {first},

Thanks for downloading our guide. Teams like yours cut their onboarding time
in half with a few simple habits; here are the three we see most often.

1. Write the playbook before the first hire.
2. Measure time to first value, not time to first login.
3. Ask every new customer one question in week one.

Read the full case study: https://track.nurture.example/c/{token}

Cheers,
The Nurture team

Unsubscribe: https://track.nurture.example/u/{token}
"""

_HTML = """<!doctype html><html><body style="font-family:sans-serif">
<p>Hi {first},</p>
<p>Thanks for downloading our guide. Teams like yours cut their onboarding time in
half with a few simple habits; here are the three we see most often.</p>
<ol><li>Write the playbook before the first hire.</li>
<li>Measure time to first value, not time to first login.</li>
<li>Ask every new customer one question in week one.</li></ol>
<p><a href="https://track.nurture.example/c/{token}">Read the full case study</a></p>
<p>Cheers,<br>The Nurture team</p>
<img src="https://track.nurture.example/o/{token}.gif" width="1" height="1" alt="">
<p style="font-size:small"><a href="https://track.nurture.example/u/{token}">Unsubscribe</a></p>
</body></html>
"""


def build_messages(count: int) -> list[Outgoing]:
    """``count`` small multipart/alternative messages (~2.5 kB), one per lead."""
    out = []
    for i in range(count):
        first = FIRST[i % len(FIRST)]
        rcpt = f"{first.lower()}.{i}@company{i % 997}.example.com"
        token = f"{i:08x}a1b2c3d4e5f6"
        msg = MIMEMultipart("alternative")
        msg["From"] = f"Nurture <{SENDER}>"
        msg["To"] = rcpt
        msg["Subject"] = f"{first}, three habits of fast-onboarding teams"
        msg["Message-ID"] = f"<delivery-{i}@nurture.example>"
        msg["List-Unsubscribe"] = (
            f"<mailto:unsubscribe@nurture.example?subject={token}>, "
            f"<https://track.nurture.example/u/{token}>"
        )
        msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        msg.attach(MIMEText(_TEXT.format(first=first, token=token), "plain", "utf-8"))
        msg.attach(MIMEText(_HTML.format(first=first, token=token), "html", "utf-8"))
        data = msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        out.append(Outgoing(key=i, sender=SENDER, recipient=rcpt, data=data))
    return out


def smtplib_floor(messages: Sequence[Outgoing], connections: int, host: str, port: int) -> float:
    """Seconds for plain smtplib: one thread per connection, ``sendmail`` in a loop."""
    shares = [messages[i::connections] for i in range(connections)]
    errors: list[BaseException] = []

    def work(share: Sequence[Outgoing]) -> None:
        try:
            with smtplib.SMTP(host, port, timeout=30) as conn:
                for m in share:
                    conn.sendmail(m.sender, [m.recipient], m.data)
        except BaseException as exc:  # reported below; the floor must not fail silently
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(share,)) for share in shares]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"smtplib floor failed: {errors[0]!r}")
    return elapsed


def sender_time(messages: Sequence[Outgoing], connections: int, host: str, port: int) -> float:
    """Seconds for ``SmtpSender.send_batch`` over the same number of fresh connections."""
    config = SmtpConfig(host=host, port=port, security="plain")
    sender = SmtpSender(config, connections=connections)
    started = time.perf_counter()
    results = sender.send_batch(messages)
    elapsed = time.perf_counter() - started
    sender.close()
    failed = [r for r in results if r.outcome is not Outcome.sent]
    if failed or len(results) != len(messages):
        raise RuntimeError(f"SmtpSender did not send everything: {failed[:3]}")
    return elapsed


def run(
    messages: int, connections: int, host: str, port: int, *, rounds: int = 2
) -> dict[str, Any]:
    """Time both senders on the same prebuilt messages; best of ``rounds`` each.

    Returns:
        msgs/s for plain smtplib and for ``SmtpSender``, their ratio and the floor.
    """
    batch = build_messages(messages)
    floor_s: list[float] = []
    ours_s: list[float] = []
    for _ in range(rounds):  # interleaved, so drift in the machine's load hits both
        floor_s.append(smtplib_floor(batch, connections, host, port))
        ours_s.append(sender_time(batch, connections, host, port))
    floor_rate = messages / min(floor_s)
    ours_rate = messages / min(ours_s)
    return {
        "messages": messages,
        "connections": connections,
        "smtplib_msgs_per_s": round(floor_rate, 1),
        "sender_msgs_per_s": round(ours_rate, 1),
        "ratio": round(ours_rate / floor_rate, 3),
        "floor": FLOOR,
        "ok": ours_rate / floor_rate >= FLOOR,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sink exited with {proc.returncode} (its stderr is above)")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"sink did not listen on 127.0.0.1:{port} within {timeout}s")


@contextmanager
def start_sink(kind: str) -> Iterator[tuple[str, int]]:
    """Start a sink in its own process on a free port; yield (host, port)."""
    port = _free_port()
    if kind == "smtp-sink":
        binary = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        if not os.path.exists(binary):
            raise SystemExit(
                "smtp-sink not found: install Debian's postfix package "
                "(DEBIAN_FRONTEND=noninteractive apt-get install -y postfix)"
            )
        # -u: as root it must drop privileges; 1000: listen backlog.
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        cmd = [binary, *user, f"127.0.0.1:{port}", "1000"]
    elif kind == "aiosmtpd":
        cmd = [sys.executable, "-m", "aiosmtpd", "-n", "-c", "aiosmtpd.handlers.Sink"]
        cmd += ["-l", f"127.0.0.1:{port}"]
    else:
        raise SystemExit(f"unknown sink {kind!r}: use aiosmtpd or smtp-sink")
    # stderr is inherited: a pipe nobody reads could fill up and stall the sink mid-run.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        _wait_listening(port, proc)
        yield "127.0.0.1", port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point; prints a table, or JSON with ``--json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--sink", choices=["aiosmtpd", "smtp-sink"], default="smtp-sink")
    parser.add_argument("--host", help="use a running server instead of starting a sink")
    parser.add_argument("--port", type=int)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.host:
        result = run(
            args.messages, args.connections, args.host, args.port or 25, rounds=args.rounds
        )
        result["sink"] = f"{args.host}:{args.port}"
    else:
        with start_sink(args.sink) as (host, port):
            result = run(args.messages, args.connections, host, port, rounds=args.rounds)
        result["sink"] = args.sink
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"delivery to {result['sink']}: {result['messages']} messages, "
        f"{result['connections']} connections\n"
        f"  plain smtplib : {result['smtplib_msgs_per_s']:>9.1f} msg/s (floor)\n"
        f"  SmtpSender    : {result['sender_msgs_per_s']:>9.1f} msg/s  "
        f"ratio {result['ratio']:.2f}x (target >= {FLOOR}x) "
        f"{'OK' if result['ok'] else 'BELOW TARGET'}"
    )


if __name__ == "__main__":
    main()
