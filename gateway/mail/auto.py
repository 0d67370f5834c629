"""Recognise mail no person wrote: auto-replies, bulk mail, bounces, our own mail.

Pure functions over a `ParsedMail` (and the envelope sender):
`classify` says whether a message is automatic and why (B17), `is_loop`
whether it is the daemon's own mail coming back (B19), and `parse_report`
reads a delivery or read report (RFC 3464 DSN, RFC 8098 MDN) so it can be
filed on its ticket (B18). None of them raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from gateway.message import Attachment, ParsedMail

__all__ = ["AutoInfo", "Report", "classify", "is_loop", "parse_report"]


@dataclass(frozen=True, slots=True)
class AutoInfo:
    """Whether a message is automatic; `reasons` name every rule that matched."""

    is_automatic: bool
    reasons: tuple[str, ...]
    is_report: bool


ReportKind = Literal["delivery-status", "disposition", "other"]


@dataclass(frozen=True, slots=True)
class Report:
    """What a delivery/read report says about the message it reports on."""

    kind: ReportKind
    original_message_ids: tuple[str, ...]
    statuses: tuple[str, ...]
    failed_recipients: tuple[str, ...]
    permanent: bool
    summary: str


_TOKEN = re.compile(r"\s*([A-Za-z0-9_.-]+)")
_MIME_TYPE = re.compile(r"\s*([A-Za-z0-9_.+-]+/[A-Za-z0-9_.+-]+)")
_PRECEDENCE_AUTOMATIC = frozenset({"bulk", "junk", "list"})
_SUPPRESS_AUTOMATIC = frozenset({"all", "oof", "autoreply"})
_DAEMON_LOCAL_PARTS = frozenset({"mailer-daemon", "postmaster"})
_DAEMON_NAME = re.compile(r"(?:^|[\s<\"'(])(mailer-daemon|postmaster)(?:$|[\s>@\"')])", re.I)
# Subjects auto-responders write (Exchange/Outlook, Gmail, Zimbra, Apple,
# Lotus Notes ...), in the languages seen in practice. Anchored at the start
# except for the phrases no person puts in the middle of a subject.
_AUTO_SUBJECT = re.compile(
    r"""^\s*(?:
        auto(?:matic)?[\s-]*(?:reply|response|respons|antwort)\b
      | autoreply\b
      | auto\s*:
      | automatische\s+antwort\b
      | automatisch\s+antwoord\b
      | r[ée]ponse\s+automatique\b
      | respuesta\s+autom[áa]tica\b
      | risposta\s+automatica\b
      | resposta\s+autom[áa]tica\b
      | autosvar\b
      | automatisk\s+svar\b
      | out\s+of\s+(?:the\s+)?office\s*(?:$|[:(\-]|auto)
      | abwesenheitsnotiz\b
    )
    | \bis\s+out\s+of\s+the\s+office\b
    | \babwesenheitsnotiz\b
    """,
    re.I | re.X,
)


def _first_token(value: str | None) -> str:
    if value is None:
        return ""
    match = _TOKEN.match(value)
    return match.group(1).lower() if match else ""


def _content_type(mail: ParsedMail) -> str:
    match = _MIME_TYPE.match(mail.header("Content-Type") or "")
    return match.group(1).lower() if match else ""


def classify(mail: ParsedMail, mail_from: str | None) -> AutoInfo:
    """B17: is `mail` automatic? `mail_from` is the envelope sender ("" for `<>`).

    `mail_from=None` means no envelope is known (e.g. IMAP) and counts as nothing.
    """
    reasons: list[str] = []
    for value in mail.header_all("Auto-Submitted"):
        # RFC 3834 5: anything but "no" is automatic.
        keyword = _first_token(value)
        if keyword and keyword != "no":
            reasons.append(f"auto-submitted:{keyword}")
    for value in mail.header_all("Precedence"):
        token = _first_token(value)
        if token in _PRECEDENCE_AUTOMATIC:
            reasons.append(f"precedence:{token}")
    if mail.header("X-Autoreply") is not None:
        reasons.append("x-autoreply")
    if mail.header("X-Autorespond") is not None:
        reasons.append("x-autorespond")
    # iCloud's vacation responder sends no Auto-Submitted, only its own header.
    if (mail.header("X-Apple-Action") or "").strip().lower() == "vacation":
        reasons.append("x-apple-action:vacation")
    for value in mail.header_all("X-Auto-Response-Suppress"):
        # [MS-OXCMAIL] 2.1.3.2.20: a comma-separated list of flags.
        flags = {flag.strip().lower() for flag in value.split(",")}
        hit = sorted(flags & _SUPPRESS_AUTOMATIC)
        if hit:
            reasons.append(f"x-auto-response-suppress:{','.join(hit)}")
    if mail_from == "":
        # RFC 5321 4.5.5: notifications are sent with the null reverse-path.
        reasons.append("null-sender")
    ctype = _content_type(mail)
    is_report = ctype in ("multipart/report", "message/delivery-status") or ctype == (
        "message/disposition-notification"
    )
    if is_report:
        reasons.append(f"content-type:{ctype}")
    if mail.header("List-Id") is not None:
        reasons.append("list-id")
    if mail.header("List-Unsubscribe") is not None:
        reasons.append("list-unsubscribe")
    daemon = _daemon_sender(mail, mail_from)
    if daemon:
        reasons.append(f"sender:{daemon}")
    if any(_is_null_path(value) for value in mail.header_all("Return-Path")):
        reasons.append("return-path:null")
    automatic = bool(reasons)
    # The subject is only a hint, recorded but not decisive: real auto-responders
    # (Exchange, Gmail, Zimbra) also send the headers above, while a person may well
    # write "Out of office: setting lost" and must then get an acknowledgement (B6)
    # and reopen their ticket (B10), as B17 defines "automatic" by headers alone.
    if _AUTO_SUBJECT.search(mail.subject):
        reasons.append("hint:subject-auto-reply")
    return AutoInfo(is_automatic=automatic, reasons=tuple(reasons), is_report=is_report)


def _daemon_sender(mail: ParsedMail, mail_from: str | None) -> str | None:
    candidates = []
    if mail.sender is not None:
        candidates.append(mail.sender.address)
    if mail_from:
        candidates.append(mail_from)
    for address in candidates:
        local = address.rpartition("@")[0].strip('"').lower()
        if local in _DAEMON_LOCAL_PARTS:
            return local
    if mail.sender is None:
        # "From: MAILER-DAEMON" without a domain is not a usable address, but says it all.
        match = _DAEMON_NAME.search(mail.header("From") or "")
        if match:
            return match.group(1).lower()
    return None


def _is_null_path(value: str) -> bool:
    return re.sub(r"\([^()]*\)|\s", "", value) == "<>"


def is_loop(mail: ParsedMail, *, loop_value: str, own_domains: frozenset[str]) -> str | None:
    """B19: a reason when `mail` is the daemon's own mail coming back, else None.

    Checks the daemon's loop header and the domain of the Message-ID, which
    survive forwarding that strips Auto-Submitted and Precedence.
    """
    wanted = loop_value.strip().lower()
    for value in mail.header_all("X-Loop"):
        if wanted and value.strip().lower() == wanted:
            return f"x-loop:{value.strip()}"
    if mail.message_id and "@" in mail.message_id:
        domain = mail.message_id.rpartition("@")[2].strip().lower()
        if domain and domain in {d.strip().lower() for d in own_domains}:
            return f"message-id:{domain}"
    return None


# --- reports -----------------------------------------------------------------

_STATUS = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_TEXT_STATUS = re.compile(r"\b[245]\d\d[ -]([245])\.(\d{1,3})\.(\d{1,3})\b")
_FIELD_LINE = re.compile(r"^([A-Za-z][A-Za-z0-9-]*)[ \t]*:[ \t]*(.*)$")
_MESSAGE_ID_FIELD = re.compile(
    rb"^(?:original-)?message-id[ \t]*:[ \t]*((?:[^\r\n]|\r?\n[ \t])*)", re.I | re.M
)
_ANGLE_ID = re.compile(r"<([^<>\s]+)>")
_HEADER_END = re.compile(rb"\r?\n\r?\n|\r\r")
_RAW_SCAN_LIMIT = 256 * 1024
# RFC 3463 3: the class and the subject of an enhanced status code.
_STATUS_CLASS = {"2": "success", "4": "temporary failure", "5": "permanent failure"}
_STATUS_DETAIL = {
    "0.0": "other",
    "1.0": "addressing problem",
    "1.1": "bad destination mailbox address",
    "1.2": "bad destination system address",
    "1.3": "bad destination mailbox address syntax",
    "1.6": "destination mailbox has moved",
    "2.0": "mailbox problem",
    "2.1": "mailbox disabled",
    "2.2": "mailbox full",
    "2.3": "message too long for mailbox",
    "3.0": "mail system problem",
    "3.4": "message too big for system",
    "4.0": "network or routing problem",
    "4.1": "no answer from host",
    "4.4": "unable to route",
    "4.7": "delivery time expired",
    "5.0": "mail delivery protocol problem",
    "6.0": "message content problem",
    "7.0": "security or policy problem",
    "7.1": "delivery not authorized, message refused",
}
_REPORT_TYPES = {
    "message/delivery-status": "delivery-status",
    "message/disposition-notification": "disposition",
}
_ORIGINAL_TYPES = frozenset(
    {"message/rfc822", "message/global", "text/rfc822-headers", "message/rfc822-headers"}
)
_FAILED_ACTIONS = frozenset({"failed", "delayed"})


def parse_report(raw: bytes, mail: ParsedMail) -> Report | None:
    """Read a multipart/report (RFC 6522): DSN (RFC 3464) or MDN (RFC 8098).

    Works from the parts `parse_mail` kept as attachments; the raw bytes are
    scanned only when the message holds no machine-readable part. Returns None
    when nothing about an original message can be found. Never raises.
    """
    try:
        return _parse_report(raw, mail)
    except Exception:  # a report we cannot read is filed by its text (B18)
        return None


def _parse_report(raw: bytes, mail: ParsedMail) -> Report | None:
    kind: ReportKind = "other"
    blocks: list[list[tuple[str, str]]] = []
    ids: list[str] = []
    for attachment in mail.attachments:
        ctype = attachment.content_type
        if ctype in _REPORT_TYPES:
            if kind == "other":
                kind = "delivery-status" if ctype == "message/delivery-status" else "disposition"
            blocks.extend(_field_blocks(_text(attachment.data)))
        elif ctype in _ORIGINAL_TYPES:
            ids.extend(_original_ids(attachment))
    if not blocks:
        # Broken structure: the fields may sit in a text part or be unparsed.
        blocks = _field_blocks(_text(raw[:_RAW_SCAN_LIMIT]))
        blocks = [b for b in blocks if any(name in _RECIPIENT_FIELDS for name, _ in b)]
    if kind == "other":
        report_type = _report_type(mail)
        if report_type == "disposition-notification":
            kind = "disposition"
        elif report_type == "delivery-status" or blocks:
            kind = "delivery-status"
    if not ids:
        ids.extend(_raw_original_ids(raw[:_RAW_SCAN_LIMIT], mail.message_id))
    for block in blocks:
        for name, value in block:
            if name == "original-message-id":
                ids.extend(_ANGLE_ID.findall(value) or value.split()[:1])
    ids.extend(mail.in_reply_to)

    statuses: list[str] = []
    failed: list[str] = []
    lines: list[str] = []
    for block in blocks:
        fields = dict(block)  # later duplicates win; fine for one recipient block
        recipient = _recipient(fields.get("original-recipient")) or _recipient(
            fields.get("final-recipient")
        )
        status_match = _STATUS.search(fields.get("status", ""))
        status = ".".join(status_match.groups()) if status_match else None
        if status:
            statuses.append(status)
        action = _first_word(fields.get("action"))
        if (
            kind == "delivery-status"
            and recipient
            and (action in _FAILED_ACTIONS or (not action and status and status[0] in "45"))
        ):
            for field in ("original-recipient", "final-recipient"):
                address = _recipient(fields.get(field))
                if address:
                    failed.append(address)
        line = _describe(kind, fields, recipient, action, status)
        if line:
            lines.append(line)

    if not statuses and kind == "delivery-status":
        # No machine-readable status: take the enhanced codes (RFC 3463) that
        # follow an SMTP reply code in the human-readable text ("550 5.1.1").
        statuses.extend(".".join(m.groups()) for m in _TEXT_STATUS.finditer(mail.text))

    ids = list(dict.fromkeys(i for i in ids if i))
    if not ids and not statuses and not failed:
        return None
    statuses = list(dict.fromkeys(statuses))
    return Report(
        kind=kind,
        original_message_ids=tuple(ids),
        statuses=tuple(statuses),
        failed_recipients=tuple(dict.fromkeys(failed)),
        permanent=any(s.startswith("5.") for s in statuses),
        summary=_summary(kind, mail, lines),
    )


_RECIPIENT_FIELDS = frozenset({"final-recipient", "original-recipient"})
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _text(data: bytes) -> str:
    if b"\x1b$" in data:
        # ISO-2022-JP escape sequences (RFC 1468), common in Japanese MTAs' reports.
        try:
            return data.decode("iso2022_jp_ext")
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _field_blocks(text: str) -> list[list[tuple[str, str]]]:
    """RFC 3464 2.1 / RFC 8098 3.1: blank-line separated blocks of header-like fields."""
    blocks: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line.strip():
            if current:
                blocks.append(current)
                current = []
            continue
        if line[0] in " \t" and current:
            name, value = current[-1]
            current[-1] = (name, f"{value} {line.strip()}")
            continue
        match = _FIELD_LINE.match(line)
        if match:
            current.append((match.group(1).lower(), match.group(2).strip()))
    if current:
        blocks.append(current)
    return blocks


def _recipient(value: str | None) -> str | None:
    """The address in "rfc822; user@example.com" (RFC 3464 2.3.1, 2.3.2)."""
    if not value:
        return None
    address = value.split(";", 1)[1] if ";" in value else value
    address = address.strip().strip("<>").strip().lower()
    return address if "@" in address and " " not in address else None


def _first_word(value: str | None) -> str:
    return value.split()[0].lower().rstrip(";") if value and value.split() else ""


def _original_ids(attachment: Attachment) -> list[str]:
    head = attachment.data
    match = _HEADER_END.search(head)
    if match:
        head = head[: match.start()]
    return _ids_in_headers(head)


def _ids_in_headers(head: bytes) -> list[str]:
    ids: list[str] = []
    for match in _MESSAGE_ID_FIELD.finditer(head):
        value = _text(match.group(1))
        ids.extend(_ANGLE_ID.findall(value) or value.split()[:1])
    return ids


def _raw_original_ids(raw: bytes, own_id: str | None) -> list[str]:
    # Skip the report's own header block, then take every Message-ID after it.
    match = _HEADER_END.search(raw)
    body = raw[match.end() :] if match else b""
    return [i for i in _ids_in_headers(body) if i != own_id]


def _report_type(mail: ParsedMail) -> str:
    value = mail.header("Content-Type") or ""
    match = re.search(r"report-type\s*=\s*\"?([A-Za-z0-9_.-]+)", value, re.I)
    return match.group(1).lower() if match else ""


def _status_text(status: str) -> str:
    klass, _, detail = status.partition(".")
    words = [_STATUS_CLASS.get(klass, "")]
    subject = _STATUS_DETAIL.get(detail) or _STATUS_DETAIL.get(detail.split(".")[0] + ".0")
    if subject:
        words.append(subject)
    return ", ".join(w for w in words if w)


def _describe(
    kind: ReportKind,
    fields: dict[str, str],
    recipient: str | None,
    action: str,
    status: str | None,
) -> str:
    if kind == "disposition":
        disposition = fields.get("disposition")
        if not disposition:
            return ""
        who = recipient or "the recipient"
        return f"{who}: {disposition}."
    if not recipient and not status:
        return ""
    parts = [recipient or "unknown recipient"]
    if action:
        parts.append(action)
    text = " ".join(parts)
    if status:
        meaning = _status_text(status)
        text += f" (status {status}{': ' + meaning if meaning else ''})"
    diagnostic = fields.get("diagnostic-code")
    if diagnostic:
        text += f"; diagnostic: {diagnostic}"
    return text + "."


def _summary(kind: ReportKind, mail: ParsedMail, lines: list[str]) -> str:
    title = {
        "delivery-status": "Delivery status notification",
        "disposition": "Message disposition notification (read receipt)",
        "other": "Report",
    }[kind]
    if mail.sender is not None:
        title += f" from {mail.sender.address}"
    if mail.subject:
        title += f" ({mail.subject})"
    summary = f"{title}: {' '.join(lines)}" if lines else title + "."
    return _CONTROL.sub("", summary)
