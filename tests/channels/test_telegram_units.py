"""Pure parts of the Telegram channel: config, text splitting, pacing, update parsing, the guard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support.botapi import guard_real_telegram
from telegram import Bot
from telegram.error import NetworkError

from gateway.channels.telegram import Pacer, media_of, split_text
from gateway.chat import SkippedFile, encode_raw, parse_raw
from gateway.config import ConfigError, Settings, parse_settings
from gateway.message import Attachment


def _settings(bot: dict[str, Any], environ: dict[str, str] | None = None,
              base_dir: Path = Path(".")) -> Settings:
    data = {
        "daemon": {"secret": "test-secret-0123456789abcdef"},
        "inbound": [{"address": "help@helpdesk.test", "default_group": "First Line"}],
        "groups": [{"name": "First Line"}, {"name": "Providers"}],
        "telegram": [{"name": "help-bot", "inbound_address": "help@helpdesk.test", **bot}],
    }
    return parse_settings(data, environ=environ or {}, base_dir=base_dir)


# -- configuration ---------------------------------------------------------------------


def test_config_defaults_and_route() -> None:
    s = _settings({"token": "1:x", "default_group": "Providers"})
    [bot] = s.telegram
    assert (bot.mode, bot.route, bot.allow_groups) == ("polling", "/telegram/help-bot", False)
    assert s.telegram_token(bot) == "1:x"
    assert (s.http.host, s.http.port) == ("127.0.0.1", 8080)
    assert "1:x" not in repr(s)  # the token is a secret


def test_token_from_environment_and_file(tmp_path: Path) -> None:
    s = _settings({}, environ={"HELPDESKD_TELEGRAM__HELP_BOT__TOKEN": "2:env"})
    assert s.telegram_token(s.telegram[0]) == "2:env"
    (tmp_path / "token").write_text("3:file\n")
    s = _settings({"token_file": "token"}, base_dir=tmp_path)
    assert s.telegram_token(s.telegram[0]) == "3:file"


@pytest.mark.parametrize(("bot", "message"), [
    ({}, "no token"),
    ({"token": "1:x", "token_file": "t"}, "not both"),
    ({"token": "1:x", "mode": "webhook", "webhook_url": "https://h/t"}, "webhook_secret"),
    ({"token": "1:x", "mode": "webhook", "webhook_secret": "s"}, "webhook_url"),
    ({"token": "1:x", "inbound_address": "other@helpdesk.test"}, "not an [[inbound]]"),
    ({"token": "1:x", "default_group": "Nobody"}, "is no group"),
    ({"token": "1:x", "name": "Bad Name"}, "telegram.0.name"),
    ({"token": "1:x", "token_file": None, "tokn": "typo"}, "unknown key"),
])
def test_contradictions_refused_at_load(bot: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        _settings(bot)


# -- splitting and pacing --------------------------------------------------------------


def test_split_prefers_paragraphs_and_keeps_everything() -> None:
    text = "\n\n".join(f"Paragraph {i}. " + "x" * 90 for i in range(100))
    parts = split_text(text)
    assert len(parts) == 3
    assert all(len(p) <= 4096 for p in parts)
    assert all(p.startswith("Paragraph") for p in parts)
    assert "\n\n".join(parts) == text


def test_split_counts_utf16_units_and_never_cuts_a_character() -> None:
    text = "😀" * 3000  # 6000 UTF-16 code units, no place to break
    parts = split_text(text)
    assert [len(p.encode("utf-16-le")) // 2 for p in parts] == [4096, 1904]
    assert "".join(parts) == text
    assert split_text("short") == ["short"]


def test_pacer_spaces_sends_per_chat_and_per_bot() -> None:
    now = [100.0]
    pacer = Pacer(chat_interval=1.0, bot_interval=0.1, clock=lambda: now[0])
    assert pacer.reserve(1) == 0
    assert pacer.reserve(2) == pytest.approx(0.1)  # another chat: only the bot's pace
    assert pacer.reserve(1) == pytest.approx(1.0)  # same chat: a second after its last
    now[0] += 5
    assert pacer.reserve(1) == 0


# -- updates ---------------------------------------------------------------------------


def _update(text: str | None = None, **msg: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"message_id": 9, "date": 1700000000,
                               "chat": {"id": 5, "type": "private"},
                               "from": {"id": 5, "is_bot": False, "first_name": "Dana",
                                        "last_name": "User", "username": "dana"}, **msg}
    if text is not None:
        message["text"] = text
    return {"update_id": 42, "message": message}


@pytest.mark.parametrize(("text", "command"), [
    ("/status", ("status", "")),
    ("/status@helpbot", ("status", "")),
    ("/NEW I cannot log in", ("new", "I cannot log in")),
    ("/new\nline two", ("new", "line two")),
    ("/etc/hosts is broken", None),
    ("/ hello", None),
    ("hello /status", None),
])
def test_commands(text: str, command: tuple[str, str] | None) -> None:
    assert parse_raw(encode_raw("b", _update(text))).command == command


def test_raw_round_trip_keeps_files_and_skips() -> None:
    att = Attachment("app.log", "text/plain", b"\x00binary\xff")
    raw = encode_raw("helpbot", _update(caption="see log"), [("document", att)],
                     [SkippedFile("video", "big.mp4", 30_000_000)])
    upd = parse_raw(raw)
    assert (upd.bot, upd.update_id, upd.kind, upd.chat_id) == ("helpbot", 42, "message", 5)
    assert (upd.text, upd.user_name, upd.username, upd.private) == (
        "see log", "Dana User", "dana", True)
    assert upd.files == (att,)
    assert upd.skipped == (SkippedFile("video", "big.mp4", 30_000_000),)


def test_media_picks_largest_photo_and_never_a_path() -> None:
    msg = {
        "photo": [{"file_id": "s", "file_unique_id": "us", "file_size": 10, "width": 90,
                   "height": 60},
                  {"file_id": "b", "file_unique_id": "ub", "file_size": 900, "width": 1280,
                   "height": 853}],
        "document": {"file_id": "d", "file_unique_id": "ud", "file_name": "../../etc/passwd"},
        "voice": {"file_id": "v", "file_unique_id": "uv", "mime_type": "audio/ogg"},
    }
    found = {m.kind: m for m in media_of(msg)}
    assert found["photo"].file_id == "b"
    assert found["document"].filename == "passwd"
    assert found["voice"].filename.startswith("voice_uv.")
    assert found["voice"].content_type == "audio/ogg"


# -- the guard -------------------------------------------------------------------------


async def test_guard_stops_calls_to_the_real_telegram(monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = guard_real_telegram(monkeypatch)
    bot = Bot("123:not-a-real-token")
    with pytest.raises(NetworkError):
        await bot.get_me()
    await bot.shutdown()
    assert attempts and "123:not-a-real-token" not in " ".join(attempts)
