/* Attention of many queries (a prefill chunk) with bfloat16 products on the CPU.
 *
 * Each KV head's query rows attend to that head's keys in one online softmax, as a flash
 * attention does: the logits of a row block against a block of KB keys, their running
 * maximum and sum, then the block's values. Both products (query . key and probability .
 * value) take bfloat16 pairs and accumulate in float32 with AVX512-BF16's dot instruction,
 * twice the float32 multiply-add rate; the softmax, the running state and the output are
 * float32. Queries, keys and values are rounded to bfloat16 once (keys and values packed in
 * the pair layout the instruction reads), probabilities as each block is weighed.
 *
 * A step's parts (the window, the sinks, the pages: each its query rows and its keys) run in
 * one softmax, so nothing is merged after. A row r is the query of token r % tokens (rows
 * are a group's heads one after another); in a part with causal >= 0 it sees key n only
 * when n <= causal + r % tokens.
 *
 * The same products give Quest's page scores for a chunk: the largest upper bound
 * [q-, q+] . [min, max] over its query rows (memlayer_bounds_bf16); where the CPU has AMX-BF16,
 * its tiles take those products, 32 rows by 32 pages at a time (score_block_amx). Where the
 * compiler does not target AVX512-BF16, memlayer_bf16_available() is 0 and nothing else is
 * compiled.
 * memlayer/kernels/cpu_bf16.py compiles and calls it.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

#define KB 64    /* keys per block: 4 registers of 16 lanes */
#define MR 4     /* query rows per register block */
#define ROWS 32  /* query rows per work item */
#define MAX_DIM 256

int memlayer_bf16_available(void) { return 1; }

/* float32 -> bfloat16, rounded to nearest even (the inputs are finite). */
static inline uint16_t to_bf16(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* e^x lane-wise for x <= 0 (0 below -87): 2^n e^r, |r| <= ln 2 / 2, e^r by its degree-6
 * Taylor polynomial. */
static inline __m512 exp512_nonpositive(__m512 x) {
    __m512 y = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(1.44269504f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), y);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.f / 720.f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    __m512 e = _mm512_scalef_ps(p, n);
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_GE_OQ), e);
}

/* Rows [at / dim, + count) of x (float32, or bfloat16 where `bf16`) in bfloat16 as to[KB]
 * [MAX_DIM]; the rows past `count` are zero. */
static void block_rows(const void *x, int bf16, int64_t at, int count, int dim,
                       uint16_t to[][MAX_DIM]) {
    for (int n = 0; n < KB; n++) {
        if (n >= count) {
            memset(to[n], 0, (size_t)dim * sizeof(uint16_t));
        } else if (bf16) {
            memcpy(to[n], (const uint16_t *)x + at + (int64_t)n * dim, (size_t)dim * 2);
        } else {
            const float *row = (const float *)x + at + (int64_t)n * dim;
            for (int d = 0; d < dim; d += 16)
                _mm256_store_si256((__m256i *)(to[n] + d),
                                   (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(row + d)));
        }
    }
}

/* The block of `count` keys from element `at` in pair layout: kp[(d/2) * KB * 2 + n * 2 +
 * d % 2] = k[n][d] (the pairs of each key's row, transposed to pair-major: 32-bit gathers),
 * and its values as vp[(n/2) * dim * 2 + d * 2 + n % 2] = v[n][d] (two rows interleaved);
 * rows past `count` are zero. */
static void pack_block(const void *k, const void *v, int bf16, int64_t at, int count, int dim,
                       uint16_t *kp, uint16_t *vp) {
    uint16_t rows[KB][MAX_DIM] __attribute__((aligned(64)));
    block_rows(k, bf16, at, count, dim, rows);
    const __m512i key = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm512_set1_epi32(MAX_DIM / 2));
    for (int p = 0; p < dim / 2; p++)
        for (int g = 0; g < KB / 16; g++) {
            const int *from = (const int *)rows[16 * g] + p;
            _mm512_store_si512((void *)(kp + (p * KB + 16 * g) * 2),
                               _mm512_i32gather_epi32(key, from, 4));
        }
    block_rows(v, bf16, at, count, dim, rows);
    __m512i low = _mm512_setzero_si512(), high = _mm512_setzero_si512();
    {
        int16_t l[32], h[32];
        for (int i = 0; i < 32; i++) {
            l[i] = (int16_t)((i % 2) * 32 + i / 2);
            h[i] = (int16_t)((i % 2) * 32 + 16 + i / 2);
        }
        low = _mm512_loadu_si512(l);
        high = _mm512_loadu_si512(h);
    }
    for (int m = 0; m < KB / 2; m++)
        for (int d0 = 0; d0 < dim; d0 += 32) {
            __m512i a = _mm512_load_si512(rows[2 * m] + d0), b = _mm512_load_si512(rows[2 * m + 1] + d0);
            uint16_t *to = vp + ((int64_t)m * dim + d0) * 2;
            _mm512_store_si512(to, _mm512_permutex2var_epi16(a, low, b));
            _mm512_store_si512(to + 32, _mm512_permutex2var_epi16(a, high, b));
        }
}

/* Rows [first, first + count) of m, `stride` elements apart, in key pair layout (as
 * pack_block's keys): the pages' (min, max) rows of one KV head for the bounds. */
static void pack_rows(const float *m, int64_t stride, int64_t first, int count, int dim,
                      uint16_t *kp) {
    memset(kp, 0, (size_t)KB * dim * sizeof *kp);
    for (int n = 0; n < count; n++) {
        const float *row = m + (first + n) * stride;
        for (int d = 0; d < dim; d++) kp[(d / 2) * KB * 2 + n * 2 + d % 2] = to_bf16(row[d]);
    }
}

static inline int32_t pair_at(const uint16_t *row, int pair) {
    int32_t bits;
    memcpy(&bits, row + 2 * pair, sizeof bits);
    return bits;
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define HAVE_TILES 1
#include <sys/syscall.h>
#include <unistd.h>

/* The tile layout of palette 1 (the ldtilecfg operand). */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config_t;

/* Every tile 16 rows of 64 bytes: 16 x 32 bfloat16 (A), 16 pairs x 16 (B), 16 x 16 float32
 * (C). The configuration is per thread: each work item loads it. */
static void load_tiles(void) {
    tile_config_t config = {.palette = 1};
    for (int t = 0; t < 8; t++) config.rows[t] = 16, config.colsb[t] = 64;
    _tile_loadconfig(&config);
}

/* Whether this process may use AMX tiles: Linux grants the tile state on request. */
static int amx_granted(void) {
    static int granted = -1; /* a race only asks twice; the answer is the same */
    if (granted < 0) granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                       18 /* XFEATURE_XTILEDATA */) == 0;
    return granted;
}

static int amx_wanted = 1;

static int amx_usable(void) { return amx_wanted && amx_granted(); }

/* Whether the products take AMX tiles from now on (`wanted` 0: the AVX512 loops; below 0:
 * as they are), as far as the CPU and the kernel allow: the tiles' use after the call. */
int memlayer_bf16_tiles(int wanted) {
    if (wanted >= 0) amx_wanted = wanted;
    return amx_usable();
}
#else
#define HAVE_TILES 0
static int amx_usable(void) { return 0; }
int memlayer_bf16_tiles(int wanted) {
    (void)wanted;
    return 0;
}
#endif

/* One part of a step: query rows against one set of keys and values. */
typedef struct {
    const float *q;     /* [kv_heads, rows, dim] float32 */
    const void *k, *v;  /* [kv_heads, keys, dim], heads kv_stride elements apart, rows packed */
    int64_t kv_stride;
    int64_t causal;     /* -1: every row sees every key */
    int keys;
    int bf16;           /* keys and values in bfloat16, else float32 */
} part_t;

/* The online softmax of a block of MR rows, carried from part to part. */
typedef struct {
    float acc[MR][MAX_DIM] __attribute__((aligned(64)));
    float run_max[MR], run_sum[MR];
} state_t;

/* A block of n query rows from r0 (the first m of them live) of one head's queries qh, in
 * bfloat16 as qb (dead rows zero), and the last key of the part each row sees (-1: none);
 * returns the largest. */
static int64_t block_rows_of(const float *qh, int r0, int m, int n, int tokens,
                             const part_t *part, int dim, uint16_t qb[][MAX_DIM], int64_t *last) {
    int64_t reach = -1;
    for (int i = 0; i < n; i++) {
        int live = i < m;
        const float *row = qh + (int64_t)(r0 + (live ? i : 0)) * dim;
        for (int d = 0; d < dim; d += 16) {
            __m512 x = live ? _mm512_loadu_ps(row + d) : _mm512_setzero_ps();
            _mm256_store_si256((__m256i *)(qb[i] + d), (__m256i)_mm512_cvtneps_pbh(x));
        }
        last[i] = part->keys - 1;
        int64_t seen = part->causal + (r0 + i) % tokens;
        if (part->causal >= 0 && seen < last[i]) last[i] = seen;
        if (!live) last[i] = -1;
        if (last[i] > reach) reach = last[i];
    }
    return reach;
}

/* Rows [r0, r0 + m) (m <= MR) of one head (queries qh) against one part's packed blocks. */
static void attend_part(const float *qh, int r0, int m, int tokens, const part_t *part, int dim,
                        float scale, const uint16_t *kp, const uint16_t *vp, state_t *st) {
    uint16_t qb[MR][MAX_DIM] __attribute__((aligned(64)));
    uint16_t pb[MR][KB] __attribute__((aligned(64)));
    int64_t last[MR]; /* the last key each row sees */
    int64_t reach = block_rows_of(qh, r0, m, MR, tokens, part, dim, qb, last);
    int blocks = (int)((reach + KB) / KB);
    float *run_max = st->run_max, *run_sum = st->run_sum;
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int b = 0; b < blocks; b++) {
        const uint16_t *kb = kp + (int64_t)b * KB * dim;
        const uint16_t *vb = vp + (int64_t)b * KB * dim;
        __m512 s[MR][4];
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < 4; j++) s[i][j] = _mm512_setzero_ps();
        for (int p = 0; p < dim / 2; p++) {
            __m512bh kk[4];
            for (int j = 0; j < 4; j++)
                kk[j] = (__m512bh)_mm512_load_si512((const void *)(kb + (p * KB + 16 * j) * 2));
            for (int i = 0; i < MR; i++) {
                __m512bh qq = (__m512bh)_mm512_set1_epi32(pair_at(qb[i], p));
                for (int j = 0; j < 4; j++) s[i][j] = _mm512_dpbf16_ps(s[i][j], qq, kk[j]);
            }
        }
        for (int i = 0; i < MR; i++) {
            __m512 best = _mm512_set1_ps(-INFINITY);
            for (int j = 0; j < 4; j++) {
                __m512i key = _mm512_add_epi32(lane, _mm512_set1_epi32(b * KB + 16 * j));
                __mmask16 seen = _mm512_cmple_epi32_mask(key, _mm512_set1_epi32((int)last[i]));
                s[i][j] = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), seen, s[i][j],
                                             _mm512_set1_ps(scale));
                best = _mm512_max_ps(best, s[i][j]);
            }
            float top = _mm512_reduce_max_ps(best);
            float grown = top > run_max[i] ? top : run_max[i];
            if (grown == -INFINITY) { /* nothing seen yet: the block weighs nothing */
                memset(pb[i], 0, sizeof pb[i]);
                continue;
            }
            float shrink = run_max[i] == -INFINITY ? 0.f : expf(run_max[i] - grown);
            __m512 total = _mm512_setzero_ps();
            __m512 peak = _mm512_set1_ps(grown);
            for (int j = 0; j < 4; j++) {
                __m512 e = exp512_nonpositive(_mm512_sub_ps(s[i][j], peak));
                total = _mm512_add_ps(total, e);
                _mm256_store_si256((__m256i *)(pb[i] + 16 * j), (__m256i)_mm512_cvtneps_pbh(e));
            }
            run_sum[i] = run_sum[i] * shrink + _mm512_reduce_add_ps(total);
            run_max[i] = grown;
            if (shrink != 1.f) {
                __m512 f = _mm512_set1_ps(shrink);
                for (int d = 0; d < dim; d += 16)
                    _mm512_store_ps(st->acc[i] + d, _mm512_mul_ps(_mm512_load_ps(st->acc[i] + d), f));
            }
        }
        for (int d0 = 0; d0 < dim; d0 += 64) {
            __m512 o[MR][4];
            for (int i = 0; i < MR; i++)
                for (int j = 0; j < 4; j++) o[i][j] = _mm512_load_ps(st->acc[i] + d0 + 16 * j);
            for (int p = 0; p < KB / 2; p++) {
                __m512bh vv[4];
                for (int j = 0; j < 4; j++)
                    vv[j] = (__m512bh)_mm512_load_si512(
                        (const void *)(vb + ((int64_t)p * dim + d0 + 16 * j) * 2));
                for (int i = 0; i < MR; i++) {
                    __m512bh pp = (__m512bh)_mm512_set1_epi32(pair_at(pb[i], p));
                    for (int j = 0; j < 4; j++) o[i][j] = _mm512_dpbf16_ps(o[i][j], pp, vv[j]);
                }
            }
            for (int i = 0; i < MR; i++)
                for (int j = 0; j < 4; j++) _mm512_store_ps(st->acc[i] + d0 + 16 * j, o[i][j]);
        }
    }
}

#define TR 16 /* query rows a tile holds */

/* The online softmax of TR rows, carried from part to part (tiles' share of state_t). */
typedef struct {
    float acc[TR][MAX_DIM] __attribute__((aligned(64)));
    float sums[TR][16] __attribute__((aligned(64))); /* each row's running sum, in 16 lanes */
    float run_max[TR];
} tile_state_t;

#if HAVE_TILES
/* c [16, 64] float32 (rows `c_stride` bytes apart) = the sum over `steps` of A_s [16, 32]
 * bfloat16 (from a + 32 s, rows `a_stride` bytes apart) times B_s in pair layout (from
 * b + s * b_step: 16 pair rows `b_stride` bytes apart, 64 columns as four tiles of 16). */
static inline void tile_product(const uint16_t *a, int a_stride, const uint16_t *b, int64_t b_step,
                                int b_stride, int steps, float *c, int c_stride) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int s = 0; s < steps; s++) {
        const uint16_t *bs = b + s * b_step;
        _tile_loadd(4, a + 32 * s, a_stride);
        _tile_loadd(5, bs, b_stride);
        _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(6, bs + 32, b_stride);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(7, bs + 64, b_stride);
        _tile_dpbf16ps(2, 4, 7);
        _tile_loadd(5, bs + 96, b_stride);
        _tile_dpbf16ps(3, 4, 5);
    }
    _tile_stored(0, c, c_stride);
    _tile_stored(1, c + 16, c_stride);
    _tile_stored(2, c + 32, c_stride);
    _tile_stored(3, c + 48, c_stride);
}

/* attend_part with AMX tiles: rows [r0, r0 + m) (m <= TR) of one head against one part's
 * packed blocks. A block's logits [TR, KB] come from four accumulator tiles (the packed keys
 * are the B operand as they are), the softmax runs on them in AVX512 registers as
 * attend_part's does, and the probabilities [TR, KB] in bfloat16 are the A operand of the
 * product with the packed values, 64 output columns at a time. */
static void attend_part_amx(const float *qh, int r0, int m, int tokens, const part_t *part,
                            int dim, float scale, const uint16_t *kp, const uint16_t *vp,
                            tile_state_t *st) {
    uint16_t qb[TR][MAX_DIM] __attribute__((aligned(64)));
    uint16_t pb[TR][KB] __attribute__((aligned(64)));
    float sb[TR][KB] __attribute__((aligned(64)));
    float ob[TR][64] __attribute__((aligned(64)));
    int64_t last[TR]; /* the last key each row sees */
    int64_t reach = block_rows_of(qh, r0, m, TR, tokens, part, dim, qb, last);
    int blocks = (int)((reach + KB) / KB);
    float *run_max = st->run_max;
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int b = 0; b < blocks; b++) {
        const uint16_t *kb = kp + (int64_t)b * KB * dim;
        const uint16_t *vb = vp + (int64_t)b * KB * dim;
        /* 32 dimensions a step: 16 pairs of the keys' layout */
        tile_product(qb[0], MAX_DIM * 2, kb, 16 * KB * 2, KB * 4, dim / 32, sb[0], KB * 4);
        /* each row's largest logit in the block (raw: scale > 0 keeps the order) */
        float peak_raw[TR] __attribute__((aligned(64)));
        for (int i = 0; i < TR; i++) {
            __m512 best = _mm512_set1_ps(-INFINITY);
            if (last[i] >= (int64_t)b * KB + KB - 1) {
                for (int j = 0; j < 4; j++) best = _mm512_max_ps(best, _mm512_load_ps(sb[i] + 16 * j));
            } else {
                for (int j = 0; j < 4; j++) {
                    __m512i key = _mm512_add_epi32(lane, _mm512_set1_epi32(b * KB + 16 * j));
                    __mmask16 seen = _mm512_cmple_epi32_mask(key, _mm512_set1_epi32((int)last[i]));
                    __m512 x = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), seen,
                                                  _mm512_load_ps(sb[i] + 16 * j));
                    _mm512_store_ps(sb[i] + 16 * j, x);
                    best = _mm512_max_ps(best, x);
                }
            }
            peak_raw[i] = _mm512_reduce_max_ps(best);
        }
        /* the running maxima and their shrink factors, all TR rows in one register */
        __m512 before = _mm512_loadu_ps(run_max);
        __m512 grown = _mm512_max_ps(before, _mm512_mul_ps(_mm512_load_ps(peak_raw),
                                                           _mm512_set1_ps(scale)));
        __mmask16 live = _mm512_cmp_ps_mask(grown, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
        __mmask16 held = _mm512_cmp_ps_mask(before, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
        float shrink[TR] __attribute__((aligned(64)));
        _mm512_store_ps(shrink, _mm512_maskz_mov_ps(
                                    held, exp512_nonpositive(_mm512_maskz_sub_ps(
                                              held, before, grown))));
        _mm512_storeu_ps(run_max, grown);
        float peak[TR] __attribute__((aligned(64)));
        _mm512_store_ps(peak, grown);
        for (int i = 0; i < TR; i++) {
            if (!(live >> i & 1)) { /* nothing seen yet: the block weighs nothing */
                memset(pb[i], 0, sizeof pb[i]);
                continue;
            }
            __m512 total = _mm512_setzero_ps();
            __m512 top = _mm512_set1_ps(peak[i]), f = _mm512_set1_ps(scale);
            for (int j = 0; j < 4; j++) {
                __m512 e = exp512_nonpositive(_mm512_fmsub_ps(_mm512_load_ps(sb[i] + 16 * j), f, top));
                total = _mm512_add_ps(total, e);
                _mm256_store_si256((__m256i *)(pb[i] + 16 * j), (__m256i)_mm512_cvtneps_pbh(e));
            }
            _mm512_store_ps(st->sums[i], _mm512_fmadd_ps(_mm512_load_ps(st->sums[i]),
                                                         _mm512_set1_ps(shrink[i]), total));
            if (shrink[i] != 1.f) {
                __m512 by = _mm512_set1_ps(shrink[i]);
                for (int d = 0; d < dim; d += 16)
                    _mm512_store_ps(st->acc[i] + d, _mm512_mul_ps(_mm512_load_ps(st->acc[i] + d), by));
            }
        }
        for (int d0 = 0; d0 < dim; d0 += 64) {
            /* 32 keys a step: 16 pairs of the values' layout */
            tile_product(pb[0], KB * 2, vb + d0 * 2, (int64_t)16 * dim * 2, dim * 4, KB / 32, ob[0],
                         64 * 4);
            for (int i = 0; i < m; i++)
                for (int j = 0; j < 4; j++) {
                    float *to = st->acc[i] + d0 + 16 * j;
                    _mm512_store_ps(to, _mm512_add_ps(_mm512_load_ps(to),
                                                      _mm512_load_ps(ob[i] + 16 * j)));
                }
        }
    }
}
#else
static void attend_part_amx(const float *qh, int r0, int m, int tokens, const part_t *part,
                            int dim, float scale, const uint16_t *kp, const uint16_t *vp,
                            tile_state_t *st) {
    (void)qh, (void)r0, (void)m, (void)tokens, (void)part, (void)dim, (void)scale, (void)kp;
    (void)vp, (void)st;
}
#endif

/* memlayer_attend_bf16's rows by tiles, TR at a time, from the packed blocks. */
static void attend_tiles(const part_t *parts, int count, int rows, int tokens, int kv_heads,
                         int dim, float scale, int threads, const uint16_t *kp,
                         const uint16_t *vp, const int *blocks, const int *first, float *out,
                         float *lse) {
    size_t block_elems = (size_t)KB * dim;
    int per_head = (rows + ROWS - 1) / ROWS;
    int items = kv_heads * per_head;
#pragma omp parallel for schedule(dynamic) num_threads(threads)
    for (int item = 0; item < items; item++) {
        int h = item / per_head, start = (item % per_head) * ROWS;
        int end = start + ROWS < rows ? start + ROWS : rows;
        tile_state_t st;
#if HAVE_TILES
        load_tiles();
#endif
        for (int r = start; r < end; r += TR) {
            int m = end - r < TR ? end - r : TR;
            for (int i = 0; i < TR; i++) {
                memset(st.acc[i], 0, (size_t)dim * sizeof(float));
                memset(st.sums[i], 0, sizeof st.sums[i]);
                st.run_max[i] = -INFINITY;
            }
            for (int i = 0; i < count; i++) {
                size_t at = ((size_t)first[i] + (size_t)h * blocks[i]) * block_elems;
                attend_part_amx(parts[i].q + (int64_t)h * rows * dim, r, m, tokens, &parts[i],
                                dim, scale, kp + at, vp + at, &st);
            }
            for (int i = 0; i < m; i++) {
                float *row = out + ((int64_t)h * rows + r + i) * dim;
                float sum = _mm512_reduce_add_ps(_mm512_load_ps(st.sums[i]));
                float inv = sum > 0.f ? 1.f / sum : 0.f;
                for (int d = 0; d < dim; d++) row[d] = st.acc[i][d] * inv;
                lse[(int64_t)h * rows + r + i] = sum > 0.f ? st.run_max[i] + logf(sum) : -INFINITY;
            }
        }
#if HAVE_TILES
        _tile_release();
#endif
    }
}

/* The parts of one step in one online softmax: out [kv_heads, rows, dim] and lse
 * [kv_heads, rows] float32 (a row that sees no key: 0 and -inf). dim a multiple of 64, at
 * most MAX_DIM. 0 on success. */
int memlayer_attend_bf16(const part_t *parts, int count, int rows, int tokens, int kv_heads,
                         int dim, float scale, int threads, float *out, float *lse) {
    if (dim % 64 || dim > MAX_DIM || tokens < 1 || rows < 1 || count < 1 || count > 8) return 1;
    size_t block_elems = (size_t)KB * dim;
    int blocks[8], first[8], total = 0; /* per part: key blocks, and its first in the buffers */
    for (int i = 0; i < count; i++) {
        blocks[i] = (parts[i].keys + KB - 1) / KB;
        first[i] = total;
        total += kv_heads * blocks[i];
    }
    size_t bytes = (size_t)(total ? total : 1) * block_elems * sizeof(uint16_t);
    uint16_t *kp = aligned_alloc(64, bytes), *vp = aligned_alloc(64, bytes);
    if (!kp || !vp) {
        free(kp);
        free(vp);
        return 2;
    }
#pragma omp parallel for schedule(static) num_threads(threads) if (total > 1)
    for (int item = 0; item < total; item++) {
        int i = 0;
        while (item >= first[i] + kv_heads * blocks[i]) i++;
        int h = (item - first[i]) / blocks[i], b = (item - first[i]) % blocks[i];
        const part_t *part = &parts[i];
        int n = part->keys - b * KB < KB ? part->keys - b * KB : KB;
        size_t at = (size_t)item * block_elems;
        pack_block(part->k, part->v, part->bf16, h * part->kv_stride + (int64_t)b * KB * dim, n,
                   dim, kp + at, vp + at);
    }
    int per_head = (rows + ROWS - 1) / ROWS;
    int items = kv_heads * per_head;
    if (amx_usable()) {
        attend_tiles(parts, count, rows, tokens, kv_heads, dim, scale, threads, kp, vp, blocks,
                     first, out, lse);
        items = 0;
    }
#pragma omp parallel for schedule(dynamic) num_threads(threads)
    for (int item = 0; item < items; item++) {
        int h = item / per_head, start = (item % per_head) * ROWS;
        int end = start + ROWS < rows ? start + ROWS : rows;
        state_t st;
        for (int r = start; r < end; r += MR) {
            int m = end - r < MR ? end - r : MR;
            for (int i = 0; i < MR; i++) {
                memset(st.acc[i], 0, (size_t)dim * sizeof(float));
                st.run_max[i] = -INFINITY;
                st.run_sum[i] = 0.f;
            }
            for (int i = 0; i < count; i++) {
                size_t at = ((size_t)first[i] + (size_t)h * blocks[i]) * block_elems;
                attend_part(parts[i].q + (int64_t)h * rows * dim, r, m, tokens, &parts[i], dim,
                            scale, kp + at, vp + at, &st);
            }
            for (int i = 0; i < m; i++) {
                float *row = out + ((int64_t)h * rows + r + i) * dim;
                float inv = st.run_sum[i] > 0.f ? 1.f / st.run_sum[i] : 0.f;
                for (int d = 0; d < dim; d++) row[d] = st.acc[i][d] * inv;
                lse[(int64_t)h * rows + r + i] =
                    st.run_sum[i] > 0.f ? st.run_max[i] + logf(st.run_sum[i]) : -INFINITY;
            }
        }
    }
    free(kp);
    free(vp);
    return 0;
}

/* Rows idx[0 .. count) of m (each `stride` elements after the one before it) in key pair
 * layout, as pack_rows lays out consecutive ones. */
static void pack_list(const float *m, int64_t stride, const int *idx, int count, int dim,
                      uint16_t *kp) {
    memset(kp, 0, (size_t)KB * dim * sizeof *kp);
    for (int n = 0; n < count; n++) {
        const float *row = m + (int64_t)idx[n] * stride;
        for (int d = 0; d < dim; d++) kp[(d / 2) * KB * 2 + n * 2 + d % 2] = to_bf16(row[d]);
    }
}

/* lanes[n] = max over the head's signed rows qh [rows, wide] of the row . packed key n. */
static void score_block(const uint16_t *qh, int rows, int wide, const uint16_t *kp,
                        float *lanes) {
    __m512 best[4];
    for (int j = 0; j < 4; j++) best[j] = _mm512_set1_ps(-INFINITY);
    for (int r = 0; r < rows; r += MR) {
        const uint16_t *row[MR]; /* past the last row: the block's first again (same max) */
        for (int i = 0; i < MR; i++) row[i] = qh + (int64_t)(r + i < rows ? r + i : r) * wide;
        __m512 s[MR][4];
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < 4; j++) s[i][j] = _mm512_setzero_ps();
        for (int p = 0; p < wide / 2; p++) {
            __m512bh kk[4];
            for (int j = 0; j < 4; j++)
                kk[j] = (__m512bh)_mm512_load_si512((const void *)(kp + (p * KB + 16 * j) * 2));
            for (int i = 0; i < MR; i++) {
                __m512bh qq = (__m512bh)_mm512_set1_epi32(pair_at(row[i], p));
                for (int j = 0; j < 4; j++) s[i][j] = _mm512_dpbf16_ps(s[i][j], qq, kk[j]);
            }
        }
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < 4; j++) best[j] = _mm512_max_ps(best[j], s[i][j]);
    }
    for (int j = 0; j < 4; j++) _mm512_store_ps(lanes + 16 * j, best[j]);
}

#define AMX_ROWS 32 /* query rows a tile pass of the bounds takes: two 16-row tiles */

#if HAVE_TILES
/* score_block with AMX tiles: the head's signed rows qh [rows, wide] (rows a multiple of
 * AMX_ROWS) against the KB packed keys kp (whose pair layout is the B operand's), 32 rows by
 * 32 keys at a time in four float32 accumulator tiles. */
static void score_block_amx(const uint16_t *qh, int rows, int wide, const uint16_t *kp,
                            float *lanes) {
    load_tiles();
    float c[4][16][16] __attribute__((aligned(64)));
    for (int half = 0; half < 2; half++) {
        __m512 best[2] = {_mm512_set1_ps(-INFINITY), _mm512_set1_ps(-INFINITY)};
        for (int r = 0; r < rows; r += AMX_ROWS) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int s = 0; s < wide / 32; s++) {
                const uint16_t *a = qh + (int64_t)r * wide + 32 * s;
                const uint16_t *b = kp + (16 * s * KB + 32 * half) * 2;
                _tile_loadd(4, a, wide * 2);
                _tile_loadd(5, a + 16 * wide, wide * 2);
                _tile_loadd(6, b, KB * 4);
                _tile_loadd(7, b + 32, KB * 4);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
            _tile_stored(0, c[0], 64);
            _tile_stored(1, c[1], 64);
            _tile_stored(2, c[2], 64);
            _tile_stored(3, c[3], 64);
            for (int i = 0; i < 16; i++) {
                best[0] = _mm512_max_ps(best[0], _mm512_max_ps(_mm512_load_ps(c[0][i]),
                                                               _mm512_load_ps(c[2][i])));
                best[1] = _mm512_max_ps(best[1], _mm512_max_ps(_mm512_load_ps(c[1][i]),
                                                               _mm512_load_ps(c[3][i])));
            }
        }
        _mm512_store_ps(lanes + 32 * half, best[0]);
        _mm512_store_ps(lanes + 32 * half + 16, best[1]);
    }
    _tile_release();
}

#else
static void score_block_amx(const uint16_t *qh, int rows, int wide, const uint16_t *kp,
                            float *lanes) {
    (void)qh, (void)rows, (void)wide, (void)kp, (void)lanes;
}
#endif

/* The signed rows a head keeps for the bounds: with AMX, padded to whole tile passes. */
typedef struct {
    int rows, padded, amx;
} row_plan_t;

static row_plan_t row_plan(int rows) {
    int amx = amx_usable();
    int padded = amx ? (rows + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS : rows;
    return (row_plan_t){rows, padded, amx};
}

/* lanes[n] = max over the head's signed rows of the row . packed key n, by tiles where the
 * CPU has them. */
static void score_rows(const uint16_t *qh, row_plan_t plan, int wide, const uint16_t *kp,
                       float *lanes) {
    if (plan.amx)
        score_block_amx(qh, plan.padded, wide, kp, lanes);
    else
        score_block(qh, plan.rows, wide, kp, lanes);
}

/* [q-, q+] rows of q [kv_heads * rows, dim] in bfloat16, `padded` rows a head ([kv_heads *
 * padded, 2 * dim]; a head's rows past `rows` repeat its last, which leaves every maximum over
 * rows as it is), or NULL when out of memory. */
static uint16_t *signed_rows_of(const float *q, int kv_heads, int rows, int padded, int dim,
                                int threads) {
    int wide = 2 * dim;
    int64_t all = (int64_t)kv_heads * padded;
    uint16_t *signed_rows = aligned_alloc(64, (size_t)all * wide * sizeof(uint16_t));
    if (!signed_rows) return NULL;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < all; r++) {
        int64_t h = r / padded, i = r % padded < rows ? r % padded : rows - 1;
        const float *row = q + (h * rows + i) * dim;
        uint16_t *to = signed_rows + r * wide;
        for (int d = 0; d < dim; d++) {
            to[d] = to_bf16(row[d] < 0.f ? row[d] : 0.f);
            to[dim + d] = to_bf16(row[d] > 0.f ? row[d] : 0.f);
        }
    }
    return signed_rows;
}

/* Quest's scores of a chunk: out[h][p] = max over rows r of q-[h][r] . min[p][h] + q+[h][r] .
 * max[p][h] (q- = min(q, 0), q+ = max(q, 0)). Shapes: q [kv_heads, rows, dim] float32,
 * summary [pages, kv_heads, 2, dim] float32 (min row, max row), out [kv_heads, pages]; dim a
 * multiple of 32, 2 * dim at most MAX_DIM. 0 on success. */
int memlayer_bounds_bf16(const float *q, int rows, const float *summary, int pages,
                         int kv_heads, int dim, int threads, float *out) {
    int wide = 2 * dim; /* [q-, q+] against [min, max] */
    if (wide % 64 || wide > MAX_DIM || rows < 1) return 1;
    row_plan_t plan = row_plan(rows);
    uint16_t *signed_rows = signed_rows_of(q, kv_heads, rows, plan.padded, dim, threads);
    if (!signed_rows) return 2;
    int blocks = (pages + KB - 1) / KB;
    int items = kv_heads * blocks;
#pragma omp parallel for schedule(dynamic) num_threads(threads)
    for (int item = 0; item < items; item++) {
        int h = item / blocks, b = item % blocks;
        int count = pages - b * KB < KB ? pages - b * KB : KB;
        uint16_t kp[KB * MAX_DIM] __attribute__((aligned(64)));
        pack_rows(summary + (int64_t)h * wide, (int64_t)kv_heads * wide, (int64_t)b * KB, count,
                  wide, kp);
        float lanes[KB] __attribute__((aligned(64)));
        score_rows(signed_rows + (int64_t)h * plan.padded * wide, plan, wide, kp, lanes);
        memcpy(out + (int64_t)h * pages + (int64_t)b * KB, lanes, (size_t)count * sizeof(float));
    }
    free(signed_rows);
    return 0;
}

#define GROUP 8 /* pages a group bound covers */

/* Exact scores of the pages list[0 .. count) of head h into score (by page index). */
static void score_list(const uint16_t *qh, row_plan_t plan, int wide, const float *summary_h,
                       int64_t stride, const int *list, int count, int threads, float *score) {
    int blocks = (count + KB - 1) / KB;
#pragma omp parallel for schedule(dynamic) num_threads(threads)
    for (int b = 0; b < blocks; b++) {
        int n = count - b * KB < KB ? count - b * KB : KB;
        uint16_t kp[KB * MAX_DIM] __attribute__((aligned(64)));
        float lanes[KB] __attribute__((aligned(64)));
        pack_list(summary_h, stride, list + b * KB, n, wide, kp);
        score_rows(qh, plan, wide, kp, lanes);
        for (int i = 0; i < n; i++) score[list[b * KB + i]] = lanes[i];
    }
}

typedef struct {
    float bound;
    int group;
} ranked_t;

static int by_bound_descending(const void *a, const void *b) {
    const ranked_t *x = a, *y = b;
    if (x->bound != y->bound) return x->bound < y->bound ? 1 : -1;
    return x->group - y->group;
}

/* memlayer_bounds_bf16's scores where they can reach a head's top k, -INFINITY for pages
 * shown unable to: a group of GROUP pages is bounded by [min of its mins, max of its maxes]
 * (never below any member's score: the products are monotone in the summary and rounding is
 * too); the pages of the highest-bounded groups are scored first, the k-th best of them is a
 * threshold, and every page of a group bounded at or above it is scored exactly. So the top
 * k of `out` is the top k of the full scores. Same shapes as memlayer_bounds_bf16. */
int memlayer_bounds_pruned_bf16(const float *q, int rows, const float *summary, int pages,
                                int kv_heads, int dim, int k, int threads, float *out) {
    int wide = 2 * dim;
    if (wide % 64 || wide > MAX_DIM || rows < 1 || k < 1) return 1;
    int groups = (pages + GROUP - 1) / GROUP;
    row_plan_t plan = row_plan(rows);
    uint16_t *signed_rows = signed_rows_of(q, kv_heads, rows, plan.padded, dim, threads);
    float *grouped = malloc(sizeof(float) * (size_t)groups * kv_heads * wide);
    float *bound = malloc(sizeof(float) * (size_t)kv_heads * groups);
    int *order = malloc(sizeof(int) * (size_t)groups), *list = malloc(sizeof(int) * (size_t)pages);
    ranked_t *ranked = malloc(sizeof(ranked_t) * (size_t)groups);
    float *best = malloc(sizeof(float) * (size_t)k);
    if (!signed_rows || !grouped || !bound || !order || !list || !ranked || !best) {
        free(signed_rows), free(grouped), free(bound), free(order), free(list), free(ranked);
        free(best);
        return 2;
    }
    for (int g = 0; g < groups; g++) /* [groups, kv_heads, (min, max), dim] */
        for (int h = 0; h < kv_heads; h++) {
            float *to = grouped + ((int64_t)g * kv_heads + h) * wide;
            for (int d = 0; d < wide; d++) to[d] = d < dim ? INFINITY : -INFINITY;
            for (int p = g * GROUP; p < pages && p < (g + 1) * GROUP; p++) {
                const float *from = summary + ((int64_t)p * kv_heads + h) * wide;
                for (int d = 0; d < dim; d++) {
                    to[d] = from[d] < to[d] ? from[d] : to[d];
                    to[dim + d] = from[dim + d] > to[dim + d] ? from[dim + d] : to[dim + d];
                }
            }
        }
    for (int h = 0; h < kv_heads; h++) {
        const uint16_t *qh = signed_rows + (int64_t)h * plan.padded * wide;
        const float *summary_h = summary + (int64_t)h * wide;
        const int64_t stride = (int64_t)kv_heads * wide;
        float *score = out + (int64_t)h * pages, *bound_h = bound + (int64_t)h * groups;
        for (int g = 0; g < groups; g++) order[g] = g;
        score_list(qh, plan, wide, grouped + (int64_t)h * wide, stride, order, groups, threads,
                   bound_h);
        for (int g = 0; g < groups; g++) ranked[g] = (ranked_t){bound_h[g], g};
        qsort(ranked, groups, sizeof *ranked, by_bound_descending);
        for (int g = 0; g < groups; g++) order[g] = ranked[g].group;
        for (int p = 0; p < pages; p++) score[p] = -INFINITY;
        /* the best-bounded groups, a block of pages or at least k pages' worth */
        int first = 0, count = 0;
        while (first < groups && (count < KB || count < k)) {
            int g = order[first++];
            for (int p = g * GROUP; p < pages && p < (g + 1) * GROUP; p++) list[count++] = p;
        }
        score_list(qh, plan, wide, summary_h, stride, list, count, threads, score);
        /* the k-th best exact score so far: a min-heap of the k best */
        int held = 0;
        for (int i = 0; i < count; i++) {
            float v = score[list[i]];
            if (held < k) {
                int at = held++;
                best[at] = v;
                while (at > 0 && best[(at - 1) / 2] > best[at]) {
                    float t = best[at];
                    best[at] = best[(at - 1) / 2], best[(at - 1) / 2] = t;
                    at = (at - 1) / 2;
                }
            } else if (v > best[0]) {
                best[0] = v;
                for (int at = 0;;) {
                    int low = at, l = 2 * at + 1, r = l + 1;
                    if (l < k && best[l] < best[low]) low = l;
                    if (r < k && best[r] < best[low]) low = r;
                    if (low == at) break;
                    float t = best[at];
                    best[at] = best[low], best[low] = t;
                    at = low;
                }
            }
        }
        float threshold = held < k ? -INFINITY : best[0];
        count = 0;
        for (int i = first; i < groups && bound_h[order[i]] >= threshold; i++) {
            int g = order[i];
            for (int p = g * GROUP; p < pages && p < (g + 1) * GROUP; p++) list[count++] = p;
        }
        score_list(qh, plan, wide, summary_h, stride, list, count, threads, score);
    }
    free(signed_rows), free(grouped), free(bound), free(order), free(list), free(ranked);
    free(best);
    return 0;
}

/* One attention over part of the keys, for memlayer_merge_bf16: its output (bfloat16) and
 * log-sum-exp (float32), row (h, g, t) of each at h * hs + g * gs + t * ts (elements). */
typedef struct {
    const uint16_t *out;
    const float *lse;
    int64_t hs, gs, ts;    /* the output's strides */
    int64_t lhs, lgs, lts; /* the log-sum-exp's strides */
} merge_part_t;

/* The exact softmax merge of `count` attentions over disjoint key sets: for each of the
 * kv_heads x groups x tokens rows, out = sum_i w_i part_i with w_i = exp(lse_i - total),
 * total = log sum_i exp lse_i; out [kv_heads, groups * tokens, dim] and total float32. A
 * row that no part saw (every lse -inf) gets 0 and -inf. 0 on success. */
int memlayer_merge_bf16(const merge_part_t *parts, int count, int kv_heads, int groups,
                        int tokens, int dim, int threads, float *out, float *total) {
    if (count < 1 || count > 8 || dim < 1) return 1;
    int64_t rows = (int64_t)kv_heads * groups * tokens;
#pragma omp parallel for schedule(static) num_threads(threads) if (rows > 1024)
    for (int64_t row = 0; row < rows; row++) {
        int64_t h = row / ((int64_t)groups * tokens), g = row / tokens % groups, t = row % tokens;
        float lse[8], top = -INFINITY, sum = 0.f;
        for (int i = 0; i < count; i++) {
            const merge_part_t *p = &parts[i];
            lse[i] = p->lse[h * p->lhs + g * p->lgs + t * p->lts];
            top = lse[i] > top ? lse[i] : top;
        }
        float *dst = out + row * dim;
        memset(dst, 0, (size_t)dim * sizeof(float));
        if (top == -INFINITY) {
            total[row] = -INFINITY;
            continue;
        }
        for (int i = 0; i < count; i++) sum += expf(lse[i] - top);
        float log_sum = logf(sum);
        for (int i = 0; i < count; i++) {
            const merge_part_t *p = &parts[i];
            const uint16_t *src = p->out + h * p->hs + g * p->gs + t * p->ts;
            float w = expf(lse[i] - top - log_sum);
            for (int d = 0; d < dim; d++) {
                uint32_t bits = (uint32_t)src[d] << 16;
                float x;
                memcpy(&x, &bits, sizeof x);
                dst[d] += w * x;
            }
        }
        total[row] = top + log_sum;
    }
    return 0;
}

#else

int memlayer_bf16_available(void) { return 0; }

#endif
