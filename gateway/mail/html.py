"""HTML from inbound mail: make it safe to display, or turn it into plain text.

`sanitize_html` keeps only an allowlist of elements and attributes, with
ammonia (through nh3): script/style/iframe/object/SVG and anything else not on
the list go, so do `on*` handlers and every URL whose scheme is not http(s),
mailto, tel or cid (inline images). An allowlist, rather than a list of what to
remove, because the list of ways HTML can run code keeps growing (SVG
`<animate attributeName="href" values="javascript:...">` got past the previous,
hand-written one). ammonia's parser (html5ever) is also linear in its input; the
stdlib's HTMLParser took seconds on a 100 KB run of `<!--`.
`html_to_text` renders HTML as readable text (B22: tags removed, entities
decoded, script and style dropped). Both are pure and never raise.
"""

from __future__ import annotations

import html as _html
import re
from functools import cache

import nh3
from inscriptis import get_text

__all__ = ["html_to_text", "sanitize_html"]

# Elements dropped together with everything inside them (the rest of what is not
# allowed is dropped as a tag, its text kept).
_DROP_WITH_CONTENT = frozenset({
    "script", "style", "iframe", "frame", "frameset", "object", "applet", "noembed",
    "noscript", "template", "svg", "math", "head", "title",
})
# Presentational attributes mail clients use, on any element.
_GENERIC_ATTRIBUTES = frozenset({
    "align", "bgcolor", "border", "cellpadding", "cellspacing", "class", "color", "dir",
    "face", "height", "lang", "size", "style", "title", "valign", "width",
})
_TAGS = frozenset(nh3.ALLOWED_TAGS | {"font", "tfoot"}) - _DROP_WITH_CONTENT
_ATTRIBUTES = {**{tag: set(attrs) for tag, attrs in nh3.ALLOWED_ATTRIBUTES.items()},
               "*": set(_GENERIC_ATTRIBUTES)}
_URL_SCHEMES = {"http", "https", "mailto", "tel", "cid"}
_STYLE_JUNK = re.compile(r"/\*.*?\*/|[\x00-\x20]+", re.S)
# Old IE/Firefox ways to run script from CSS, and CSS escapes that could spell them.
_BAD_STYLE = ("expression(", "javascript:", "vbscript:", "behavior:", "-moz-binding", "\\")
_BLANK_LINES = re.compile(r"\n{3,}")


def _is_bad_style(value: str) -> bool:
    compact = _STYLE_JUNK.sub("", value).lower()
    return any(marker in compact for marker in _BAD_STYLE)


def _attribute(tag: str, name: str, value: str) -> str | None:
    return None if name == "style" and _is_bad_style(value) else value


@cache
def _cleaner(drop: frozenset[str]) -> nh3.Cleaner:
    dropped = _DROP_WITH_CONTENT | drop
    # ammonia refuses a tag that is both allowed and dropped with its content.
    attributes = {tag: names for tag, names in _ATTRIBUTES.items() if tag not in dropped}
    return nh3.Cleaner(
        tags=set(_TAGS - dropped), clean_content_tags=set(dropped), attributes=attributes,
        attribute_filter=_attribute, url_schemes=_URL_SCHEMES, link_rel=None,
    )


def sanitize_html(html: str, *, drop: frozenset[str] = frozenset()) -> str:
    """Return `html` without active content; the allowed markup is kept.

    `drop` names further elements to remove together with their content.
    """
    return _cleaner(drop).clean(html.replace("\x00", ""))


def _tidy(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    # Line by line, not with a `[ \t]+$` regex: that one is quadratic on a long run
    # of spaces that does not end a line.
    lines = text.replace("\xa0", " ").split("\n")
    return _BLANK_LINES.sub("\n\n", "\n".join(line.rstrip(" \t") for line in lines)).strip("\n")


def html_to_text(html: str) -> str:
    """Render `html` as plain text: script/style dropped, entities decoded."""
    html = html.replace("\x00", "")
    try:
        return _tidy(get_text(html))
    except Exception:  # lxml rejects some inputs: keep the text of the sanitised markup
        text = re.sub(r"<(?:br|/p|/div|/tr|/li|/h[1-6])\b[^>]*>", "\n", sanitize_html(html))
        return _tidy(_html.unescape(re.sub(r"<[^>]*>", "", text)))
