"""The `flashinfer-lite` command: thin click commands over the Python API.

Every user mistake surfaces as a FlashInferError (or a click usage error) and is printed as one
line with a non-zero exit; a traceback here is a bug.
"""

from __future__ import annotations

import json
import sys

import click

from ..errors import FlashInferError
from ..options import (
    BACKENDS,
    FILTER_MODES,
    KV_KINDS,
    FilterOptions,
    KVOptions,
    RuntimeOptions,
    SamplingOptions,
    ServerOptions,
)
from ..registry import short_names_help
from ..speculative import DraftOptions

# the defaults every flag shows and passes on (options.py holds them)
RUNTIME, KV, FILTER = RuntimeOptions(), KVOptions(), FilterOptions()
SAMPLING, SERVER = SamplingOptions(), ServerOptions()
DRAFT = DraftOptions()
MODEL_HELP = f"a .gguf path or a short name: {short_names_help()}"


def common_model_options(f):
    f = click.option("-m", "--model", default=None, help=MODEL_HELP)(f)
    f = click.option("--backend", default=RUNTIME.backend, show_default=True,
                     type=click.Choice(BACKENDS))(f)
    f = click.option("-t", "--threads", type=click.IntRange(min=1), default=None,
                     help="CPU threads (default: physical cores)")(f)
    f = click.option("-c", "--ctx-size", type=click.IntRange(min=1), default=None,
                     help="context length (default: the model's)")(f)
    f = click.option("--kv-cache", default=KV.kind, show_default=True,
                     type=click.Choice(KV_KINDS),
                     help="KV cache: float16, or KIVI-style 8/4-bit")(f)
    f = click.option("--kv-window", type=click.IntRange(min=1), default=None,
                     help="bound the KV cache to the sinks + this many recent tokens "
                          "(a chat may then run past the context)")(f)
    f = click.option("--kv-sinks", type=click.IntRange(min=0), default=KV.sinks,
                     show_default=True,
                     help="first tokens a bounded cache always keeps")(f)
    f = click.option("--memory-budget", default=None,
                     help="e.g. 300MB, 1.5GB, or 0.5 (a fraction of the model file); below "
                          "what the model needs, FFN weights stay on flash")(f)
    f = click.option("--ffn-share", type=click.FloatRange(0, 1, min_open=True), default=None,
                     help="keep this fraction of FFN neurons in DRAM (the rest on flash)")(f)
    return filter_options(f)


def filter_options(f):
    """GemFilter flags; they reach load() as **filter_opts."""
    f = click.option("--token-filter", type=click.Choice(["none", *FILTER_MODES]),
                     default="none", show_default=True,
                     help="filter long prompts with an early layer (GemFilter); auto: from "
                          "--filter-threshold tokens on, or sooner when the whole prompt "
                          "would not fit --memory-budget")(f)
    f = click.option("--filter-keep", type=click.IntRange(min=1), default=FILTER.keep,
                     show_default=True, help="prompt tokens GemFilter keeps")(f)
    f = click.option("--filter-layer", type=click.IntRange(min=0), default=None,
                     help="layer whose attention scores the tokens (default: the model's)")(f)
    f = click.option("--filter-threshold", type=click.IntRange(min=1), default=FILTER.threshold,
                     show_default=True, help="prompt length from which auto filters")(f)
    return f


def sampling_options(f):
    f = click.option("--temp", "temperature", type=float, default=None,
                     help="temperature; 0 = greedy")(f)
    f = click.option("--top-k", type=int, default=SAMPLING.top_k, show_default=True)(f)
    f = click.option("--top-p", type=float, default=SAMPLING.top_p, show_default=True)(f)
    f = click.option("--min-p", type=float, default=SAMPLING.min_p, show_default=True)(f)
    f = click.option("--repeat-penalty", type=float, default=SAMPLING.repeat_penalty,
                     show_default=True)(f)
    f = click.option("--seed", type=int, default=None)(f)
    f = click.option("--stop", multiple=True, help="stop string (repeatable)")(f)
    f = click.option("--draft-max", type=click.IntRange(min=0), default=DRAFT.num_draft,
                     show_default=True,
                     help="speculative decoding: tokens drafted from the text itself and "
                          "verified in one pass (output unchanged); 0 = off")(f)
    return f


def _load(model, backend, threads, ctx_size, kv_cache, memory_budget, ffn_share, kv_window,
          kv_sinks, token_filter="none", **filter_opts):
    from .. import load

    # "0.5" is a fraction of the model file: memory.parse_budget reads it so
    return load(model, memory_budget=memory_budget, backend=backend, kv_cache=kv_cache,
                ctx_size=ctx_size, threads=threads, ffn_share=ffn_share, kv_window=kv_window,
                kv_sinks=kv_sinks, token_filter=None if token_filter == "none" else token_filter,
                **filter_opts)


def _sampling(temperature, top_k, top_p, min_p, repeat_penalty, seed, stop, draft_max,
              default_temp):
    return dict(temperature=default_temp if temperature is None else temperature, top_k=top_k,
                top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed,
                stop=list(stop), num_draft_tokens=draft_max)


@click.group()
@click.version_option(package_name="flashinfer-lite")
def app():
    """Run GGUF language models on memory-constrained personal devices."""


@app.command()
@common_model_options
@sampling_options
@click.option("-p", "--prompt", required=True, help="the prompt text; '-' reads it from stdin")
@click.option("-n", "--n-predict", "max_tokens", type=click.IntRange(min=0), default=128,
              show_default=True, help="tokens to generate")
@click.option("--chat-template/--raw", "use_template", default=None,
              help="the prompt as one user turn of the model's chat template (the default "
                   "when the model has one) / as plain text to complete")
@click.option("--json", "as_json", is_flag=True, help="print text and stats as one JSON object")
def generate(model, backend, threads, ctx_size, kv_cache, kv_window, kv_sinks, memory_budget,
             ffn_share, temperature, top_k, top_p, min_p, repeat_penalty, seed, stop, draft_max,
             prompt, max_tokens, use_template, as_json, **filter_opts):
    """One-shot generation from a prompt: an answer to it as a chat message where the model
    has a chat template, else (or with --raw) its continuation."""
    if prompt == "-":
        prompt = click.get_text_stream("stdin").read().removesuffix("\n")
    m = _load(model, backend, threads, ctx_size, kv_cache, memory_budget, ffn_share, kv_window,
              kv_sinks, **filter_opts)
    kw = _sampling(temperature, top_k, top_p, min_p, repeat_penalty, seed, stop, draft_max,
                   0.0)
    if m.has_chat_template if use_template is None else use_template:
        source = m.apply_chat_template([{"role": "user", "content": prompt}])
    else:
        source = prompt
    parts, last = [], None
    for chunk in m.stream(source, max_tokens=max_tokens, **kw):
        parts.append(chunk.text)
        last = chunk
        if not as_json:
            click.echo(chunk.text, nl=False)
    if as_json:
        click.echo(json.dumps({"text": "".join(parts), "model": str(m.path),
                               "finish_reason": last.finish_reason if last else "length",
                               "stats": m.stats}))
    else:
        click.echo()


@app.command()
@common_model_options
@sampling_options
@click.option("-n", "--n-predict", "max_tokens", type=click.IntRange(min=1), default=512,
              show_default=True, help="most tokens per reply")
@click.option("-s", "--system", default=None, help="a system prompt")
def chat(model, backend, threads, ctx_size, kv_cache, kv_window, kv_sinks, memory_budget,
         ffn_share, temperature, top_k, top_p, min_p, repeat_penalty, seed, stop, draft_max,
         max_tokens, system, **filter_opts):
    """Chat in the terminal (or through a pipe). /reset, /stats, /exit; Ctrl-C stops a reply."""
    from .chat_loop import run_chat

    m = _load(model, backend, threads, ctx_size, kv_cache, memory_budget, ffn_share, kv_window,
              kv_sinks, **filter_opts)
    kw = _sampling(temperature, top_k, top_p, min_p, repeat_penalty, seed, stop, draft_max,
                   0.7)
    run_chat(m, system, max_tokens, kw)


@app.command(epilog=f"MODEL: {MODEL_HELP}")
@click.argument("model", required=False)
@click.option("--json", "as_json", is_flag=True)
def inspect(model, as_json):
    """Architecture, dimensions, parameters, quant types and bytes by tensor group."""
    from ..config import ModelConfig
    from ..loaders.flash_format import is_flash_dir, open_flash_dir
    from ..loaders.gguf_file import GGUFFile
    from ..memory import format_bytes
    from ..registry import resolve_model

    path = resolve_model(model)
    flash = None
    if is_flash_dir(path):
        flash = open_flash_dir(path, verify_data=False)
        f = GGUFFile(flash.resident_path)
    else:
        f = GGUFFile(path)
    cfg = ModelConfig.from_gguf(f)
    info = {
        "path": str(f.path), "name": cfg.name, "architecture": cfg.architecture,
        "layers": cfg.n_layers, "d_model": cfg.d_model, "ffn_dim": cfg.ffn_dim,
        "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "vocab": cfg.vocab_size, "context_length": cfg.context_length,
        "sliding_window": cfg.sliding_window, "parameters": f.parameter_count(),
        "file_bytes": f.file_size, "quant_types": f.quant_types(),
        "bytes_by_group": f.bytes_by_group(),
        "chat_template": bool(f.get("tokenizer.chat_template")),
    }
    if flash is not None:
        info["path"] = str(path)
        info["flash"] = {"bundle_bytes": flash.layout.stride,
                         "ffn_bytes_on_flash": flash.ffn_path.stat().st_size,
                         "up_type": flash.layout.up_type.name, "down_type": "Q8_0",
                         "calibration": flash.data["calibration"]}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key == "bytes_by_group":
            value = ", ".join(f"{k} {format_bytes(v)}" for k, v in
                              sorted(value.items(), key=lambda kv: -kv[1]))
        elif key == "quant_types":
            value = ", ".join(f"{k} x{v}" for k, v in value.items())
        elif key in ("file_bytes",):
            value = format_bytes(value)
        elif key == "parameters":
            value = f"{value / 1e6:.1f} M"
        click.echo(f"{key:>16}: {value}")


@app.command()
@click.argument("model")
@click.option("-o", "--output", "out", required=False, default=None,
              help="output directory (default: MODEL's stem + .flash next to it)")
@click.option("--force", is_flag=True, help="replace OUT if it exists")
@click.option("--verify", is_flag=True,
              help="check OUT's checksums and that its bundles decode to the GGUF's weights")
@click.option("--calibration-tokens", type=click.IntRange(min=16), default=512,
              show_default=True)
def convert(model, out, force, verify, calibration_tokens):
    """Convert a GGUF to the flash format (FFN bundles on flash, the rest resident)."""
    from pathlib import Path

    from ..flash.calibration import calibrate
    from ..flash.convert import convert as do_convert
    from ..flash.convert import progress_line
    from ..flash.verify import verify_flash_dir
    from ..loaders.flash_format import is_flash_dir
    from ..registry import resolve_model

    src = resolve_model(model)
    dest = Path(out) if out else src.with_suffix(".flash")
    if is_flash_dir(src):  # `convert --verify DIR`
        if not verify:
            raise click.UsageError(f"{src} is already converted (add --verify to check it)")
        dest, src = src, None
    elif not (verify and dest.exists() and not force):
        if dest.exists() and not force:
            raise click.UsageError(f"{dest} exists (use --force to replace it)")
        do_convert(src, dest, lambda f: calibrate(f, calibration_tokens),
                   progress=progress_line, force=force)
        click.echo(f"wrote {dest}")
    if verify:
        report = verify_flash_dir(dest, src)
        click.echo(f"verified {dest}: {report}")


@app.command()
@common_model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on; anything but loopback exposes the model to the network")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="TCP port (0: a free one)")
@click.option("--api-key", envvar="FLASHINFER_LITE_API_KEY", default=None,
              help="require 'Authorization: Bearer KEY' on every request "
                   "(or set FLASHINFER_LITE_API_KEY)")
@click.option("--cache-slots", type=click.IntRange(min=0), default=SERVER.cache_slots,
              show_default=True, help="conversations whose KV cache is kept for their next turn")
@click.option("--cache-memory", default=None,
              help="most memory the kept conversation caches may hold, e.g. 64MB "
                   f"(default: {SERVER.cache_bytes >> 20} MiB)")
@click.option("--max-queue", type=click.IntRange(min=1), default=SERVER.max_queue,
              show_default=True, help="requests waiting beyond this get 503")
@click.option("--model-id", default=None,
              help="the name clients send as 'model' (default: -m's value or the file's stem)")
def serve(model, backend, threads, ctx_size, kv_cache, kv_window, kv_sinks, memory_budget,
          ffn_share, host, port, api_key, cache_slots, cache_memory, max_queue, model_id,
          **filter_opts):
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, ...)."""
    from pathlib import Path

    from ..memory import parse_budget
    from ..registry import DEFAULT_MODEL, SHORT_NAMES
    from ..server.run import _require_server_extra, is_loopback
    from ..server.run import serve as run_server

    _require_server_extra()  # before the model loads: a missing extra fails fast
    cache_bytes = SERVER.cache_bytes if cache_memory is None else parse_budget(cache_memory, 0)
    if not is_loopback(host):
        click.echo(f"warning: listening on {host}: other machines can reach this server"
                   + ("" if api_key else " and it has no --api-key"), err=True)
    m = _load(model, backend, threads, ctx_size, kv_cache, memory_budget, ffn_share, kv_window,
              kv_sinks, **filter_opts)
    if model_id:
        name = model_id
    elif model is None or model in SHORT_NAMES:
        name = model or DEFAULT_MODEL
    else:
        name = Path(model).name.removesuffix(".gguf").removesuffix(".flash")
    run_server(m, name, host=host, port=port, api_key=api_key or None, cache_slots=cache_slots,
               cache_bytes=cache_bytes, max_queue=max_queue, log_level="warning",
               on_ready=lambda url: click.echo(f"serving {name} at {url}", err=True))


def main():
    """Run the app; every user mistake ends as one line on stderr and a non-zero exit."""
    try:
        code = app.main(prog_name="flashinfer-lite", standalone_mode=False)
    except click.UsageError as exc:  # a bad flag or value: click's message, on one line
        click.echo(f"error: {exc.format_message()}".replace("\n", " "), err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except FlashInferError as exc:
        click.echo(f"error: {exc}".replace("\n", " "), err=True)
        sys.exit(1)
    except (KeyboardInterrupt, click.Abort):
        click.echo("", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
