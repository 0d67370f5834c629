"""Where one message's time goes in the intake writer (no SMTP, no client).

Feeds the same messages as bench/smtp_ingest.py straight to the intake in
batches of 16 (as a burst would; --batch 1 is a quiet daemon's case), on a
fresh SQLite database: prints the writer's time per message, and with
--profile the cProfile breakdown of the pipeline's own functions.

    .venv/bin/python bench/pipeline_profile.py [--messages 1000] [--batch 16] [--profile]

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from smtp_ingest import message, write_config

from gateway.config import load_settings
from gateway.daemon import App, freeze_startup_objects
from gateway.message import Channel, Inbound


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        app = App(load_settings(write_config(Path(tmp), 0), environ={}))
        raws = [message(i) for i in range(args.messages + args.warmup)]

        def run(batch: list[bytes]) -> None:
            for i in range(0, len(batch), args.batch):
                app.intake._process_batch([
                    Inbound(Channel.EMAIL, raw, dt.datetime.now(dt.UTC), "bench",
                            "user@users.test", ("help@helpdesk.test",))
                    for raw in batch[i:i + args.batch]])

        run(raws[:args.warmup])  # warm-up: caches, prepared statements
        freeze_startup_objects()  # as `helpdeskd run` does before it starts
        profile = cProfile.Profile() if args.profile else None
        t0, c0 = time.perf_counter(), time.thread_time()
        if profile:
            profile.enable()
        run(raws[args.warmup:])
        if profile:
            profile.disable()
        per = (time.perf_counter() - t0) / args.messages * 1000
        cpu = (time.thread_time() - c0) / args.messages * 1000
        print(f"{per:.2f} ms per message in the intake writer (batches of {args.batch}), "
              f"{cpu:.2f} ms of it CPU"
              f"{' (under cProfile: inflated)' if profile else ''}")
        if profile:
            stats = pstats.Stats(profile)
            stats.sort_stats("cumulative").print_stats(r"gateway/|orm/session.py.*\(flush\)", 25)
        app.engine.dispose()


if __name__ == "__main__":
    main()
