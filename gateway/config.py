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

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "HELPDESKD_"
# Short environment names for the settings operators most often keep out of files.
ENV_SHORTCUTS = {
    "HELPDESKD_SECRET": ("daemon", "secret"),
    "HELPDESKD_DATABASE_URL": ("daemon", "database_url"),
}
DEFAULT_SECRET = "change-me-to-a-long-random-string"


class ConfigError(Exception):
    """A configuration file is unreadable or invalid; the message says where and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _normalise_address(value: str) -> str:
    value = value.strip().lower()
    if value.count("@") != 1 or not value.split("@")[0] or not value.split("@")[1]:
        raise ValueError(f"not an email address: {value!r}")
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


class InboundAddress(_Section):
    """[[inbound]]: an address the daemon receives mail for, and its default group."""

    address: str
    default_group: str
    name: str = ""

    @field_validator("address")
    @classmethod
    def _norm(cls, value: str) -> str:
        return _normalise_address(value)


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

    @field_validator("agents")
    @classmethod
    def _agents(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_normalise_address(v) for v in value)


class Settings(_Section):
    """The whole configuration, as loaded from one file."""

    daemon: DaemonSettings = DaemonSettings()
    smtp: SmtpSettings = SmtpSettings()
    outbound: OutboundSettings = OutboundSettings()
    inbound: tuple[InboundAddress, ...] = ()
    agents: tuple[AgentSettings, ...] = ()
    groups: tuple[GroupSettings, ...] = ()
    # Directory the file was loaded from; relative paths are resolved against it.
    base_dir: Path = Path(".")

    @model_validator(mode="after")
    def _cross_references(self) -> Settings:
        groups = [g.name for g in self.groups]
        if len(set(groups)) != len(groups):
            raise ValueError("group names must be unique")
        agents = {a.address for a in self.agents}
        if len(agents) != len(self.agents):
            raise ValueError("agent addresses must be unique")
        for g in self.groups:
            for a in g.agents:
                if a not in agents:
                    raise ValueError(f"group {g.name!r} lists {a!r}, which is not in [[agents]]")
            if g.escalate_to is not None and g.escalate_to not in groups:
                raise ValueError(f"group {g.name!r}: escalate_to {g.escalate_to!r} is no group")
        inbound = [i.address for i in self.inbound]
        if len(set(inbound)) != len(inbound):
            raise ValueError("inbound addresses must be unique")
        for i in self.inbound:
            if i.default_group not in groups:
                raise ValueError(
                    f"inbound {i.address!r}: default_group {i.default_group!r} is no group"
                )
            if i.address in agents:
                raise ValueError(f"inbound {i.address!r} is also an agent address")
        return self

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

    def inbound_for(self, address: str) -> InboundAddress | None:
        """The inbound address `address` delivers to, `+` sub-addresses included."""
        address = address.lower()
        local, _, domain = address.rpartition("@")
        base = local.split("+", 1)[0]
        for i in self.inbound:
            if i.address == address or i.address == f"{base}@{domain}":
                return i
        return None

    @property
    def own_domains(self) -> frozenset[str]:
        return frozenset(i.address.rsplit("@", 1)[1] for i in self.inbound)


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for key, value in environ.items():
        if key in ENV_SHORTCUTS:
            path: tuple[str, ...] = ENV_SHORTCUTS[key]
        elif key.startswith(ENV_PREFIX) and "__" in key:
            path = tuple(part.lower() for part in key[len(ENV_PREFIX) :].split("__"))
        else:
            continue
        if len(path) != 2:
            continue
        section = data.setdefault(path[0], {})
        if isinstance(section, dict):
            section[path[1]] = value


_TABLE = re.compile(r"^\s*\[(\[)?\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(?:#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+|\"[^\"]*\")\s*=")


def locate(text: str, loc: tuple[int | str, ...]) -> int | None:
    """Best-effort line number (1-based) of the key at `loc` in TOML `text`.

    tomllib keeps no positions, so this walks table headers: `[a.b]` and the
    n-th `[[a]]`, then the key inside that table. It returns the table's line
    when the key itself is absent (a missing required key).
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
            if parts[: len(table)] == table and (best is None or len(table) >= 1):
                best = number
            continue
        k = _KEY.match(line)
        if k and [*table, k.group(1).strip('"')] == parts[: len(table) + 1]:
            return number
    return best


def _format_errors(source: str, exc: ValidationError, text: str | None = None) -> str:
    lines = [f"{source}: invalid configuration:"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = ".".join(str(part) for part in loc) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
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
    _apply_env(merged, os.environ if environ is None else environ)
    merged["base_dir"] = base_dir
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc, text)) from None


def load_settings(path: Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the configuration file at `path`."""
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_settings(
        data, source=str(path), base_dir=path.absolute().parent, environ=environ, text=text
    )


def default_config_path(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env.get("HELPDESKD_CONFIG", "helpdeskd.toml"))
