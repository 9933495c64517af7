"""The prompt cache: one KV cache per layer plus the token ids they hold (mlx-lm's
make_prompt_cache / trim_prompt_cache / save_prompt_cache, as one object).

A Model holds one and reuses its longest common prefix with each call's prompt, so a chat turn
only prefills the new turn; `Model.swap_cache` trades it for another (a server keeps one per
conversation); save / load write it to a file and back (the format: cache/persist.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .cache.kv import KVSpec
from .cache.persist import load_prompt_cache, save_prompt_cache


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids a and b share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def make_layer_caches(net, spec: KVSpec) -> list:
    """An empty KV cache per layer of net (a models.common.CausalLM), laid out as its
    architecture attends (CausalLM.make_cache)."""
    return net.make_cache(spec)


@dataclass
class PromptCache:
    """The caches of every layer and the ids they hold (ids[i] is at position i)."""

    ids: list[int]
    caches: list
    owner: int = 0  # id() of the Model it belongs to: caches are shaped for that model only

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

    def bytes_at(self, n_tokens: int, chunk: int) -> int:
        """Bytes the caches hold after n_tokens positions fed in chunks of at most `chunk`
        (a bounded cache levels off)."""
        return sum(c.bytes_at(n_tokens, chunk) for c in self.caches)

    def trim(self, n: int) -> None:
        """Forget the last n positions."""
        for c in self.caches:
            c.trim(n)
        del self.ids[len(self.ids) - n:]

    def rollback(self) -> None:
        """Put every layer back to the positions `ids` says it holds (after a forward pass was
        interrupted between layers or chunks)."""
        for c in self.caches:
            c.trim(c.offset - len(self.ids))

    def reuse(self, ids: Sequence[int]) -> int | None:
        """Trim to the longest common prefix with ids, keeping at least one of ids to run;
        returns the positions kept, or None when a bounded cache had already dropped some of
        them (the caller starts over with an empty cache)."""
        n = common_prefix(self.ids, ids[: len(ids) - 1])
        self.trim(len(self.ids) - n)
        if any(c.offset != n for c in self.caches):
            return None
        return n

    def save(self, path, identity: dict, spec: KVSpec) -> None:
        """Write the caches and ids to path with the model's identity and a checksum."""
        save_prompt_cache(path, identity, spec, self.ids, self.caches)

    @classmethod
    def load(cls, path, identity: dict, spec: KVSpec, caches: list, owner: int) -> PromptCache:
        """Fill the empty `caches` from a file written by save (CacheFileError when it was
        made by another model or cache kind, or is damaged)."""
        ids = load_prompt_cache(path, identity, spec, caches)
        return cls(ids, caches, owner)


KVState = PromptCache  # the name swap_cache's states had before
