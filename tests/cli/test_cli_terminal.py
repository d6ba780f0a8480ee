"""Build output printed to a terminal keeps its colours and loses every other control sequence
(jobforge_cli.terminal), on get-logs, --follow and watch; pipes get the text exactly as stored."""

from __future__ import annotations

import io
import os
import pty
import subprocess

import pytest

from jobforge_cli.terminal import for_terminal, sanitize
from tests.cli.conftest import cli_command, cli_env
from tests.cli.fake_service import status_doc

ESC = "\x1b"
HOSTILE = (f"{ESC}]0;pwned title{ESC}\\{ESC}[2J{ESC}[H{ESC}[31mred{ESC}[0m ok\rspoof\x08\x07"
           f"{ESC}]8;;http://evil.example{ESC}\\link{ESC}]8;;{ESC}\\{ESC}[6n{ESC}P+q544e{ESC}\\\x9b2J\tend")


@pytest.mark.parametrize("raw, safe", [
    ("plain text", "plain text"),
    (f"{ESC}[31mred{ESC}[0m {ESC}[1;38;5;208mbold{ESC}[m {ESC}[38:2:1:2:3mtrue{ESC}[0m",
     f"{ESC}[31mred{ESC}[0m {ESC}[1;38;5;208mbold{ESC}[m {ESC}[38:2:1:2:3mtrue{ESC}[0m"),   # SGR kept
    (f"{ESC}]0;title{ESC}\\after", "after"),                    # OSC window title (ST)
    (f"{ESC}]2;title\x07after", "after"),                       # OSC window title (BEL)
    (f"{ESC}]52;c;ZXZpbA==\x07x", "x"),                         # OSC 52 clipboard write
    (f"{ESC}]8;;http://e.example{ESC}\\text{ESC}]8;;{ESC}\\", "text"),  # OSC 8 hyperlink
    (f"a{ESC}[2Jb{ESC}[Hc{ESC}[10;5fd{ESC}[Ke", "abcde"),       # clear screen, cursor moves, erase
    (f"{ESC}[6n{ESC}[c{ESC}[?1049h", ""),                       # device queries, alternate screen
    (f"{ESC}P+q544e{ESC}\\x", "x"),                             # DCS (terminal query)
    (f"{ESC}c{ESC}(0{ESC}7{ESC}8x", "x"),                       # reset, charset switch, save/restore cursor
    ("over\rwrite\x08\x07\x00\x7f", "overwrite"),               # CR, BS, BEL, NUL, DEL
    ("\x9b2J\x9d0;t\x9cx", "x"),                                 # 8-bit CSI and C1 controls
    ("tab\tand\nnewline", "tab\tand\nnewline"),
    (f"truncated {ESC}[31", "truncated 31"),
    (f"lone {ESC}", "lone "),
    (f"unterminated {ESC}]0;title\nnext line", "unterminated \nnext line"),
])
def test_sanitize_keeps_colours_and_drops_every_other_control(raw, safe):
    assert sanitize(raw) == safe


def test_sanitize_output_holds_no_escape_but_sgr():
    import re
    left = re.sub(r"\x1b\[[0-9;:]*m", "", sanitize(HOSTILE))
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", left)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_only_terminals_get_the_sanitized_text():
    assert for_terminal(HOSTILE, _Tty()) == sanitize(HOSTILE)
    assert for_terminal(HOSTILE, io.StringIO()) == HOSTILE


def _run_on_a_terminal(fake, *args: str) -> str:
    """Run the installed CLI with stdout on a pseudo-terminal, as a user's shell does; return what it printed."""
    master, slave = pty.openpty()
    try:
        result = subprocess.run([*cli_command(), *args], stdout=slave, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, env=cli_env(JOB_SERVICE_URL=fake.url), timeout=120)
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the writer side is closed and everything was read
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
        if slave != -1:
            os.close(slave)
    assert result.returncode in (0, 1), result.stderr
    return b"".join(chunks).decode()


@pytest.mark.parametrize("args", [["get-logs", "j1", "build", "--human"], ["get-logs", "j1", "--follow"]])
def test_get_logs_on_a_terminal_strips_control_sequences(fake_service, args):
    fake_service.jobs["j1"] = status_doc("j1", "FAILED", failed_phase="build", error="exit 1",
                                         finished_at="2025-10-10T14:24:00Z")
    fake_service.logs["j1"] = {"build": [{"ts": "2025-10-10T14:23:46Z", "stream": "stdout", "line": HOSTILE}]}
    fake_service.watch_scripts["j1"] = [{"type": "end", "job": fake_service.jobs["j1"]}]
    printed = _run_on_a_terminal(fake_service, *args)
    assert f"{ESC}[31mred{ESC}[0m ok" in printed  # colours survive
    for needle in ("pwned title", "]8;", "[2J", "[6n", "P+q", "\x07", "\x08", "\x9b"):
        assert needle not in printed, needle


def test_a_pipe_gets_the_log_exactly_as_stored(fake_service, tmp_path):
    fake_service.jobs["j1"] = status_doc("j1", "SUCCEEDED")
    fake_service.logs["j1"] = {"build": [{"ts": "2025-10-10T14:23:46Z", "stream": "stdout", "line": HOSTILE}]}
    result = subprocess.run([*cli_command(), "get-logs", "j1", "build", "--human"], capture_output=True,
                            env=cli_env(JOB_SERVICE_URL=fake_service.url), timeout=120, cwd=tmp_path)
    assert result.stdout.decode() == HOSTILE + "\n"
