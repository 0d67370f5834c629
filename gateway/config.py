"""helpdeskd.toml -> validated, frozen settings.

The file is read with tomllib and validated with pydantic once, at load. Every
error names the file, the key path and what was expected; unknown keys are
refused. Secrets may come from the environment instead of the file:
`HELPDESKD_<SECTION>__<KEY>` overrides `[section] key` (e.g.
`HELPDESKD_DAEMON__SECRET`, `HELPDESKD_OUTBOUND__PASSWORD`), and a handful of
short names are accepted for the common ones (`HELPDESKD_SECRET`,
`HELPDESKD_DATABASE_URL`).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import secrets
import tomllib
from collections.abc import Iterable, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.escalation.calendar import Calendar, CalendarSettings, never_open_again
from gateway.escalation.settings import (
    EscalationSettings,
    MajorIncidentSettings,
    SlaSettings,
    reference_problems,
)

ENV_PREFIX = "HELPDESKD_"
# Short environment names for the settings operators most often keep out of files.
ENV_SHORTCUTS = {
    "HELPDESKD_SECRET": ("daemon", "secret"),
    "HELPDESKD_DATABASE_URL": ("daemon", "database_url"),
}
DEFAULT_SECRET = "change-me-to-a-long-random-string"  # noqa: S105 - the demo value


class ConfigError(Exception):
    """A configuration file is unreadable or invalid; the message says where and why."""


class KeyProblem(ValueError):
    """A problem with one key found by a check across keys or sections; `loc` is the
    key's path (relative to the model raising it), so the error can name its line."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


def _unique(array: str, key: str, values: list[Any], message: str = "") -> None:
    """Refuse the first entry of `[[array]]` whose `key` repeats an earlier one's (None
    values are not compared)."""
    seen: set[Any] = set()
    for index, value in enumerate(values):
        if value is None:
            continue
        if value in seen:
            raise KeyProblem((array, index, key),
                             message or f"{value!r} is already used by an earlier entry")
        seen.add(value)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_guessed_types(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic would read `enabled = "no"` as false and `max_attempts = true` as 1;
        # a typo in a switch must not quietly turn a channel off. The strings "true"
        # and "false" stay accepted: environment overrides can only be strings.
        annotation = cls.model_fields[info.field_name or ""].annotation
        if annotation is bool and not isinstance(value, bool) and value not in ("true", "false"):
            raise ValueError(f"expected true or false, not {value!r}")
        if annotation in (int, float) and isinstance(value, bool):
            raise ValueError(f"expected a number, not {str(value).lower()}")
        return value


def _normalise_address(value: str) -> str:
    value = value.strip().lower()
    if value.count("@") != 1 or not value.split("@")[0] or not value.split("@")[1]:
        raise ValueError(f"not an email address: {value!r}")
    return value


def _normalise_own_address(value: str) -> str:
    """An address the daemon receives mail at: `+` is its sub-address delimiter
    (`help+<ticket>.<token>@...` are the reply addresses), so it cannot be part of one."""
    value = _normalise_address(value)
    if "+" in value.split("@")[0]:
        raise ValueError(f"{value!r}: '+' starts the sub-address of the daemon's own "
                         "addresses, so it cannot be part of one")
    return value


class DaemonSettings(_Section):
    """[daemon]: identity, storage and secrets."""

    name: str = "EOSC Helpdesk"
    # Domain used in the daemon's own Message-IDs; mail carrying it comes back only as a loop.
    message_id_domain: str = "helpdesk.localhost"
    data_dir: Path = Path("var")
    database_url: str = ""
    secret: SecretStr = SecretStr(DEFAULT_SECRET)
    rules_dir: Path = Path("rules")
    templates_dir: Path | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    ticket_hook: str = "Ticket#"

    @field_validator("secret")
    @classmethod
    def _secret_length(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return value


class SmtpSettings(_Section):
    """[smtp]: the inbound SMTP listener."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=2525, ge=0, le=65535)
    hostname: str = "helpdesk.localhost"
    max_message_size: int = Field(default=25 * 1024 * 1024, gt=0)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Under a burst, 250 once the raw message is committed to the spool; its ticket
    # follows when the burst has passed, at most this many seconds later (0: never
    # spool, every message gets its ticket before its 250).
    burst_queue_seconds: float = Field(default=10.0, ge=0)

    @model_validator(mode="after")
    def _tls_pair(self) -> SmtpSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be set together")
        return self


class OutboundSettings(_Section):
    """[outbound]: how the daemon's own mail leaves (smarthost, or a maildir)."""

    smarthost: str = ""
    port: int = Field(default=25, ge=1, le=65535)
    starttls: bool = False
    username: str = ""
    password: SecretStr = SecretStr("")
    maildir: Path = Path("var/outbound")
    max_attempts: int = Field(default=8, ge=1)
    backoff_seconds: float = Field(default=30.0, gt=0)
    backoff_max_seconds: float = Field(default=3600.0, gt=0)
    timeout_seconds: float = Field(default=30.0, gt=0)
    # Cap on mail the daemon writes by itself (acknowledgements, error mails) to one address.
    auto_mail_per_hour: int = Field(default=10, ge=0)
    # Longest the outbox holds deliveries back while the intake is saturated (0: never).
    burst_hold_seconds: float = Field(default=10.0, ge=0)

    @model_validator(mode="after")
    def _login(self) -> OutboundSettings:
        if self.password.get_secret_value() and not self.username:
            raise KeyProblem(("username",), "a smarthost password needs a username")
        return self


class InboundAddress(_Section):
    """[[inbound]]: an address the daemon receives mail for, and its default group."""

    address: str
    default_group: str
    name: str = ""

    @field_validator("address")
    @classmethod
    def _norm(cls, value: str) -> str:
        return _normalise_own_address(value)


class AgentSettings(_Section):
    """[[agents]]: a person who works tickets by email."""

    address: str
    name: str = ""

    @field_validator("address")
    @classmethod
    def _norm(cls, value: str) -> str:
        return _normalise_address(value)


class GroupSettings(_Section):
    """[[groups]]: a support group and its agents (by address)."""

    name: str
    agents: tuple[str, ...] = ()
    escalate_to: str | None = None
    # Escalation (docs/escalation.md): business hours, SLA per priority, who hears of a
    # breach, what a breach does, and the reminders while waiting for the customer.
    calendar: str | None = None
    sla: str | None = None
    sla_by_priority: dict[str, str] = Field(default_factory=dict)
    leads: tuple[str, ...] = ()
    breach_move: bool = True
    breach_raise_priority: bool = False
    escalation_mail_anytime: bool = False
    waiting_reminder_days: int = Field(default=5, ge=0, le=365)
    waiting_second_reminder_days: int = Field(default=5, ge=0, le=365)
    waiting_close_days: int = Field(default=5, ge=0, le=365)

    @field_validator("agents", "leads")
    @classmethod
    def _agents(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_normalise_address(v) for v in value)


class HttpSettings(_Section):
    """[http]: the daemon's own HTTP server (Telegram webhooks, the read-only JSON API).

    It starts only when some feature registers a route on it.
    """

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # Set to serve the read-only JSON API (gateway/api.py) to callers presenting it as
    # `Authorization: Bearer <token>`; empty: no API. Use HELPDESKD_HTTP__API_TOKEN.
    api_token: SecretStr = SecretStr("")


_BOT_NAME = r"^[a-z0-9][a-z0-9_-]{0,31}$"
# Telegram's rule for setWebhook's secret_token: 1-256 of A-Z, a-z, 0-9, _ and -.
_WEBHOOK_SECRET = re.compile(r"^[A-Za-z0-9_-]{1,256}$")


class TelegramSettings(_Section):
    """[[telegram]]: one Telegram bot, the inbound address it stands for, and how it listens.

    The token comes from `token`, from `token_file`, or from the environment as
    `HELPDESKD_TELEGRAM__<NAME>__TOKEN`, never from more than one of them.
    """

    # Short, stable id: used in logs, outbox rows, dedup keys and the webhook path.
    name: str = Field(pattern=_BOT_NAME)
    token: SecretStr = SecretStr("")
    token_file: Path | None = None
    # A configured [[inbound]] address: the From of this bot's agent notifications,
    # and the base of the agents' tokened reply addresses.
    inbound_address: str
    # Group of new tickets no rule routes; default: the inbound address's default group.
    default_group: str | None = None
    mode: Literal["polling", "webhook"] = "polling"
    # Webhook mode: the public URL Telegram posts to (it must reach [http] at webhook_path).
    webhook_url: str = ""
    webhook_path: str = ""
    webhook_secret: SecretStr = SecretStr("")
    allow_groups: bool = False
    # Bot API endpoints; tests point these at a loopback stand-in.
    base_url: str = "https://api.telegram.org/bot"
    base_file_url: str = "https://api.telegram.org/file/bot"
    poll_timeout: int = Field(default=50, ge=0, le=600)
    # Telegram's getFile refuses files over 20 MB.
    max_download_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    # Pacing of what the bot sends: Telegram allows about one message per second in
    # one chat and 30 per second overall before it answers 429.
    chat_interval_seconds: float = Field(default=1.0, ge=0)
    bot_interval_seconds: float = Field(default=1 / 30, ge=0)

    @field_validator("inbound_address")
    @classmethod
    def _norm(cls, value: str) -> str:
        return _normalise_own_address(value)

    @property
    def route(self) -> str:
        """The path of this bot's webhook on the daemon's HTTP server."""
        return self.webhook_path or f"/telegram/{self.name}"

    @model_validator(mode="after")
    def _consistent(self) -> TelegramSettings:
        if self.token.get_secret_value() and self.token_file is not None:
            raise ValueError("give token or token_file, not both")
        if not self.token.get_secret_value() and self.token_file is None:
            raise ValueError(f"no token: set token_file or HELPDESKD_TELEGRAM__"
                             f"{self.name.upper()}__TOKEN")
        if self.mode == "webhook":
            if not self.webhook_url.startswith(("https://", "http://")):
                raise ValueError("mode webhook needs webhook_url (the public URL)")
            if not _WEBHOOK_SECRET.match(self.webhook_secret.get_secret_value()):
                raise ValueError("mode webhook needs webhook_secret: 1-256 characters "
                                 "of A-Z, a-z, 0-9, _ and -")
        if self.webhook_path and not self.webhook_path.startswith("/"):
            raise ValueError("webhook_path must start with /")
        return self


class ImapSettings(_Section):
    """[[imap]]: one mailbox the daemon drains, standing for one [[inbound]] address.

    The password comes from `password`, from `password_file` (read at each
    connect), or from the environment as `HELPDESKD_IMAP__<NAME>__PASSWORD`.
    Mail is never deleted: after its commit a message is moved to `done_folder`
    (`after = "move"`) or flagged \\Seen and kept (`after = "flag"`); what the
    pipeline quarantines is moved to `quarantine_folder` in both modes.
    """

    # Short, stable id: logs, `helpdeskd status`, and the key of the stored UID position.
    name: str = Field(pattern=_BOT_NAME)
    # The [[inbound]] address this mailbox receives for: it decides the default group.
    address: str
    host: str
    # Default: 993 for tls = "implicit", 143 otherwise.
    port: int | None = Field(default=None, ge=1, le=65535)
    tls: Literal["implicit", "starttls", "plain"] = "implicit"
    # Plain-text IMAP sends the password in clear; refused unless this says so.
    allow_plaintext: bool = False
    # CA bundle for a server certificate no system CA signed (a private CA).
    ca_file: Path | None = None
    user: str
    password: SecretStr = SecretStr("")
    password_file: Path | None = None
    folder: str = "INBOX"
    after: Literal["move", "flag"] = "move"
    done_folder: str = "Processed"
    quarantine_folder: str = "Quarantine"
    # Use IDLE when the server offers it; false polls even then (for broken IDLE).
    idle: bool = True
    poll_interval_seconds: float = Field(default=60.0, gt=0)
    # RFC 2177: servers may drop a client idle for 30 minutes; re-issue IDLE before 29.
    idle_restart_seconds: float = Field(default=1500.0, gt=0, lt=29 * 60)
    # A backlog is fetched at most batch_size messages and batch_bytes octets at a time.
    # At most 200: aioimaplib parses an answer recursively, a stack frame per line.
    batch_size: int = Field(default=50, ge=1, le=200)
    batch_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    # Larger messages are not fetched; they are moved to quarantine_folder and logged.
    max_message_size: int = Field(default=25 * 1024 * 1024, gt=0)
    # Every IMAP command, the connect and the TLS handshake each get this long.
    timeout_seconds: float = Field(default=30.0, gt=0)
    backoff_seconds: float = Field(default=1.0, gt=0)
    backoff_max_seconds: float = Field(default=300.0, gt=0)

    @field_validator("address")
    @classmethod
    def _norm(cls, value: str) -> str:
        return _normalise_address(value)

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return 993 if self.tls == "implicit" else 143

    @model_validator(mode="after")
    def _consistent(self) -> ImapSettings:
        if self.tls == "plain" and not self.allow_plaintext:
            raise ValueError('tls = "plain" sends the password in clear; '
                             "set allow_plaintext = true to accept that")
        if self.password.get_secret_value() and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        if not self.password.get_secret_value() and self.password_file is None:
            raise ValueError(f"no password: set password_file or HELPDESKD_IMAP__"
                             f"{self.name.upper().replace('-', '_')}__PASSWORD")
        if self.quarantine_folder == self.folder:
            raise ValueError("quarantine_folder must differ from folder")
        if self.after == "move" and self.done_folder in (self.folder, self.quarantine_folder):
            raise ValueError("done_folder must differ from folder and quarantine_folder")
        if self.backoff_max_seconds < self.backoff_seconds:
            raise ValueError("backoff_max_seconds must not be below backoff_seconds")
        return self


class Settings(_Section):
    """The whole configuration, as loaded from one file."""

    daemon: DaemonSettings = DaemonSettings()
    smtp: SmtpSettings = SmtpSettings()
    outbound: OutboundSettings = OutboundSettings()
    inbound: tuple[InboundAddress, ...] = ()
    agents: tuple[AgentSettings, ...] = ()
    groups: tuple[GroupSettings, ...] = ()
    http: HttpSettings = HttpSettings()
    telegram: tuple[TelegramSettings, ...] = ()
    imap: tuple[ImapSettings, ...] = ()
    calendars: dict[str, CalendarSettings] = Field(default_factory=dict)
    sla: dict[str, SlaSettings] = Field(default_factory=dict)
    escalation: EscalationSettings = EscalationSettings()
    major_incidents: MajorIncidentSettings = MajorIncidentSettings()
    # Directory the file was loaded from; relative paths are resolved against it.
    base_dir: Path = Path(".")

    @model_validator(mode="after")
    def _cross_references(self) -> Settings:
        _unique("groups", "name", [g.name for g in self.groups])
        _unique("agents", "address", [a.address for a in self.agents])
        agents = {a.address for a in self.agents}
        groups = {g.name for g in self.groups}
        for gi, g in enumerate(self.groups):
            for a in g.agents:
                if a not in agents:
                    raise KeyProblem(("groups", gi, "agents"),
                                     f"{a!r} is not in [[agents]]")
            if g.escalate_to is not None and g.escalate_to not in groups:
                raise KeyProblem(("groups", gi, "escalate_to"), f"{g.escalate_to!r} is no group")
        _unique("inbound", "address", [i.address for i in self.inbound])
        for ii, i in enumerate(self.inbound):
            if i.default_group not in groups:
                raise KeyProblem(("inbound", ii, "default_group"),
                                 f"{i.default_group!r} is no group")
            if i.address in agents:
                raise KeyProblem(("inbound", ii, "address"),
                                 f"{i.address!r} is also an agent address")
        return self

    @model_validator(mode="after")
    def _escalation_references(self) -> Settings:
        problems = reference_problems(self.groups, self.calendars, self.sla, self.escalation,
                                      self.major_incidents)
        if problems:
            # One line per problem (each names its key path): printed under the file name.
            raise ValueError("\n  ".join(problems))
        return self

    @model_validator(mode="after")
    def _calendars_open_again(self) -> Settings:
        # Whether a calendar is ever open again depends on today (past open_days, a
        # closure running for decades); `check` and `run` must refuse what would make
        # every ticket change end in an sla-error event without deadlines.
        now = dt.datetime.now(dt.UTC)
        for name, table in self.calendars.items():
            problem = never_open_again(Calendar.from_settings(table), now)
            if problem is not None:
                raise KeyProblem(("calendars", name), problem)
        return self

    @model_validator(mode="after")
    def _telegram_references(self) -> Settings:
        _unique("telegram", "name", [b.name for b in self.telegram])
        _unique("telegram", "webhook_path",
                [b.route if b.mode == "webhook" else None for b in self.telegram])
        for bi, b in enumerate(self.telegram):
            if self.inbound_for(b.inbound_address) is None:
                raise KeyProblem(("telegram", bi, "inbound_address"),
                                 f"{b.inbound_address!r} is not an [[inbound]] address")
            if b.default_group is not None and self.group(b.default_group) is None:
                raise KeyProblem(("telegram", bi, "default_group"),
                                 f"{b.default_group!r} is no group")
            self._existing_file(("telegram", bi, "token_file"), b.token_file)
        return self

    @model_validator(mode="after")
    def _imap_references(self) -> Settings:
        _unique("imap", "name", [m.name for m in self.imap])
        # Two entries draining one folder would race each other for the same messages.
        _unique("imap", "folder",
                [(m.host.lower(), m.effective_port, m.user, m.folder) for m in self.imap],
                "names the same server, user and folder as an earlier [[imap]] entry")
        inbound = {i.address for i in self.inbound}
        for mi, m in enumerate(self.imap):
            if m.address not in inbound:
                raise KeyProblem(("imap", mi, "address"),
                                 f"{m.address!r} is not an [[inbound]] address")
            self._existing_file(("imap", mi, "password_file"), m.password_file)
            self._existing_file(("imap", mi, "ca_file"), m.ca_file)
        return self

    @model_validator(mode="after")
    def _smtp_files(self) -> Settings:
        # Checked here, not when the listener starts: `check` must catch what `run` would.
        self._existing_file(("smtp", "tls_cert"), self.smtp.tls_cert)
        self._existing_file(("smtp", "tls_key"), self.smtp.tls_key)
        return self

    def _existing_file(self, loc: tuple[str | int, ...], path: Path | None) -> None:
        if path is not None and not self.path(path).is_file():
            raise KeyProblem(loc, f"{self.path(path)} is not a readable file")

    # -- derived views -------------------------------------------------------------

    def path(self, p: Path) -> Path:
        """Resolve a configured path against the config file's directory."""
        return p if p.is_absolute() else (self.base_dir / p)

    @property
    def database_url(self) -> str:
        if self.daemon.database_url:
            return self.daemon.database_url
        return f"sqlite:///{self.path(self.daemon.data_dir) / 'helpdeskd.sqlite3'}"

    @property
    def group_names(self) -> frozenset[str]:
        return frozenset(g.name for g in self.groups)

    def group(self, name: str) -> GroupSettings | None:
        for g in self.groups:
            if g.name == name:
                return g
        return None

    def agent(self, address: str) -> AgentSettings | None:
        address = address.lower()
        for a in self.agents:
            if a.address == address:
                return a
        return None

    @cached_property
    def inbound_index(self) -> dict[str, InboundAddress]:
        """Inbound addresses by address (asked several times for every message)."""
        return {i.address: i for i in reversed(self.inbound)}  # the first one wins

    def inbound_for(self, address: str) -> InboundAddress | None:
        """The inbound address `address` delivers to, `+` sub-addresses included."""
        address = address.lower()
        found = self.inbound_index.get(address)
        if found is None and "+" in address:
            local, _, domain = address.rpartition("@")
            found = self.inbound_index.get(f"{local.split('+', 1)[0]}@{domain}")
        return found

    def inbound_of(self, recipients: Iterable[str]) -> str | None:
        """B2: the inbound address a mail to `recipients` was delivered to; among several,
        the first configured one wins; none of ours: the first configured address."""
        wanted = {r.lower() for r in recipients}
        for configured in self.inbound:
            if any(self.inbound_for(r) is configured for r in wanted):
                return configured.address
        return self.inbound[0].address if self.inbound else None

    @property
    def own_domains(self) -> frozenset[str]:
        return frozenset(i.address.rsplit("@", 1)[1] for i in self.inbound)

    def telegram_bot(self, name: str) -> TelegramSettings | None:
        for b in self.telegram:
            if b.name == name:
                return b
        return None

    def telegram_token(self, bot: TelegramSettings) -> str:
        """The bot's token, from the file or the environment (read when needed, not logged)."""
        if bot.token_file is not None:
            return self.path(bot.token_file).read_text(encoding="utf-8").strip()
        return bot.token.get_secret_value()

    def imap_password(self, mailbox: ImapSettings) -> str:
        """The mailbox's password, from the file (read at each connect) or the settings."""
        if mailbox.password_file is not None:
            return self.path(mailbox.password_file).read_text(encoding="utf-8").rstrip("\r\n")
        return mailbox.password.get_secret_value()


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[tuple[Any, ...], str]:
    """Apply the `HELPDESKD_*` overrides to `data`; returns the key path each one set,
    with its variable's name, so an error in such a value can name the variable."""
    sources: dict[tuple[Any, ...], str] = {}
    for key, value in environ.items():
        if key in ENV_SHORTCUTS:
            path: tuple[str, ...] = ENV_SHORTCUTS[key]
        elif key.startswith(ENV_PREFIX) and "__" in key:
            path = tuple(part.lower() for part in key[len(ENV_PREFIX) :].split("__"))
        else:
            continue
        if len(path) == 3:
            for index in _apply_env_to_array(data, path, value):
                sources[(path[0], index, path[2])] = key
            continue
        if len(path) != 2:
            continue
        section = data.setdefault(path[0], {})
        if isinstance(section, dict):
            section[path[1]] = value
            sources[path] = key
    return sources


def _apply_env_to_array(data: dict[str, Any], path: tuple[str, ...], value: str) -> list[int]:
    """`HELPDESKD_<ARRAY>__<NAME>__<KEY>` sets `key` of the `[[array]]` entry named NAME.

    Entries are matched by `name` with `-` read as `_` (shells cannot set `-` in names),
    e.g. HELPDESKD_TELEGRAM__HELP_BOT__TOKEN for the bot `help-bot`. Returns the
    indexes of the entries it set.
    """
    array, name, key = path
    entries = data.get(array)
    if not isinstance(entries, list):
        return []
    copied = [dict(e) if isinstance(e, dict) else e for e in entries]
    found = []
    for index, entry in enumerate(copied):
        if isinstance(entry, dict) and str(entry.get("name", "")).lower().replace("-", "_") == name:
            entry[key] = value
            found.append(index)
    # A copy: the caller's parsed TOML stays untouched.
    data[array] = copied
    return found


_TABLE = re.compile(r"^\s*\[(\[)?\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(?:#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+|\"[^\"]*\")\s*=")


def locate(text: str, loc: tuple[int | str, ...]) -> int | None:
    """Best-effort line number (1-based) of the key at `loc` in TOML `text`.

    tomllib keeps no positions, so this walks table headers: `[a.b]` and the
    n-th `[[a]]`, then the key inside that table. It returns the table's line
    when the key itself is absent (a missing required key). Dotted keys
    (`smtp.port = 1`) and inline tables are not followed: the error then names
    the key path without a line.
    """
    parts = [str(p) for p in loc]
    table: list[str] = []
    counts: dict[str, int] = {}
    best: int | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        m = _TABLE.match(line)
        if m:
            name = [p.strip().strip("\"'") for p in m.group(2).split(".")]
            if m.group(1):  # [[array]]: remember which element this is
                key = ".".join(name)
                counts[key] = counts.get(key, -1) + 1
                name = [*name, str(counts[key])]
            table = name
            if parts[: len(table)] == table:
                best = number
            continue
        k = _KEY.match(line)
        if k and [*table, k.group(1).strip('"')] == parts[: len(table) + 1]:
            return number
    return best


def _format_errors(source: str, exc: ValidationError, text: str | None = None,
                   env: Mapping[tuple[Any, ...], str] | None = None) -> str:
    """One line per error: `file:line: key.path: message`, or the environment variable
    that set the key; the line is left out when it cannot be found."""
    lines = [f"{source}: invalid configuration:"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        msg = err["msg"]
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, KeyProblem):
            loc, msg = loc + cause.loc, str(cause)
        elif isinstance(cause, ValueError):
            msg = str(cause)  # without pydantic's "Value error, "
        elif err["type"] == "extra_forbidden":
            msg = "unknown key"
        where = ".".join(str(part) for part in loc) or "(top level)"
        variable = next((name for path, name in (env or {}).items()
                         if loc[: len(path)] == path), None)
        if variable is not None:
            lines.append(f"{variable} (environment): {where}: {msg}")
            continue
        line = locate(text, loc) if text is not None and loc else None
        prefix = f"{source}:{line}: " if line is not None else "  "
        lines.append(f"{prefix}{where}: {msg}")
    return "\n".join(lines)


def parse_settings(
    data: Mapping[str, Any],
    *,
    source: str = "<config>",
    base_dir: Path = Path("."),
    environ: Mapping[str, str] | None = None,
    text: str | None = None,
) -> Settings:
    """Validate an already-parsed TOML mapping (plus environment overrides)."""
    merged: dict[str, Any] = {
        k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()
    }
    env = _apply_env(merged, os.environ if environ is None else environ)
    merged["base_dir"] = base_dir
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc, text, env)) from None


def load_settings(path: Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the configuration file at `path`."""
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_settings(
        data, source=str(path), base_dir=path.absolute().parent, environ=environ, text=text
    )


def with_real_secret(settings: Settings, *, create: bool = True) -> Settings:
    """Replace the shipped demo secret with a random one kept in `data_dir/secret`.

    Anyone can compute reply tokens with a secret that is printed in the repository,
    and so act as any agent. A deployment that never set `secret` therefore gets a
    random secret generated once (mode 0600) and reused on every start, so tokens in
    notifications already sent stay valid. `create=False` (commands that sign
    nothing) reads the file if there is one and otherwise changes nothing.
    """
    if settings.daemon.secret.get_secret_value() != DEFAULT_SECRET:
        return settings
    path = settings.path(settings.daemon.data_dir) / "secret"
    if not path.exists() and not create:
        return settings
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32))
    value = path.read_text().strip()
    daemon = settings.daemon.model_copy(update={"secret": SecretStr(value)})
    return settings.model_copy(update={"daemon": daemon})


def default_config_path(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env.get("HELPDESKD_CONFIG", "helpdeskd.toml"))
