"""The one model behind the server: a worker thread serves queued requests one at a time, in the
order they came, and keeps a few conversations' KV caches so a chat's next turn only prefills
what is new.

The web side never touches the model. It submits a Job and reads the job's events from an
asyncio queue that the worker fills (call_soon_threadsafe): ("start", prompt_tokens),
("text", str)..., then ("end", finish_reason, usage) or ("error", OpenAIError). Setting
job.cancel (the client went away) stops the generation within one token and frees its cache.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from ..errors import ContextLengthError, FlashInferError
from ..model import Model
from ..options import ServerOptions
from ..prompt_cache import PromptCache, common_prefix
from .errors import OpenAIError

log = logging.getLogger("flashinfer_lite.server")


@dataclass
class Job:
    """One request: a chat (messages) or a completion (text or token ids)."""

    chat: bool
    prompt: list[dict] | str | list[int]
    max_tokens: int | None  # None: up to the end of the context
    sampling: dict
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def emit(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancel.set()


@dataclass
class _Slot:
    state: PromptCache
    prompt_len: int  # the prompt this state answered; a next turn starts with all of it


class Engine:
    """Serializes requests onto one Model (see the module docstring)."""

    def __init__(self, model: Model, options: ServerOptions | None = None):
        self.model = model
        options = options or ServerOptions()
        self.cache_slots = options.cache_slots
        self.cache_bytes = options.cache_bytes  # bound on the parked caches' memory
        self.max_queue = options.max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._slots: OrderedDict[int, _Slot] = OrderedDict()  # least recently used first
        self._slot_ids = itertools.count()
        self._pending = 0
        self._count_lock = threading.Lock()
        self.counters = {"served": 0, "cancelled": 0, "rejected": 0, "failed": 0}
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="flashinfer-lite-engine",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish the request in progress, drop the queued ones, stop the worker."""
        while True:  # cancel what is still queued so its handlers return
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel.set()
                job.emit("error", OpenAIError(503, "the server is shutting down"))
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._slots.clear()

    def submit(self, job: Job) -> None:
        with self._count_lock:
            if self._pending >= self.max_queue:
                raise OpenAIError(503, f"the server is busy: {self._pending} requests are "
                                  "queued; retry later", code="server_busy")
            self._pending += 1
        self._queue.put(job)

    # ---- reporting -----------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return self._pending

    def slot_bytes(self) -> int:
        return sum(s.state.nbytes for s in list(self._slots.values()))

    def report(self) -> dict:
        return {"queued": self.queued, **self.counters, "cache_slots": len(self._slots),
                "cache_slot_bytes": self.slot_bytes(), "kv_bytes": self.model.kv_bytes}

    # ---- the worker ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._serve(job)
            except FlashInferError as exc:  # the request's own mistake (a prompt too long)
                self.counters["rejected"] += 1
                job.emit("error", OpenAIError.from_library(exc))
            except Exception as exc:  # a bug: answer 500, keep serving the others
                log.exception("request failed")
                self.counters["failed"] += 1
                job.emit("error", OpenAIError(500, f"internal error: {type(exc).__name__}: "
                                                   f"{exc}"))
            finally:
                with self._count_lock:
                    self._pending -= 1

    def _serve(self, job: Job) -> None:
        m = self.model
        if job.cancel.is_set():  # the client left while queued
            self.counters["cancelled"] += 1
            job.emit("end", "cancelled", None)
            return
        if job.chat:
            ids = m.apply_chat_template(job.prompt)
        elif isinstance(job.prompt, str):
            ids = m.tokenize(job.prompt)
        else:
            ids = list(job.prompt)
        max_tokens = self._check_room(len(ids), job.max_tokens)
        m.swap_cache(self._take_slot(ids))
        try:
            job.emit("start", len(ids))
            last = None
            for chunk in m.stream(ids, max_tokens=max_tokens, cancel=job.cancel, **job.sampling):
                if chunk.text:
                    job.emit("text", chunk.text)
                last = chunk
        finally:
            state = m.swap_cache(None)  # the model holds no conversation between requests
        finish = last.finish_reason if last is not None else "length"
        if finish == "cancelled":
            self.counters["cancelled"] += 1
            job.emit("end", "cancelled", None)
            return
        self._park(state, len(ids))
        self.counters["served"] += 1
        stats = m.generation_stats
        usage = {"prompt_tokens": len(ids), "completion_tokens": stats.generated_tokens,
                 "total_tokens": len(ids) + stats.generated_tokens,
                 "prompt_tokens_details": {"cached_tokens": stats.prompt_tokens_reused}}
        job.emit("end", finish, usage)

    def _check_room(self, n_prompt: int, max_tokens: int | None) -> int:
        """OpenAI's rule: prompt + max_tokens must fit the context (a bounded cache has room
        for any length)."""
        m = self.model
        if m.bounded:
            return max_tokens or m.n_ctx
        room = m.n_ctx - n_prompt
        if room < 1:
            raise ContextLengthError(
                f"This model's maximum context length is {m.n_ctx} tokens. However, your "
                f"prompt has {n_prompt} tokens.")
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise ContextLengthError(
                f"This model's maximum context length is {m.n_ctx} tokens. However, you "
                f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the prompt, "
                f"{max_tokens} in the completion). Please reduce the prompt or max_tokens.")
        return max_tokens

    # ---- conversation caches -----------------------------------------------------------------
    def _take_slot(self, ids: list[int]) -> PromptCache | None:
        """The parked cache this request continues: its whole prompt is a prefix of ids and ids
        go on past it (a next turn). A repeated or unrelated prompt starts from an empty cache:
        the prefix path and the full-prefill path round differently, so reusing only real
        continuations keeps a prompt's greedy answer independent of what other clients sent."""
        best, best_n = None, 0
        for key, slot in self._slots.items():
            if len(ids) <= slot.prompt_len:
                continue
            n = common_prefix(slot.state.ids, ids)
            if n >= slot.prompt_len and n > best_n:
                best, best_n = key, n
        return self._slots.pop(best).state if best is not None else None

    def _park(self, state: PromptCache, prompt_len: int) -> None:
        if self.cache_slots == 0 or not state.ids:
            return
        self._slots[next(self._slot_ids)] = _Slot(state, prompt_len)
        while self._slots and (len(self._slots) > self.cache_slots or (
                self.cache_bytes is not None and self.slot_bytes() > self.cache_bytes)):
            self._slots.popitem(last=False)  # least recently used
