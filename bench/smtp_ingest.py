"""SMTP ingest throughput and latency: helpdeskd on SQLite versus a bare aiosmtpd server.

Starts, in separate processes, (1) `helpdeskd run` on a fresh SQLite database in
a temporary directory, its outbound mail going to a counting aiosmtpd smarthost
(`--maildir`: to a maildir, the demo default), so acknowledgements and
notifications are really composed, committed and delivered, and (2) a bare
aiosmtpd server that only counts messages: the ceiling of this machine for the
same client. Then, against each: a paced run at a fixed rate (p50/p99 from DATA to
the final reply), and N messages over K concurrent connections (messages/second,
p50/p99, and each server process's CPU time per message during that burst).

Under a burst helpdeskd answers 250 once a message is committed to its spool and
makes the ticket after the burst ([smtp] burst_queue_seconds; docs/design.md,
"Accept first under a burst"): the bench counts the replies that say "queued"
and prints when the burst's tickets all existed and when its mail was all
delivered. `--burst-queue 0` runs without the spool.

    .venv/bin/python bench/smtp_ingest.py [--messages 2000] [--concurrency 8] [--rate 100]
                                          [--seconds 10] [--maildir] [--burst-hold 10]
                                          [--burst-queue 10]

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib

BARE_SERVER = """
import asyncio, sys
from aiosmtpd.smtp import SMTP
class Count:
    n = 0
    async def handle_DATA(self, server, session, envelope):
        Count.n += 1
        return "250 OK"
async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(Count(), loop=loop), "127.0.0.1",
                                      int(sys.argv[1]))
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def message(i: int) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"User {i % 50} <user{i % 50}@users.test>"
    msg["To"] = "help@helpdesk.test"
    msg["Subject"] = f"Benchmark request {i}: cannot access the catalogue"
    msg["Message-ID"] = f"<bench-{i}-{time.time_ns()}@users.test>"
    msg["Date"] = "Fri, 27 Nov 2026 10:00:00 +0000"
    msg.set_content("Hello,\n\n" + "I cannot access the service since this morning.\n" * 20)
    return msg.as_bytes()


async def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            await w.wait_closed()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


class Replies:
    """Latencies from DATA to the final reply, and how many replies said "queued"."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.queued = 0


async def worker(port: int, jobs: asyncio.Queue[bytes | None], replies: Replies) -> None:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=60)
    await client.connect()
    await client.ehlo()
    while (raw := await jobs.get()) is not None:
        await client.mail("user@users.test")
        await client.rcpt("help@helpdesk.test")
        t0 = time.perf_counter()
        reply = await client.data(raw)
        replies.latencies.append(time.perf_counter() - t0)
        replies.queued += "queued" in reply.message
    await client.quit()


async def burst(port: int, n: int, k: int) -> tuple[float, Replies]:
    jobs: asyncio.Queue[bytes | None] = asyncio.Queue()
    for i in range(n):
        jobs.put_nowait(message(i))
    for _ in range(k):
        jobs.put_nowait(None)
    replies = Replies()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(port, jobs, replies) for _ in range(k)))
    return n / (time.perf_counter() - t0), replies


async def paced(port: int, rate: float, seconds: float) -> Replies:
    """Open-loop load: a new message every 1/rate s on a pool of connections."""
    n = int(rate * seconds)
    jobs: asyncio.Queue[bytes | None] = asyncio.Queue()
    replies = Replies()
    workers = [asyncio.create_task(worker(port, jobs, replies)) for _ in range(16)]
    start = time.perf_counter()
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        jobs.put_nowait(message(100_000 + i))
    for _ in workers:
        jobs.put_nowait(None)
    await asyncio.gather(*workers)
    return replies


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))] * 1000


def write_config(directory: Path, port: int, smarthost_port: int | None = None,
                 burst_hold: float = 10.0, burst_queue: float = 10.0) -> Path:
    (directory / "rules").mkdir()
    (directory / "rules" / "10.yaml").write_text(
        "rules:\n  - name: catalogue\n    when: {subject: {contains: catalogue}}\n"
        "    then: {group: Catalogue Support}\n")
    config = directory / "helpdeskd.toml"
    config.write_text(f"""
[daemon]
data_dir = "var"
secret = "bench-secret-0123456789"
log_level = "WARNING"
message_id_domain = "helpdesk.test"
[smtp]
port = {port}
burst_queue_seconds = {burst_queue:g}
[outbound]
maildir = "var/outbound"
auto_mail_per_hour = 1000000
burst_hold_seconds = {burst_hold:g}
{'smarthost = "127.0.0.1"' + chr(10) + f'port = {smarthost_port}' if smarthost_port else ''}
[[inbound]]
address = "help@helpdesk.test"
default_group = "First Line"
[[agents]]
address = "alice@agents.test"
[[agents]]
address = "bob@agents.test"
[[groups]]
name = "First Line"
agents = ["alice@agents.test"]
[[groups]]
name = "Catalogue Support"
agents = ["bob@agents.test"]
""")
    return config


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def emptied(database: Path, query: str, t0: float) -> float:
    """Seconds from `t0` until `query` (a count) says 0: polled, every 50 ms."""
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        while db.execute(query).fetchone()[0]:
            await asyncio.sleep(0.05)
    finally:
        db.close()
    return time.perf_counter() - t0


# The burst's messages that wait for their tickets (the daemon makes them after the
# burst), and its acknowledgements and notifications still to go out (the outbox
# holds back while the intake is saturated).
SPOOLED = "SELECT count(*) FROM spool"
UNSENT = "SELECT count(*) FROM outbox WHERE state = 'pending'"


async def measure(label: str, port: int, args: argparse.Namespace,
                  processes: dict[str, int], database: Path | None = None,
                  ) -> dict[str, float]:
    await wait_port(port)
    await burst(port, 50, 2)  # warm-up
    if database is not None:  # the paced run starts on a daemon with nothing left to do
        now = time.perf_counter()
        await emptied(database, SPOOLED, now)
        await emptied(database, UNSENT, now)
    # Paced first: after the burst the daemon's outbox would still be delivering the
    # burst's thousands of notifications, and the paced figure would measure that.
    slow = await paced(port, args.rate, args.seconds)
    before = {name: cpu_seconds(pid) for name, pid in processes.items()}
    rate, fast = await burst(port, args.messages, args.concurrency)
    # CPU spent while the burst ran, per message (what a ceiling is made of).
    cpu_ms = {name: (cpu_seconds(pid) - before[name]) / args.messages * 1000
              for name, pid in processes.items()}
    result = {
        "msgs_per_s": rate, "burst_p50_ms": pct(fast.latencies, 50),
        "burst_p99_ms": pct(fast.latencies, 99),
        f"paced_{args.rate:g}_p50_ms": pct(slow.latencies, 50),
        f"paced_{args.rate:g}_p99_ms": pct(slow.latencies, 99),
        **{f"burst_cpu_ms_per_msg_{name}": ms for name, ms in cpu_ms.items()},
    }
    if database is not None:
        end = time.perf_counter()
        result["burst_queued"] = fast.queued
        result["paced_queued"] = slow.queued
        result["tickets_made_after_burst_s"] = await emptied(database, SPOOLED, end)
        result["outbox_drained_after_burst_s"] = await emptied(database, UNSENT, end)
    print(f"{label:<28} {rate:8.1f} msg/s   burst p50 {result['burst_p50_ms']:6.1f} ms "
          f"p99 {result['burst_p99_ms']:6.1f} ms   at {args.rate:g}/s p50 "
          f"{result[f'paced_{args.rate:g}_p50_ms']:6.1f} ms "
          f"p99 {result[f'paced_{args.rate:g}_p99_ms']:6.1f} ms", flush=True)
    print(f"{'':<28} CPU per message during the burst: " + ", ".join(
        f"{name} {ms:.2f} ms" for name, ms in cpu_ms.items()), flush=True)
    if database is not None:
        print(f"{'':<28} answered 250 from the spool: {fast.queued} of the burst's "
              f"{args.messages}, {slow.queued} of the paced run's "
              f"{int(args.rate * args.seconds)}", flush=True)
        print(f"{'':<28} the burst's tickets all made "
              f"{result['tickets_made_after_burst_s']:.1f} s and its "
              f"{2 * args.messages} outbound mails all delivered "
              f"{result['outbox_drained_after_burst_s']:.1f} s after its last reply",
              flush=True)
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--maildir", action="store_true",
                        help="outbound mail to a maildir instead of a smarthost")
    parser.add_argument("--burst-hold", type=float, default=10.0, metavar="SECONDS",
                        help="[outbound] burst_hold_seconds (0: deliver during the burst)")
    parser.add_argument("--burst-queue", type=float, default=10.0, metavar="SECONDS",
                        help="[smtp] burst_queue_seconds (0: every ticket made before its 250)")
    args = parser.parse_args()
    print(f"{args.messages} messages over {args.concurrency} connections; then "
          f"{args.rate:g} msg/s for {args.seconds:g} s; {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        bare_port, hd_port = free_port(), free_port()
        bare = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(bare_port)],
                                stdout=subprocess.DEVNULL)
        try:
            ceiling = await measure("bare aiosmtpd (counts only)", bare_port, args,
                                    {"server": bare.pid})
        finally:
            bare.terminate()
            bare.wait()
        # The daemon's own mail goes to a smarthost (another counting aiosmtpd), as in
        # production; --maildir measures the demo default (an fsync'd file per message).
        smarthost_port = free_port()
        smarthost = subprocess.Popen(
            [sys.executable, "-c", BARE_SERVER, str(smarthost_port)], stdout=subprocess.DEVNULL)
        config = write_config(Path(tmp), hd_port, None if args.maildir else smarthost_port,
                              args.burst_hold, args.burst_queue)
        daemon = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "--config", str(config), "run"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            label = "helpdeskd (SQLite, maildir)" if args.maildir else "helpdeskd (SQLite)"
            processes = {"helpdeskd": daemon.pid}
            if not args.maildir:
                processes["smarthost"] = smarthost.pid
            ours = await measure(label, hd_port, args, processes,
                                 Path(tmp) / "var" / "helpdeskd.sqlite3")
        finally:
            daemon.terminate()
            daemon.wait()
            smarthost.terminate()
            smarthost.wait()
    print(f"ratio: {ours['msgs_per_s'] / ceiling['msgs_per_s']:.1%} of the bare server's rate")
    print(json.dumps({"bare": ceiling, "helpdeskd": ours}, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
