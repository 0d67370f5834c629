"""Templates: override directory first, read once (SIGHUP re-reads), HTML autoescaped."""

from __future__ import annotations

from pathlib import Path

from gateway.notify import Templates


def test_an_override_wins_and_is_read_again_only_on_reload(tmp_path: Path) -> None:
    (tmp_path / "ack.txt").write_text("Thanks, {{ customer_name }}.\n")
    templates = Templates(tmp_path)
    assert templates.render("ack.txt", customer_name="Dana") == "Thanks, Dana.\n"
    (tmp_path / "ack.txt").write_text("We got it, {{ customer_name }}.\n")
    # Read once: an edit is not picked up message by message...
    assert templates.render("ack.txt", customer_name="Dana") == "Thanks, Dana.\n"
    templates.reload()  # ...but on SIGHUP
    assert templates.render("ack.txt", customer_name="Dana") == "We got it, Dana.\n"


def test_html_templates_escape_what_they_interpolate_and_text_ones_do_not(
    tmp_path: Path,
) -> None:
    (tmp_path / "note.html").write_text("<p>{{ subject }}</p>")
    (tmp_path / "note.txt").write_text("{{ subject }}")
    templates = Templates(tmp_path)
    subject = '<script>alert("x")</script> & more'
    assert templates.render("note.html", subject=subject) == (
        "<p>&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; more</p>")
    assert templates.render("note.txt", subject=subject) == subject
