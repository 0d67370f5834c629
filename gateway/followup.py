"""Which ticket does this message belong to: hooks, reply tokens, Message-ID threading.

Three signals, strongest first (DESIGN, "Follow-up matching"):
1. a per-ticket reply address `local+<number>.<token>@domain`, whose token is an
   HMAC of the ticket number and the recipient under the configured secret;
2. the ticket hook `[Ticket#<number>]` anywhere in the decoded subject;
3. In-Reply-To / References naming any Message-ID the ticket has seen or sent.
Signals 2 and 3 only attach a message when its sender may write to the ticket;
that decision is the pipeline's, this module only finds candidates.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.store.models import MessageId, Ticket

TOKEN_LENGTH = 20  # base32 characters: 100 bits of HMAC


@dataclass(frozen=True, slots=True)
class ReplyAddress:
    """A tokened reply address, split into its parts (nothing verified yet)."""

    base: str  # the inbound address it belongs to, e.g. help@example.org
    number: str
    token: str


_REPLY_LOCAL = re.compile(r"^(?P<local>[^+]+)\+(?P<number>\d{6,20})\.(?P<token>[a-z2-7]{20})$")


class Hooks:
    """Formats and finds the ticket hook in subjects (`[Ticket#2026112700012]`)."""

    def __init__(self, word: str = "Ticket#") -> None:
        self.word = word
        self._pattern = re.compile(r"\[" + re.escape(word) + r"\s*(\d{6,20})\]", re.IGNORECASE)

    def format(self, number: str) -> str:
        return f"[{self.word}{number}]"

    def subject(self, number: str, subject: str, prefix: str = "") -> str:
        """`prefix[Ticket#N] subject`, without repeating a hook already in it."""
        hook = self.format(number)
        clean = self._pattern.sub("", subject).strip()
        return f"{prefix}{hook} {clean}".rstrip()

    def find(self, subject: str) -> list[str]:
        return self._pattern.findall(subject)


def make_token(secret: bytes, number: str, recipient: str) -> str:
    """HMAC of ticket number and recipient: proves a reply came via that recipient's mail."""
    mac = hmac.new(secret, f"{number}\0{recipient.lower()}".encode(), hashlib.sha256).digest()
    return base64.b32encode(mac).decode("ascii").lower()[:TOKEN_LENGTH]


def verify_token(secret: bytes, number: str, recipient: str, token: str) -> bool:
    # Constant-time: the token is the only thing standing between a forged From and a command.
    return hmac.compare_digest(make_token(secret, number, recipient), token.lower())


def reply_address(inbound: str, number: str, token: str) -> str:
    local, _, domain = inbound.rpartition("@")
    return f"{local}+{number}.{token}@{domain}"


def token_remover(domains: Iterable[str]) -> Callable[[bytes], bytes]:
    """A function that turns every reply address at `domains` in some bytes back into
    its plain inbound address (`help+<n>.<token>@d` -> `help@d`).

    An agent's reply can carry its own token to the customer: a forwarded or
    attached notification has the tokened Reply-To in its headers. With the token
    and a forged From, anyone could act as that agent (B14: no token anywhere). The
    pattern starts at the literal `+`, so it runs in linear time on any input.
    """
    alternatives = b"|".join(re.escape(d.lower().encode()) for d in sorted(domains))
    pattern = re.compile(rb"\+\d{6,20}\.[a-z2-7]{%d}@(%s)"
                         % (TOKEN_LENGTH, alternatives), re.IGNORECASE)
    return lambda data: pattern.sub(rb"@\1", data)


def parse_reply_address(address: str) -> ReplyAddress | None:
    local, _, domain = address.lower().rpartition("@")
    m = _REPLY_LOCAL.match(local)
    if m is None or not domain:
        return None
    return ReplyAddress(f"{m['local']}@{domain}", m["number"], m["token"])


def tickets_by_message_ids(session: Session, ids: Iterable[str]) -> list[int]:
    """Ticket ids that have seen any of `ids` (inbound or outbound), newest reference first."""
    wanted = [i for i in dict.fromkeys(ids) if i]
    if not wanted:
        return []
    rows = session.execute(
        select(MessageId.message_id, MessageId.ticket_id).where(
            MessageId.message_id.in_(wanted), MessageId.ticket_id.is_not(None)
        )
    ).all()
    by_id = {mid: tid for mid, tid in rows}
    # References lists oldest first; the most recent reference is the best guess.
    found: list[int] = []
    for mid in reversed(wanted):
        tid = by_id.get(mid)
        if tid is not None and tid not in found:
            found.append(tid)
    return found


def ticket_by_number(session: Session, number: str) -> Ticket | None:
    return session.scalars(select(Ticket).where(Ticket.number == number)).first()
