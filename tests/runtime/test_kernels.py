"""The patched ggml against slim-edge's numpy references, on every CPU path this machine can run.

Flavors (conftest.py): host-generic (x86-64 without AVX: the generic C kernels); host-avx2; host-avx512
(VNNI path; run only where /proc/cpuinfo lists avx512f/bw/vl/vnni; elsewhere the series' x86 sources
are compiled with its flags and the tests skipped: evals/lab/device_kernels.sh runs it on another host);
arm64-dotprod under qemu -cpu cortex-a76 (sdot path); arm64-v8 under qemu -cpu cortex-a53 (plain NEON path).
"""

import numpy as np
import pytest

from slim_edge.formats import get_format

pytestmark = pytest.mark.runtime

NEW = ("stq1_0", "q2_0c", "q2_0c_64", "stq1_0_64")
BLOCK_64 = ("q2_0c_64", "stq1_0_64")
K = 1024  # a multiple of every block size involved (64, 256, 512)
K_64 = 576  # SmolLM2's hidden size: 9 blocks of 64, not whole blocks of 256 (nor Q8_K's activations)


def edge_rows(n: int, rng) -> np.ndarray:
    rows = [
        np.zeros(n),  # all zero
        np.full(n, 3.5),  # all +max
        np.full(n, -3.5),  # all -max
        np.where(np.arange(n) % 2, -2.0, 2.0),  # +-max alternating
        np.where(np.arange(n) == n // 3, 50.0, 0.01 * rng.standard_normal(n)),  # one outlier
        np.round(rng.standard_normal(n)),  # many exact ties in |x|
        rng.standard_normal(n) * 1e-6,  # tiny scale (fp16 subnormal d)
    ]
    return np.stack(rows).astype(np.float32)


def weight_rows(rng, rows=24) -> np.ndarray:
    x = rng.standard_normal((rows, K)).astype(np.float32)
    x[:, ::37] *= 6  # heavier tails than a Gaussian
    return np.concatenate([x, edge_rows(K, rng)])


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("imatrix", [False, True], ids=["plain", "imatrix"])
def test_reference_quantize_is_bit_exact(kernel_check, name, imatrix):
    rng = np.random.default_rng(1)
    x = weight_rows(rng)
    w = rng.uniform(0, 4, K).astype(np.float32) ** 2 if imatrix else None
    if imatrix:
        w[::91] = 0  # zero importance must not break the scale
    got = kernel_check.quantize(name, x, w)
    want = get_format(name).quantize(x, w)
    bad = np.nonzero((got != want).any(axis=1))[0]
    assert bad.size == 0, f"rows {bad.tolist()} differ; first: {got[bad[0]][:16]} vs {want[bad[0]][:16]}"


@pytest.mark.parametrize("name", NEW)
def test_get_rows_is_the_dequantized_rows(kernel_check, name):
    """get_rows, the token-embedding lookup: the numpy-dequantized rows bit for bit, in any order, repeated."""
    rng = np.random.default_rng(6)
    raw = get_format(name).quantize(weight_rows(rng, rows=9))  # 9 + the edge rows
    ids = np.array([3, 0, raw.shape[0] - 1, 3, 7, 1], np.int32)
    got = kernel_check.getrows(name, raw, K, ids, threads=3)
    want = get_format(name).dequantize(raw, K)[ids]
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("name", NEW + ("q2_0",))
def test_dequantize_is_bit_exact(kernel_check, name):
    rng = np.random.default_rng(2)
    raw = get_format(name).quantize(weight_rows(rng, rows=8))
    got = kernel_check.dequantize(name, raw, K)
    want = get_format(name).dequantize(raw, K)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("name", NEW + ("q2_0",))
def test_vec_dot_and_mul_mat(kernel_check, name):
    fmt = get_format(name)
    rng = np.random.default_rng(3)
    raw = fmt.quantize(weight_rows(rng, rows=12))
    w = fmt.dequantize(raw, K).astype(np.float64)
    x = rng.standard_normal((3, K)).astype(np.float32)
    x[1, ::29] *= 10  # activation outliers
    kern, exact = kernel_check.vecdot(name, raw, x)
    mag = np.abs(x.astype(np.float64)) @ np.abs(w).T
    # against the exact dot with the 8-bit activations the kernel saw: only fp32 rounding may differ
    assert np.all(np.abs(kern - exact) <= 1e-5 * mag + 1e-6), np.max(np.abs(kern - exact) / (mag + 1e-9))
    # against float activations (the numpy reference): only the 8-bit activation error, which for a
    # 256-block is at most about 1/254 of max|x| per element (Q8_0: of a 32-block), so well under 5 % of mag
    ref = x.astype(np.float64) @ w.T
    mm = kernel_check.mulmat(name, raw, x)
    for out in (kern, mm):
        err = np.abs(out - ref)
        assert np.all(err <= 0.05 * mag + 1e-6), np.max(err / (mag + 1e-9))
    assert np.all(np.abs(mm - exact) <= 1e-5 * mag + 1e-6)  # mul_mat runs the same kernel


@pytest.mark.parametrize("name", BLOCK_64)
def test_block_64_types_on_rows_of_576(kernel_check, name):
    """The reason these types exist: rows of 576. Reference quantize (plain and imatrix) bit-exact, dequantize
    bit-exact, vec_dot and mul_mat within fp32 rounding of the exact dot with the 8-bit (Q8_0) activations."""
    fmt = get_format(name)
    rng = np.random.default_rng(8)
    x = np.concatenate([rng.standard_normal((10, K_64)), edge_rows(K_64, rng)]).astype(np.float32)
    w = rng.uniform(0, 4, K_64).astype(np.float32) ** 2
    for imatrix in (None, w):
        got = kernel_check.quantize(name, x, imatrix)
        assert got.tobytes() == fmt.quantize(x, imatrix).tobytes()
    raw = fmt.quantize(x)
    assert raw.shape == (17, 9 * fmt.type_size)
    wd = kernel_check.dequantize(name, raw, K_64)
    np.testing.assert_array_equal(wd.view(np.uint32), fmt.dequantize(raw, K_64).view(np.uint32))
    acts = rng.standard_normal((5, K_64)).astype(np.float32)
    acts[2] = 0
    kern, exact = kernel_check.vecdot(name, raw, acts)
    mag = np.abs(acts.astype(np.float64)) @ np.abs(wd.astype(np.float64)).T
    assert_same_sums(kern, exact, mag, 5)
    assert_same_sums(kernel_check.mulmat(name, raw, acts), exact, mag, 5)
    ref = acts.astype(np.float64) @ wd.astype(np.float64).T  # float activations: Q8_0's rounding only
    assert np.all(np.abs(kern - ref) <= 0.02 * mag + 1e-6)


@pytest.mark.parametrize("n", [64, 128, 576, 1536])
@pytest.mark.parametrize("name", BLOCK_64)
def test_block_64_types_on_odd_and_even_block_counts(kernel_check, name, n):
    """1, 2, 9 and 24 blocks of 64 a row: the SIMD kernels (AVX2: patch 0011, NEON: 0012) take the blocks
    in pairs and an odd last one alone. vec_dot and mul_mat within fp32 rounding of the exact dot with the
    8-bit (Q8_0) activations, get_rows bit for bit."""
    fmt = get_format(name)
    rng = np.random.default_rng(n)
    x = rng.standard_normal((8, n)) * np.where(np.arange(n) % 37 == 0, 6.0, 1.0)  # heavier tails
    raw = fmt.quantize(np.concatenate([x, edge_rows(n, rng)]).astype(np.float32))
    w = fmt.dequantize(raw, n)
    acts = rng.standard_normal((5, n)).astype(np.float32)
    acts[1, ::29] *= 10  # activation outliers
    acts[3] = 0
    kern, exact, mag = checked_vecdot(kernel_check, name, raw, w, acts, n)
    assert np.abs(kern).max() > 0 and not kern[3].any()
    for cols in (1, 5):
        assert_same_sums(kernel_check.mulmat(name, raw, acts[:cols]), exact[:cols], mag[:cols], n)
    ids = np.array([2, 0, raw.shape[0] - 1, 2, 5], np.int32)
    got = kernel_check.getrows(name, raw, n, ids)
    np.testing.assert_array_equal(got.view(np.uint32), w[ids].view(np.uint32))


def q8_0_bound(w: np.ndarray, acts: np.ndarray) -> np.ndarray:
    """The most that Q8_0 activations can move each dot: with d = max|x| / 127 over a 32-block, q = round(x / d)
    is off by half a step and the fp16 d by 2^-11 of itself in each of up to 127 steps, so an activation is off
    by at most (1/2 + 127 * 2^-11) * d and |err| <= sum over blocks of that times sum |w|."""
    step = np.abs(acts.astype(np.float64)).reshape(len(acts), -1, 32).max(axis=2) / 127 * (0.5 + 127 * 2.0**-11)
    wsum = np.abs(w.astype(np.float64)).reshape(len(w), -1, 32).sum(axis=2)
    return step @ wsum.T


@pytest.mark.parametrize("n", [64, 192, 576])
@pytest.mark.parametrize("name", BLOCK_64)
def test_block_64_odd_last_block_alone(kernel_check, name, n):
    """1, 3 and 9 blocks of 64: activations only in the last block, only before it, and everywhere. The odd
    last block (AVX2 and NEON take blocks in pairs) alone must give its own dot, the two parts must add up to
    the whole row, and every sum is within the Q8_0 bound of the float reference; a tail that is dropped,
    reads a neighbour's codes or scale, or a zero second half that leaks into the sum fails here."""
    fmt = get_format(name)
    rng = np.random.default_rng(100 + n)
    x = rng.standard_normal((6, n)) * np.linspace(0.5, 3.0, n)  # a different scale in every block
    raw = fmt.quantize(np.concatenate([x, edge_rows(n, rng)[1:4]]).astype(np.float32))
    w = fmt.dequantize(raw, n)
    base = rng.standard_normal((3, n)).astype(np.float32)
    base[1, ::29] *= 10  # activation outliers
    last = (np.arange(n) >= n - 64).astype(np.float32)
    acts = np.concatenate([base * last, base * (1 - last), base])  # last block, the rest, the whole row
    kern, exact, mag = checked_vecdot(kernel_check, name, raw, w, acts, n)
    assert np.all(np.abs(kern[:3]) > 0)
    np.testing.assert_allclose(kern[:3] + kern[3:6], kern[6:], rtol=0, atol=1e-5 * mag[6:].max() + 1e-6)
    ref = acts.astype(np.float64) @ w.astype(np.float64).T
    assert np.all(np.abs(kern - ref) <= q8_0_bound(w, acts) * (1 + 1e-4) + 1e-5 * mag + 1e-6)


@pytest.mark.parametrize("n", [64, 576, 1536])
@pytest.mark.parametrize("name", BLOCK_64)
def test_block_64_mul_mat_on_row_and_column_pairs(kernel_check, name, n):
    """32 rows and even column counts: mul_mat passes two rows x two columns a call where the type asks for it
    (AVX2: nrows = 2, patch 0015; one block of both rows a step, so 1 and 9 blocks need no tail). Each output
    within fp32 rounding of the exact dot with the Q8_0 activations (a swapped or dropped one of the four sums
    fails), for one column (the one-row path), 2, 4 and 16, on 1 and 2 threads."""
    _, w, acts, kern, mag = _mul_mat_columns(kernel_check, name, n, 200 + n, 30, 3, 16, (1, 2, 4, 16))
    ref = acts.astype(np.float64) @ w.astype(np.float64).T
    assert np.all(np.abs(kern - ref) <= q8_0_bound(w, acts) * (1 + 1e-4) + 1e-5 * mag + 1e-6)


@pytest.mark.parametrize("n", [576, 1536])
@pytest.mark.parametrize("name", BLOCK_64)
def test_block_64_tiled_gemm_on_smollm2_shapes(kernel_check, name, n):
    """Rows of 576 (9 blocks) and 1536, 37 rows and 5..37 columns: mul_mat's chunks of 4 or more columns take the
    AVX2 tiled GEMM (patch 0017: 8 rows x 4 columns a step), here with row tails (37 = 16 + 16 + 5) and column
    tails (5, 7, 21, 37 are not multiples of 4 nor of the 16-column chunks). Each output within fp32 rounding of
    the exact dot with the Q8_0 activations, on 1 and 2 threads; elsewhere the same sums come from vec_dot."""
    _mul_mat_columns(kernel_check, name, n, 300 + n, 34, 4, 37, (4, 5, 7, 21, 37))


@pytest.mark.parametrize("rows", [37, 16, 3])
@pytest.mark.parametrize("n", [576, 1536])
@pytest.mark.parametrize("name", BLOCK_64)
def test_block_64_repacked_mul_mat(kernel_check, name, n, rows):
    """Weights in the repack buffer (patch 0018: groups of 8 rows interleaved at load, the last rows % 8 left in
    the file's layout; 37 = 4 groups + 5, 16 = 2 groups, 3 = the tail alone): 1-3 columns take its 8-row gemv, 4
    or more its 8 x 4 gemm (5, 7, 21, 37 columns: short column groups). On 1 and 2 threads (2 threads split the
    groups, one of them ending in the tail), each output within fp32 rounding of the exact dot with the Q8_0
    activations, so within the Q8_0 bound of the float reference, as the plain mul_mat. Flavors without the
    repack (not AVX2) must refuse the type."""
    random_rows = max(rows - 6, 1)
    raw, w, acts, kern, mag = _mul_mat_columns(
        kernel_check, name, n, 400 + n + rows, random_rows, rows - random_rows + 1, 37, (1, 3)
    )
    ref = acts.astype(np.float64) @ w.astype(np.float64).T
    bound = q8_0_bound(w, acts) * (1 + 1e-4) + 1e-5 * mag + 1e-6
    for cols in (1, 2, 3, 4, 5, 7, 21, 37):
        for threads in (1, 2):
            got = kernel_check.mulmat(name, raw, acts[:cols], threads=threads, repack=True)
            if not kernel_check.flavor.repacks_64:
                assert got is None, "the repack buffer took a 64-block type outside AVX2"
                return
            assert_same_sums(got, kern[:cols], mag[:cols], n)
            assert np.all(np.abs(got - ref[:cols]) <= bound[:cols])


@pytest.mark.parametrize("n", [64, 576, 8192])
@pytest.mark.parametrize("name", BLOCK_64)
def test_block_64_repacked_gemv_row_lengths(kernel_check, name, n):
    """The repacked 8-row gemv (decode) from the shortest row to the longest the repack takes: 1 block, 9 (SmolLM2)
    and 128 (GGML_GEMM64_MAX_K = 8192: AVX-512's per-column activation table of patch 0019 at its full 64 KiB). 17
    rows = 2 groups + a tail row, 1 and 2 columns on 1 and 2 threads: within fp32 rounding of the exact dot with the
    Q8_0 activations and within the Q8_0 bound of the float reference. On host-avx512 the build carries AVX-512 VNNI
    (kernel_check cpu), so 0019's kernel is the one held to the reference there; elsewhere 0018's AVX2 gemv is."""
    cpu = kernel_check.run("cpu")
    assert ("avx512=1 avx512_vnni=1" in cpu) == kernel_check.flavor.vnni_512, cpu
    raw, w, acts, kern, mag = _mul_mat_columns(kernel_check, name, n, 500 + n, 11, 7, 7, (1, 2))
    ref = acts.astype(np.float64) @ w.astype(np.float64).T
    bound = q8_0_bound(w, acts) * (1 + 1e-4) + 1e-5 * mag + 1e-6
    for cols in (1, 2):
        for threads in (1, 2):
            got = kernel_check.mulmat(name, raw, acts[:cols], threads=threads, repack=True)
            if not kernel_check.flavor.repacks_64:
                assert got is None, "the repack buffer took a 64-block type outside AVX2"
                return
            assert_same_sums(got, kern[:cols], mag[:cols], n)
            assert np.all(np.abs(got - ref[:cols]) <= bound[:cols])


def _mul_mat_columns(kernel_check, name, n, seed, random_rows, edge_end, ncols, col_counts):
    """`random_rows` scaled random rows and edge rows 1..edge_end-1 of a 64-block type, ncols activations with
    outliers and a zero column: mul_mat on the first `cols` columns of each count, on 1 and 2 threads, within fp32
    rounding of the exact dot with the Q8_0 activations. Returns (raw, w, acts, vec_dot's sums, their magnitudes)."""
    fmt = get_format(name)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((random_rows, n)) * np.linspace(0.5, 3.0, n)
    raw = fmt.quantize(np.concatenate([x, edge_rows(n, rng)[1:edge_end]]).astype(np.float32))
    assert raw.shape[0] == random_rows + edge_end - 1
    w = fmt.dequantize(raw, n)
    acts = rng.standard_normal((ncols, n)).astype(np.float32)
    acts[3, ::29] *= 10  # activation outliers
    acts[6] = 0
    kern, exact, mag = checked_vecdot(kernel_check, name, raw, w, acts, n)
    for cols in col_counts:
        for threads in (1, 2):
            assert_same_sums(kernel_check.mulmat(name, raw, acts[:cols], threads=threads), exact[:cols], mag[:cols], n)
    return raw, w, acts, kern, mag


def test_selftest(kernel_check):
    """The driver's own check (the one to run on machines pytest cannot reach, e.g. AVX-512)."""
    out = kernel_check.run("selftest", *NEW, "q2_0")
    assert "PASSED" in out, out


# mul_mat paths (ggml-cpu.c, tiled/ of patches 0007 and 0008): with 16 or more columns the tiled int8 GEMM
# (x86: VNNI or AVX2 kernel; aarch64: NEON, sdot or not; 16 columns: its narrow path), else vec_dot; the
# environment forces either.
MM_PATHS = {"auto": {}, "tiled": {"GGML_CPU_TILED_MM_FORCE": "1"}, "vec_dot": {"GGML_CPU_TILED_MM": "0"}}
K_MM = 1536  # 6 slabs of 256 (3 Q2_0C blocks): the narrow tiled path reads 3 slabs at a time, so a Q2_0C
# chunk starts on the odd half of a block


def mul_mat_case(kernel_check, name: str, seed: int, random_rows: int, columns: int):
    """Weights (random_rows heavy-tailed rows + the edge rows, quantized to `name`) and activation columns
    (outliers in column 1, column 5 all zero: d = 0 in its Q8_K blocks); the one-column kernel's results,
    the exact dots with the 8-bit activations, and sum |x| |w| per output (the tolerance's scale)."""
    fmt = get_format(name)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((random_rows, K_MM)).astype(np.float32)
    x[:, ::37] *= 6
    raw = fmt.quantize(np.concatenate([x, edge_rows(K_MM, rng)]))
    w = fmt.dequantize(raw, K_MM).astype(np.float64)
    acts = rng.standard_normal((columns, K_MM)).astype(np.float32)
    acts[1, ::29] *= 10
    acts[5] = 0
    kern, exact = kernel_check.vecdot(name, raw, acts)  # one row and column at a time
    mag = np.abs(acts.astype(np.float64)) @ np.abs(w).T
    return raw, acts, kern, exact, mag


def checked_vecdot(kernel_check, name: str, raw, w, acts, n: int):
    """vec_dot of every activation row with every weight row, held to the exact dot (assert_same_sums); returns
    the kernel's sums, the exact ones and sum |x| |w| per output."""
    kern, exact = kernel_check.vecdot(name, raw, acts)
    mag = np.abs(acts.astype(np.float64)) @ np.abs(w.astype(np.float64)).T
    assert_same_sums(kern, exact, mag, n)
    return kern, exact, mag


def assert_same_sums(got, want, mag, n: int):
    """Float rounding only: within 1e-5 of sum |x| |w| per output."""
    bad = np.abs(got - want) > 1e-5 * mag + 1e-6
    assert not bad.any(), f"n={n}: {bad.sum()} outputs differ, first at {np.argwhere(bad)[0].tolist()}"


@pytest.mark.parametrize("path", MM_PATHS)
@pytest.mark.parametrize("name", NEW)
def test_mul_mat_columns(kernel_check, name, path):
    """mul_mat over 1..300 columns and an odd row count: per column, the same integer sums as one vec_dot."""
    raw, acts, kern, exact, mag = mul_mat_case(kernel_check, name, seed=4, random_rows=12, columns=300)  # 19 rows
    for n in (1, 2, 3, 4, 5, 8, 16, 17, 300):
        mm = kernel_check.mulmat(name, raw, acts[:n], env=MM_PATHS[path])
        # float rounding only: against the 1-column kernel and the exact dot with the 8-bit activations
        for want in (kern[:n], exact[:n]):
            assert_same_sums(mm, want, mag[:n], n)


@pytest.mark.parametrize("name", NEW)
def test_mul_mat_id_routes_each_token_to_its_experts(kernel_check, name):
    """mul_mat_id (MoE layers): 4 experts of 21 rows (the edge rows in the last), 6 tokens with 2 experts each; every
    output is the plain mul_mat of the chosen expert's rows with that token, within float rounding."""
    raw, acts, _, _, mag = mul_mat_case(kernel_check, name, seed=7, random_rows=77, columns=6)  # 84 rows
    n_exp, m = 4, raw.shape[0] // 4
    ids = np.array([[0, 3], [2, 2], [1, 0], [3, 1], [0, 0], [2, 3]], np.int32)
    got = kernel_check.mulmatid(name, raw, n_exp, acts, ids, threads=3)
    per_expert = [kernel_check.mulmat(name, raw[e * m : (e + 1) * m], acts) for e in range(n_exp)]
    want = np.stack([np.stack([per_expert[e][t] for e in ids[t]]) for t in range(len(ids))])
    scale = np.stack([np.stack([mag[t, e * m : (e + 1) * m] for e in ids[t]]) for t in range(len(ids))])
    assert got.shape == (6, 2, m)
    assert_same_sums(got, want, scale, 6)
    assert np.abs(got).max() > 0


@pytest.mark.parametrize("threads", [1, 3])
def test_stq1_0_decode_tables(kernel_check, threads):
    """x86 decode (patch 0009, the default; GGML_CPU_STQ1_0_LUT=0 turns it off): STQ1_0 with < 16 columns on
    per-column activation tables, 16 rows at a time. 85 rows = 5 tiles + 5 rows of vec_dot tail, split over
    threads; the same sums as vec_dot, with the variable unset and set to 1 (on aarch64 and x86 without AVX2 all
    are vec_dot)."""
    raw, acts, kern, exact, mag = mul_mat_case(kernel_check, "stq1_0", seed=5, random_rows=78, columns=15)  # 85 rows
    for n in (1, 2, 7, 15):
        on = kernel_check.mulmat("stq1_0", raw, acts[:n], threads=threads)
        on1 = kernel_check.mulmat("stq1_0", raw, acts[:n], threads=threads, env={"GGML_CPU_STQ1_0_LUT": "1"})
        off = kernel_check.mulmat("stq1_0", raw, acts[:n], threads=threads, env={"GGML_CPU_STQ1_0_LUT": "0"})
        np.testing.assert_array_equal(on1, on)
        if n == 1:  # the prefetch distance (tiles ahead; 0: none) moves no result bit
            for pf in ("0", "3"):
                got = kernel_check.mulmat(
                    "stq1_0", raw, acts[:n], threads=threads, env={"GGML_CPU_STQ1_0_LUT_PREFETCH": pf}
                )
                np.testing.assert_array_equal(got, on)
        for got, want in ((on, kern[:n]), (on, exact[:n]), (off, kern[:n])):
            assert_same_sums(got, want, mag[:n], n)
        if n == 1 and kernel_check.flavor.decode_tables:
            # the tables ran, not vec_dot: they add the blocks in row order, vec_dot in 8 lanes, so some
            # float roundings differ (with more columns the tiled GEMM may run instead)
            assert np.abs(on - off).max() > 0


def test_benchmm_runs(kernel_check):
    out = kernel_check.run("benchmm", "stq1_0", 256, 16, 8, 1)
    assert "ns/weight/column" in out, out
