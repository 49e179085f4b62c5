"""The terminal chat behind ``qwenlm chat``: a read-reply loop with a few slash commands.

Replies stream as they are generated. Ctrl-C stops the reply being written (the turn is then dropped
from the history) or clears the line being typed; Ctrl-D or ``/exit`` leaves.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from qwenlm.chat.session import DEFAULT_SYSTEM, chat_stream

PROMPT = ">>> "
HELP = (
    "type a message and press Enter. Commands: /clear forgets the conversation, /system TEXT sets the "
    "system prompt (no TEXT: shows it), /history shows the conversation, /exit or Ctrl-D leaves. "
    "Ctrl-C stops a reply."
)


@dataclass
class Conversation:
    system: str
    history: list[tuple[str, str]] = field(default_factory=list)


def run_chat(
    model,
    tokenizer,
    system: str = DEFAULT_SYSTEM,
    generation: dict[str, Any] | None = None,
    read: Callable[[str], str] = input,
    out: TextIO | None = None,
) -> int:
    """Talk until the user leaves; returns the exit status (0)."""
    out = out or sys.stdout
    generation = generation or {}
    if read is input:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and recall for input())
        # Ctrl-C is this loop's key even when the process was started with SIGINT ignored (as a shell's
        # background job, or under nohup), which Python would otherwise leave so
        with contextlib.suppress(ValueError):  # not the main thread: the caller owns the signals
            signal.signal(signal.SIGINT, signal.default_int_handler)
    talk = Conversation(system)
    say = lambda text: print(text, file=out, flush=True)
    say(f"qwenlm chat: {HELP}")
    while True:
        replying = False
        try:  # Ctrl-C may come at any moment, not only while a reply streams
            line = read(PROMPT).strip()
            if not line:
                continue
            if line.startswith("/"):
                if not _command(line, talk, say):
                    return 0
                continue
            replying = True
            parts: list[str] = []
            for delta in chat_stream(model, tokenizer, line, talk.history, talk.system, **generation):
                out.write(delta)
                out.flush()
                parts.append(delta)
            talk.history.append((line, "".join(parts)))
            replying = False
            say("")
        except EOFError:  # Ctrl-D
            say("")
            return 0
        except KeyboardInterrupt:
            say("\n(reply stopped; this turn is not kept)" if replying else "")


def _command(line: str, talk: Conversation, say: Callable[[str], None]) -> bool:
    """Run a slash command; False means leave."""
    command, _, argument = line.partition(" ")
    argument = argument.strip()
    if command in ("/exit", "/quit"):
        return False
    if command == "/clear":
        talk.history.clear()
        say("(conversation cleared)")
    elif command == "/system":
        if argument:
            talk.system = argument
            say(f"(system prompt set: {talk.system})")
        else:
            say(f"(system prompt: {talk.system})")
    elif command == "/history":
        if not talk.history:
            say("(no conversation yet)")
        for i, (query, reply) in enumerate(talk.history, 1):
            say(f"[{i}] user: {query}\n[{i}] assistant: {reply}")
    elif command == "/help":
        say(HELP)
    else:
        say(f"(unknown command {command}) {HELP}")
    return True
