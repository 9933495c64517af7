"""The interactive chat loop: history kept across turns (the model reuses the cached prefix, so
only the new turn is prefilled), /reset, /stats, /exit, Ctrl-C stops the current reply. A
message may span lines (a pasted file) between triple quotes, as Ollama reads one, or as a
here-document (<<END ... END)."""

from __future__ import annotations

import sys

import click

from ..generate import GenerationStats
from ..memory import format_bytes

HELP = ('commands: /reset (new conversation), /stats, /exit (or Ctrl-D); a message of several '
        'lines: between """ and """, or from <<END to a line END (for code holding """)')
QUOTE = '"""'


def read_block(first: str, next_line) -> str:
    """The message that starts with line `first` (next_line() -> the next line, None at the end
    of input; an unclosed block ends there):
    - triple quotes, then text: every line up to one that ends with triple quotes (as Ollama
      reads one);
    - '<<WORD' (a shell here-document): every following line up to one that is exactly WORD,
      so a pasted Python file's docstrings do not end it;
    - anything else: the line itself."""
    body = first.lstrip()
    if body.startswith("<<") and body[2:].strip().isidentifier():
        end, lines = body[2:].strip(), []
        while (line := next_line()) is not None and line != end:
            lines.append(line)
        return "\n".join(lines)
    if not body.startswith(QUOTE):
        return first
    body, lines = body[len(QUOTE):], []
    while not body.rstrip().endswith(QUOTE):
        lines.append(body)
        body = next_line()
        if body is None:
            return "\n".join(lines)
    lines.append(body.rstrip()[: -len(QUOTE)])
    return "\n".join(lines).strip("\n")


def run_chat(m, system: str | None, max_tokens: int, sampling: dict,
             stdin=None, out=None) -> None:
    stdin = stdin or sys.stdin
    interactive = stdin.isatty()
    history = [{"role": "system", "content": system}] if system else []
    start = list(history)
    if interactive:
        click.echo(f"{m.config.name} ({m.config.architecture}) ready. {HELP}", err=True)

    def next_line(prompt: str = "> ") -> str | None:
        if interactive:
            try:
                return input(prompt)
            except EOFError:
                click.echo("", err=True)
                return None
        line = stdin.readline()
        return line.rstrip("\n") if line else None

    while True:
        try:
            line = next_line()
        except KeyboardInterrupt:
            click.echo("", err=True)
            continue
        if line is None:
            return
        try:
            line = read_block(line, lambda: next_line("... "))
        except KeyboardInterrupt:  # a block abandoned half way
            click.echo("", err=True)
            continue
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
            click.echo("\n".join(stats_lines(m.generation_stats, m.resident_bytes)))
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


def _rate(value: float | None) -> str:
    return f"{value:.1f} tokens/s" if value else "-"


def stats_lines(s: GenerationStats | None, resident_bytes: int) -> list[str]:
    """The last reply's numbers in a few readable lines (as Ollama's --verbose prints them)."""
    if s is None:
        return ["no reply yet"]
    reused = f" ({s.prompt_tokens_reused} reused)" if s.prompt_tokens_reused else ""
    lines = [f"prompt:      {s.prompt_tokens} tokens{reused}, {s.prefill_tokens} prefilled at "
             f"{_rate(s.prefill_tokens_per_s)}",
             f"generated:   {s.generated_tokens} tokens at {_rate(s.tokens_per_s)}",
             f"first token: {s.ttft_s:.3f} s" if s.ttft_s is not None else "first token: -",
             f"memory:      RSS {format_bytes(s.rss_bytes or 0)} (peak "
             f"{format_bytes(s.peak_rss_bytes or 0)}), weights {format_bytes(resident_bytes)}, "
             f"KV cache {format_bytes(s.kv_bytes)}"]
    if s.flash.get("flash_reads"):
        hit = s.flash.get("neuron_cache_hit_rate")
        lines.append(f"flash:       {s.flash['flash_reads']} reads, "
                     f"{format_bytes(s.flash['flash_bytes_read'])}"
                     + (f", neuron cache hit rate {hit:.0%}" if hit is not None else ""))
    if s.filtered is not None:
        f = s.filtered
        lines.append(f"filter:      GemFilter kept {f.tokens_after} of {f.tokens_before} prompt "
                     f"tokens (layer {f.layer})")
    return lines
