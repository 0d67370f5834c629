"""sanitize_html keeps markup but nothing active; html_to_text gives readable text (B22, B23)."""

from __future__ import annotations

import pytest

from gateway.mail.html import html_to_text, sanitize_html

# --- sanitize_html ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "element",
    [
        "<script>alert(1)</script>",
        "<script type='text/javascript'>if (a < b) { x() }</script>",
        "<style>body { background: url(evil) }</style>",
        "<iframe src='https://evil.example'><p>fallback</p></iframe>",
        "<object data='x.swf'><param name=a value=b>fallback</object>",
        "<embed src='x.swf'>",
        "<applet code='X'>inner</applet>",
        "<frameset><frame src='x'></frameset>",
        "<SCRIPT>alert(1)</SCRIPT>",
        "<script>never closed",
    ],
)
def test_active_elements_are_dropped_with_their_content(element: str) -> None:
    out = sanitize_html(f"<p>before</p>{element}<p>after</p>")
    lowered = out.lower()
    for word in ("script", "style", "iframe", "object", "embed", "applet", "frame", "alert"):
        assert word not in lowered
    assert "<p>before</p>" in out
    if "never closed" not in element:
        assert "<p>after</p>" in out
        assert "fallback" not in out and "inner" not in out


@pytest.mark.parametrize(
    "attribute",
    [
        'onclick="steal()"',
        "onload=steal()",
        'ONMOUSEOVER="steal()"',
        'onerror="steal()"',
    ],
)
def test_event_handlers_are_dropped(attribute: str) -> None:
    out = sanitize_html(f'<img src="https://x.example/a.png" {attribute} alt="pic">')
    assert "steal" not in out
    assert 'src="https://x.example/a.png"' in out
    assert 'alt="pic"' in out


@pytest.mark.parametrize(
    "url",
    [
        "javascript:alert(1)",
        "JavaScript:alert(1)",
        " java\tscript:alert(1)",
        "&#106;avascript:alert(1)",
        "jav&#x09;ascript:alert(1)",
        "vbscript:msgbox(1)",
        "data:text/html;base64,PHNjcmlwdD4=",
        "\x01javascript:alert(1)",
    ],
)
def test_dangerous_urls_are_dropped(url: str) -> None:
    out = sanitize_html(
        f'<a href="{url}">link</a><img src="{url}"><form action="{url}"></form>'
        f'<svg><a xlink:href="{url}">x</a></svg><img srcset="a.png 1x, {url} 2x">'
    )
    lowered = out.lower()
    assert "script:" not in lowered and "data:" not in lowered
    assert "<a>link</a>" in out


def test_safe_markup_is_kept() -> None:
    html = (
        '<!DOCTYPE html><html><body><div class="x" style="color: red">'
        '<a href="https://example.com/?a=1&amp;b=2" title="T">link</a>'
        '<img src="cid:logo@x" width="10"><br><table><tr><td>cell</td></tr></table>'
        '<a href="mailto:bob@example.com">mail</a></div></body></html>'
    )
    out = sanitize_html(html)
    for kept in (
        '<div class="x" style="color: red">',
        '<a href="https://example.com/?a=1&amp;b=2" title="T">link</a>',
        '<img src="cid:logo@x" width="10">',
        "<br>",
        "<td>cell</td>",
        'href="mailto:bob@example.com"',
    ):
        assert kept in out


def test_text_and_attributes_are_escaped_again() -> None:
    out = sanitize_html('<p title="&quot;&gt;&lt;script&gt;">1 &lt; 2 &amp; &lt;b&gt;</p>')
    assert out == '<p title="&quot;&gt;&lt;script&gt;">1 &lt; 2 &amp; &lt;b&gt;</p>'


def test_comments_and_conditional_comments_are_dropped() -> None:
    out = sanitize_html("<p>a<!-- secret --></p><!--[if gte mso 9]><xml>x</xml><![endif]-->")
    assert out == "<p>a</p>"


def test_style_attribute_with_script_is_dropped() -> None:
    out = sanitize_html(
        '<div style="width: expression(alert(1))">a</div>'
        '<div style="background:url(javascript:alert(1))">b</div>'
        '<div style="behavior: url(x.htc)">c</div>'
    )
    assert "style" not in out
    assert out == "<div>a</div><div>b</div><div>c</div>"


def test_meta_refresh_and_base_are_dropped() -> None:
    out = sanitize_html(
        '<head><meta http-equiv="refresh" content="0;url=javascript:x()">'
        '<base href="https://evil.example/"><link rel=stylesheet href=x.css></head>'
    )
    assert out == ""


@pytest.mark.parametrize("svg", [
    '<svg><a><animate attributeName="href" values="javascript:alert(1)"/><text>x</text></a></svg>',
    '<svg><set attributeName="onload" to="alert(1)"/></svg>',
    '<svg><handler ev:event="load">alert(1)</handler></svg>',
])
def test_svg_is_dropped_with_its_animations(svg: str) -> None:
    out = sanitize_html(f"<p>before</p>{svg}<p>after</p>")
    assert out == "<p>before</p><p>after</p>"


def test_style_with_css_escapes_is_dropped() -> None:
    out = sanitize_html('<div style="width: expr\\65ssion(alert(1))">a</div>')
    assert out == "<div>a</div>"


def test_weird_attribute_names_are_dropped() -> None:
    out = sanitize_html('<a "onclick=x() href="https://ok.example">y</a>')
    assert "onclick" not in out
    assert "<a" in out and "y</a>" in out


def test_broken_markup_is_contained() -> None:
    for html in ("<![foo bar]>text", "<p <script>alert(1)</script>", "<a href='x", "<<>>"):
        out = sanitize_html(html)
        assert "<script" not in out.lower()


def test_extra_elements_can_be_dropped() -> None:
    out = sanitize_html(
        "<p>new</p><blockquote><p>old</p></blockquote>", drop=frozenset({"blockquote"})
    )
    assert out == "<p>new</p>"


def test_nul_bytes_are_removed() -> None:
    assert sanitize_html("<p>a\x00b</p>") == "<p>ab</p>"


# --- html_to_text -----------------------------------------------------------------------


def test_tags_removed_entities_decoded() -> None:
    text = html_to_text("<p>Fish &amp; chips &lt;3 &eacute;t&eacute;&nbsp;!</p>")
    assert text == "Fish & chips <3 été !"


def test_script_and_style_are_dropped() -> None:
    text = html_to_text(
        "<html><head><title>T</title><style>p {color: red}</style></head>"
        "<body><script>var secret = 1;</script><p>visible</p></body></html>"
    )
    assert text == "visible"


def test_blocks_become_lines() -> None:
    text = html_to_text("<div>one</div><div>two<br>three</div><ul><li>a</li><li>b</li></ul>")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    assert lines == ["one", "two", "three", "* a", "* b"]


def test_whitespace_is_tidied() -> None:
    text = html_to_text("<p>a   </p>\n\n\n\n<p></p><p></p><p>b</p>")
    assert text.startswith("a")
    assert text.endswith("b")
    assert "\n\n\n" not in text
    assert all(line == line.rstrip() for line in text.splitlines())


@pytest.mark.parametrize(
    "html",
    ["", "   ", '<?xml version="1.0" encoding="utf-8"?><p>x</p>', "<p>a\x00b</p>", "<<<", "\ufeff"],
)
def test_odd_input_never_raises(html: str) -> None:
    assert isinstance(html_to_text(html), str)
