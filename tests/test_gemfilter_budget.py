"""GemFilter, the compact KV cache and the memory budget together: a prompt's memory counted
before it runs (filter/budget.py), the clear error of a prompt that cannot fit, and what
token_filter="auto" chooses from the prompt's length and the budget."""

import io

import numpy as np
import pytest
from conftest import cache_state

import flashinfer_lite as fl
from flashinfer_lite.cli.chat_loop import read_block, run_chat
from flashinfer_lite.filter import FilterOptions
from flashinfer_lite.filter.budget import SCORE_BLOCK, activation_bytes
from flashinfer_lite.flash.planner import WORKING_BYTES
from flashinfer_lite.planning import DENSE_RSS_PER_FILE_BYTE

KEEP, LAYER = 64, 12  # small, so the filtered runs here stay cheap


@pytest.fixture(scope="module")
def budgeted(smollm2_path, smollm2):
    """SmolLM2 under a budget that keeps it dense with KV room for ~1k tokens beside the
    working memory: the smallest dense one, plus 16 MiB."""
    budget = int(DENSE_RSS_PER_FILE_BYTE * smollm2_path.stat().st_size
                 + smollm2.kv_bytes_needed(1024)) + (16 << 20)
    m = fl.load(smollm2_path, memory_budget=budget, threads=2)
    assert m.flash is None and m.kv_budget_bytes() is not None
    return m


def first_unfitting(m, **filter_kw) -> int:
    """The shortest prompt length (in steps of 64) whose memory does not fit m's budget."""
    for n in range(128, m.n_ctx, 64):
        if not m.prompt_budget.fits(m.prompt_memory(list(range(10, 10 + n)), **filter_kw)):
            return n
    raise AssertionError("every length fits")


def prompt_of(m, n: int) -> list[int]:
    ids = m.tokenize("The grass is green and the sky is blue. " * (n // 8 + 8))[:n]
    assert len(ids) == n
    return ids


def test_auto_rule_on_length_and_budget():
    auto = FilterOptions("auto", keep=100, threshold=500)
    assert not auto.applies(300) and auto.applies(500)  # from the threshold on
    assert auto.applies(300, fits_unfiltered=False)  # sooner when the whole would not fit
    assert not auto.applies(100, fits_unfiltered=False)  # nothing to filter within keep
    assert not FilterOptions(None).applies(10**5, fits_unfiltered=False)  # off is off


def test_prompt_memory_counts_cache_pass1_and_activations(budgeted):
    m, c = budgeted, budgeted.config
    n = 2048
    ids = prompt_of(m, n)
    full = m.prompt_memory(ids, token_filter=None)
    assert (full.tokens, full.kept, full.kind, full.layer) == (n, n, "f16", None)
    assert full.kv_bytes == m.kv_bytes_needed(n) >= n * c.n_layers * 2 * c.n_kv_heads \
        * c.head_dim * 2  # float16 keys and values of every layer
    assert full.pass1_bytes == 0 and full.held_cache_bytes == 0
    # a 256-row chunk's attention over one 1,024-position block, the larger of its two phases:
    # 9 heads' scores and their masked copy, float32, and 3 KV heads' keys and values
    assert full.activation_bytes == activation_bytes(c, 256, n) \
        == 4 * (2 * 9 * 256 * 1024 + 2 * 3 * 1024 * 64)
    # pass 1 as counted is what a real pass 1 holds at its end, plus the scoring block
    flt = m.prompt_memory(ids, token_filter="gemfilter", filter_keep=KEEP, filter_layer=LAYER)
    assert (flt.kept, flt.layer) == (KEEP, LAYER) and flt.kv_bytes == m.kv_bytes_needed(KEEP)
    ran = m.filter_prompt(ids, keep=KEEP, layer=LAYER)
    block = 4 * min(n, SCORE_BLOCK) * c.n_kv_heads * c.head_dim
    assert flt.pass1_bytes == ran.pass1_bytes + block
    # layers 0..11 of 30: pass 1's caches are 12/30 of the full cache, plus layer 12's keys
    assert flt.pass1_bytes == pytest.approx(full.kv_bytes * LAYER / c.n_layers
                                            + n * c.n_kv_heads * c.head_dim * 2 + block)
    assert flt.beyond_working_bytes == flt.pass1_bytes + max(
        0, flt.activation_bytes - WORKING_BYTES)


def test_too_long_prompt_under_a_small_budget_says_what_would_fit(budgeted):
    m = budgeted
    m.reset()
    n = first_unfitting(m, token_filter=None)
    ids = prompt_of(m, n)
    with pytest.raises(fl.KVBudgetError, match=f"a prompt of {n} tokens needs") as err:
        m.generate(ids, max_tokens=1)
    msg = str(err.value)
    assert isinstance(err.value, fl.ContextLengthError)  # the family it always belonged to
    for option in ("kv_cache='q4'", "token_filter='gemfilter'", "memory_budget of at least"):
        assert option in msg, msg
    assert cache_state(m).ids == []  # refused before anything ran
    # the options it names do fit: the filter (run here), and a q4 cache (counted here: the
    # q4 model's own check is the slow test below)
    out = m.generate(ids, max_tokens=2, token_filter="gemfilter", filter_keep=KEEP,
                     filter_layer=LAYER)
    assert isinstance(out, str) and m.stats["filter_tokens_after"] == KEEP
    need = float(msg.split("needs ")[1].split(" MB")[0]) * 1e6
    assert need > m.kv_budget_bytes()


def test_auto_filters_when_the_whole_prompt_would_not_fit(budgeted, smollm2):
    m = budgeted
    opts = dict(token_filter="auto", filter_keep=KEEP, filter_layer=LAYER)
    n = first_unfitting(m, token_filter=None)
    assert n < FilterOptions().threshold  # below the length at which auto filters for time
    ids = prompt_of(m, n)
    m.generate(ids, max_tokens=1, **opts)
    assert m.stats["token_filter"] == "gemfilter" and m.stats["filter_tokens_after"] == KEEP
    short = ids[: n // 2]  # fits whole: auto leaves it alone
    m.generate(short, max_tokens=1, **opts)
    assert m.stats["token_filter"] is None and m.stats["filter_tokens_after"] == len(short)
    # without a budget the same prompt is short of auto's threshold: not filtered
    smollm2.generate(ids, max_tokens=1, **opts)
    assert smollm2.stats["token_filter"] is None


def test_prompt_too_long_even_filtered_names_a_budget(budgeted):
    m = budgeted
    m.reset()
    n = first_unfitting(m, token_filter="gemfilter", filter_keep=KEEP, filter_layer=LAYER)
    with pytest.raises(fl.KVBudgetError) as err:
        m.generate(prompt_of(m, n), max_tokens=1, token_filter="auto", filter_keep=KEEP,
                   filter_layer=LAYER)
    msg = str(err.value)
    assert "GemFilter's pass 1" in msg and "memory_budget of at least" in msg
    assert "token_filter='gemfilter' (" not in msg  # already filtering: not offered again


@pytest.mark.slow  # a model of its own
def test_q4_pass1_is_compact_and_fits_where_f16_does_not(smollm2_path, budgeted):
    budget = budgeted.memory_budget
    q4 = fl.load(smollm2_path, memory_budget=budget, kv_cache="q4", threads=2)
    n = first_unfitting(budgeted, token_filter=None)
    ids = prompt_of(budgeted, n)
    mem = q4.prompt_memory(ids, token_filter=None)  # what the f16 error promised: it fits
    assert mem.kind == "q4" and mem.kv_bytes < 0.4 * budgeted.kv_bytes_needed(n)
    assert q4.generate(ids, max_tokens=1) is not None
    f16 = budgeted.prompt_memory(ids, token_filter="gemfilter", filter_keep=KEEP,
                                 filter_layer=LAYER)
    q4f = q4.prompt_memory(ids, token_filter="gemfilter", filter_keep=KEEP, filter_layer=LAYER)
    ran = q4.filter_prompt(ids, keep=KEEP, layer=LAYER)
    c = q4.config
    assert q4f.pass1_bytes == ran.pass1_bytes + 4 * n * c.n_kv_heads * c.head_dim
    keys = 2 * n * c.n_kv_heads * c.head_dim + 4 * n * c.n_kv_heads * c.head_dim
    assert q4f.pass1_bytes - keys < 0.4 * (f16.pass1_bytes - keys)  # the caches, compact
    np.testing.assert_array_equal(ran.kept[-8:], np.arange(n - 8, n))  # the question, kept


@pytest.mark.slow  # two flash models of their own
def test_flash_model_is_told_the_kv_reserve_that_fits(smollm2_path):
    """Under a budget that sends the FFN to flash, the pools take what the KV reserve leaves,
    so the error names kv_reserve_tokens (a larger budget would go to the pools); with it,
    the prompt runs."""
    m = fl.load(smollm2_path, memory_budget="210MB", threads=2)
    assert m.plan is not None  # the planner sized the pools
    ids = prompt_of(m, 2000)
    with pytest.raises(fl.KVBudgetError, match=r"kv_reserve_tokens=(\d+)") as err:
        m.generate(ids, max_tokens=1)
    reserve = int(str(err.value).rsplit("kv_reserve_tokens=", 1)[1])
    assert "memory_budget of at least" not in str(err.value)
    roomy = fl.load(smollm2_path, memory_budget="210MB", kv_reserve_tokens=reserve, threads=2)
    assert roomy.kv_budget_bytes() > m.kv_budget_bytes()
    assert roomy.generate(ids, max_tokens=2) is not None


# ---- chat: a long pasted file in the first turn, questions after it ------------------------------
def pasted_file(n_funcs: int) -> str:
    """A Python module of small functions with two constants inside (DATABASE_PORT a third of
    the way in, OWNER_EMAIL at three quarters)."""
    lines = ['"""Warehouse inventory helpers."""', "", "import math", ""]
    for i in range(n_funcs):
        if i == n_funcs // 4:
            lines += ["DATABASE_PORT = 48213", ""]
        if i == 3 * n_funcs // 4:
            lines += ['OWNER_EMAIL = "rosa@example.org"', ""]
        lines += [f"def shelf_{i}(count):", f'    """Units on shelf {i}."""',
                  f"    return count * {i % 9 + 2} + {i % 5}", ""]
    return "\n".join(lines)


def chat_turns(m, doc: str, questions, **opts):
    """The file pasted in the first user turn, then one question per turn; yields (reply,
    the raw history's ids, stats) per turn."""
    msgs = [{"role": "user", "content": "Here is a file:\n```python\n" + doc + "\n```\n"
             + questions[0]}]
    for i, _ in enumerate(questions):
        if i:
            msgs.append({"role": "user", "content": questions[i]})
        reply = m.chat(msgs, **opts)
        yield reply, m.apply_chat_template(msgs), m.stats
        msgs.append({"role": "assistant", "content": reply})


def test_chat_with_a_pasted_file_refilters_every_turn(smollm2):
    m, keep = smollm2, 128
    m.reset()
    questions = ["What does the file do?", "What is DATABASE_PORT set to?",
                 "Which function is last?"]
    before = 0
    for turn, (_, raw, s) in enumerate(chat_turns(m, pasted_file(24), questions, max_tokens=4,
                                                  token_filter="gemfilter", filter_keep=keep)):
        assert s["filter_tokens_before"] == len(raw) > before  # the whole raw history
        before = len(raw)
        assert s["filter_tokens_after"] == keep
        kept = m.filter_prompt(raw, keep=keep).kept_ids
        assert cache_state(m).ids[:keep] == kept  # pass 2 ran this turn's selection
        text = m.detokenize(kept)
        assert text.rstrip().endswith("assistant")  # the reply's header, after the question
        assert questions[turn] in text  # this turn's question, whole
        start = m.tokenize("<|im_start|>", add_bos=False)
        assert len(start) == 1 and m.control_tokens[start[0]]
        assert kept.count(start[0]) == raw.count(start[0]) >= 2 + turn  # every turn's header
        if turn:  # the pasted file is the first turn's: its start stays cached
            assert s["prompt_tokens_reused"] > 0


@pytest.mark.slow  # the Qwen 0.5B, three filtered turns of ~3k tokens
def test_qwen_answers_questions_on_a_pasted_file_in_later_turns():
    m = fl.load("qwen2.5-coder-0.5b", threads=2)
    questions = ["Read it; I will ask about it.", "What is DATABASE_PORT set to in the file?",
                 "What is OWNER_EMAIL in the file?"]
    turns = list(chat_turns(m, pasted_file(120), questions, max_tokens=24,
                            token_filter="gemfilter", filter_keep=512))
    for _, raw, s in turns:
        assert s["filter_tokens_before"] == len(raw) > 3000
        assert s["filter_tokens_after"] == 512
    assert "48213" in turns[1][0], turns[1][0]
    assert "rosa@example.org" in turns[2][0], turns[2][0]


def test_read_block_joins_the_lines_between_triple_quotes():
    lines = iter(["def f():", "    return 1", '"""', "after"])
    assert read_block('"""Here:', lambda: next(lines)) == "Here:\ndef f():\n    return 1"
    assert next(lines) == "after"  # nothing read past the closing quotes
    assert read_block('""" one line """', lambda: None) == " one line "
    assert read_block("no quotes", lambda: None) == "no quotes"
    lines = iter(["a", None])
    assert read_block('"""', lambda: next(lines)) == "\na"  # unclosed: ends with the input
    # a here-document ends only at its word: a file's docstrings stay inside
    lines = iter(['"""Doc."""', "x = 1", "  END", "END", "after"])
    assert read_block("<<END", lambda: next(lines)) == '"""Doc."""\nx = 1\n  END'
    assert next(lines) == "after"


class RecordingModel:
    """A model whose chat histories are recorded as the chat loop passes them."""

    def __init__(self, m):
        self.m, self.histories = m, []

    def __getattr__(self, name):
        return getattr(self.m, name)

    def stream_chat(self, history, **kw):
        self.histories.append([dict(x) for x in history])
        return self.m.stream_chat(history, **kw)


def test_cli_chat_takes_a_pasted_file_as_one_turn_and_refilters(smollm2):
    smollm2.reset()
    m, doc = RecordingModel(smollm2), pasted_file(24)
    assert '"""' in doc  # its docstrings: a triple-quoted block would end at the first
    typed = f"<<EOF\nHere is a file:\n{doc}\nEOF\nWhat is DATABASE_PORT set to?\n/exit\n"
    run_chat(m, None, 3, {"temperature": 0.0, "token_filter": "gemfilter", "filter_keep": 128},
             stdin=io.StringIO(typed))
    first, second = m.histories
    assert first == [{"role": "user", "content": "Here is a file:\n" + doc}]
    assert [t["role"] for t in second] == ["user", "assistant", "user"]
    assert second[2]["content"] == "What is DATABASE_PORT set to?"
    s = smollm2.generation_stats
    assert s.filtered.tokens_before == len(smollm2.apply_chat_template(second)) > 128
    assert s.filtered.tokens_after == 128
