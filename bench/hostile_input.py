"""CPU cliffs on hostile input: how long the intake writer spends on one crafted message part.

Each case is input that once took seconds on the writer thread (quadratic regular
expressions, list slicing or parser behaviour) and is now linear. The writer runs
one message at a time, so a cliff there holds up every message behind it: these
figures should stay in milliseconds.

    .venv/bin/python bench/hostile_input.py

Prints figures; asserts nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.mail.html import html_to_text, sanitize_html
from gateway.mail.parse import parse_mail
from gateway.mail.quotes import strip_reply


def mail(headers: str, body: str = "Hello\n") -> bytes:
    return (f"From: a@users.test\nTo: help@helpdesk.test\nMessage-ID: <x@users.test>\n"
            f"{headers}\n\n{body}").encode()


CASES: list[tuple[str, Callable[[], object], int]] = []


def case(name: str, size: int) -> Callable[[Callable[[], object]], Callable[[], object]]:
    def register(fn: Callable[[], object]) -> Callable[[], object]:
        CASES.append((name, fn, size))
        return fn
    return register


COMMENTS = "<!--" * 80_000
BLANKS = "<pre>" + "x" + " \n" * 40_000 + "</pre>"
WORDS = " ".join(["=?utf-8?q?a?="] * 20_000)
QUOTES = ">\n" * 40_000
FOOTERS = "Answer\n" + "Sent from my iPhone\n" * 10_000
RULES = "Answer\n" + "-----\n" * 20_000


@case("HTML: runs of '<!--' (sanitise + to text)", len(COMMENTS))
def comments() -> object:
    return html_to_text(sanitize_html(COMMENTS))


@case("HTML: blank lines in <pre> (to text)", len(BLANKS))
def blanks() -> object:
    return html_to_text(BLANKS)


@case("header: adjacent encoded words (parse)", len(WORDS))
def words() -> object:
    return parse_mail(mail(f"Subject: {WORDS}"))


@case("reply: lines of '>' only (strip quotes)", len(QUOTES))
def quotes() -> object:
    return strip_reply("Answer\n" + QUOTES)


@case("reply: repeated mobile footers", len(FOOTERS))
def footers() -> object:
    return strip_reply(FOOTERS)


@case("reply: repeated separator lines", len(RULES))
def rules() -> object:
    return strip_reply(RULES)


def main() -> None:
    for name, fn, size in CASES:
        best = min(_timed(fn) for _ in range(3))
        print(f"{name:<48} {size / 1024:7.0f} KiB {best * 1000:9.1f} ms")


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
