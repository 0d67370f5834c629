"""strip_reply: the new text of a reply, without the quoted original or signature (B14).

The talon fixtures (shared/corpus/mail/talon) are checked against the reply
text talon's own tests expect, compared after stripping whitespace:

- TALON_MATCHES: our output equals talon's expected text.
- TALON_SIGNATURE_DIFFERS: talon keeps the author's signature in the reply,
  we remove it (B14 says the relayed reply has its signature removed). For
  these the test asserts what we return *and* that it is exactly talon's
  expected text with the signature block cut off, so any other difference
  still fails.
- reply-quotations-share-block has no expected text; talon's test asks for a
  non-empty reply without the quoted "From" header, and so does this one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.mail.parse import parse_mail
from gateway.mail.quotes import strip_reply

TALON = Path(__file__).resolve().parents[2].parent / "shared" / "corpus" / "mail" / "talon"

TALON_MATCHES = [
    "standard_replies__android",
    "standard_replies__aol",
    "standard_replies__apple_mail",
    "standard_replies__apple_mail_2",
    "standard_replies__comcast",
    "standard_replies__gmail",
    "standard_replies__hotmail",
    "standard_replies__outlook",
    "standard_replies__thunderbird",
    "standard_replies__yahoo",
]

TALON_SIGNATURE_DIFFERS = {
    # Expected "Hello\n\nSent from my iPhone": talon keeps the mobile footer,
    # which we treat as a signature.
    "standard_replies__iphone": "Hello",
    # Expected "Hello \n\n-- \nxxx\nSent with Sparrow (...)": talon keeps the
    # "-- " signature block (RFC 3676 4.3), which we cut.
    "standard_replies__sparrow": "Hello",
}


def talon_text(name: str) -> str:
    return parse_mail((TALON / f"{name}.eml").read_bytes()).text


def talon_expected(name: str) -> str:
    return (TALON / f"{name}.expected.txt").read_text(encoding="utf-8").strip()


def test_every_talon_case_is_listed() -> None:
    names = {path.name.removesuffix(".expected.txt") for path in TALON.glob("*.expected.txt")}
    assert names == set(TALON_MATCHES) | set(TALON_SIGNATURE_DIFFERS)


@pytest.mark.parametrize("name", TALON_MATCHES)
def test_talon_matches(name: str) -> None:
    assert strip_reply(talon_text(name)).strip() == talon_expected(name)


@pytest.mark.parametrize(("name", "ours"), sorted(TALON_SIGNATURE_DIFFERS.items()))
def test_talon_signature_differs(name: str, ours: str) -> None:
    got = strip_reply(talon_text(name)).strip()
    assert got == ours
    expected = talon_expected(name)
    assert expected.startswith(ours)
    # What talon keeps beyond our text is only the signature block.
    tail = expected[len(ours) :].strip()
    assert tail.startswith(("-- ", "--\n", "Sent from my"))


def test_talon_share_block() -> None:
    got = strip_reply(talon_text("reply-quotations-share-block"))
    assert got
    assert "From" not in got
    assert got.startswith("Hi Katharine.")
    assert got.endswith("Joe XXX")


# The fixtures with an HTML part whose content matches the text part. (The
# outlook fixture's HTML part is a different message, "Allo! Follow up MIME!";
# the others have no HTML part.)
TALON_HTML = [
    "standard_replies__android",
    "standard_replies__aol",
    "standard_replies__comcast",
    "standard_replies__gmail",
    "standard_replies__hotmail",
    "standard_replies__sparrow",
]


@pytest.mark.parametrize("name", TALON_HTML)
def test_talon_html_parts_give_the_reply_too(name: str) -> None:
    html = parse_mail((TALON / f"{name}.eml").read_bytes()).html
    assert html is not None
    assert strip_reply("", html) == "Hello"


# --- hand-written replies ---------------------------------------------------------------

CASES = {
    "gmail": (
        "Thanks, that fixed it.\n\nOn Mon, Apr 2, 2012 at 6:26 PM, Megan One <megan@example.com>\n"
        "wrote:\n\n> Please restart the printer.\n> \n> Megan\n",
        "Thanks, that fixed it.",
    ),
    "outlook": (
        "Done.\r\n\r\n-----Original Message-----\r\nFrom: Help <help@example.com>\r\n"
        "Sent: Monday, June 3, 2024 9:00 AM\r\nTo: Bob\r\nSubject: Printer\r\n\r\nRestart it.\r\n",
        "Done.",
    ),
    "outlook-underscores": (
        "Done.\n\n________________________________\nFrom: Help <help@example.com>\n"
        "Sent: Monday, June 3, 2024 9:00 AM\nTo: Bob\nSubject: Printer\n\nRestart it.\n",
        "Done.",
    ),
    "apple-mail": (
        "Yes please.\n\n> On 3 Jun 2024, at 09:00, Help <help@example.com> wrote:\n"
        ">\n> Shall we?\n",
        "Yes please.",
    ),
    "thunderbird-bottom-post": (
        "On 03/06/2024 09:00, Help wrote:\n> Shall we?\nYes please.\n",
        "Yes please.",
    ),
    "german-outlook": (
        "Erledigt.\n\nVon: Support <help@example.com>\nGesendet: Montag, 3. Juni 2024 09:00\n"
        "An: Bob\nBetreff: Drucker\n\nBitte neu starten.\n",
        "Erledigt.",
    ),
    "german-attribution": (
        "Danke!\n\nAm 03.06.2024 um 09:00 schrieb Support <help@example.com>:\n"
        "> Bitte neu starten.\n",
        "Danke!",
    ),
    "german-separator": (
        "Erledigt.\n\n-----Ursprüngliche Nachricht-----\nVon: Support\nalt\n",
        "Erledigt.",
    ),
    "french-attribution": (
        "Merci.\n\nLe lun. 3 juin 2024 à 09:00, Support <help@example.com> a écrit :\n"
        "> Redémarrez.\n",
        "Merci.",
    ),
    "french-separator": (
        "Merci.\n\n-----Message d'origine-----\nDe : Support\nredémarrez\n",
        "Merci.",
    ),
    "plain-quoting": ("Agreed.\n\n> earlier text\n> more\n", "Agreed."),
    "signature": ("It works now.\n\n-- \nBob Smith\nACME Corp\n", "It works now."),
    "signature-without-space": ("It works now.\n\n--\nBob\n", "It works now."),
    "mobile-footer": ("It works.\n\nSent from my iPhone\n", "It works."),
    "mobile-footer-german": ("Geht.\n\nVon meinem iPhone gesendet\n\n> alt\n", "Geht."),
    "all-quoted": ("> nothing new\n> at all\n", ""),
    "empty": ("", ""),
}


@pytest.mark.parametrize(("text", "expected"), CASES.values(), ids=list(CASES))
def test_replies(text: str, expected: str) -> None:
    assert strip_reply(text) == expected


def test_author_content_is_not_mistaken_for_a_signature() -> None:
    text = (
        "Steps:\n- restart the spooler\n- print a test page\n\n"
        "Thanks, I will check tomorrow.\nWarning: the old driver is broken.\n\n"
        "    indented code stays indented\nBest regards,\nBob"
    )
    assert strip_reply(text) == text


def test_inline_replies_keep_their_context() -> None:
    text = "On Mon, Help wrote:\n> Question one?\nAnswer one.\n> Question two?\nAnswer two.\n> bye"
    assert strip_reply(text) == "Answer one.\n> Question two?\nAnswer two."


def test_dashes_in_the_middle_of_a_long_text_are_not_a_signature() -> None:
    body = "\n".join(f"line {i}" for i in range(30))
    text = f"Intro\n--\n{body}"
    assert strip_reply(text) == text


def test_html_only_reply_uses_quotequail() -> None:
    html = (
        "<div>Yes, go ahead.</div><div><br></div>"
        '<div class="gmail_quote">On Mon, Jun 3, 2024 at 9:00 AM Help &lt;help@example.com&gt; '
        "wrote:<br><blockquote>Shall we?</blockquote></div>"
    )
    assert strip_reply("", html) == "Yes, go ahead."
    assert strip_reply("  \n", html) == "Yes, go ahead."
    # Text wins when there is any.
    assert strip_reply("plain wins", html) == "plain wins"


def test_html_blockquote_with_unknown_attribution_language() -> None:
    html = "<p>Да.</p><p>03.06.2024 9:00 Help &lt;help@example.com&gt; написал:</p>" + (
        "<blockquote>Вопрос?</blockquote>"
    )
    assert strip_reply("", html) == "Да."


def test_hostile_input_finishes() -> None:
    text = "Reply\n" + ("On " + "a b " * 60 + ":\n") * 3000 + "x" * 100_000
    assert strip_reply(text).startswith("Reply")


def test_long_runs_of_quotes_footers_and_rules_are_all_cut() -> None:
    # Each of these once cost quadratic time (bench/hostile_input.py times them).
    assert strip_reply("Answer\n\n" + ">\n" * 20_000) == "Answer"
    assert strip_reply(">\n" * 20_000 + "\nAnswer") == "Answer"
    assert strip_reply("Answer\n" + "Sent from my iPhone\n\n" * 5_000) == "Answer"
    assert strip_reply("Answer\n" + "-----\n" * 20_000) == "Answer"
    assert strip_reply("Answer\n> q\nOn 1 Jan 2026, bob@users.test wrote:\n> q\n") == "Answer"
