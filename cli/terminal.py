"""Text from a build (logs, errors, config values) made safe to print on a terminal.

A build's output is written by whoever wrote the Dockerfile or the test command. Printed raw, its escape
sequences can retitle the window, clear the screen, move the cursor to overwrite earlier lines, plant OSC 8
links or query the terminal (whose answer lands in the user's input). `for_terminal` keeps colours (SGR:
``ESC [ ... m``) and removes every other escape sequence and control character except tab and newline. Output
that is not a terminal (a pipe, a file) is left exactly as the service stored it.
"""

from __future__ import annotations

import re
from typing import TextIO

__all__ = ["for_terminal", "sanitize"]

_SGR = re.compile(r"\x1b\[[0-9;:]*m")
_CONTROL = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"            # CSI ... final byte (cursor moves, erase, modes, device queries)
    r"|\x1b\][^\x07\x1b\n]*(?:\x07|\x1b\\)?"  # OSC ... BEL or ST (window title, hyperlinks, clipboard)
    r"|\x1b[PX^_][^\x1b\n]*(?:\x1b\\)?"       # DCS / SOS / PM / APC ... ST
    r"|\x1b[ -/]*[0-~]"                     # other escape sequences (charset switches, resets, ...)
    r"|\x1b"                                # a lone or truncated ESC
    r"|\x9b[0-?]*[ -/]*[@-~]"               # 8-bit CSI
    r"|[\x90\x98\x9d-\x9f][^\x07\x1b\x9c\n]*(?:\x07|\x1b\\|\x9c)?"  # 8-bit DCS / SOS / OSC / PM / APC ... ST
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]"       # C0 controls but tab and newline (CR, BS, BEL, ...), DEL, C1
)


def sanitize(text: str) -> str:
    """`text` with SGR colour sequences, tabs and newlines kept and every other control removed.

    An unterminated string sequence (OSC, DCS, ...) ends at the line's end, so one bad line cannot hide the
    next."""
    return _CONTROL.sub(lambda m: m.group() if _SGR.fullmatch(m.group()) else "", text)


def for_terminal(text: str, out: TextIO) -> str:
    """`sanitize(text)` when `out` is a terminal, else `text` unchanged."""
    isatty = getattr(out, "isatty", None)
    return sanitize(text) if isatty is not None and isatty() else text
