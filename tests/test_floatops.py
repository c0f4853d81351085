"""Float kernels against their numpy references, and the batch-invariance promise row by row."""

import numpy as np
import pytest
from bitnet_grpc.cyext import floatops
from bitnet_grpc.cyext import reference as ref


@pytest.fixture(params=floatops.kernel_paths())
def kernel_path(request):
    before = floatops.get_kernel_path()
    floatops.set_kernel_path(request.param)
    yield request.param
    floatops.set_kernel_path(before)


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("d", [1, 15, 16, 17, 100, 2560])
def test_matmul_rows_is_the_documented_fixed_order(kernel_path, d):
    rng = np.random.default_rng(d)
    x, w = rand(rng, 13, d), rand(rng, 37, d)  # 13 rows: groups of 8 and 4 and a single row
    out = np.empty((13, 37), np.float32)
    floatops.matmul_rows(x, w, out)
    np.testing.assert_array_equal(out, ref.matmul_rows(x, w))
    np.testing.assert_allclose(out, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-4)


def test_matmul_rows_f16_equals_f32_on_the_widened_table(kernel_path):
    rng = np.random.default_rng(1)
    x = rand(rng, 13, 70)
    w16 = rand(rng, 50, 70).astype(np.float16)
    w16[0, :4] = [np.float16(6e-8), np.float16(-1e-5), np.float16(65504), np.float16(-0.0)]  # subnormals, max
    out16 = np.empty((13, 50), np.float32)
    out32 = np.empty((13, 50), np.float32)
    floatops.matmul_rows_f16(x, w16.view(np.uint16), out16)
    floatops.matmul_rows(x, w16.astype(np.float32), out32)
    np.testing.assert_array_equal(out16, out32)
    np.testing.assert_array_equal(out16, ref.matmul_rows(x, w16))


def test_matmul_rows_bf16_is_the_widened_table(kernel_path):
    rng = np.random.default_rng(11)
    x = rand(rng, 13, 70)
    bits = (rand(rng, 50, 70).view(np.uint32) >> 16).astype(np.uint16)
    out = np.empty((13, 50), np.float32)
    floatops.matmul_rows_bf16(x, bits, out)
    np.testing.assert_array_equal(out, ref.matmul_rows(x, ref.bf16_to_float32(bits)))


def test_matmul_rows_batch_and_thread_invariant():
    rng = np.random.default_rng(2)
    x, w = rand(rng, 9, 300), rand(rng, 257, 300)
    batched = np.empty((9, 257), np.float32)
    floatops.matmul_rows(x, w, batched)
    threads = floatops.get_num_threads()
    try:
        for n_threads in (1, 2):
            floatops.set_num_threads(n_threads)
            for r in range(9):
                alone = np.empty((1, 257), np.float32)
                floatops.matmul_rows(x[r : r + 1], w, alone)
                np.testing.assert_array_equal(alone[0], batched[r])
    finally:
        floatops.set_num_threads(threads)


def test_kernel_paths_agree_bit_for_bit():
    rng = np.random.default_rng(3)
    results = []
    for d in (2048, 2048 + 7):
        x, w = rand(rng, 13, d), rand(rng, 64, d)
        for path in floatops.kernel_paths():
            floatops.set_kernel_path(path)
            out = np.empty((13, 64), np.float32)
            floatops.matmul_rows(x, w, out)
            out16 = np.empty((13, 64), np.float32)
            floatops.matmul_rows_f16(x, w.astype(np.float16).view(np.uint16), out16)
            out_bf16 = np.empty((13, 64), np.float32)
            floatops.matmul_rows_bf16(x, (w.view(np.uint32) >> 16).astype(np.uint16), out_bf16)
            results.append((d, out, out16, out_bf16))
    floatops.set_kernel_path(floatops.kernel_paths()[-1])
    for d, *outs in results:
        first = next(r for r in results if r[0] == d)
        for got, expected in zip(outs, first[1:], strict=True):
            np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_rmsnorm_matches_reference_and_works_in_place(rows):
    rng = np.random.default_rng(rows)
    x = rand(rng, rows, 640, scale=3.0)
    w = 1 + rand(rng, 640, scale=0.1)
    out = np.empty_like(x)
    floatops.rmsnorm(x, w, 1e-5, out)
    np.testing.assert_allclose(out, ref.rmsnorm(x, w, 1e-5), rtol=1e-5, atol=1e-6)
    inplace = x.copy()
    floatops.rmsnorm(inplace, w, 1e-5, inplace)
    np.testing.assert_array_equal(inplace, out)
    for r in range(rows):
        alone = np.empty((1, 640), np.float32)
        floatops.rmsnorm(x[r : r + 1], w, 1e-5, alone)
        np.testing.assert_array_equal(alone[0], out[r])


def test_rmsnorm_eps_matters_for_zero_rows():
    x = np.zeros((1, 8), np.float32)
    out = np.full((1, 8), np.nan, np.float32)
    floatops.rmsnorm(x, np.ones(8, np.float32), 1e-5, out)
    np.testing.assert_array_equal(out, 0)


def test_rope_matches_reference_on_strided_rows():
    rng = np.random.default_rng(4)
    n_heads, head_dim = 4, 32
    cos, sin = ref.rope_tables(64, head_dim, 10000.0)
    fused = rand(rng, 5, n_heads * head_dim + 20)  # rope works on a view into a wider buffer
    positions = np.array([0, 1, 7, 63, 7], np.int32)
    expected = ref.rope(fused[:, : n_heads * head_dim].copy(), positions, cos, sin, n_heads)
    floatops.rope(fused[:, : n_heads * head_dim], positions, cos, sin, n_heads)
    np.testing.assert_array_equal(fused[:, : n_heads * head_dim], expected)
    # position 0 is the identity; rotation keeps each (i, i + half) pair's length
    x0 = rand(rng, 1, n_heads * head_dim)
    y0 = x0.copy()
    floatops.rope(y0, np.array([0], np.int32), cos, sin, n_heads)
    np.testing.assert_array_equal(y0, x0)


def test_rope_pairs_i_with_i_plus_half():
    head_dim = 8
    cos, sin = ref.rope_tables(4, head_dim, 10000.0)
    x = np.zeros((1, head_dim), np.float32)
    x[0, 0] = 1.0  # only dimension 0 set: rotation moves it into dimension 0 + half, nowhere else
    floatops.rope(x, np.array([1], np.int32), cos, sin, 1)
    assert x[0, 0] == pytest.approx(np.cos(1.0)) and x[0, 4] == pytest.approx(np.sin(1.0))
    assert np.count_nonzero(x) == 2


def test_rope_rejects_positions_outside_table():
    cos, sin = ref.rope_tables(4, 8, 10000.0)
    with pytest.raises(ValueError, match="position"):
        floatops.rope(np.zeros((1, 8), np.float32), np.array([4], np.int32), cos, sin, 1)


def test_gates_match_reference():
    rng = np.random.default_rng(5)
    gate_up = rand(rng, 3, 2 * 96, scale=2.0)
    out = np.empty((3, 96), np.float32)
    floatops.relu2_gate(gate_up, out)
    np.testing.assert_array_equal(out, ref.relu2_gate(gate_up))
    floatops.silu_gate(gate_up, out)
    np.testing.assert_allclose(out, ref.silu_gate(gate_up), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError):
        floatops.relu2_gate(gate_up, np.empty((3, 95), np.float32))


def make_cache(rng, n_slots=3, ctx=40, n_kv=2, head_dim=16):
    return rand(rng, n_slots, n_kv, ctx, head_dim), rand(rng, n_slots, n_kv, ctx, head_dim)


def test_attention_matches_reference_gqa():
    rng = np.random.default_rng(6)
    k_cache, v_cache = make_cache(rng)
    n_heads = 6  # 3 query heads per KV head
    q = rand(rng, 5, n_heads * 16, scale=2.0)
    slots = np.array([0, 2, 2, 1, 0], np.int32)
    positions = np.array([0, 5, 39, 17, 3], np.int32)
    out = np.empty_like(q)
    scratch = np.empty((2, 40), np.float32)
    floatops.attention(q, k_cache, v_cache, slots, positions, out, scratch)
    expected = ref.attention(q, k_cache, v_cache, slots, positions)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=2e-6)
    # position 0 sees only itself: the output is exactly v[0] of the head's KV head
    np.testing.assert_allclose(out[0].reshape(n_heads, 16)[4], v_cache[0, 1, 0], rtol=1e-6)


def test_attention_is_causal_and_batch_invariant():
    rng = np.random.default_rng(7)
    k_cache, v_cache = make_cache(rng)
    q = rand(rng, 4, 4 * 16)
    slots = np.array([1, 1, 0, 2], np.int32)
    positions = np.array([10, 11, 3, 30], np.int32)
    out = np.empty_like(q)
    scratch = np.empty((2, 40), np.float32)
    floatops.attention(q, k_cache, v_cache, slots, positions, out, scratch)
    for r in range(4):
        alone = np.empty((1, 4 * 16), np.float32)
        floatops.attention(
            q[r : r + 1], k_cache, v_cache, slots[r : r + 1], positions[r : r + 1], alone, scratch
        )
        np.testing.assert_array_equal(alone[0], out[r])
    # future positions and other slots do not matter
    k2, v2 = k_cache.copy(), v_cache.copy()
    k2[1, :, 12:] = 99.0
    v2[1, :, 12:] = -99.0
    k2[0] = 5.0
    again = np.empty((2, 4 * 16), np.float32)
    floatops.attention(q[:2], k2, v2, slots[:2], positions[:2], again, scratch)
    np.testing.assert_array_equal(again, out[:2])


def test_kv_store_and_bounds():
    rng = np.random.default_rng(8)
    k_cache = np.zeros((2, 2, 8, 4), np.float32)
    v_cache = np.zeros_like(k_cache)
    kv = rand(rng, 3, 16)  # a fused k|v buffer: k = kv[:, :8], v = kv[:, 8:]
    slots = np.array([1, 0, 1], np.int32)
    positions = np.array([0, 7, 3], np.int32)
    floatops.kv_store(kv[:, :8], kv[:, 8:], k_cache, v_cache, slots, positions)
    for r in range(3):
        np.testing.assert_array_equal(k_cache[slots[r], :, positions[r]].ravel(), kv[r, :8])
        np.testing.assert_array_equal(v_cache[slots[r], :, positions[r]].ravel(), kv[r, 8:])
    assert np.count_nonzero(k_cache) == 3 * 8
    with pytest.raises(ValueError, match="position"):
        floatops.kv_store(kv[:1, :8], kv[:1, 8:], k_cache, v_cache, slots[:1], np.array([8], np.int32))
    with pytest.raises(ValueError, match="slot"):
        floatops.kv_store(kv[:1, :8], kv[:1, 8:], k_cache, v_cache, np.array([2], np.int32), positions[:1])


def test_embed_rows_half_and_bfloat16():
    rng = np.random.default_rng(9)
    table = rand(rng, 10, 12).astype(np.float16)
    tokens = np.array([3, 0, 9, 3], np.int32)
    out = np.empty((4, 12), np.float32)
    floatops.embed_rows_half(table.view(np.uint16), tokens, out)
    np.testing.assert_array_equal(out, table[tokens].astype(np.float32))
    with pytest.raises(ValueError, match="token"):
        floatops.embed_rows_half(table.view(np.uint16), np.array([10], np.int32), out[:1])
    bits = rng.integers(0, 2**16, (10, 12)).astype(np.uint16)
    bits[(bits & 0x7F80) == 0x7F80] = 0  # no inf / nan patterns
    floatops.embed_rows_half(bits, tokens, out, bfloat16=True)
    np.testing.assert_array_equal(out, ref.bf16_to_float32(bits)[tokens])


def test_non_contiguous_rows_are_refused():
    x = np.zeros((2, 16), np.float32)[:, ::2]
    with pytest.raises(ValueError, match="contiguous"):
        floatops.rmsnorm(x, np.ones(8, np.float32), 1e-5, np.empty((2, 8), np.float32))


@pytest.mark.parametrize("head_dim", [16, 40, 96])
def test_attention_paths_agree_and_match_reference(head_dim):
    rng = np.random.default_rng(head_dim)
    k_cache, v_cache = make_cache(rng, n_slots=2, ctx=70, n_kv=2, head_dim=head_dim)
    q = rand(rng, 6, 4 * head_dim)
    slots = np.array([0, 1, 1, 0, 1, 0], np.int32)
    positions = np.array([0, 2, 3, 4, 37, 69], np.int32)  # position counts around multiples of 4
    scratch = np.empty((2, 70), np.float32)
    results = []
    for path in floatops.kernel_paths():
        floatops.set_kernel_path(path)
        out = np.empty_like(q)
        floatops.attention(q, k_cache, v_cache, slots, positions, out, scratch)
        results.append(out)
    floatops.set_kernel_path(floatops.kernel_paths()[-1])
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])
    expected = ref.attention(q, k_cache, v_cache, slots, positions)
    np.testing.assert_allclose(results[0], expected, rtol=1e-5, atol=2e-6)


def test_attention_parallel_path_equals_one_thread():
    rng = np.random.default_rng(12)
    k_cache, v_cache = make_cache(rng, n_slots=2, ctx=300, n_kv=2, head_dim=32)
    q = rand(rng, 4, 4 * 32)
    slots = np.array([0, 1, 0, 1], np.int32)
    positions = np.array([299, 250, 3, 200], np.int32)  # enough (position, head) pairs to use threads
    scratch = np.empty((2, 300), np.float32)
    threads = floatops.get_num_threads()
    results = []
    try:
        for n_threads in (1, 2):
            floatops.set_num_threads(n_threads)
            out = np.empty_like(q)
            floatops.attention(q, k_cache, v_cache, slots, positions, out, scratch)
            results.append(out)
    finally:
        floatops.set_num_threads(threads)
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_allclose(
        results[1], ref.attention(q, k_cache, v_cache, slots, positions), rtol=1e-5, atol=2e-6
    )


def test_rmsnorm_threads_give_identical_rows():
    rng = np.random.default_rng(13)
    x, w = rand(rng, 67, 2000), rand(rng, 2000)  # enough elements to be split between threads
    threads = floatops.get_num_threads()
    results = []
    try:
        for n_threads in (1, 2, 3):
            floatops.set_num_threads(n_threads)
            out = np.empty_like(x)
            floatops.rmsnorm(x, w, 1e-6, out)
            results.append(out)
    finally:
        floatops.set_num_threads(threads)
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])
    np.testing.assert_array_equal(results[0], ref.rmsnorm(x, w, 1e-6))
    with pytest.raises(ValueError, match="threads must be >= 1"):
        floatops.set_num_threads(0)


def test_float_and_ternary_kernels_share_the_pool_from_two_python_threads():
    """Both extensions run on one worker pool: while one Python thread's job holds it, the other's
    runs on its own thread (its own scratch row 0). Every result must stay bit-identical."""
    import threading

    from bitnet_grpc.cyext import ternary

    rng = np.random.default_rng(14)
    k_cache, v_cache = make_cache(rng, n_slots=2, ctx=300, n_kv=2, head_dim=32)
    q = rand(rng, 4, 4 * 32)
    slots, positions = np.array([0, 1, 0, 1], np.int32), np.array([299, 250, 3, 200], np.int32)
    x, w = rand(rng, 5, 1024), rand(rng, 700, 1024)  # both big enough to be split between threads
    codes = rng.integers(-1, 2, size=(1200, 1024)).astype(np.int8)
    packed, w_scale = ternary.pack_ternary(codes), np.ones(1200, np.float32)
    want_attention = np.empty_like(q)
    floatops.attention(q, k_cache, v_cache, slots, positions, want_attention, np.empty((2, 300), np.float32))
    want_head = np.empty((5, 700), np.float32)
    floatops.matmul_rows(x, w, want_head)
    want_ternary = ternary.bitlinear(x, packed, w_scale)
    failures = []

    def float_worker():
        scratch, out, head = np.empty((2, 300), np.float32), np.empty_like(q), np.empty((5, 700), np.float32)
        for _ in range(100):
            floatops.attention(q, k_cache, v_cache, slots, positions, out, scratch)
            floatops.matmul_rows(x, w, head)
            if not (np.array_equal(out, want_attention) and np.array_equal(head, want_head)):
                failures.append("float")

    def ternary_worker():
        for _ in range(200):
            if not np.array_equal(ternary.bitlinear(x, packed, w_scale), want_ternary):
                failures.append("ternary")

    threads = floatops.get_num_threads(), ternary.get_num_threads()
    floatops.set_num_threads(2)
    ternary.set_num_threads(2)
    try:
        workers = [threading.Thread(target=float_worker), threading.Thread(target=ternary_worker)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    finally:
        floatops.set_num_threads(threads[0])
        ternary.set_num_threads(threads[1])
    assert failures == []


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":")[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def test_avx512_path_offered_when_the_cpu_has_it():
    wanted = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "f16c"}
    flags = _cpu_flags()
    if flags:
        assert ("avx512" in floatops.kernel_paths()) == (wanted <= flags)


@pytest.mark.parametrize("wtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("d", [1, 15, 17, 33, 256, 2048 + 5, 2560 + 3])
def test_head_tiles_on_odd_shapes_equal_reference_on_every_path(wtype, d):
    """Rows 1..17 (every remainder of the 4-row tiles, widened and direct half weights), weight-row
    counts around multiples of 4, lengths with and without a tail of n % 16 elements."""
    rng = np.random.default_rng(100 + d)
    x = rand(rng, 17, d)
    w32 = rand(rng, 4 * 3 + 3, d)
    if wtype == "f32":
        w, fn, wide = w32, floatops.matmul_rows, w32
    elif wtype == "f16":
        w16 = w32.astype(np.float16)
        w, fn, wide = w16.view(np.uint16), floatops.matmul_rows_f16, w16.astype(np.float32)
    else:
        w = (w32.view(np.uint32) >> 16).astype(np.uint16)
        fn, wide = floatops.matmul_rows_bf16, ref.bf16_to_float32(w)
    expected = ref.matmul_rows(x, wide)
    try:
        for path in floatops.kernel_paths():
            floatops.set_kernel_path(path)
            for rows in (1, 2, 3, 4, 5, 8, 11, 16, 17):
                for n_w in (1, 3, 4, 5, 15):
                    out = np.full((rows, n_w), np.nan, np.float32)
                    fn(x[:rows], w[:n_w], out)
                    np.testing.assert_array_equal(out, expected[:rows, :n_w], err_msg=f"{path} {rows}x{n_w}")
    finally:
        floatops.set_kernel_path(floatops.kernel_paths()[-1])


def test_head_strided_rows_and_output():
    """x and out as views with row strides wider than their rows (as the engine passes them)."""
    rng = np.random.default_rng(21)
    x_buf, w = rand(rng, 9, 300), rand(rng, 70, 260)
    out_buf = np.full((9, 90), np.nan, np.float32)
    expected = ref.matmul_rows(np.ascontiguousarray(x_buf[:, :260]), w)
    try:
        for path in floatops.kernel_paths():
            floatops.set_kernel_path(path)
            floatops.matmul_rows(x_buf[:, :260], w, out_buf[:, :70])
            np.testing.assert_array_equal(out_buf[:, :70], expected, err_msg=path)
            assert np.isnan(out_buf[:, 70:]).all()
    finally:
        floatops.set_kernel_path(floatops.kernel_paths()[-1])


@pytest.mark.parametrize(
    ("n_kv", "group", "head_dim", "ctx"),
    [
        (1, 1, 64, 40),
        (2, 2, 64, 70),
        (1, 3, 40, 70),
        (2, 4, 128, 70),
        (1, 6, 96, 70),
        (1, 5, 24, 1100),
        # one pass over V for 1-2 heads of 65-128 dims (masked chunks past head_dim)
        (2, 1, 96, 70),
        (1, 1, 65, 40),
        (1, 1, 128, 40),
        (1, 2, 72, 70),
        (2, 2, 128, 40),
        # groups of 5: a pass of 4 heads, then a leftover head of 65-128 dims in one pass over V
        (1, 5, 96, 70),
        (2, 5, 72, 40),
    ],
)
def test_attention_groups_agree_on_every_path(n_kv, group, head_dim, ctx):
    """Grouped query heads (1..6 per KV head, more than one pass when over 4 or when the scores of
    the group outgrow the scratch row), head_dim not a multiple of 64 or 16, every position count
    from 1 to ctx: bit-identical on every path, and each row as if alone."""
    rng = np.random.default_rng(1000 * group + head_dim)
    k_cache, v_cache = make_cache(rng, n_slots=2, ctx=ctx, n_kv=n_kv, head_dim=head_dim)
    n_heads = n_kv * group
    positions = np.array(sorted({*range(0, min(ctx, 70)), ctx // 2, ctx - 2, ctx - 1}), np.int32)
    rows = len(positions)
    q = rand(rng, rows, n_heads * head_dim, scale=2.0)
    slots = (np.arange(rows) % 2).astype(np.int32)
    scratch = np.empty((2, ctx), np.float32)
    results = {}
    try:
        for path in floatops.kernel_paths():
            floatops.set_kernel_path(path)
            out = np.full_like(q, np.nan)
            floatops.attention(q, k_cache, v_cache, slots, positions, out, scratch)
            results[path] = out
    finally:
        floatops.set_kernel_path(floatops.kernel_paths()[-1])
    for path, out in results.items():
        np.testing.assert_array_equal(out, results["portable"], err_msg=path)
    np.testing.assert_allclose(
        results["portable"], ref.attention(q, k_cache, v_cache, slots, positions), rtol=1e-5, atol=2e-6
    )
    for r in (0, rows // 2, rows - 1):
        alone = np.empty((1, q.shape[1]), np.float32)
        floatops.attention(
            q[r : r + 1], k_cache, v_cache, slots[r : r + 1], positions[r : r + 1], alone, scratch
        )
        np.testing.assert_array_equal(alone[0], results["portable"][r])


@pytest.mark.parametrize("d", [1, 7, 8, 9, 17, 256, 640, 2560 + 3])
def test_rmsnorm_identical_on_every_path(d):
    rng = np.random.default_rng(50 + d)
    x, w = rand(rng, 5, d, scale=3.0), 1 + rand(rng, d, scale=0.1)
    expected = ref.rmsnorm(x, w, 1e-5)
    try:
        for path in floatops.kernel_paths():
            floatops.set_kernel_path(path)
            out = np.full_like(x, np.nan)
            floatops.rmsnorm(x, w, 1e-5, out)
            np.testing.assert_array_equal(out, expected, err_msg=path)
            inplace = x.copy()
            floatops.rmsnorm(inplace, w, 1e-5, inplace)
            np.testing.assert_array_equal(inplace, expected, err_msg=path)
    finally:
        floatops.set_kernel_path(floatops.kernel_paths()[-1])
