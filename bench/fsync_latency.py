"""How long this disk takes to make a write durable: the floor under every acknowledgement.

helpdeskd answers SMTP `250` only after the message's transaction is committed,
and a commit in SQLite's WAL mode with `synchronous=FULL` ends with an fsync of the
WAL file (PostgreSQL's commit does the same to its WAL). So the daemon's latency can
be no better than the disk's fsync latency, and a disk whose fsync now and then
stalls for hundreds of milliseconds holds every message queued behind it for as
long. This script appends 16 KiB and fsyncs, about 100 times a second (the paced
rate of bench/smtp_ingest.py), in the directory given (default: the current one,
where `var/` usually lives), and prints the distribution.

    .venv/bin/python bench/fsync_latency.py [--seconds 20] [--dir var]

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--dir", default=".")
    parser.add_argument("--interval", type=float, default=0.01,
                        help="pause between fsyncs, in seconds (0.01: about 100/s)")
    args = parser.parse_args()
    fd, path = tempfile.mkstemp(prefix="fsync-", dir=args.dir)
    latencies: list[float] = []
    try:
        end = time.perf_counter() + args.seconds
        block = b"x" * 16384
        while time.perf_counter() < end:
            os.write(fd, block)
            t0 = time.perf_counter()
            os.fsync(fd)
            latencies.append(time.perf_counter() - t0)
            time.sleep(args.interval)
    finally:
        os.close(fd)
        os.unlink(path)
    latencies.sort()
    n = len(latencies)

    def ms(q: float) -> float:
        return latencies[min(n - 1, int(q * n))] * 1000

    slow = sum(1 for x in latencies if x > 0.05)
    print(f"{n} fsyncs of 16 KiB appends in {args.dir!r} over {args.seconds:g} s")
    print(f"p50 {ms(0.5):.2f} ms  p99 {ms(0.99):.2f} ms  p99.9 {ms(0.999):.2f} ms  "
          f"max {latencies[-1] * 1000:.2f} ms  over 50 ms: {slow}")


if __name__ == "__main__":
    main()
