"""HTML from inbound mail: make it safe to display, or turn it into plain text.

`sanitize_html` re-serialises a message's HTML with everything that can run
code or load active content removed (script/style/iframe/object/embed
elements, `on*` event handlers, `javascript:`/`vbscript:`/`data:` URLs).
`html_to_text` renders HTML as readable text (B22: tags removed, entities
decoded, script and style dropped). Both are pure and never raise.
"""

from __future__ import annotations

import html as _html
import re
from html.parser import HTMLParser

from inscriptis import get_text

__all__ = ["html_to_text", "sanitize_html"]

# Dropped together with everything inside them.
_DROP_WITH_CONTENT = frozenset(
    {"script", "style", "iframe", "frame", "frameset", "object", "applet", "noembed"}
)
# Dropped as a tag only (void elements, or elements whose only job is to load,
# redirect or re-base active content: <meta http-equiv=refresh>, <base href>).
_DROP_TAG = frozenset({"embed", "base", "link", "meta", "param"})
_VOID = frozenset(
    {
        "area",
        "base",
        "br",
        "col",
        "embed",
        "hr",
        "img",
        "input",
        "link",
        "meta",
        "param",
        "source",
        "track",
        "wbr",
    }
)
# Attributes whose value is a URL a browser may follow or fetch.
_URL_ATTRS = frozenset(
    {
        "href",
        "src",
        "xlink:href",
        "action",
        "formaction",
        "background",
        "poster",
        "lowsrc",
        "dynsrc",
        "cite",
        "longdesc",
        "srcset",
        "data",
        "codebase",
        "usemap",
        "ping",
    }
)
_BAD_SCHEMES = ("javascript:", "vbscript:", "data:", "livescript:")
# Browsers ignore ASCII whitespace and control characters inside a URL scheme
# ("java\tscript:"), so compare with those removed.
_URL_JUNK = re.compile(r"[\x00-\x20\x7f]+")
_STYLE_JUNK = re.compile(r"/\*.*?\*/|[\x00-\x20\\]+", re.S)
# Old IE/Firefox ways to run script from CSS.
_BAD_STYLE = ("expression(", "javascript:", "vbscript:", "behavior:", "-moz-binding")
_TAG_NAME = re.compile(r"[a-z][a-z0-9:-]*\Z")
_ATTR_NAME = re.compile(r"[a-z_:][-a-z0-9_:.]*\Z")
_BLANK_LINES = re.compile(r"\n{3,}")
_TRAILING_WS = re.compile(r"[ \t\xa0]+$", re.M)


class _Sanitizer(HTMLParser):
    """Re-emits only what it recognises; every text node is escaped again.

    Because all literal `<` in the output come from tags this class writes
    itself, a browser cannot see a tag the sanitizer did not check.
    """

    def __init__(self, drop: frozenset[str]) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self._drop = _DROP_WITH_CONTENT | drop
        # Name and nesting depth of the element whose content is being skipped.
        self._skip: str | None = None
        self._skip_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._start(tag, attrs, self_closing=False)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._start(tag, attrs, self_closing=True)

    def _start(self, tag: str, attrs: list[tuple[str, str | None]], *, self_closing: bool) -> None:
        if self._skip is not None:
            if tag == self._skip and not self_closing:
                self._skip_depth += 1
            return
        if tag in self._drop:
            if not self_closing:
                self._skip, self._skip_depth = tag, 1
            return
        if tag in _DROP_TAG or not _TAG_NAME.match(tag):
            return
        parts = [tag]
        for name, value in attrs:
            if not _ATTR_NAME.match(name) or name.startswith("on") or name == "srcdoc":
                continue
            if value is None:
                parts.append(name)
                continue
            if name in _URL_ATTRS and _is_bad_url(value):
                continue
            if name == "style" and _is_bad_style(value):
                continue
            parts.append(f'{name}="{_html.escape(value, quote=True)}"')
        close = " /" if self_closing and tag in _VOID else ""
        self.out.append(f"<{' '.join(parts)}{close}>")

    def handle_endtag(self, tag: str) -> None:
        if self._skip is not None:
            if tag == self._skip:
                self._skip_depth -= 1
                if self._skip_depth == 0:
                    self._skip = None
            return
        if tag in self._drop or tag in _DROP_TAG or tag in _VOID:
            return
        if _TAG_NAME.match(tag):
            self.out.append(f"</{tag}>")

    def handle_data(self, data: str) -> None:
        if self._skip is None:
            self.out.append(_html.escape(data, quote=False))

    def handle_decl(self, decl: str) -> None:
        if self._skip is None and decl.lower().startswith("doctype"):
            self.out.append("<!DOCTYPE html>")

    # Comments (including Outlook's conditional comments), processing
    # instructions and CDATA sections are dropped: none of them is content.
    def handle_comment(self, data: str) -> None:
        return

    def handle_pi(self, data: str) -> None:
        return

    def unknown_decl(self, data: str) -> None:
        return


def _is_bad_url(value: str) -> bool:
    compact = _URL_JUNK.sub("", value).lower()
    if compact.startswith(_BAD_SCHEMES):
        return True
    # srcset is a comma-separated list of URLs.
    return "," in compact and any(
        item.strip().startswith(_BAD_SCHEMES) for item in compact.split(",")
    )


def _is_bad_style(value: str) -> bool:
    compact = _STYLE_JUNK.sub("", value).lower()
    return any(marker in compact for marker in _BAD_STYLE)


def sanitize_html(html: str, *, drop: frozenset[str] = frozenset()) -> str:
    """Return `html` without active content; the rest of the markup is kept.

    `drop` names further elements to remove together with their content.
    """
    html = html.replace("\x00", "")
    parser = _Sanitizer(drop)
    try:
        parser.feed(html)
        parser.close()
    except Exception:  # html.parser raises AssertionError on some broken markup
        # Whatever was emitted so far is safe; show the rest as escaped text so
        # nothing is lost.
        return "<pre>" + _html.escape(html_to_text(html), quote=False) + "</pre>"
    return "".join(parser.out)


class _TextFallback(HTMLParser):
    """Minimal text extraction, used only when inscriptis/lxml fail."""

    _BLOCK = frozenset(
        {"br", "p", "div", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "pre"}
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style", "head", "title"):
            self._skip += 1
        elif tag in self._BLOCK:
            self.out.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "head", "title"):
            self._skip = max(0, self._skip - 1)
        elif tag in self._BLOCK:
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.out.append(data)


def _tidy(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    text = _TRAILING_WS.sub("", text.replace("\xa0", " "))
    return _BLANK_LINES.sub("\n\n", text).strip("\n")


def html_to_text(html: str) -> str:
    """Render `html` as plain text: script/style dropped, entities decoded."""
    html = html.replace("\x00", "")
    try:
        return _tidy(get_text(html))
    except Exception:  # lxml rejects some inputs; fall back to the stdlib
        parser = _TextFallback()
        try:
            parser.feed(html)
            parser.close()
        except Exception:
            # Last resort: strip anything tag-like, keep the text.
            return _tidy(_html.unescape(re.sub(r"<[^>]*>", " ", html)))
        return _tidy("".join(parser.out))
