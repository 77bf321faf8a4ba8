/* One layer's sparse attention step for a few queries (a decode token) on the CPU, fused.
 *
 * The queries of one KV head's group attend to the sink tokens, the listed pages (read in
 * place from the front tier's slab through their slots) and the local window (causal), in
 * one online softmax: no gathered copy, no logits tensor. The keys are cut into pieces of at
 * most BLOCK keys; each (KV head, range of pieces) is one work item, so every thread gets
 * about the same number of keys, and a head's items merge exactly on their log-sum-exp.
 *
 * float32, with the pages in float32 or bfloat16 (widened to float32 as they are read: the
 * arithmetic is float32 either way); head_dim a multiple of 16 (GCC/Clang vector extensions:
 * AVX-512, AVX2 or SSE, whatever the compiler targets). memlayer/kernels/cpu_decode.py
 * compiles and calls it.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
typedef uint16_t h16 __attribute__((vector_size(32), aligned(2)));
typedef int32_t i16x __attribute__((vector_size(64)));
/* The same vectors read from and written to memory of any alignment, in one instruction: a
 * memcpy into a vector made GCC copy through the stack in halves and then read the whole,
 * which stalls on every read (store forwarding fails), most of a step's time. */
typedef float v16_mem __attribute__((vector_size(64), aligned(4), may_alias));
typedef uint16_t h16_mem __attribute__((vector_size(32), aligned(2), may_alias));

static inline __attribute__((always_inline)) v16 loadu(const float *p) {
    return *(const v16_mem *)p;
}

static inline __attribute__((always_inline)) void storeu(float *p, v16 x) {
    *(v16_mem *)p = x;
}

#define BLOCK 64    /* keys per piece: one page of the default size */
#define MAX_ROWS 64 /* query rows (group heads x tokens) of one KV head */
#define MAX_LANES 16 /* head_dim / 16 */

/* e^x for x <= 0 (0 below -87): n = round(x / ln 2), e^x = 2^n e^r, |r| <= ln 2 / 2, e^r by
 * its degree-6 Taylor polynomial (relative error about 1e-7, float32's own). */
static inline float exp_nonpositive(float x) {
    float y = x < -87.f ? -87.f : x;
    float n = rintf(y * 1.44269504f);
    float r = y - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return x < -87.f ? 0.f : p * two_n;
}

/* 16 consecutive values at `at` (element index) of a float32 or bfloat16 array, as float32:
 * a bfloat16 is the top half of the float32 it stands for. */
static inline __attribute__((always_inline)) v16 load16(const void *base, int64_t at, int bf16) {
    if (bf16) {
        h16 half = *(const h16_mem *)((const uint16_t *)base + at);
        i16x wide = __builtin_convertvector(half, i16x) << 16;
        return (v16)wide;
    }
    return loadu((const float *)base + at);
}

static inline float lane_sum(v16 a) {
    v8 b = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 c = __builtin_shufflevector(b, b, 0, 1, 2, 3) + __builtin_shufflevector(b, b, 4, 5, 6, 7);
    return (c[0] + c[2]) + (c[1] + c[3]);
}

/* A run of n <= BLOCK keys and values [n, dim], contiguous, from element `at` of k and v
 * (bfloat16 when `bf16`, else float32). Causal pieces (the window's) show key j to the
 * query of token t only when j <= base + t. */
typedef struct {
    const void *k, *v;
    int64_t at;
    int bf16;
    int n;
    int causal;
    int base;
    int memory; /* 1: read by the queries placed for memory (sinks, pages) */
} piece_t;

/* The running softmax of one work item: max m, sum l and output acc [rows, dim] per row. */
typedef struct {
    float *m, *l, *acc;
} state_t;

/* Ask for share `part` of `parts` of piece p's key and value bytes to come into the cache
 * (NULL: none). A work item does this for the piece two ahead while it computes one: pages
 * sit apart in the slab, so the hardware's stride prefetcher cannot guess them, and a
 * decode step otherwise waits on memory more than it computes. */
static inline void prefetch_share(const piece_t *p, int dim, int part, int parts) {
    if (!p) return;
    const int size = p->bf16 ? 2 : 4;
    const int64_t bytes = (int64_t)p->n * dim * size;
    const char *k = (const char *)p->k + p->at * size, *v = (const char *)p->v + p->at * size;
    for (int64_t b = bytes * part / parts; b < bytes * (part + 1) / parts; b += 64) {
        __builtin_prefetch(k + b, 0, 1);
        __builtin_prefetch(v + b, 0, 1);
    }
}

static inline __attribute__((always_inline)) void attend_piece(
    const int dim, const int bf16, const float *q, int rows, int tokens, piece_t p,
    const piece_t *next, state_t st) {
    const int lanes = dim / 16;
    float s[MAX_ROWS][BLOCK] __attribute__((aligned(64)));
    /* up to `block` query rows share each key and value read (their sums stay in registers) */
    const int block = dim <= 64 ? 4 : (dim <= 128 ? 2 : 1);
    for (int r0 = 0; r0 < rows; r0 += block) {
        const int held = rows - r0 < block ? rows - r0 : block;
        v16 qv[4][MAX_LANES];
        for (int b = 0; b < held; b++)
            for (int w = 0; w < lanes; w++) qv[b][w] = loadu(q + (r0 + b) * dim + 16 * w);
        for (int j = 0; j < p.n; j++) {
            if (r0 == 0 && j % 8 == 0) prefetch_share(next, dim, j / 8, (p.n + 7) / 8);
            const int64_t kj = p.at + (int64_t)j * dim;
            v16 kv[MAX_LANES];
            for (int w = 0; w < lanes; w++) kv[w] = load16(p.k, kj + 16 * w, bf16);
            for (int b = 0; b < block; b++) {
                if (b >= held) break;
                v16 a = {0};
                for (int w = 0; w < lanes; w++) a += qv[b][w] * kv[w];
                s[r0 + b][j] = lane_sum(a);
            }
        }
    }
    for (int r = 0; r < rows; r++) {
        int visible = p.n;
        if (p.causal) {
            int last = p.base + r % tokens + 1;
            visible = last < 0 ? 0 : (last < p.n ? last : p.n);
        }
        if (visible == 0) { /* a piece wholly after this token: it adds nothing */
            memset(s[r], 0, sizeof(float) * p.n);
            continue;
        }
        float top = st.m[r];
        for (int j = 0; j < visible; j++) top = s[r][j] > top ? s[r][j] : top;
        float rescale = exp_nonpositive(st.m[r] - top);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j < p.n; j++) {
            float e = j < visible ? exp_nonpositive(s[r][j] - top) : 0.f;
            s[r][j] = e;
            sum += e;
        }
        st.l[r] = st.l[r] * rescale + sum;
        st.m[r] = top;
        if (rescale != 1.f)
            for (int d = 0; d < dim; d++) st.acc[r * dim + d] *= rescale;
    }
    for (int r0 = 0; r0 < rows; r0 += block) {
        const int held = rows - r0 < block ? rows - r0 : block;
        v16 av[4][MAX_LANES];
        for (int b = 0; b < held; b++)
            for (int w = 0; w < lanes; w++) av[b][w] = loadu(st.acc + (r0 + b) * dim + 16 * w);
        for (int j = 0; j < p.n; j++) {
            const int64_t vj = p.at + (int64_t)j * dim;
            v16 vv[MAX_LANES];
            for (int w = 0; w < lanes; w++) vv[w] = load16(p.v, vj + 16 * w, bf16);
            for (int b = 0; b < block; b++) {
                if (b >= held) break;
                const float e = s[r0 + b][j];
                for (int w = 0; w < lanes; w++) av[b][w] += e * vv[w];
            }
        }
        for (int b = 0; b < held; b++)
            for (int w = 0; w < lanes; w++) storeu(st.acc + (r0 + b) * dim + 16 * w, av[b][w]);
    }
}

/* The common head sizes with dim a constant (loops unrolled, lanes in registers), for each
 * element type. */
static void attend(int dim, const float *q, int rows, int tokens, piece_t p, const piece_t *next,
                   state_t st) {
    if (p.bf16) {
        if (dim == 64)
            attend_piece(64, 1, q, rows, tokens, p, next, st);
        else if (dim == 128)
            attend_piece(128, 1, q, rows, tokens, p, next, st);
        else
            attend_piece(dim, 1, q, rows, tokens, p, next, st);
    } else if (dim == 64)
        attend_piece(64, 0, q, rows, tokens, p, next, st);
    else if (dim == 128)
        attend_piece(128, 0, q, rows, tokens, p, next, st);
    else
        attend_piece(dim, 0, q, rows, tokens, p, next, st);
}

/* Pieces of one KV head g, in key order: sinks, pages, window. Returns how many. */
static int head_pieces(
    piece_t *out, int g, const float *win_k, const float *win_v, int64_t win_head_stride,
    int win_len, const float *sink_k, const float *sink_v, int64_t sink_head_stride,
    int sinks, const void *pool_k, const void *pool_v, int pool_bf16, const int64_t *slots,
    const int64_t *lengths, int pages, int page, int kv_heads, int tokens, int dim) {
    int count = 0;
    for (int j = 0; j < sinks; j += BLOCK) {
        int64_t at = g * sink_head_stride + (int64_t)j * dim;
        out[count++] = (piece_t){sink_k, sink_v, at, 0, sinks - j < BLOCK ? sinks - j : BLOCK, 0, 0, 1};
    }
    for (int i = 0; i < pages; i++) {
        int64_t slot = slots[(int64_t)g * pages + i];
        if (slot < 0) continue;
        int held = lengths ? (int)lengths[(int64_t)g * pages + i] : page;
        for (int j = 0; j < held; j += BLOCK) {
            int64_t at = ((slot * kv_heads + g) * (int64_t)page + j) * dim;
            out[count++] = (piece_t){pool_k, pool_v, at, pool_bf16, held - j < BLOCK ? held - j : BLOCK, 0, 0, 1};
        }
    }
    for (int j = 0; j < win_len; j += BLOCK) {
        int64_t at = g * win_head_stride + (int64_t)j * dim;
        int n = win_len - j < BLOCK ? win_len - j : BLOCK;
        out[count++] = (piece_t){win_k, win_v, at, 0, n, 1, win_len - tokens - j, 0};
    }
    return count;
}

/* Returns 0, or -1 when out of memory (nothing written). Shapes: queries [heads, tokens,
 * dim]; window and sinks [kv_heads, *, dim] rows contiguous, heads `*_head_stride` floats
 * apart; pools [slots, kv_heads, page, dim], bfloat16 when `pool_bf16`; slots and lengths
 * [kv_heads, pages] (slot -1: none; lengths NULL: every page full); out [heads, tokens,
 * dim]. */
int memlayer_sparse_decode_f32(
    const float *q_local, const float *q_memory, const float *win_k, const float *win_v,
    int64_t win_head_stride, int win_len, const float *sink_k, const float *sink_v,
    int64_t sink_head_stride, int sinks, const void *pool_k, const void *pool_v, int pool_bf16,
    const int64_t *slots, const int64_t *lengths, int pages, int page, int heads,
    int kv_heads, int tokens, int dim, float scale, int threads, float *out) {
    const int group = heads / kv_heads, rows = group * tokens;
    const int splits = threads > 1 ? (2 * threads + kv_heads - 1) / kv_heads : 1;
    const int64_t most = (sinks + BLOCK - 1) / BLOCK + (int64_t)pages * ((page + BLOCK - 1) / BLOCK) +
                         (win_len + BLOCK - 1) / BLOCK;
    const int64_t state_size = (int64_t)rows * (dim + 2);
    piece_t *pieces = malloc(sizeof(piece_t) * most * kv_heads);
    int *counts = malloc(sizeof(int) * kv_heads);
    float *states = malloc(sizeof(float) * state_size * kv_heads * splits);
    float *placed = malloc(sizeof(float) * 2 * (int64_t)heads * tokens * dim);
    if (!pieces || !counts || !states || !placed) {
        free(pieces), free(counts), free(states), free(placed);
        return -1;
    }
    const int64_t query_size = (int64_t)heads * tokens * dim;
    for (int64_t i = 0; i < query_size; i++) {
        placed[i] = q_local[i] * scale;
        placed[query_size + i] = q_memory[i] * scale;
    }
    for (int g = 0; g < kv_heads; g++)
        counts[g] = head_pieces(pieces + most * g, g, win_k, win_v, win_head_stride, win_len,
                                sink_k, sink_v, sink_head_stride, sinks, pool_k, pool_v, pool_bf16, slots,
                                lengths, pages, page, kv_heads, tokens, dim);
    const int items = kv_heads * splits;
#pragma omp parallel for schedule(static) num_threads(threads > items ? items : threads)
    for (int item = 0; item < items; item++) {
        int g = item / splits, part = item % splits;
        float *m = states + state_size * item;
        state_t st = {m, m + rows, m + 2 * rows};
        for (int r = 0; r < rows; r++) st.m[r] = -INFINITY, st.l[r] = 0.f;
        memset(st.acc, 0, sizeof(float) * rows * dim);
        int first = (int)((int64_t)counts[g] * part / splits);
        int last = (int)((int64_t)counts[g] * (part + 1) / splits);
        int64_t q_at = (int64_t)g * rows * dim;
        for (int i = first; i < last && i < first + 2; i++)
            prefetch_share(pieces + most * g + i, dim, 0, 1);
        for (int i = first; i < last; i++) {
            const piece_t *p = pieces + most * g + i;
            attend(dim, placed + (p->memory ? query_size : 0) + q_at, rows, tokens, *p,
                   i + 2 < last ? p + 2 : NULL, st);
        }
    }
    for (int g = 0; g < kv_heads; g++) {
        for (int r = 0; r < rows; r++) {
            float top = -INFINITY, total = 0.f;
            for (int part = 0; part < splits; part++) {
                float m = states[state_size * (g * splits + part) + r];
                top = m > top ? m : top;
            }
            float *o = out + ((int64_t)g * rows + r) * dim;
            memset(o, 0, sizeof(float) * dim);
            for (int part = 0; part < splits; part++) {
                float *m = states + state_size * (g * splits + part);
                if (m[r] == -INFINITY) continue;
                float weight = exp_nonpositive(m[r] - top);
                total += weight * m[rows + r];
                const float *acc = m + 2 * rows + (int64_t)r * dim;
                for (int d = 0; d < dim; d++) o[d] += weight * acc[d];
            }
            for (int d = 0; d < dim; d++) o[d] /= total;
        }
    }
    free(pieces), free(counts), free(states), free(placed);
    return 0;
}

/* A min-heap of (score, page) on the score, the lower page winning ties (kept first). */
static inline int heap_less(const float *score, const int64_t *page, int a, int b) {
    return score[a] < score[b] || (score[a] == score[b] && page[a] > page[b]);
}

static void heap_sift_down(float *score, int64_t *page, int size, int at) {
    for (;;) {
        int low = at, left = 2 * at + 1, right = left + 1;
        if (left < size && heap_less(score, page, left, low)) low = left;
        if (right < size && heap_less(score, page, right, low)) low = right;
        if (low == at) return;
        float s = score[at];
        int64_t p = page[at];
        score[at] = score[low], page[at] = page[low];
        score[low] = s, page[low] = p;
        at = low;
    }
}

static int ascending(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* The k pages of the highest scores among `pages` (ascending, -1 after the last when fewer
 * than k exist) into out[k]; best[k] is scratch. Pages that score the same keep the lower
 * index. */
static void top_pages(const float *score, int pages, int k, float *best, int64_t *out) {
    const int take = pages < k ? pages : k;
    for (int i = 0; i < take; i++) best[i] = score[i], out[i] = i;
    for (int i = take / 2 - 1; i >= 0; i--) heap_sift_down(best, out, take, i);
    for (int p = take; p < pages; p++)
        if (score[p] > best[0]) { /* a later page wins only by a strictly higher score */
            best[0] = score[p], out[0] = p;
            heap_sift_down(best, out, take, 0);
        }
    qsort(out, take, sizeof(int64_t), ascending);
    for (int i = take; i < k; i++) out[i] = -1;
}

/* The k pages [k] (ascending, -1 after the last when fewer than k exist) of the highest
 * score Σ over KV heads of the group's queries summed · the page's summary row: InfLLM's
 * and ReKV's selection, shared by every head (the reference's mean over tokens divides
 * every score alike, so the ranking is the same). Shapes: queries [heads,
 * tokens, dim]; summaries [pages, kv_heads, dim]. Returns 0, or -1 when out of memory. */
int memlayer_select_summed_f32(const float *q, int heads, int tokens, int kv_heads, int dim,
                               const float *summaries, int pages, int k, int64_t *out) {
    const int group = heads / kv_heads, width = kv_heads * dim, take = pages < k ? pages : k;
    if (take == pages) { /* every page */
        for (int i = 0; i < k; i++) out[i] = i < pages ? i : -1;
        return 0;
    }
    float *query = calloc(width, sizeof(float));
    float *score = malloc(sizeof(float) * pages);
    float *best = malloc(sizeof(float) * take);
    if (!query || !score || !best) {
        free(query), free(score), free(best);
        return -1;
    }
    for (int g = 0; g < kv_heads; g++)
        for (int row = 0; row < group * tokens; row++)
            for (int d = 0; d < dim; d++)
                query[g * dim + d] += q[((int64_t)g * group * tokens + row) * dim + d];
#pragma omp parallel for schedule(static) if (pages >= 4096)
    for (int p = 0; p < pages; p++) {
        const float *row = summaries + (int64_t)p * width;
        v16 a = {0};
        for (int i = 0; i < width; i += 16) {
            a += loadu(row + i) * loadu(query + i);
        }
        score[p] = lane_sum(a);
    }
    top_pages(score, pages, k, best, out);
    free(query), free(score), free(best);
    return 0;
}

/* Quest's selection, per KV head: the k pages [kv_heads, k] of the highest upper bound of
 * q·k over the group's query rows, max over rows of Σ_d max(q_d·min_d, q_d·max_d), written
 * as q⁻·min + q⁺·max as the reference computes it. Shapes: queries [heads, tokens, dim];
 * summaries [pages, kv_heads, 2 (min, max), dim]. Returns 0, or -1 when out of memory. */
int memlayer_select_bounds_f32(const float *q, int heads, int tokens, int kv_heads, int dim,
                               const float *summaries, int pages, int k, int64_t *out) {
    const int rows = heads / kv_heads * tokens;
    const int64_t n = (int64_t)heads * tokens * dim;
    float *positive = malloc(sizeof(float) * n), *negative = malloc(sizeof(float) * n);
    float *score = malloc(sizeof(float) * ((int64_t)kv_heads * pages + 1));
    float *best = malloc(sizeof(float) * (k > 0 ? k : 1));
    if (!positive || !negative || !score || !best) {
        free(positive), free(negative), free(score), free(best);
        return -1;
    }
    for (int64_t i = 0; i < n; i++) {
        positive[i] = q[i] > 0 ? q[i] : 0; /* read with the max */
        negative[i] = q[i] < 0 ? q[i] : 0; /* read with the min */
    }
#pragma omp parallel for schedule(static) if ((int64_t)pages * rows >= 1024)
    for (int p = 0; p < pages; p++)
        for (int h = 0; h < kv_heads; h++) {
            const float *low = summaries + ((int64_t)p * kv_heads + h) * 2 * dim;
            const float *high = low + dim;
            float top = -INFINITY;
            for (int r = 0; r < rows; r++) {
                const int64_t at = ((int64_t)h * rows + r) * dim;
                v16 a = {0};
                for (int d = 0; d < dim; d += 16) {
                    a += loadu(positive + at + d) * loadu(high + d) +
                         loadu(negative + at + d) * loadu(low + d);
                }
                float s = lane_sum(a);
                top = s > top ? s : top;
            }
            score[(int64_t)h * pages + p] = top;
        }
    for (int h = 0; h < kv_heads; h++)
        top_pages(score + (int64_t)h * pages, pages, k, best, out + (int64_t)h * k);
    free(positive), free(negative), free(score), free(best);
    return 0;
}

/* RoPE of rows x [heads, tokens, dim] (unrotated), token t of every head at table row
 * first + t, into out (same layout): x·cos + roll(x, dim / 2)·signed_sin, rounded as torch's
 * mul then addcmul round it (the first product alone, then one fused multiply-add), so the
 * result is bit for bit the reference's. */
__attribute__((optimize("fp-contract=off"))) static void rope_rows(
    const float *x, int heads, int tokens, int dim, const float *cos, const float *ssin,
    int64_t first, int64_t head_stride, float *out) {
    const int half = dim / 2;
    for (int h = 0; h < heads; h++)
        for (int t = 0; t < tokens; t++) {
            const float *row = x + ((int64_t)h * tokens + t) * dim;
            const float *c = cos + (first + t) * dim, *s = ssin + (first + t) * dim;
            float *to = out + h * head_stride + (int64_t)t * dim;
            for (int d = 0; d < dim; d++) {
                float turned = row[d] * c[d];
                to[d] = fmaf(row[d < half ? d + half : d - half], s[d], turned);
            }
        }
}

/* A few tokens' keys and values [kv_heads, tokens, dim] (rows packed) into a layer's window
 * buffers at raw / rot / val (each head's rows `head_stride` floats apart): keys as they
 * came and rotated at table rows first, first + 1, ...; values as they came. */
void memlayer_window_put_f32(const float *k, const float *v, int kv_heads, int tokens, int dim,
                             const float *cos, const float *ssin, int64_t first,
                             int64_t head_stride, float *raw, float *rot, float *val) {
    for (int h = 0; h < kv_heads; h++) {
        size_t bytes = sizeof(float) * tokens * dim;
        memcpy(raw + h * head_stride, k + (int64_t)h * tokens * dim, bytes);
        memcpy(val + h * head_stride, v + (int64_t)h * tokens * dim, bytes);
    }
    rope_rows(k, kv_heads, tokens, dim, cos, ssin, first, head_stride, rot);
}

/* One layer's whole decode step: the unrotated queries q_raw [heads, tokens, dim] rotated to
 * the window's positions (table rows from local_at) and to memory's (every token at row
 * memory_at; memory_at < 0: the window's), k pages selected from the summaries of the
 * `sealed` pages (kind 0: InfLLM's and ReKV's summed score, [sealed, kv_heads, dim], one
 * selection every head shares; kind 1: Quest's bounds, [sealed, kv_heads, 2, dim], per KV
 * head), their slots read from table [sealed], then memlayer_sparse_decode_f32. The same
 * arithmetic as those calls made one by one from Python. Returns 0, or -1 when out of memory
 * (nothing written). */
int memlayer_decode_layer_f32(
    const float *q_raw, const float *cos, const float *ssin, int64_t local_at, int64_t memory_at,
    int kind, const float *summaries, int sealed, int k, const int64_t *table,
    const float *win_k, const float *win_v, int64_t win_head_stride, int win_len,
    const float *sink_k, const float *sink_v, int64_t sink_head_stride, int sinks,
    const void *pool_k, const void *pool_v, int pool_bf16, int page, int heads, int kv_heads,
    int tokens, int dim, float scale, int threads, float *out) {
    const int64_t size = (int64_t)heads * tokens * dim;
    const int choices = kind == 0 ? 1 : kv_heads;
    float *placed = malloc(sizeof(float) * 2 * size);
    int64_t *chosen = malloc(sizeof(int64_t) * choices * k);
    int64_t *slots = malloc(sizeof(int64_t) * kv_heads * k);
    if (!placed || !chosen || !slots) {
        free(placed), free(chosen), free(slots);
        return -1;
    }
    float *local = placed, *memory = placed + size;
    rope_rows(q_raw, heads, tokens, dim, cos, ssin, local_at, (int64_t)tokens * dim, local);
    if (memory_at >= 0) {
        for (int t = 0; t < tokens; t++) /* every token at the one memory position */
            for (int h = 0; h < heads; h++)
                rope_rows(q_raw + ((int64_t)h * tokens + t) * dim, 1, 1, dim, cos, ssin,
                          memory_at, 0, memory + ((int64_t)h * tokens + t) * dim);
    } else {
        memory = local;
    }
    int failed = kind == 0
        ? memlayer_select_summed_f32(memory, heads, tokens, kv_heads, dim, summaries, sealed, k, chosen)
        : memlayer_select_bounds_f32(memory, heads, tokens, kv_heads, dim, summaries, sealed, k, chosen);
    if (!failed) {
        for (int g = 0; g < kv_heads; g++)
            for (int i = 0; i < k; i++) {
                int64_t page_index = chosen[(kind == 0 ? 0 : (int64_t)g * k) + i];
                slots[(int64_t)g * k + i] = page_index < 0 ? -1 : table[page_index];
            }
        failed = memlayer_sparse_decode_f32(
            local, memory, win_k, win_v, win_head_stride, win_len, sink_k, sink_v,
            sink_head_stride, sinks, pool_k, pool_v, pool_bf16, slots, NULL, k, page, heads,
            kv_heads, tokens, dim, scale, threads, out);
    }
    free(placed), free(chosen), free(slots);
    return failed;
}
