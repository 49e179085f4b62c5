"""``qwenlm chat`` in a pseudo-terminal, typed at like a person would: commands, Ctrl-C, Ctrl-D."""

from __future__ import annotations

import os
import select
import signal
import sys
import time

import pytest

from tests.builders import tiny_checkpoint

pty = pytest.importorskip("pty")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # room for a reply of thousands of tokens, so that Ctrl-C lands in the middle of one
    return tiny_checkpoint(tmp_path_factory.mktemp("term") / "tiny", max_position_embeddings=4096)


class Terminal:
    """A child process on a pseudo-terminal: ``send`` keystrokes, ``expect`` text on the screen."""

    def __init__(self, *args: str) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: its terminal is the pty, so Ctrl-C there becomes SIGINT
            # started with SIGINT ignored, as a background job of a script starts it: the chat must still
            # take Ctrl-C (and the test does not depend on how its own runner was started)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            env = {**os.environ, "TERM": "dumb"}
            os.execve(sys.executable, [sys.executable, "-m", "qwenlm", "chat", *args], env)
        self.screen = b""
        self.seen = 0  # ``expect`` searches after the previous match
        self.status: int | None = None

    def read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # the child is gone
            return False
        self.screen += data
        return bool(data)

    def expect(self, text: str, timeout: float = 120) -> None:
        needle = text.encode()
        deadline = time.monotonic() + timeout
        while needle not in self.screen[self.seen :]:
            if time.monotonic() > deadline or (not self.read(0.5) and self.exited()):
                raise AssertionError(f"{text!r} never appeared; the screen shows:\n{self.screen[-3000:]!r}")
        self.seen = self.screen.index(needle, self.seen) + len(needle)

    def wait_for_output(self, nbytes: int, timeout: float = 120) -> None:
        start, deadline = len(self.screen), time.monotonic() + timeout
        while len(self.screen) - start < nbytes:
            assert time.monotonic() < deadline, f"no output; the screen shows:\n{self.screen[-2000:]!r}"
            self.read(0.5)

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def wait_until_reading_keys(self, timeout: float = 60) -> None:
        """Wait until the child's main thread sleeps waiting for a key.

        CPython's ``input()`` with readline checks for a signal only when its wait for a key is interrupted: a
        Ctrl-C that lands while readline is still handling the keys before it is noticed only when the next
        line is entered. A person sees the line echoed long before pressing Ctrl-C; a test must wait for the
        same moment. Where the kernel does not say what a process waits in, a quiet second stands in for it.
        """
        deadline = time.monotonic() + timeout
        wchan = f"/proc/{self.pid}/task/{self.pid}/wchan"
        try:
            with open(wchan) as f:
                readable = f.read() not in ("", "0")
        except OSError:
            readable = False
        if not readable:
            while self.read(1.0):
                assert time.monotonic() < deadline, f"never quiet; the screen shows:\n{self.screen[-2000:]!r}"
            return
        while True:
            with open(wchan) as f:
                waiting_in = f.read()
            if "poll" in waiting_in or "select" in waiting_in:
                return
            assert time.monotonic() < deadline, f"never waited for a key; the screen shows:\n{self.screen[-2000:]!r}"
            self.read(0.05)

    def type(self, line: str, *expected: str) -> None:
        """Type ``line`` and Enter, expect each of ``expected`` in order, then the next prompt."""
        self.send(line + "\r")
        for text in expected:
            self.expect(text)
        self.expect(">>> ")

    def exited(self) -> bool:
        if self.pid:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.pid, self.status = 0, os.waitstatus_to_exitcode(status)
        return not self.pid

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read(0.1)
            if self.exited():
                return self.status
        raise AssertionError(f"still running; the screen shows:\n{self.screen[-2000:]!r}")

    def close(self) -> None:
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.fixture
def terminal():
    opened = []

    def open_terminal(*args: str) -> Terminal:
        opened.append(Terminal(*args))
        return opened[-1]

    yield open_terminal
    for t in opened:
        t.close()


def test_commands_history_and_ctrl_d(ckpt, terminal):
    t = terminal("--model", str(ckpt), "--max-new-tokens", "6")
    t.expect(">>> ")
    # Each step waits for the next prompt before typing again, as a person would: text typed ahead is
    # echoed early by the terminal and would match too soon.
    t.type("/system Be brief.", "(system prompt set: Be brief.)")
    t.type("/system", "(system prompt: Be brief.)")
    t.type("Hello")
    t.type("Tell me more")
    t.type("/history", "[1] user: Hello", "[1] assistant: ", "[2] user: Tell me more")
    t.type("/clear", "(conversation cleared)")
    t.type("/history", "(no conversation yet)")
    t.type("/frobnicate", "(unknown command /frobnicate)")
    t.send("half a line")
    t.expect("half a line")  # echoed: the line editor is reading keys
    t.wait_until_reading_keys()
    t.send("\x03")  # Ctrl-C while typing: a fresh prompt, still running
    t.expect(">>> ")
    t.type("/history", "(no conversation yet)")
    t.send("/system Short.\r\x03")  # Ctrl-C right behind a command, wherever it lands: still running
    t.type("\r/system", "(system prompt: ")
    t.send("\x04")  # Ctrl-D on an empty line leaves
    assert t.wait() == 0


def test_ctrl_c_stops_a_reply_but_not_the_chat(ckpt, terminal):
    t = terminal("--model", str(ckpt), "--max-new-tokens", "4000")
    t.expect(">>> ")
    t.send("Write a very long story\r")
    t.expect("Write a very long story")
    t.wait_for_output(200)  # the reply is streaming
    t.send("\x03")
    t.expect("(reply stopped; this turn is not kept)")
    t.expect(">>> ")
    t.send("/history\r")
    t.expect("(no conversation yet)")
    t.send("/exit\r")
    assert t.wait() == 0
