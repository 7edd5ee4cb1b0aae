"""ternet.text.printable: untrusted strings never reach a terminal as control sequences."""
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ternet.text import printable

BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


def terminal_active(c: str) -> bool:
    """What a terminal acts on rather than shows, by Unicode category plus the bidi controls."""
    return unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") or c in BIDI


@pytest.mark.parametrize("raw, shown", [
    ("\x1b[2J\x1b[H", "\\x1b[2J\\x1b[H"),                  # clear screen, cursor home
    ("\x1b]0;owned\x07", "\\x1b]0;owned\\x07"),            # set the window title
    ("cat\n  1  99.00%  forged", "cat\\x0a  1  99.00%  forged"),
    ("a\rb\tc\x00d\x7f", "a\\x0db\\x09c\\x00d\\x7f"),
    ("\x9b31m", "\\x9b31m"),                                # C1 CSI, one character
    ("abc\u202edcba", "abc\\u202edcba"),                    # right-to-left override
    ("line\u2028sep", "line\\u2028sep"),
    ("name\udcff.png", "name\\udcff.png"),                  # an undecodable file-name byte
])
def test_control_characters_become_visible_escapes(raw, shown):
    assert printable(raw) == shown


@pytest.mark.parametrize("text", ["tabby, tabby cat", "Schrödinger's café", "日本語",
                                  "C:\\path\\x1b", "👩‍👩‍👧 (zero-width joiners)", ""])
def test_ordinary_text_is_unchanged(text):
    assert printable(text) == text


def test_non_strings_are_converted():
    from pathlib import Path
    assert printable(Path("/tmp/a\nb")) == "/tmp/a\\x0ab" and printable(3) == "3"


@given(st.text())
def test_no_terminal_active_character_survives(s):
    out = printable(s)
    assert not any(terminal_active(c) for c in out)
    assert out.encode("utf-8").decode("utf-8") == out     # a UTF-8 stream can always take it


@given(st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"),
                                      blacklist_characters=BIDI)))
def test_text_without_controls_passes_through(s):
    assert printable(s) == s
