"""Our integer decoding of GGUF blocks against the `gguf` package's own dequantizers.

Two sources of blocks: random bytes with sane float16 scale fields (every bit pattern of the
integer fields, every type), and the real tensors of the two bundled models.
"""

import os

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from flashinfer_lite.loaders.gguf_file import GGUFFile
from flashinfer_lite.loaders.quant_grid import INTEGER_TYPES, decode_grid

Q = GGMLQuantizationType
# byte offsets of float16 fields (scales, minimums) that random bytes must not make NaN/inf
F16_FIELDS = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2],
              Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}


def random_blocks(qtype, rows, cols, seed=0):
    rng = np.random.default_rng(seed)
    per_block, size = GGML_QUANT_SIZES[qtype]
    nb = rows * cols // per_block
    blocks = rng.integers(0, 256, (nb, size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        vals = rng.uniform(-0.05, 0.05, nb).astype(np.float16)
        blocks[:, off : off + 2] = vals.view(np.uint8).reshape(nb, 2)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", sorted(INTEGER_TYPES, key=lambda q: q.name))
def test_random_blocks_match_gguf(qtype):
    rows, cols = 8, 512
    raw = random_blocks(qtype, rows, cols)
    grid = decode_grid(qtype, raw, (rows, cols), rows_per_step=3)  # exercise slabs
    assert grid.q.max() < (1 << grid.bits)
    expected = dequantize(raw, qtype).reshape(rows, cols)
    np.testing.assert_allclose(grid.dequantize(), expected, rtol=1e-5, atol=1e-6)


def test_real_tensors_match_gguf(smollm2_file, gemma3_file):
    seen = set()
    for f in (smollm2_file, gemma3_file):
        for t in f.tensors.values():
            if t.qtype not in INTEGER_TYPES or len(t.shape) != 2 or t.qtype in seen:
                continue
            seen.add(t.qtype)
            rows = min(64, t.shape[0])
            raw = np.asarray(t.raw[:rows])
            grid = decode_grid(t.qtype, raw, (rows, t.shape[1]))
            expected = dequantize(raw, t.qtype).reshape(rows, t.shape[1])
            np.testing.assert_allclose(grid.dequantize(), expected, rtol=1e-5, atol=1e-6,
                                       err_msg=f"{t.name} {t.qtype.name}")
    # the two files together hold these types (Gemma mixes Q8_0, Q4_K, Q5_0, Q6_K)
    assert {Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q5_0, Q.Q6_K} <= seen


def _mapped_rss(path) -> int:
    """Bytes of `path`'s mappings resident in this process (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and not parts[0].endswith(":"):
                inside = len(parts) > 5 and parts[5] == str(path)
            elif inside and parts[0] == "Rss:":
                total += int(parts[1]) * 1024
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's smaps")
def test_embedding_rows_are_read_not_mapped(smollm2_path):
    """GGUFFile.rows: gguf's dequantization of the rows asked for (repeats, runs, any order),
    read with pread: scattered rows leave none of the mapped file in RSS (fault-around mapped
    64 KiB per row touched through the mapping)."""
    f = GGUFFile(smollm2_path)
    f.release_pages()
    t = f.tensor("token_embd.weight")
    ids = np.random.default_rng(0).integers(0, t.shape[0], 3000)
    ids[:4] = [7, 8, 9, 7]
    got = f.rows("token_embd.weight", ids)
    np.testing.assert_array_equal(got, dequantize(t.raw[ids], t.qtype).astype(np.float32))
    f.release_pages()  # the reference above read through the mapping
    before = _mapped_rss(f.path)
    f.rows("token_embd.weight", np.random.default_rng(1).integers(0, t.shape[0], 3000))
    assert _mapped_rss(f.path) - before < 1 << 20
