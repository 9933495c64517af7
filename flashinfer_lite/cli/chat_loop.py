"""The interactive chat loop: history kept across turns (the model reuses the cached prefix, so
only the new turn is prefilled), /reset, /stats, /exit, Ctrl-C stops the current reply."""

from __future__ import annotations

import json
import sys

import click

HELP = "commands: /reset (new conversation), /stats, /exit (or Ctrl-D)"


def run_chat(m, system: str | None, max_tokens: int, sampling: dict,
             stdin=None, out=None) -> None:
    stdin = stdin or sys.stdin
    interactive = stdin.isatty()
    history = [{"role": "system", "content": system}] if system else []
    start = list(history)
    if interactive:
        click.echo(f"{m.config.name} ({m.config.architecture}) ready. {HELP}", err=True)
    while True:
        if interactive:
            try:
                line = input("> ")
            except EOFError:
                click.echo("", err=True)
                return
            except KeyboardInterrupt:
                click.echo("", err=True)
                continue
        else:
            line = stdin.readline()
            if not line:
                return
            line = line.rstrip("\n")
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            return
        if text == "/reset":
            history = list(start)
            m.reset()
            click.echo("(conversation cleared)", err=True)
            continue
        if text == "/stats":
            click.echo(json.dumps(m.stats, indent=1, default=str))
            continue
        if text.startswith("/"):
            click.echo(f"unknown command {text.split()[0]}; {HELP}", err=True)
            continue
        history.append({"role": "user", "content": line})
        reply = []
        try:
            for chunk in m.stream_chat(history, max_tokens=max_tokens, **sampling):
                reply.append(chunk.text)
                click.echo(chunk.text, nl=False)
        except KeyboardInterrupt:
            click.echo(" [stopped]", err=True)
        click.echo()
        history.append({"role": "assistant", "content": "".join(reply)})
