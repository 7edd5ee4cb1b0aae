"""Untrusted text (labels, arch, layer names, paths, error messages) made safe for a terminal."""
from __future__ import annotations

import re

__all__ = ["printable"]

# Characters a terminal acts on instead of showing: C0 controls (newline, carriage return, ESC
# starts cursor moves, title changes, screen clears), DEL, C1 controls (0x9b is a one-byte CSI);
# Unicode line/paragraph separators; bidi marks, embeddings, overrides and isolates, which
# reorder what follows them on the line; lone surrogates (undecodable file-name bytes), which
# would make the print itself fail on a UTF-8 stream.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069"
                     "\ud800-\udfff]")


def _escape(m: re.Match) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def printable(s) -> str:
    """str(s) with every terminal-active character shown as a visible escape (`\\x1b`,
    `\\u202e`), so that it can never start a line, move the cursor or reorder the text around it.

    For human-readable output only: JSON output keeps the original strings (json.dumps escapes).
    Backslashes are kept as they are, so the result is for reading, not for parsing back.
    """
    return _UNSAFE.sub(_escape, str(s))
