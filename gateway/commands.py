"""The command block at the top of an agent's reply (B12) and its validation (B13).

Leading blank lines are skipped; then each consecutive line starting with `#`
and a letter is a command; the first other line ends the block; one blank line
after it is dropped; the rest is the reply. Names are case-insensitive. This
module only reads and checks; executing is the agent module's job.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from gateway.config import Settings
from gateway.mail.compose import ComposeError, encode_address

# B12: any line starting with `#` and a letter is a command line. Its name is
# everything up to the first blank, so a typo such as `#close.` or `#note:` is an
# unknown command (the whole reply is refused, B13) rather than text that would be
# relayed to the customer.
COMMAND_LINE = re.compile(r"^#(?P<name>[A-Za-z]\S*)(?:[ \t]+(?P<arg>.*))?$")

# name -> (argument help, short description): the list an error mail shows.
COMMANDS: dict[str, tuple[str, str]] = {
    "close": ("", "close the ticket"),
    "open": ("", "reopen the ticket"),
    "pending": ("[YYYY-MM-DD [HH:MM]]", "wait for the customer (optionally until a time)"),
    "priority": ("low|normal|high", "set the priority"),
    "group": ("<group name>", "move the ticket to another group"),
    "assign": ("me|<agent address>", "set the owner"),
    "note": ("", "keep this reply internal: nothing is sent to the customer"),
    "cc": ("<address>", "add a participant who receives replies"),
    "major": ("", "declare a major incident: tighter SLA, the incident list is told at once"),
}
PRIORITIES = ("low", "normal", "high")


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    arg: str
    line: str


@dataclass(frozen=True, slots=True)
class CommandBlock:
    commands: tuple[Command, ...]
    text: str


def split_block(body: str) -> CommandBlock:
    """Separate the leading command lines from the reply text (B12)."""
    lines = body.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    i = 0
    while i < len(lines) and not lines[i].strip():
        i += 1
    commands: list[Command] = []
    while i < len(lines):
        m = COMMAND_LINE.match(lines[i].strip())
        if m is None:
            break
        commands.append(Command(m["name"].lower(), (m["arg"] or "").strip(), lines[i].strip()))
        i += 1
    if commands and i < len(lines) and not lines[i].strip():
        i += 1
    return CommandBlock(tuple(commands), "\n".join(lines[i:]) if commands else body)


COMMAND_HEADER = "X-Helpdesk-Command"


def from_headers(values: list[str]) -> tuple[Command, ...]:
    """Commands given in `X-Helpdesk-Command` headers (one or more per header, `;`-separated)."""
    found: list[Command] = []
    for value in values:
        for part in value.split(";"):
            part = part.strip()
            if not part:
                continue
            if not part.startswith("#"):
                part = "#" + part
            m = COMMAND_LINE.match(part)
            name = m["name"].lower() if m else part[1:].split(" ", 1)[0].lower()
            arg = (m["arg"] or "").strip() if m else ""
            found.append(Command(name, arg, part))
    return tuple(found)


def valid_commands() -> list[str]:
    return [f"#{name} {arg}".rstrip() + f"  - {desc}" for name, (arg, desc) in COMMANDS.items()]


def parse_until(arg: str, zone: dt.tzinfo = dt.UTC) -> dt.datetime:
    """`#pending` argument: a date or date and time, read in `zone` (the ticket group's,
    see `Notifier.zone_for`); ValueError when it is neither."""
    for fmt in ("%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M", "%Y-%m-%d"):
        try:
            return dt.datetime.strptime(arg, fmt).replace(tzinfo=zone)
        except ValueError:
            continue
    raise ValueError(f"not a date: {arg!r} (use YYYY-MM-DD or YYYY-MM-DD HH:MM)")


def check(commands: tuple[Command, ...], settings: Settings) -> list[str]:
    """Every problem in the block, one line each; empty means all commands are valid."""
    problems: list[str] = []
    for cmd in commands:
        problem = _check_one(cmd, settings)
        if problem:
            problems.append(f"{cmd.line}: {problem}")
    return problems


def _check_one(cmd: Command, settings: Settings) -> str | None:
    if cmd.name not in COMMANDS:
        return "unknown command"
    if cmd.name in ("close", "open", "note", "major") and cmd.arg:
        return f"#{cmd.name} takes no argument"
    if cmd.name == "pending" and cmd.arg:
        try:
            parse_until(cmd.arg)
        except ValueError as exc:
            return str(exc)
    if cmd.name == "priority" and cmd.arg.lower() not in PRIORITIES:
        return f"priority must be one of {', '.join(PRIORITIES)}"
    if cmd.name == "group" and cmd.arg not in settings.group_names:
        names = ", ".join(sorted(settings.group_names))
        return f"no group named {cmd.arg!r} (groups: {names})"
    if cmd.name == "assign" and cmd.arg.lower() != "me" and settings.agent(cmd.arg) is None:
        return f"{cmd.arg!r} is not an agent"
    if cmd.name == "cc":
        # The same check outbound mail gets: if we can address it, it is valid.
        # (email-validator refuses special-use domains such as .localhost, which
        # internal deployments use.)
        try:
            encode_address(cmd.arg)
        except ComposeError as exc:
            return f"not an email address: {exc}"
        if "@" not in cmd.arg:
            return "not an email address: no @"
        # Participants are the people outside the helpdesk (B5).
        if settings.inbound_for(cmd.arg) is not None:
            return "is one of the helpdesk's own addresses"
        if settings.agent(cmd.arg) is not None:
            return "is an agent: agents are told through their group, not copied"
    return None
