"""Our narrow-weight CPU kernels (shard/models/cpu_kernels.py) against float32 matmuls of the same
weights, over the row counts where they switch method (one weight row at a time up to 8 rows, register
tiles past it, L2-sized row blocks past ~48), odd column counts and both thread counts."""
from __future__ import annotations

import pytest
import torch

from shard.models import cpu_kernels
from shard.models.llama import linear
from shard.models.quantize import quantize_rows

pytestmark = pytest.mark.skipif(not cpu_kernels.supported(), reason="the kernels are for x86-64 with AVX2 + FMA")


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert cpu_kernels.load(), "the kernels did not build: see the log for the compiler's message"


def reference(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    out = x.double() @ w.double().t()
    return (out if scale is None else out * scale.double()).float()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8, 9, 16, 50, 130])
@pytest.mark.parametrize("n, k", [(1, 8), (7, 64), (100, 576), (36, 1544), (20, 1560)])
def test_bf16_weights_match_float32_math(threads, rows, n, k):
    torch.manual_seed(rows * 1000 + n)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, w = torch.randn(rows, k), torch.randn(n, k).bfloat16()
        got = cpu_kernels.linear(x, w, None)
    finally:
        torch.set_num_threads(before)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    torch.testing.assert_close(got, reference(x, w), rtol=1e-4, atol=1e-4 * k**0.5)


def test_packed_rows_are_the_matrix_rows():
    """A tied vocabulary packed for AVX512-BF16 is still looked up by row (any CPU: plain indexing)."""
    w = torch.randn(48, 96).bfloat16()
    ids = torch.tensor([0, 15, 16, 47, 3, 3])
    assert torch.equal(cpu_kernels.packed_rows(cpu_kernels.packed_layout(w), ids), w[ids])


native = pytest.mark.skipif(not cpu_kernels.native_bf16(), reason="the packed path runs on CPUs with AVX512-BF16")


@native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, 64, 130])
@pytest.mark.parametrize("n, k", [(16, 16), (48, 576), (80, 1552), (1536, 576)])
def test_packed_weights_multiply_rows_rounded_to_bf16(threads, rows, n, k):
    """Strips of four column blocks and a tail of single ones (n = 80: 4 + 1), tiles of six rows and
    every remainder; the rows are rounded to bfloat16 (to nearest even), the sums float32."""
    torch.manual_seed(rows * 1000 + n)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, w = torch.randn(rows, k), torch.randn(n, k).bfloat16()
        got = cpu_kernels.linear(x, cpu_kernels.pack(w), None)
    finally:
        torch.set_num_threads(before)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    torch.testing.assert_close(got, reference(x.bfloat16(), w), rtol=1e-4, atol=1e-4 * k**0.5)


@native
def test_a_packed_rows_result_does_not_depend_on_its_batch():
    """Same order of sums at every row count: a sequence's logits are the same alone or in a batch of 13."""
    x, w = torch.randn(13, 576), cpu_kernels.pack(torch.randn(1536, 576).bfloat16())
    batch = cpu_kernels.linear(x, w, None)
    assert all(torch.equal(cpu_kernels.linear(x[i : i + 1], w, None)[0], batch[i]) for i in range(13))


@native
def test_packed_shapes_that_do_not_fit_are_refused():
    assert cpu_kernels.pack(torch.randn(20, 64).bfloat16()) is None  # rows not a multiple of 16
    assert cpu_kernels.pack(torch.randn(16, 40).bfloat16()) is None  # K not a multiple of 16
    assert cpu_kernels.pack(torch.randn(16, 64)) is None  # float32 weights stay as they are
    with pytest.raises(RuntimeError, match="K"):
        torch.ops.sluice.linear_packed(torch.randn(2, 32), cpu_kernels.pack(torch.randn(16, 64).bfloat16()))


@native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 9, 16, 130])
@pytest.mark.parametrize("n, k", [(16, 16), (48, 576), (80, 1552)])
def test_packed_int8_weights_apply_their_row_scales(threads, rows, n, k):
    """Up to 8 rows (decode steps) the packed int8 weights stream through float32 registers and the rows
    stay float32, four at a time and then the rest; past 8 they are widened to bfloat16 a strip at a time
    and multiplied as packed bfloat16 weights are, the rows rounded to bfloat16."""
    torch.manual_seed(rows * 1000 + n)
    x = torch.randn(rows, k)
    q, scale = quantize_rows(torch.randn(n, k) * torch.linspace(0.01, 2, n)[:, None])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu_kernels.linear(x, cpu_kernels.pack(q), scale)
    finally:
        torch.set_num_threads(before)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    rows_as = x if rows <= 8 else x.bfloat16()
    torch.testing.assert_close(got, reference(rows_as, q, scale), rtol=1e-4, atol=1e-4 * k**0.5)


@native
def test_packed_int8_rows_are_the_matrix_rows_and_shapes_that_do_not_fit_stay_unpacked():
    q, _ = quantize_rows(torch.randn(48, 96))
    ids = torch.tensor([0, 15, 16, 47])
    assert torch.equal(cpu_kernels.packed_rows(cpu_kernels.pack(q), ids), q[ids])
    assert cpu_kernels.pack(quantize_rows(torch.randn(20, 64))[0]) is None
    with pytest.raises(RuntimeError, match="one float32 scale per row"):
        cpu_kernels.linear(torch.randn(2, 96), cpu_kernels.pack(q), torch.ones(47))


@pytest.mark.parametrize("rows", [10, 11, 13])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])
def test_row_blocks_of_every_tile_shape(rows, dtype):
    """K long enough that a row block holds three rows: 10 rows are blocks 3, 3, 3, 1 (a one-row tile),
    11 and 13 end in two-row ones; each strip's tiles widen the next strip's rows between them."""
    torch.manual_seed(rows)
    x, w = torch.randn(rows, 8192), torch.randn(24, 8192)
    if dtype == torch.int8:
        w, scale = quantize_rows(w)
    else:
        w, scale = w.bfloat16(), None
    torch.testing.assert_close(cpu_kernels.linear(x, w, scale), reference(x, w, scale), rtol=1e-4, atol=1e-4 * 8192**0.5)


@pytest.mark.parametrize("k", [576, 1560])  # AVX-512 hosts: 64 weights a step, then 16, then 8
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_int8_weights_apply_their_row_scales(rows, k):
    torch.manual_seed(rows)
    x = torch.randn(rows, k)
    q, scale = quantize_rows(torch.randn(300, k) * torch.linspace(0.01, 2, 300)[:, None])
    torch.testing.assert_close(cpu_kernels.linear(x, q, scale), reference(x, q, scale), rtol=1e-4, atol=1e-4)


def test_strided_rows_are_read_as_their_values():
    x = torch.randn(16, 4).t()  # [4, 16], column-major
    w = torch.randn(10, 16).bfloat16()
    torch.testing.assert_close(cpu_kernels.linear(x, w, None), reference(x, w), rtol=1e-4, atol=1e-4)


def test_bad_shapes_are_refused_not_read_out_of_bounds():
    with pytest.raises(RuntimeError, match="multiple of 8"):
        cpu_kernels.linear(torch.randn(2, 12), torch.randn(4, 12).bfloat16(), None)
    with pytest.raises(RuntimeError, match="one float32 scale per row"):
        cpu_kernels.linear(torch.randn(2, 8), torch.zeros(4, 8, dtype=torch.int8), torch.ones(3))


def test_the_model_sends_what_the_kernels_cannot_take_elsewhere():
    """llama.linear: the kernels for float32 rows with narrow weights, F.linear of a widened copy where
    K is not a multiple of 8, and float32 weights never reach the kernels."""
    x = torch.randn(3, 12)
    w = torch.randn(5, 12).bfloat16()
    assert not cpu_kernels.applies(x, w)
    torch.testing.assert_close(linear(x, w, None), reference(x, w), rtol=1e-4, atol=1e-4)
    assert not cpu_kernels.applies(torch.randn(3, 16), torch.randn(5, 16))
    assert not cpu_kernels.applies(torch.randn(3, 16).bfloat16(), torch.randn(5, 16).bfloat16())
    assert cpu_kernels.applies(torch.randn(3, 16), torch.randn(5, 16).bfloat16())


def test_compiled_graphs_call_the_kernels():
    w = torch.randn(24, 64).bfloat16()
    x = torch.randn(2, 64)
    compiled = torch.compile(lambda x: torch.relu(linear(x, w, None)), fullgraph=True)
    torch.testing.assert_close(compiled(x), torch.relu(reference(x, w)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq, hkv, d", [(9, 3, 64), (4, 4, 32), (8, 2, 16), (14, 2, 80), (10, 5, 128), (12, 2, 24)])
def test_decode_attention_matches_the_gathered_softmax(hq, hkv, d, cache_dtype, threads):
    """Contexts of different lengths in a shared paged cache (padded slots masked off), including a row
    with a single position and ones past the kernel's blocks and prefetch distance; query groups of 1-7
    heads (taken three at a time) and head sizes that leave a remainder of lanes. Against the float64
    softmax over the cache's own values (a float16 cache's rows widened exactly)."""
    torch.manual_seed(hq * d)
    B, L, S = 6, 75, 400
    k_cache, v_cache = torch.randn(S, hkv, d).to(cache_dtype), torch.randn(S, hkv, d).to(cache_dtype)
    q = torch.randn(B, hq, d)
    lengths = torch.tensor([37, 1, 20, 9, 75, 16])
    kv_slots = torch.randint(0, S, (B, L))
    mask = (torch.arange(L) < lengths[:, None]).unsqueeze(1)
    kv_slots[~mask[:, 0]] = 0  # padding points at slot 0, as the engine's does
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu_kernels.decode_attention(q, k_cache, v_cache, kv_slots, mask, d**-0.5)
    finally:
        torch.set_num_threads(before)
    keys, values = k_cache[kv_slots].permute(0, 2, 3, 1).double(), v_cache[kv_slots].transpose(1, 2).double()
    scores = (torch.matmul(q.view(B, hkv, hq // hkv, d).double(), keys) * d**-0.5).masked_fill(~mask[:, None], float("-inf"))
    want = torch.matmul(torch.softmax(scores, -1), values).reshape(B, hq * d).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Alone, the same bits as in the batch: a row's scores never meet another row's (the kernel's blocks of
    # four keys leave a few stale scores below the next multiple of eight, overwritten before the softmax).
    torch.set_num_threads(threads)
    try:
        for b in range(B):
            alone = cpu_kernels.decode_attention(q[b:b + 1], k_cache, v_cache, kv_slots[b:b + 1], mask[b:b + 1], d**-0.5)
            assert torch.equal(alone[0], got[b]), b
    finally:
        torch.set_num_threads(before)


def test_decode_attention_refuses_slots_outside_the_cache():
    k = torch.randn(10, 1, 8)
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_kernels.decode_attention(torch.randn(1, 1, 8), k, k, torch.tensor([[3, 10]]), torch.ones(1, 1, 2, dtype=torch.bool), 1.0)


def test_a_built_library_is_readable_by_other_users(tmp_path):
    """Images build the library as root and run the shard as another user."""
    built = cpu_kernels.build(tmp_path)
    assert built.stat().st_mode & 0o044 == 0o044


def test_a_library_that_does_not_load_leaves_the_weights_alone(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cpu_kernels, "_loaded", None)
    monkeypatch.setattr(cpu_kernels, "PACKAGE_DIR", tmp_path)
    monkeypatch.setattr(cpu_kernels, "_cache_dir", lambda: tmp_path)
    (tmp_path / cpu_kernels.library_name()).write_bytes(b"not a library")
    assert cpu_kernels.load() is False
    assert "could not load" in caplog.text


@pytest.mark.parametrize("vocab", [1, 7, 8, 13, 49152])
def test_argmax_and_logsumexp_match_atens(vocab):
    """The sampler's two statistics in one pass: the first of equal maxima (as torch.argmax), a row
    masked to -inf everywhere (a grammar with no way on), rows whose maximum sits in the tail past the
    last full vector."""
    torch.manual_seed(vocab)
    logits = torch.randn(6, vocab) * 4
    logits[1] = 2.0  # all tied: the first
    logits[2] = float("-inf")
    logits[3, vocab // 2 :] = float("-inf")  # a constraint's mask
    logits[4, -1] = 50.0  # in the tail
    logits[5, [0, vocab - 1]] = 30.0  # tied at both ends
    chosen, lse = cpu_kernels.argmax_logsumexp(logits)
    assert torch.equal(chosen, logits.argmax(-1))
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 49152])
def test_grammar_masks_match_the_bit_by_bit_reading(vocab):
    """llguidance's bitmask (bit t % 32 of word t / 32: token t allowed) applied in place: words that
    allow everything, nothing, or some; a vocabulary that ends inside a word."""
    torch.manual_seed(vocab)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (4, words), dtype=torch.int32)
    bitmask[1] = -1
    bitmask[2] = 0
    bitmask[3, : words // 2] = -1
    logits = torch.randn(4, vocab)
    expected = logits.clone()
    allowed = ((bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).view(4, -1)[:, :vocab]
    expected.masked_fill_(allowed == 0, float("-inf"))
    assert cpu_kernels.mask_logits(logits, bitmask)
    assert torch.equal(logits, expected)
    assert not cpu_kernels.mask_logits(logits.repeat(1, 2)[:, ::2], bitmask)  # strided: the caller masks
