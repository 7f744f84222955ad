// kernel_check: drive the patched ggml's quantize / dequantize / vec_dot / mul_mat from files, and a
// self-test that needs no files (run it on any machine: AVX-512, NEON with and without dotprod, ...).
//
//   kernel_check quantize   TYPE N_PER_ROW IN.f32 OUT.bin [IMATRIX.f32]   reference quantizer (ggml_quantize_chunk)
//   kernel_check dequantize TYPE N_PER_ROW IN.bin OUT.f32                 type_traits.to_float
//   kernel_check vecdot     TYPE K W.bin X.f32 OUT.f32                    per row and column: the CPU vec_dot, then
//                                                                         the exact dot of the dequantized row with
//                                                                         the dequantized quantized activations
//                                                                         (OUT = [2, N, M] float32)
//   kernel_check mulmat     TYPE K W.bin X.f32 OUT.f32 [THREADS] [repack]
//                                                                         ggml_mul_mat on the CPU backend, OUT = [N, M];
//                                                                         `repack`: W in the repack buffer (as llama.cpp
//                                                                         loads it with --repack 1), exit status 3 if
//                                                                         that buffer does not take TYPE
//   kernel_check getrows    TYPE K W.bin IDS.i32 OUT.f32 [THREADS]       ggml_get_rows on the CPU backend (the token
//                                                                         embedding lookup), OUT = [N_IDS, K]
//   kernel_check mulmatid   TYPE K W.bin X.f32 IDS.i32 OUT.f32 N_EXPERTS [THREADS]
//                                                                         ggml_mul_mat_id (MoE experts): W = N_EXPERTS
//                                                                         x M rows, X = T tokens, IDS = [T, N_USED],
//                                                                         OUT = [T, N_USED, M]
//   kernel_check cpu                                                      the SIMD features this build was compiled with
//   kernel_check selftest   [TYPE ...]                                    random rows: vec_dot and mul_mat (also from the
//                                                                         repack buffer, for the types it takes) against
//                                                                         the exact reference; exit status 1 on a mismatch
//   kernel_check bench      TYPE K M [REPS]                               ns per weight of vec_dot (one thread)
//   kernel_check benchmm    TYPE K M N [REPS] [repack]                    ns per weight per column of ggml_mul_mat
//                                                                         ([M, K] x [N, K] from float activations,
//                                                                         CPU backend, one thread): best and median
//                                                                         of REPS; `repack`: weights in the repack
//                                                                         buffer (Q4_0, Q4_K, ... as llama-bench
//                                                                         loads them), only for types it repacks
//
// mul_mat takes ggml's tiled int8 GEMM for the src0 types it supports (x86: K-quants, IQ, STQ1_0, Q2_0C;
// aarch64: STQ1_0, Q2_0C) once N >= 8 (STQ1_0, Q2_0C: 16), else the vec_dot path; GGML_CPU_TILED_MM=0 in the
// environment forces vec_dot, GGML_CPU_TILED_MM_FORCE=1 the tiled GEMM at any N.
//
// Files are raw little-endian arrays; W.bin holds M rows of ggml_row_size(TYPE, K) bytes, X.f32 holds N rows of K.
// Build: cc -O2 kernel_check.c -I<tree>/ggml/include -L<build>/bin -lggml -lggml-base -lggml-cpu -lm
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void die(const char * msg, const char * arg) {
    fprintf(stderr, "kernel_check: %s%s%s\n", msg, arg ? ": " : "", arg ? arg : "");
    exit(2);
}

static enum ggml_type type_by_name(const char * name) {
    for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
        const char * n = ggml_type_name((enum ggml_type) t);
        if (n && ggml_blck_size((enum ggml_type) t) > 0 && strcasecmp(n, name) == 0) {
            return (enum ggml_type) t;
        }
    }
    die("unknown type", name);
    return GGML_TYPE_COUNT;
}

static void * read_file(const char * path, size_t * size) {
    FILE * f = fopen(path, "rb");
    if (!f) die("cannot open", path);
    fseek(f, 0, SEEK_END);
    *size = (size_t) ftell(f);
    fseek(f, 0, SEEK_SET);
    void * buf = malloc(*size ? *size : 1);
    if (fread(buf, 1, *size, f) != *size) die("cannot read", path);
    fclose(f);
    return buf;
}

static void write_file(const char * path, const void * buf, size_t size) {
    FILE * f = fopen(path, "wb");
    if (!f || fwrite(buf, 1, size, f) != size) die("cannot write", path);
    fclose(f);
}

// activations as the kernel sees them: quantized to vec_dot_type, then back to float (exactly)
static void dequantize_activations(enum ggml_type vt, const void * q, float * out, int64_t k) {
    if (vt == GGML_TYPE_Q8_K) {
        // block_q8_K: float d, int8 qs[256], int16 bsums[16]
        const size_t bs = ggml_type_size(GGML_TYPE_Q8_K);
        if (bs != 4 + 256 + 32) die("unexpected block_q8_K size", NULL);
        for (int64_t i = 0; i < k / 256; ++i) {
            const uint8_t * b = (const uint8_t *) q + i*bs;
            float d;
            memcpy(&d, b, 4);
            for (int j = 0; j < 256; ++j) out[i*256 + j] = d * (float) (int8_t) b[4 + j];
        }
    } else if (ggml_get_type_traits(vt)->to_float) {
        ggml_get_type_traits(vt)->to_float(q, out, k);
    } else {
        die("no dequantizer for vec_dot_type", ggml_type_name(vt));
    }
}

// kernel results and the exact reference for W [m, k] (raw) times X [n, k] (float)
static void vecdot(enum ggml_type type, int64_t k, const void * w, int64_t m, const float * x, int64_t n,
                   float * out_kernel, float * out_ref, double * out_abs) {
    const struct ggml_type_traits_cpu * tc = ggml_get_type_traits_cpu(type);
    const enum ggml_type vt = tc->vec_dot_type;
    const size_t wrow = ggml_row_size(type, k);
    const size_t xrow = ggml_row_size(vt, k);
    void  * xq = malloc(xrow);
    float * xd = malloc(k*sizeof(float));
    float * wd = malloc(k*sizeof(float));
    for (int64_t c = 0; c < n; ++c) {
        ggml_get_type_traits_cpu(vt)->from_float(x + c*k, xq, k);
        dequantize_activations(vt, xq, xd, k);
        for (int64_t r = 0; r < m; ++r) {
            const void * wr = (const char *) w + r*wrow;
            float s = 0.0f;
            tc->vec_dot((int) k, &s, 0, wr, 0, xq, 0, 1);
            ggml_get_type_traits(type)->to_float(wr, wd, k);
            double ref = 0.0, mag = 0.0;
            for (int64_t j = 0; j < k; ++j) {
                ref += (double) wd[j] * (double) xd[j];
                mag += fabs((double) wd[j] * (double) xd[j]);
            }
            out_kernel[c*m + r] = s;
            if (out_ref) out_ref[c*m + r] = (float) ref;
            if (out_abs) out_abs[c*m + r] = mag;
        }
    }
    free(xq); free(xd); free(wd);
}

// compute the graph of `ty` on the CPU backend, copy its data to `out`, free the context
static void compute_into(struct ggml_context * ctx, struct ggml_tensor * ty, int n_threads, float * out,
                         const char * failure) {
    struct ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, ty);
    if (ggml_graph_compute_with_ctx(ctx, gf, n_threads) != GGML_STATUS_SUCCESS) die(failure, NULL);
    memcpy(out, ty->data, ggml_nbytes(ty));
    ggml_free(ctx);
}

static void mulmat(enum ggml_type type, int64_t k, const void * w, int64_t m, const float * x, int64_t n,
                   float * out, int n_threads) {
    const size_t mem = ggml_row_size(type, k)*m + (size_t) (k*n + m*n)*sizeof(float) + 64*ggml_tensor_overhead()
                     + ggml_graph_overhead() + (16 << 20);  // + the work buffer (tiled: 512 KiB a thread)
    struct ggml_init_params params = { mem, NULL, false };
    struct ggml_context * ctx = ggml_init(params);
    struct ggml_tensor * tw = ggml_new_tensor_2d(ctx, type, k, m);
    struct ggml_tensor * tx = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, k, n);
    memcpy(tw->data, w, ggml_nbytes(tw));
    memcpy(tx->data, x, ggml_nbytes(tx));
    struct ggml_tensor * ty = ggml_mul_mat(ctx, tw, tx);  // [m, n]
    compute_into(ctx, ty, n_threads, out, "mul_mat failed");
}

// the int32 ids of PATH (their count in *n), each checked to lie in [0, limit)
static int32_t * read_ids(const char * path, int64_t limit, int64_t * n, const char * what) {
    size_t sz;
    int32_t * ids = read_file(path, &sz);
    *n = sz / sizeof(int32_t);
    for (int64_t i = 0; i < *n; ++i) {
        if (ids[i] < 0 || ids[i] >= limit) die(what, path);
    }
    return ids;
}

static void getrows(enum ggml_type type, int64_t k, const void * w, int64_t m, const int32_t * ids, int64_t n,
                    float * out, int n_threads) {
    const size_t mem = ggml_row_size(type, k)*m + (size_t) n*(k*sizeof(float) + sizeof(int32_t))
                     + 16*ggml_tensor_overhead() + ggml_graph_overhead() + (1 << 20);
    struct ggml_init_params params = { mem, NULL, false };
    struct ggml_context * ctx = ggml_init(params);
    struct ggml_tensor * tw = ggml_new_tensor_2d(ctx, type, k, m);
    struct ggml_tensor * ti = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n);
    memcpy(tw->data, w, ggml_nbytes(tw));
    memcpy(ti->data, ids, ggml_nbytes(ti));
    struct ggml_tensor * ty = ggml_get_rows(ctx, tw, ti);  // [k, n] float32
    compute_into(ctx, ty, n_threads, out, "get_rows failed");
}

static void mulmatid(enum ggml_type type, int64_t k, const void * w, int64_t m, int64_t n_as, const float * x,
                     int64_t n_tok, const int32_t * ids, int64_t n_used, float * out, int n_threads) {
    const size_t mem = ggml_row_size(type, k)*m*n_as + (size_t) n_tok*(k + n_used*m + n_used)*sizeof(float)
                     + 16*ggml_tensor_overhead() + ggml_graph_overhead() + (16 << 20);
    struct ggml_init_params params = { mem, NULL, false };
    struct ggml_context * ctx = ggml_init(params);
    struct ggml_tensor * tw = ggml_new_tensor_3d(ctx, type, k, m, n_as);
    struct ggml_tensor * tx = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, k, 1, n_tok);  // one row, used by every slot
    struct ggml_tensor * ti = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, n_used, n_tok);
    memcpy(tw->data, w, ggml_nbytes(tw));
    memcpy(tx->data, x, ggml_nbytes(tx));
    memcpy(ti->data, ids, ggml_nbytes(ti));
    struct ggml_tensor * ty = ggml_mul_mat_id(ctx, tw, tx, ti);  // [m, n_used, n_tok]
    compute_into(ctx, ty, n_threads, out, "mul_mat_id failed");
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9*ts.tv_nsec;
}

static uint64_t rng_state = 0x853c49e6748fea9bULL;
static float randn(void) {
    // xorshift64* + Box-Muller: deterministic and identical on every machine
    double u[2];
    for (int i = 0; i < 2; ++i) {
        rng_state ^= rng_state >> 12; rng_state ^= rng_state << 25; rng_state ^= rng_state >> 27;
        u[i] = ((rng_state * 2685821657736338717ULL) >> 11) * (1.0/9007199254740992.0);
    }
    return (float) (sqrt(-2.0*log(u[0] + 1e-300)) * cos(6.283185307179586*u[1]));
}

static int cmp_double(const void * a, const void * b) {
    const double x = *(const double *) a, y = *(const double *) b;
    return (x > y) - (x < y);
}

// the buffer type for weights: plain, or the CPU backend's first extra buffer type, as llama.cpp's --repack 1 uses
// it (repack.cpp: Q4_0, Q4_K, ..., Q2_0C_64, STQ1_0_64)
static ggml_backend_buffer_type_t weight_buft(int repack) {
    if (!repack) return ggml_backend_cpu_buffer_type();
    ggml_backend_reg_t reg = ggml_backend_cpu_reg();
    ggml_backend_dev_get_extra_bufts_t get_extra =
        (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    ggml_backend_buffer_type_t * extra = get_extra ? get_extra(ggml_backend_reg_dev_get(reg, 0)) : NULL;
    if (!extra || !extra[0]) die("this build has no repack buffer type", NULL);
    return extra[0];
}

// y = W x as a one-node graph: W [m rows of k] in its own context (to be allocated from a weight buffer type),
// x [n columns of k] and the graph in another
struct mm_graph { struct ggml_context * ctx_w, * ctx; struct ggml_tensor * w, * x, * y; struct ggml_cgraph * gf; };

static struct mm_graph mm_graph_new(enum ggml_type type, int64_t k, int64_t m, int64_t n) {
    struct ggml_init_params params = { 8*ggml_tensor_overhead() + ggml_graph_overhead(), NULL, true };
    struct mm_graph g;
    g.ctx_w = ggml_init(params);
    g.ctx   = ggml_init(params);
    g.w  = ggml_new_tensor_2d(g.ctx_w, type, k, m);
    g.x  = ggml_new_tensor_2d(g.ctx, GGML_TYPE_F32, k, n);
    g.y  = ggml_mul_mat(g.ctx, g.w, g.x);
    g.gf = ggml_new_graph(g.ctx);
    ggml_build_forward_expand(g.gf, g.y);
    return g;
}

// mul_mat with W in the repack buffer; 0 (and out untouched) where that buffer does not take the type (it leaves
// the tensor's extra, its repack traits, empty)
static int mulmat_repacked(enum ggml_type type, int64_t k, const void * w, int64_t m, const float * x, int64_t n,
                           float * out, int n_threads) {
    ggml_backend_t be = ggml_backend_cpu_init();
    ggml_backend_cpu_set_n_threads(be, n_threads);
    struct mm_graph g = mm_graph_new(type, k, m, n);
    struct ggml_context * ctx_w = g.ctx_w, * ctx = g.ctx;
    struct ggml_tensor * tw = g.w, * tx = g.x, * ty = g.y;
    struct ggml_cgraph * gf = g.gf;
    ggml_backend_buffer_t bw = ggml_backend_alloc_ctx_tensors_from_buft(ctx_w, weight_buft(1));
    ggml_backend_buffer_t bx = ggml_backend_alloc_ctx_tensors_from_buft(ctx, ggml_backend_cpu_buffer_type());
    if (!bw || !bx) die("cannot allocate the tensors", NULL);
    const int taken = tw->extra != NULL;
    if (taken) {
        ggml_backend_tensor_set(tw, w, 0, ggml_nbytes(tw));  // repacks
        ggml_backend_tensor_set(tx, x, 0, ggml_nbytes(tx));
        if (ggml_backend_graph_compute(be, gf) != GGML_STATUS_SUCCESS) die("mul_mat failed", NULL);
        ggml_backend_tensor_get(ty, out, 0, ggml_nbytes(ty));
    }
    ggml_backend_buffer_free(bw); ggml_backend_buffer_free(bx);
    ggml_free(ctx_w); ggml_free(ctx);
    ggml_backend_free(be);
    return taken;
}

static void benchmm(enum ggml_type type, int64_t k, int64_t m, int64_t n, int reps, int repack) {
    ggml_backend_t be = ggml_backend_cpu_init();
    ggml_backend_cpu_set_n_threads(be, 1);
    ggml_backend_buffer_type_t wbuft = weight_buft(repack);
    struct mm_graph g = mm_graph_new(type, k, m, n);
    struct ggml_context * ctx_w = g.ctx_w, * ctx = g.ctx;
    struct ggml_tensor * tw = g.w, * tx = g.x, * ty = g.y;
    struct ggml_cgraph * gf = g.gf;
    ggml_backend_buffer_t bw = ggml_backend_alloc_ctx_tensors_from_buft(ctx_w, wbuft);
    ggml_backend_buffer_t bx = ggml_backend_alloc_ctx_tensors_from_buft(ctx, ggml_backend_cpu_buffer_type());
    if (!bw || !bx) die("cannot allocate the tensors", NULL);

    float * f = malloc((m > n ? m : n)*k*sizeof(float));
    for (int64_t i = 0; i < m*k; ++i) f[i] = randn();
    void * wq = malloc(ggml_nbytes(tw));
    ggml_quantize_chunk(type, f, wq, 0, m, k, NULL);
    ggml_backend_tensor_set(tw, wq, 0, ggml_nbytes(tw));  // repacks in a repack buffer
    for (int64_t i = 0; i < n*k; ++i) f[i] = randn();
    ggml_backend_tensor_set(tx, f, 0, ggml_nbytes(tx));

    double * t = malloc(reps*sizeof(double));
    for (int r = -1; r < reps; ++r) {  // r = -1: warm-up
        const double t0 = now_s();
        if (ggml_backend_graph_compute(be, gf) != GGML_STATUS_SUCCESS) die("mul_mat failed", NULL);
        if (r >= 0) t[r] = now_s() - t0;
    }
    qsort(t, reps, sizeof(double), cmp_double);
    float y;
    ggml_backend_tensor_get(ty, &y, (size_t) (m*n/2)*sizeof(float), sizeof(float));
    const double per = 1e9/((double) m*k*n);
    printf("%s%s k=%lld m=%lld n=%lld: %.4f ns/weight/column (median %.4f)  (checksum %g)\n", ggml_type_name(type),
           repack ? " (repacked)" : "", (long long) k, (long long) m, (long long) n, t[0]*per, t[reps/2]*per, y);
    free(t); free(f); free(wq);
    ggml_backend_buffer_free(bw); ggml_backend_buffer_free(bx);
    ggml_free(ctx_w); ggml_free(ctx);
    ggml_backend_free(be);
}

static int selftest_type(enum ggml_type type) {
    const int64_t blk = ggml_blck_size(type);
    int fails = 0;
    const int64_t ks[] = { blk, 2*blk, 1024 > blk ? 1024 : 2*blk, 4096, 4096 + blk };
    for (size_t ik = 0; ik < sizeof(ks)/sizeof(ks[0]); ++ik) {
        const int64_t k = ks[ik], m = 71, n = 19;  // 71 rows: 4 decode-table tiles of 16 + a vec_dot tail of 7
        if (k % blk) continue;
        float * wf = malloc(m*k*sizeof(float));
        float * x  = malloc(n*k*sizeof(float));
        for (int64_t i = 0; i < m*k; ++i) wf[i] = randn();
        for (int64_t i = 0; i < n*k; ++i) x[i] = randn() * (i % 97 == 0 ? 8.0f : 1.0f);
        // edge rows: all zero, all +max / -max, one outlier
        for (int64_t j = 0; j < k; ++j) {
            wf[0*k + j] = 0.0f;
            wf[1*k + j] = (j & 1) ? -4.0f : 4.0f;
            wf[2*k + j] = j == k/3 ? 100.0f : 0.01f * randn();
        }
        void * w = malloc(m*ggml_row_size(type, k));
        ggml_quantize_chunk(type, wf, w, 0, m, k, NULL);
        float  * kern = malloc(n*m*sizeof(float));
        float  * ref  = malloc(n*m*sizeof(float));
        double * mag  = malloc(n*m*sizeof(double));
        float  * mm   = malloc(n*m*sizeof(float));
        vecdot(type, k, w, m, x, n, kern, ref, mag);
        // mul_mat on the first 3 (vec_dot), 16 (tiled: narrow path) and all 19 (tiled: wide) columns, where tiled
        // applies
        // and from the repack buffer where it takes the type: 1 column (gemv), 3, 16 and 19 (gemm)
        const int64_t ns[] = { 3, 16, n, -1, -3, -16, -n };
        for (size_t in = 0; in < sizeof(ns)/sizeof(ns[0]); ++in) {
            if (ns[in] > 0) {
                mulmat(type, k, w, m, x, ns[in], mm, 2);
            } else if (!mulmat_repacked(type, k, w, m, x, -ns[in], mm, 2)) {
                continue;
            }
            const int64_t nc = ns[in] > 0 ? ns[in] : -ns[in];
            for (int64_t i = 0; i < nc*m; ++i) {
                const double tol = 1e-5*mag[i] + 1e-6;
                if (fabs(kern[i] - ref[i]) > tol || fabs(mm[i] - ref[i]) > tol) {
                    if (fails < 5) {
                        fprintf(stderr, "  %s k=%lld n=%lld%s out %lld: vec_dot %.6g mul_mat %.6g exact %.6g (tol %.3g)\n",
                                ggml_type_name(type), (long long) k, (long long) nc, ns[in] < 0 ? " repacked" : "",
                                (long long) i, kern[i], mm[i], ref[i], tol);
                    }
                    fails++;
                }
            }
        }
        free(wf); free(x); free(w); free(kern); free(ref); free(mag); free(mm);
    }
    printf("%-8s %s\n", ggml_type_name(type), fails ? "FAIL" : "ok");
    return fails;
}

int main(int argc, char ** argv) {
    ggml_cpu_init();
    if (argc < 2) die("usage: kernel_check quantize|dequantize|vecdot|mulmat|getrows|mulmatid|cpu|selftest|bench|benchmm ...", NULL);
    const char * mode = argv[1];

    if (strcmp(mode, "selftest") == 0 || strcmp(mode, "cpu") == 0) {
        const char * def[] = { "stq1_0", "q2_0c", "q2_0" };
        int fails = 0;
        printf("cpu: avx2=%d avx512=%d avx512_vnni=%d neon=%d dotprod=%d\n", ggml_cpu_has_avx2(),
               ggml_cpu_has_avx512(), ggml_cpu_has_avx512_vnni(), ggml_cpu_has_neon(), ggml_cpu_has_dotprod());
        if (strcmp(mode, "cpu") == 0) return 0;
        if (argc > 2) {
            for (int i = 2; i < argc; ++i) fails += selftest_type(type_by_name(argv[i]));
        } else {
            for (size_t i = 0; i < sizeof(def)/sizeof(def[0]); ++i) fails += selftest_type(type_by_name(def[i]));
        }
        printf("%s\n", fails ? "FAILED" : "PASSED");
        return fails ? 1 : 0;
    }

    if (argc < 4) die("missing arguments", mode);
    const enum ggml_type type = type_by_name(argv[2]);
    const int64_t k = atoll(argv[3]);
    if (k <= 0 || k % ggml_blck_size(type)) die("row length is not a multiple of the block size", argv[3]);

    if (strcmp(mode, "quantize") == 0) {
        if (argc < 6) die("quantize TYPE N_PER_ROW IN.f32 OUT.bin [IMATRIX.f32]", NULL);
        size_t sz, szw = 0;
        float * x = read_file(argv[4], &sz);
        const int64_t rows = sz / sizeof(float) / k;
        float * imatrix = argc > 6 ? read_file(argv[6], &szw) : NULL;
        if (imatrix && szw != (size_t) k*sizeof(float)) die("imatrix must hold N_PER_ROW floats", argv[6]);
        const size_t out_size = rows*ggml_row_size(type, k);
        void * out = malloc(out_size);
        const size_t n = ggml_quantize_chunk(type, x, out, 0, rows, k, imatrix);
        if (n != out_size) die("unexpected quantized size", NULL);
        write_file(argv[5], out, out_size);
        return 0;
    }
    if (strcmp(mode, "dequantize") == 0) {
        if (argc < 6) die("dequantize TYPE N_PER_ROW IN.bin OUT.f32", NULL);
        size_t sz;
        void * q = read_file(argv[4], &sz);
        const int64_t rows = sz / ggml_row_size(type, k);
        float * out = malloc(rows*k*sizeof(float));
        ggml_get_type_traits(type)->to_float(q, out, rows*k);
        write_file(argv[5], out, rows*k*sizeof(float));
        return 0;
    }
    if (strcmp(mode, "vecdot") == 0 || strcmp(mode, "mulmat") == 0) {
        if (argc < 7) die("vecdot|mulmat TYPE K W.bin X.f32 OUT.f32 [THREADS] [repack]", NULL);
        size_t szw, szx;
        void  * w = read_file(argv[4], &szw);
        float * x = read_file(argv[5], &szx);
        const int64_t m = szw / ggml_row_size(type, k), n = szx / sizeof(float) / k;
        if (strcmp(mode, "vecdot") == 0) {
            float * out = malloc(2*n*m*sizeof(float));
            vecdot(type, k, w, m, x, n, out, out + n*m, NULL);
            write_file(argv[6], out, 2*n*m*sizeof(float));
        } else {
            float * out = malloc(n*m*sizeof(float));
            const int threads = argc > 7 ? atoi(argv[7]) : 2;
            if (argc > 8 && strcmp(argv[8], "repack") == 0) {
                if (!mulmat_repacked(type, k, w, m, x, n, out, threads)) {
                    fprintf(stderr, "kernel_check: the repack buffer does not take %s (k=%lld)\n", argv[2], (long long) k);
                    return 3;
                }
            } else {
                mulmat(type, k, w, m, x, n, out, threads);
            }
            write_file(argv[6], out, n*m*sizeof(float));
        }
        return 0;
    }
    if (strcmp(mode, "getrows") == 0) {
        if (argc < 7) die("getrows TYPE K W.bin IDS.i32 OUT.f32 [THREADS]", NULL);
        size_t szw;
        void * w = read_file(argv[4], &szw);
        const int64_t m = szw / ggml_row_size(type, k);
        int64_t n;
        int32_t * ids = read_ids(argv[5], m, &n, "a row id is outside the matrix");
        float * out = malloc(n*k*sizeof(float));
        getrows(type, k, w, m, ids, n, out, argc > 7 ? atoi(argv[7]) : 2);
        write_file(argv[6], out, n*k*sizeof(float));
        return 0;
    }
    if (strcmp(mode, "mulmatid") == 0) {
        if (argc < 9) die("mulmatid TYPE K W.bin X.f32 IDS.i32 OUT.f32 N_EXPERTS [THREADS]", NULL);
        size_t szw, szx;
        void  * w = read_file(argv[4], &szw);
        float * x = read_file(argv[5], &szx);
        const int64_t n_as = atoll(argv[8]);
        int64_t n_ids;
        int32_t * ids = read_ids(argv[6], n_as, &n_ids, "an expert id is outside N_EXPERTS");
        const int64_t rows = szw / ggml_row_size(type, k), n_tok = szx / sizeof(float) / k;
        if (n_as <= 0 || rows % n_as || n_tok <= 0 || n_ids % n_tok) {
            die("W must hold N_EXPERTS equal row blocks and IDS a whole number of ids per token", argv[8]);
        }
        const int64_t m = rows / n_as, n_used = n_ids / n_tok;
        float * out = malloc(n_tok*n_used*m*sizeof(float));
        mulmatid(type, k, w, m, n_as, x, n_tok, ids, n_used, out, argc > 9 ? atoi(argv[9]) : 2);
        write_file(argv[7], out, n_tok*n_used*m*sizeof(float));
        return 0;
    }
    if (strcmp(mode, "bench") == 0) {
        const int64_t m = argc > 4 ? atoll(argv[4]) : 2048;
        const int reps = argc > 5 ? atoi(argv[5]) : 20;
        float * wf = malloc(m*k*sizeof(float));
        float * x  = malloc(k*sizeof(float));
        for (int64_t i = 0; i < m*k; ++i) wf[i] = randn();
        for (int64_t i = 0; i < k; ++i) x[i] = randn();
        void * w = malloc(m*ggml_row_size(type, k));
        ggml_quantize_chunk(type, wf, w, 0, m, k, NULL);
        const struct ggml_type_traits_cpu * tc = ggml_get_type_traits_cpu(type);
        void * xq = malloc(ggml_row_size(tc->vec_dot_type, k));
        ggml_get_type_traits_cpu(tc->vec_dot_type)->from_float(x, xq, k);
        float s = 0.0f, acc = 0.0f;
        double best = 1e30;
        for (int r = 0; r < reps; ++r) {
            const double t0 = now_s();
            for (int64_t i = 0; i < m; ++i) {
                tc->vec_dot((int) k, &s, 0, (const char *) w + i*ggml_row_size(type, k), 0, xq, 0, 1);
                acc += s;
            }
            const double t = now_s() - t0;
            if (t < best) best = t;
        }
        printf("%s k=%lld m=%lld: %.4f ns/weight  %.2f GB/s of weights  (checksum %g)\n", ggml_type_name(type),
               (long long) k, (long long) m, 1e9*best/(double) (m*k), m*ggml_row_size(type, k)/best/1e9, acc);
        return 0;
    }
    if (strcmp(mode, "benchmm") == 0) {
        if (argc < 6) die("benchmm TYPE K M N [REPS] [repack]", NULL);
        const int64_t m = atoll(argv[4]), n = atoll(argv[5]);
        const int reps = argc > 6 ? atoi(argv[6]) : 5;
        if (m <= 0 || n <= 0 || reps <= 0) die("M, N and REPS must be positive", NULL);
        benchmm(type, k, m, n, reps, argc > 7 && strcmp(argv[7], "repack") == 0);
        return 0;
    }
    die("unknown mode", mode);
    return 2;
}
