"""Cut a reply down to what its author wrote: no quoted original, no signature (B14).

Where the quoted original starts is found with mail-parser-reply's header
patterns ("On ... wrote:", "Am ... schrieb ...:", "Le ... a écrit :",
Outlook's "From: ... Sent: ..." block and "-----Original Message-----", in the
languages it knows), plus localised Outlook separators, `>` quoting and the
attribution line before it. HTML-only replies are cut with quotequail first.

What is deliberately not used from mail-parser-reply: its signature and
disclaimer heuristics. They cut at the first line starting with "Thanks,",
"- " (any bulleted list) or "Warning:", which would silently drop what an
agent wrote. Only the RFC 3676 separator "-- " and a trailing
"Sent from my ..." line count as a signature here. Lines are kept as
written (mail-parser-reply strips every line's indentation).
"""

from __future__ import annotations

import re

import quotequail
from mailparser_reply import EmailReplyParser
from mailparser_reply.constants import MAIL_LANGUAGES

from gateway.mail.html import html_to_text, sanitize_html

__all__ = ["strip_reply"]

# Polish is left out: its Outlook-header pattern fires on a single line
# starting with "Data:" or "Do:", which ordinary English text contains.
_LANGUAGES = [language for language in MAIL_LANGUAGES if language != "pl"]
# The reply-header pattern of every language, compiled once by the library.
_LIBRARY_HEADER = EmailReplyParser(languages=_LANGUAGES).read("").HEADER_REGEX
_SENT_FROM = "|".join(
    str(MAIL_LANGUAGES[language]["sent_from"])
    for language in _LANGUAGES
    if MAIL_LANGUAGES[language].get("sent_from")
)
_EXTRA_HEADER = re.compile(
    r"""^(?:>\s?)*(?:
        -{2,}\s*(?:original\s+message|urspr[üu]ngliche\s+nachricht|originalnachricht
            |message\s+d'origine|mensaje\s+original|messaggio\s+originale
            |oorspronkelijk\s+bericht|p[ůu]vodn[íi]\s+zpr[áa]va|ursprungligt\s+meddelande
            |alkuper[äa]inen\s+viesti|исходное\s+сообщение|оригинальное\s+сообщение)
            \s*-{2,}\s*$
    )""",
    re.I | re.X | re.M,
)
# An attribution line in a language the library does not cover, or one it
# missed because a client prefixed it ("--- On ... wrote:").
_ATTRIBUTION_WORD = re.compile(
    r"wrote|schrieb|[ée]crit|escribi[óo]|scritto|schreef|skrev|napsal|написал|napisa[łl]"
    r"|kirjoitti|yazd[\u0131i]|escreveu|写道|님이 작성|が書きました",
    re.I,
)
_MOBILE_FOOTER = re.compile(
    rf"^\s*(?:{_SENT_FROM}|Sent from (?:Mail|Outlook|Yahoo Mail)|Von meinem|Envoy[ée] de mon"
    r"|Enviado desde mi|Inviato dal mio|Skickat fr[åa]n min|Sendt fra min)\b.{0,80}$",
    re.I,
)
_FULLWIDTH_COLON = "\uff1a"  # CJK attribution lines end with it
_QUOTED = re.compile(r"^\s*>")
_SEPARATOR_LINE = re.compile(r"^\s*[_\-=*]{5,}\s*$")
_HTML_QUOTES = frozenset({"blockquote"})
# Bounds that keep the header patterns (some are quadratic in line length)
# fast on hostile input; a header past them simply is not found.
_PROBE_LINE = 200
_MAX_CANDIDATES = 400
_WINDOW = 8
_MAX_SIGNATURE_LINES = 20


def strip_reply(text: str, html: str | None = None) -> str:
    """The new text of a reply: quoted original and signature removed.

    `html` is used only when `text` is blank (HTML-only mail).
    """
    from_html = False
    if html and not text.strip():
        text, from_html = _text_from_html(html), True
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    lines = _cut(lines, depth=0)
    if from_html:
        # The blockquote it introduced is gone; the attribution is left over.
        lines = _drop_attribution(lines)
    lines = _drop_signature(lines)
    return "\n".join(lines).strip()


def _text_from_html(html: str) -> str:
    try:
        parts = quotequail.quote_html(html, quote_intro_line=True)
        shown = "".join(fragment for expanded, fragment in parts if expanded)
    except Exception:  # quotequail/lxml reject some markup; use all of it
        shown = html
    # What is left in a <blockquote> is quoted too (Gmail, Apple Mail and
    # Thunderbird quote that way); the attribution before it is cut later.
    return html_to_text(sanitize_html(shown, drop=_HTML_QUOTES))


def _cut(lines: list[str], depth: int) -> list[str]:
    header = _find_header(lines)
    if header is None:
        return _trim_quotes(lines)
    start, end = header
    before = lines[:start]
    if any(line.strip() and not _QUOTED.match(line) for line in before):
        # Top-posting: the reply is everything above the quote header.
        return _trim_quotes(_drop_attribution(before))
    # Bottom-posting or inline replies: the answer follows the quote.
    after = lines[end:]
    return _cut(after, depth + 1) if depth < 2 else _trim_quotes(after)


def _find_header(lines: list[str]) -> tuple[int, int] | None:
    """(first line, line after) of the first quote header, or None."""
    probe = [line.strip()[:_PROBE_LINE] for line in lines]
    candidates = 0
    for index, line in enumerate(probe):
        following = probe[index + 1] if index + 1 < len(probe) else ""
        if not (
            ":" in line
            or _FULLWIDTH_COLON in line
            or following.endswith(":")
            or line.startswith(("---", "___", ">"))
        ):
            continue
        candidates += 1
        if candidates > _MAX_CANDIDATES:
            return None
        window = "\n".join(probe[index : index + _WINDOW])
        match = _LIBRARY_HEADER.match(window) or _EXTRA_HEADER.match(window)
        if match and match.group(0).strip():
            consumed = window[: match.end()].rstrip("\n").count("\n") + 1
            return index, index + consumed
    return None


def _trim_quotes(lines: list[str]) -> list[str]:
    """Drop leading and trailing `>` quoted blocks (and an attribution before them)."""
    # Indices, not slices, so a long quote costs linear time, not quadratic.
    lines = _strip_blank(lines)
    end = len(lines)
    while end and _QUOTED.match(lines[end - 1]):
        end = _end_of_text(lines, end - 1)
        if not end or not _QUOTED.match(lines[end - 1]):
            end = _attribution_end(lines, end)
    start = 0
    while start < end and _QUOTED.match(lines[start]):
        start += 1
        while start < end and not lines[start].strip():
            start += 1
    return lines[start:end]


def _drop_attribution(lines: list[str]) -> list[str]:
    """Remove a trailing "On <date>, <someone> wrote:" the header patterns missed."""
    lines = _strip_blank(lines)
    return lines[: _attribution_end(lines, len(lines))]


def _attribution_end(lines: list[str], end: int) -> int:
    """Where `lines[:end]` ends without a trailing attribution line and blank lines."""
    end = _end_of_text(lines, end)
    if not end or not lines[end - 1].rstrip().endswith((":", _FULLWIDTH_COLON)):
        return end
    last = lines[end - 1]
    take = 1
    if end > 1 and lines[end - 2].strip():
        previous = lines[end - 2]
        # Clients wrap long attributions: "... <" / "bob@example.com> wrote:".
        if previous.count("<") > previous.count(">") or len(last.split()) <= 2:
            take = 2
    attribution = " ".join(lines[end - take : end])
    looks_like = _ATTRIBUTION_WORD.search(attribution) or (
        "@" in attribution and any(c.isdigit() for c in attribution)
    )
    return _end_of_text(lines, end - take) if looks_like else end


def _drop_signature(lines: list[str]) -> list[str]:
    lines = _strip_blank(lines)
    # RFC 3676 4.3: "-- " starts the signature; many clients drop the space.
    for index, line in enumerate(lines):
        if line.strip() == "--" and len(lines) - index <= _MAX_SIGNATURE_LINES:
            lines = _strip_blank(lines[:index])
            break
    end = len(lines)
    while end and _MOBILE_FOOTER.match(lines[end - 1]):
        end = _end_of_text(lines, end - 1)
    while end and _SEPARATOR_LINE.match(lines[end - 1]):
        end = _end_of_text(lines, end - 1)
    return lines[:end]


def _end_of_text(lines: list[str], end: int) -> int:
    """`end` moved back over the blank lines before it."""
    while end and not lines[end - 1].strip():
        end -= 1
    return end


def _strip_blank(lines: list[str]) -> list[str]:
    start, end = 0, len(lines)
    while start < end and not lines[start].strip():
        start += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return lines[start:end]
