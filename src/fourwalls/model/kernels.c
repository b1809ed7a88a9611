/* fourwalls' CPU kernels (OpenMP), built and loaded by fourwalls/model/native.py once per instruction set: AVX2 + FMA
 * + F16C everywhere, and where the CPU has them AVX-512 VNNI and BF16 (native.py loads the best build the CPU runs;
 * ISA_AVX512 says which this is). The AVX-512 build multiplies int8 by int8 with VNNI's dpbusd (one instruction for
 * 32 products summed in fours) where AVX2 takes two (maddubs, madd).
 *
 * decode_step: one decode step of a Llama-family model (fused.py). Decoding reads every weight once per token, so
 *   it should run at memory speed; in PyTorch a step of a 30-layer model is also some 4,000 small operator calls,
 *   which cost as much again as the reading. decode_step runs the whole step (embedding, every layer, head) in one
 *   call and one parallel region: each matrix product splits its output rows between the threads, each of which
 *   streams its own contiguous slice of the weights, and the phases of a layer meet at a spinning barrier rather
 *   than a sleeping one. A linear layer (Lin) is one of four kinds:
 *     LIN_F32   fp32;
 *     LIN_INT8  int8 with one scale per output row (y[n] = scale[n] * sum_k x[k] q[n, k]);
 *     LIN_INT4  4-bit codes with a scale and an offset per group of inputs (w = q * scale + offset), GGUF's Q4_0,
 *               Q4_1 and Q4_K exactly (groups of 32) and fourwalls' own int4;
 *     LIN_Q8    int8 codes with a scale, and an offset or none, per group of 16 or 32 inputs: GGUF's Q8_0, Q5_K and
 *               Q6_K exactly.
 *   The integer kinds take their input rounded to int8 in blocks of 32, as llama.cpp does. A layer may carry
 *   stacked multi-LoRA factors: y += ((x A^T) * mask) B^T, where mask picks (and weights) each row's adapters.
 *   The embedding table is a Lin too (row t is token t's vector), of any kind. Each row's keys and values are read
 *   and written through its block table (Cache: the serving engine's paged KV cache).
 * linear_forward: one layer's product for any number of rows on its own (quant.py's layers outside decode_step:
 *   a prompt's rows, or decoding where the fused step does not run).
 * stream_sum: the memory's read speed, which bounds decoding (benchmarks/decode.py).
 * rows_unit, rows_affine: the embedder's per-token int8 activations around fbgemm's product (rag/embed.py).
 * fw_abi: the limits, kinds and structure layout below, by name, for the Python side to read and its tests to
 *   check its ctypes structures against.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum { MAX_ROWS = 32 };  /* the most rows (sequences) one decode step takes */
enum { LIN_F32, LIN_INT8, LIN_INT4, LIN_Q8 };  /* Lin.kind */
/* The widths the kernels step through: a layer's input width must be a multiple of its kind's, an int4 group too,
 * a q8 group is 16 or 32; head_dim is a multiple of HEAD_DIM_BLOCK. */
enum { LIN_F32_BLOCK = 16, LIN_INT8_BLOCK = 32, LIN_INT4_BLOCK = 32, LIN_Q8_BLOCK = 32, HEAD_DIM_BLOCK = 16 };
#if defined(__AVX512VNNI__) && defined(__AVX512BF16__) && defined(__AVX512VL__)
#define ISA_AVX512 1  /* this build's instructions: 1 for AVX-512 (VNNI, BF16), 0 for AVX2 + FMA + F16C */
#else
#define ISA_AVX512 0
#endif

typedef struct {
    int64_t kind;          /* LIN_F32, LIN_INT8 (per-row scale), LIN_INT4 or LIN_Q8 (per-group scale and offset) */
    const void *w;         /* [n, k] row-major; int4: [n, k / 2] bytes, element 2i in the high nibble of byte i */
    const void *scale;     /* int8: [n] fp32; int4, q8: [n, k / group], fp32 or fp16 (half) */
    const void *zero;      /* int4: [n, k / group], the offset (w = q * scale + offset); q8: the same, or NULL */
    const float *in_scale; /* int4: [k] or NULL: the layer divides its input by these (AWQ) */
    int64_t group;         /* int4: weights sharing a scale and offset, a multiple of 32; q8: 16 or 32 */
    int64_t half;          /* int4, q8: scale and zero in fp16 (GGUF's own, which fp32 would only make longer) */
    const float *bias;     /* [n] or NULL */
    const float *lora_a;   /* [rank, k] or NULL: every adapter's A stacked */
    const float *lora_b;   /* [rank, n]: B transposed, the adapters' scaling folded in */
    int64_t n, k;
    int64_t zero_m8;       /* int4: every offset is -8 times its scale (GGUF's Q4_0): AVX-512 makes them, not reads */
} Lin;

typedef struct {
    const float *attn_norm, *mlp_norm;
    Lin q, k, v, o, gate, up, down;
} Layer;

typedef struct {
    int64_t n_layers, dim, hidden, n_heads, n_kv_heads, head_dim, vocab, lora_rank;
    float eps;
    const float *inv_freq;  /* [head_dim / 2] */
    Lin embed;              /* [vocab, dim]: row t is token t's vector */
    const float *norm;
    Lin head;
    const Layer *layers;
} Model;

typedef struct {
    float *x, *xn, *q, *k, *v, *att, *gate, *up, *xa, *cos, *sin;
    float *scores, *work;   /* per thread: attention scores; integer layers' input in int8 */
    int64_t scores_len, work_len;
} Scratch;

/* The KV cache in blocks (PagedAttention): per layer, fp16 buffers (llama.cpp's default KV type: half the memory of
 * fp32, and as much read per token) of [blocks, kv_heads, block_size, head_dim] (strides below; head_dim
 * contiguous), and per row the blocks holding its positions in order. Position p of row r is position
 * p % block_size of block table[r * table_stride + p / block_size]. A cache of one contiguous sequence per row is
 * the case of one block of max_len positions per row. */
typedef struct {
    uint16_t *const *k, *const *v;
    const int32_t *table;
    int64_t table_stride, block_size, block_stride, head_stride;
} Cache;

/* An integer layer's input (LIN_INT4, LIN_Q8) rounded to int8 as llama.cpp does: per block of 32 inputs the int8
 * values and their scale dx (absmax / 127); per group of the layer, the sum of the rounded inputs (the offsets'
 * term). An int4 layer's blocks hold their 16 even elements, then the 16 odd ones: the order its nibbles unpack in. */
typedef struct {
    float *xs, *dx;  /* [M, k / group]; [M, k / 32] */
    int32_t *qs;     /* [M, k / 16]: the sum of each 16 rounded inputs (AVX-512: q8 codes are made unsigned, +128) */
    int8_t *xq;      /* [M, k] */
} QInput;

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float dot(const float *a, const float *b, int64_t k) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    return hsum(_mm256_add_ps(s0, s1));
}

/* out[r] = w . x[r] for up to 4 rows of x (row stride k): each block of weights is loaded once for all of them.
 * Always inlined and called with a constant row count (see DISPATCH), so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void dot4_f32(const float *w, const float *x, int rows, int64_t k,
                                                           float *out) {
    __m256 acc[4][2];
    for (int r = 0; r < 4; r++)
        acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) {
        __m256 w0 = _mm256_loadu_ps(w + i), w1 = _mm256_loadu_ps(w + i + 8);
        for (int r = 0; r < rows; r++) {
            acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * k + i), acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * k + i + 8), acc[r][1]);
        }
    }
    for (int r = 0; r < rows; r++)
        out[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
}

static inline __attribute__((always_inline)) void dot4_i8(const int8_t *w, const float *x, int rows, int64_t k,
                                                          float *out) {
    const int A = rows <= 2 ? 4 : 2;  /* independent sums per row: enough to hide the FMA latency, few enough to fit */
    __m256 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int j = 0; j < 4; j++)
            acc[r][j] = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; i += 32) {
        __m128i b0 = _mm_loadu_si128((const __m128i *)(w + i));
        __m128i b1 = _mm_loadu_si128((const __m128i *)(w + i + 16));
        __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b0));
        __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b0, 8)));
        __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b1));
        __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b1, 8)));
        for (int r = 0; r < rows; r++) {
            const float *xr = x + r * k + i;
            acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[r][1]);
            acc[r][2 % A] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + 16), acc[r][2 % A]);
            acc[r][3 % A] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + 24), acc[r][3 % A]);
        }
    }
    for (int r = 0; r < rows; r++)
        out[r] = hsum(_mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3])));
}

/* The sum of 32-bit lanes of 4 int8 products each: u (unsigned) times s (signed), as dpbusd computes them. */
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if ISA_AVX512
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* Scales and offsets are fp32 or fp16 (Lin.half): element i, and the address of element i. */
static inline float scale_at(const void *s, int64_t i, int half) {
    return half ? _cvtsh_ss(((const uint16_t *)s)[i]) : ((const float *)s)[i];
}

static inline const void *scales_from(const void *s, int64_t i, int half) {
    return s ? (const char *)s + i * (half ? 2 : 4) : NULL;
}

static inline __m256 scales8(const void *s, int64_t i, int half) {
    return half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)s + i)))
                : _mm256_loadu_ps((const float *)s + i);
}

/* The offsets' term of an integer layer's output: sum over groups of offset * (the group's sum of inputs). */
static inline float offsets_dot(const void *zp, const float *xg, int64_t groups, int half) {
    __m256 z = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8)
        z = _mm256_fmadd_ps(scales8(zp, g, half), _mm256_loadu_ps(xg + g), z);
    float v = hsum(z);
    for (; g < groups; g++)
        v += scale_at(zp, g, half) * xg[g];
    return v;
}

/* A block of 32 int4 codes in a register (its 16 even elements, then its 16 odd: the input's order, QInput). */
static inline __m256i int4_block(const uint8_t *w) {
    const __m128i nibble = _mm_set1_epi8(0x0F), packed = _mm_loadu_si128((const __m128i *)w);
    return _mm256_set_m128i(_mm_and_si128(packed, nibble), _mm_and_si128(_mm_srli_epi16(packed, 4), nibble));
}


/* out[r] = w . x[r] for int4 weights, up to 4 rows, x in int8 (QInput): the 4-bit codes times the 8-bit inputs sum
 * in integers, 32 products at a time. Per block: scale * dx * (xq . q); per group: + offset * (sum of x rounded).
 * Two blocks a step, each with its own sums, which stay in registers (an index computed from the block would put
 * them in memory). */
static inline __attribute__((always_inline)) void dot4_i4(const uint8_t *w, const void *sc, const void *zp,
                                                          int half, const QInput *in, int64_t m0, int rows,
                                                          int64_t k, int64_t group, float *out) {
    const int64_t groups = k / group, blocks = k / 32, shift = __builtin_ctzll(group / 32);  /* groups: 2^n blocks */
    __m256 t0[4], t1[4];
    for (int r = 0; r < 4; r++)
        t0[r] = t1[r] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= blocks; b += 2) {
        const __m256i q0 = int4_block(w + b * 16), q1 = int4_block(w + b * 16 + 16);
        const float s0 = scale_at(sc, b >> shift, half), s1 = scale_at(sc, (b + 1) >> shift, half);
        for (int r = 0; r < rows; r++) {
            const int8_t *xq = in->xq + (m0 + r) * k + b * 32;
            const float *dx = in->dx + (m0 + r) * blocks + b;
            __m256 d0 = _mm256_cvtepi32_ps(dot_u8s8(q0, _mm256_loadu_si256((const __m256i *)xq)));
            __m256 d1 = _mm256_cvtepi32_ps(dot_u8s8(q1, _mm256_loadu_si256((const __m256i *)(xq + 32))));
            t0[r] = _mm256_fmadd_ps(d0, _mm256_set1_ps(s0 * dx[0]), t0[r]);
            t1[r] = _mm256_fmadd_ps(d1, _mm256_set1_ps(s1 * dx[1]), t1[r]);
        }
    }
    if (b < blocks) {
        const __m256i q0 = int4_block(w + b * 16);
        const float s0 = scale_at(sc, b >> shift, half);
        for (int r = 0; r < rows; r++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(in->xq + (m0 + r) * k + b * 32));
            __m256 d0 = _mm256_cvtepi32_ps(dot_u8s8(q0, xv));
            t0[r] = _mm256_fmadd_ps(d0, _mm256_set1_ps(s0 * in->dx[(m0 + r) * blocks + b]), t0[r]);
        }
    }
    for (int r = 0; r < rows; r++)
        out[r] = hsum(_mm256_add_ps(t0[r], t1[r])) + offsets_dot(zp, in->xs + (m0 + r) * groups, groups, half);
}

/* One block of int8 codes times one row's: the sums of four, as floats, times the group scales (one per 32, or
 * one per 16: lanes 0-3, then 4-7) and dx. q's sign moves onto x, as llama.cpp multiplies Q8_0 by Q8_0. */
static inline __m256 q8_block(__m256i q, __m256i aq, const int8_t *xq, __m256 s, float dx) {
    __m256 d = _mm256_cvtepi32_ps(dot_u8s8(aq, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)xq), q)));
    return _mm256_mul_ps(d, _mm256_mul_ps(s, _mm256_set1_ps(dx)));
}

static inline __m256 q8_scales(const void *sc, int64_t b, int64_t group, int half) {
    return group == 32 ? _mm256_set1_ps(scale_at(sc, b, half))
                       : _mm256_set_m128(_mm_set1_ps(scale_at(sc, 2 * b + 1, half)),
                                         _mm_set1_ps(scale_at(sc, 2 * b, half)));
}

/* out[r] = w . x[r] for int8 codes with a scale per group of 16 or 32 (and an offset or none), up to 4 rows, x in
 * int8; two blocks a step, as dot4_i4. */
static inline __attribute__((always_inline)) void dot4_q8(const int8_t *w, const void *sc, const void *zp,
                                                          int half, const QInput *in, int64_t m0, int rows,
                                                          int64_t k, int64_t group, float *out) {
    const int64_t groups = k / group, blocks = k / 32;
    __m256 t0[4], t1[4];
    for (int r = 0; r < 4; r++)
        t0[r] = t1[r] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= blocks; b += 2) {
        const __m256i q0 = _mm256_loadu_si256((const __m256i *)(w + b * 32));
        const __m256i q1 = _mm256_loadu_si256((const __m256i *)(w + b * 32 + 32));
        const __m256i a0 = _mm256_sign_epi8(q0, q0), a1 = _mm256_sign_epi8(q1, q1);
        const __m256 s0 = q8_scales(sc, b, group, half), s1 = q8_scales(sc, b + 1, group, half);
        for (int r = 0; r < rows; r++) {
            const int8_t *xq = in->xq + (m0 + r) * k + b * 32;
            const float *dx = in->dx + (m0 + r) * blocks + b;
            t0[r] = _mm256_add_ps(t0[r], q8_block(q0, a0, xq, s0, dx[0]));
            t1[r] = _mm256_add_ps(t1[r], q8_block(q1, a1, xq + 32, s1, dx[1]));
        }
    }
    if (b < blocks) {
        const __m256i q0 = _mm256_loadu_si256((const __m256i *)(w + b * 32)), a0 = _mm256_sign_epi8(q0, q0);
        const __m256 s0 = q8_scales(sc, b, group, half);
        for (int r = 0; r < rows; r++)
            t0[r] = _mm256_add_ps(t0[r], q8_block(q0, a0, in->xq + (m0 + r) * k + b * 32, s0,
                                                  in->dx[(m0 + r) * blocks + b]));
    }
    for (int r = 0; r < rows; r++)
        out[r] = hsum(_mm256_add_ps(t0[r], t1[r]))
                 + (zp ? offsets_dot(zp, in->xs + (m0 + r) * groups, groups, half) : 0.0f);
}

static inline int32_t hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

static inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

#if ISA_AVX512
/* Integer layers on AVX-512, 16 output rows at a time: a register's 16 lanes are 16 consecutive output rows, so no
 * horizontal sum is left to do. A block of 32 weights of the 16 rows is transposed into registers once (register j:
 * bytes 4j..4j+3 of each row, int4 codes unpacked to bytes) and meets up to TILE_M input rows (a prompt's: up to
 * TILE_MB, tile_many), four of their int8 inputs at a time broadcast to every lane. Per input row, block by block: the block's dot product in integers
 * (exact, in whatever order), then y = fma(dot, scale * dx, y); per group, y = fma(offset, xs, y). That order is the
 * same whatever the number of rows, so a token's output does not depend on the batch it is computed in. Q8 codes are
 * made unsigned for dpbusd by adding 128, whose term (128 times the sum of the block's inputs) is then taken off. */
enum { TILE_N = 16, TILE_M = 8 };

/* Bytes [off, off + len) (len <= 16) of the 16 rows as 4 registers: register j holds bytes 4j..4j+3 of row l in
 * lane l (bytes past len read as 0, and never touched). */
static inline void transpose16(const uint8_t *const *rows, int64_t off, int len, __m512i out[4]) {
    const __mmask16 keep = len >= 16 ? 0xFFFF : (__mmask16)((1u << len) - 1);
    __m512i a[4];
    for (int t = 0; t < 4; t++) {  /* rows t, 4 + t, 8 + t, 12 + t in the 128-bit lanes of a[t] */
        __m512i v = _mm512_castsi128_si512(_mm_maskz_loadu_epi8(keep, rows[t] + off));
        v = _mm512_inserti32x4(v, _mm_maskz_loadu_epi8(keep, rows[4 + t] + off), 1);
        v = _mm512_inserti32x4(v, _mm_maskz_loadu_epi8(keep, rows[8 + t] + off), 2);
        a[t] = _mm512_inserti32x4(v, _mm_maskz_loadu_epi8(keep, rows[12 + t] + off), 3);
    }
    const __m512i lo01 = _mm512_unpacklo_epi32(a[0], a[1]), hi01 = _mm512_unpackhi_epi32(a[0], a[1]);
    const __m512i lo23 = _mm512_unpacklo_epi32(a[2], a[3]), hi23 = _mm512_unpackhi_epi32(a[2], a[3]);
    out[0] = _mm512_unpacklo_epi64(lo01, lo23);
    out[1] = _mm512_unpackhi_epi64(lo01, lo23);
    out[2] = _mm512_unpacklo_epi64(hi01, hi23);
    out[3] = _mm512_unpackhi_epi64(hi01, hi23);
}

/* 16 registers of 16 dwords, transposed in place: r[j] lane l <- r[l] lane j. */
static inline void transpose16x16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 16; i += 8)
        for (int j = 0; j < 4; j++) {
            t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + 4 + j], 0x88);
            t[i + 4 + j] = _mm512_shuffle_i32x4(r[i + j], r[i + 4 + j], 0xDD);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xDD);
    }
}

/* The scales (or offsets) of the 16 rows, [groups] each in fp32 or fp16, as dst[g * 16 + lane] in fp32: 64 bytes
 * of each row at a time, as a 16 x 16 matrix of dwords transposed (one or two groups a dword). */
static void tile_scales(const uint8_t *const *rows, int64_t groups, int half, float *dst) {
    const int64_t bytes = groups * (half ? 2 : 4);
    for (int64_t off = 0; off < bytes; off += 64) {
        const int64_t left = bytes - off;
        const __mmask64 keep = left >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << left) - 1);
        __m512i r[16];
        for (int l = 0; l < 16; l++)
            r[l] = left >= 64 ? _mm512_loadu_si512(rows[l] + off) : _mm512_maskz_loadu_epi8(keep, rows[l] + off);
        transpose16x16(r);
        for (int j = 0; j < 16; j++) {
            if (half) {
                const int64_t g = off / 2 + 2 * j;
                if (g < groups)
                    _mm512_storeu_ps(dst + g * 16, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(r[j])));
                if (g + 1 < groups)
                    _mm512_storeu_ps(dst + (g + 1) * 16,
                                     _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(r[j], 16))));
            } else if (off / 4 + j < groups) {
                _mm512_storeu_ps(dst + (off / 4 + j) * 16, _mm512_castsi512_ps(r[j]));
            }
        }
    }
}

/* Block b of the 16 rows as 8 registers of unsigned codes: register j meets the input's bytes 4j..4j+3 (QInput's
 * order: an int4 block's even elements, then its odd ones). */
static inline void tile_block(const Lin *L, const uint8_t *const *w, int64_t b, __m512i wv[8]) {
    if (L->kind == LIN_Q8) {
        const __m512i flip = _mm512_set1_epi8((char)0x80);
        transpose16(w, b * 32, 16, wv);
        transpose16(w, b * 32 + 16, 16, wv + 4);
        for (int j = 0; j < 8; j++)
            wv[j] = _mm512_xor_si512(wv[j], flip);
    } else {
        const __m512i nibble = _mm512_set1_epi8(0x0F);
        __m512i t[4];
        transpose16(w, b * 16, 16, t);
        for (int j = 0; j < 4; j++) {
            wv[j] = _mm512_and_si512(_mm512_srli_epi16(t[j], 4), nibble);  /* high nibbles: even elements */
            wv[4 + j] = _mm512_and_si512(t[j], nibble);
        }
    }
}

/* sum over j in [j0, j1) of wv[j] times the input's bytes 4j..4j+3, in A independent sums (A a constant) */
static inline __attribute__((always_inline)) __m512i tile_dot(const __m512i *wv, const int32_t *x4, int j0, int j1,
                                                              int A) {
    __m512i a[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int j = j0; j < j1; j++)
        a[(j - j0) % A] = _mm512_dpbusd_epi32(a[(j - j0) % A], wv[j], _mm512_set1_epi32(x4[j]));
    return _mm512_add_epi32(_mm512_add_epi32(a[0], a[1]), _mm512_add_epi32(a[2], a[3]));
}

/* y's rows [m0, m0 + rows), outputs n0.. (the lanes in keep): the sums f plus the bias, added to y with add. */
static inline void store_rows(const Lin *L, const __m512 *f, int64_t m0, int rows, float *y, int64_t ys, int add,
                              int64_t n0, __mmask16 keep) {
    const __m512 bias = L->bias ? _mm512_maskz_loadu_ps(keep, L->bias + n0) : _mm512_setzero_ps();
    for (int r = 0; r < rows; r++) {
        float *dst = y + (m0 + r) * ys + n0;
        __m512 v = _mm512_add_ps(f[r], bias);
        if (add)
            v = _mm512_add_ps(_mm512_maskz_loadu_ps(keep, dst), v);
        _mm512_mask_storeu_ps(dst, keep, v);
    }
}

/* Rows [m0, m0 + rows) of y (16 outputs from n0, the lanes in keep) for an integer layer: see above. */
static inline __attribute__((always_inline)) void tile_rows(const Lin *L, const QInput *in, const uint8_t *const *w,
                                                            const float *sv, const float *ov, int64_t m0, int rows,
                                                            float *y, int64_t ys, int add, int64_t n0,
                                                            __mmask16 keep, const char *pf, int64_t pf_bytes) {
    const int64_t k = L->k, blocks = k / 32, groups = k / L->group;
    const int q8 = L->kind == LIN_Q8, g16 = L->group == 16, A = rows <= 2 ? 4 : rows <= 4 ? 2 : 1;
    const int64_t per = L->group >= 32 ? L->group / 32 : 1;  /* blocks a group */
    __m512 f[TILE_M];
    for (int r = 0; r < TILE_M; r++)
        f[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        __m512i wv[8];
        tile_block(L, w, b, wv);
        if (pf)  /* the next tile's weights, a share a block */
            for (int64_t c = b * pf_bytes / blocks; c < (b + 1) * pf_bytes / blocks; c += 64)
                _mm_prefetch(pf + c, _MM_HINT_T0);
        for (int r = 0; r < rows; r++) {
            const int64_t m = m0 + r;
            const int32_t *x4 = (const int32_t *)(in->xq + m * k + b * 32), *qs = in->qs + m * (k / 16) + 2 * b;
            const __m512 dx = _mm512_set1_ps(in->dx[m * blocks + b]);
            if (g16) {  /* q8 in groups of 16: two scales a block */
                for (int h = 0; h < 2; h++) {
                    __m512i d = _mm512_sub_epi32(tile_dot(wv, x4, 4 * h, 4 * h + 4, A), _mm512_set1_epi32(128 * qs[h]));
                    const int64_t g = 2 * b + h;
                    f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(_mm512_loadu_ps(sv + g * 16), dx),
                                           f[r]);
                    if (ov)
                        f[r] = _mm512_fmadd_ps(_mm512_loadu_ps(ov + g * 16), _mm512_set1_ps(in->xs[m * groups + g]),
                                               f[r]);
                }
            } else {
                __m512i d = tile_dot(wv, x4, 0, 8, A);
                if (q8)
                    d = _mm512_sub_epi32(d, _mm512_set1_epi32(128 * (qs[0] + qs[1])));
                const int64_t g = b / per;
                f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(_mm512_loadu_ps(sv + g * 16), dx), f[r]);
                if (ov && (b + 1) % per == 0)
                    f[r] = _mm512_fmadd_ps(_mm512_loadu_ps(ov + g * 16), _mm512_set1_ps(in->xs[m * groups + g]), f[r]);
            }
        }
    }
    store_rows(L, f, m0, rows, y, ys, add, n0, keep);
}

/* Up to TILE_MB input rows (a prompt's) of y: each row's arithmetic exactly as tile_rows does it, but every block of
 * the 16 weight rows is unpacked once for all of them, their sums waiting in acc; tile_rows unpacks it again for
 * every 8 rows. */
enum { TILE_MB = 64 };
static void tile_many(const Lin *L, const QInput *in, const uint8_t *const *w, const float *sv, const float *ov,
                      int64_t m0, int rows, float *y, int64_t ys, int add, int64_t n0, __mmask16 keep,
                      const char *pf, int64_t pf_bytes) {
    const int64_t k = L->k, blocks = k / 32, groups = k / L->group;
    const int q8 = L->kind == LIN_Q8, g16 = L->group == 16;
    const int64_t per = L->group >= 32 ? L->group / 32 : 1;  /* blocks a group */
    __m512 acc[TILE_MB];
    for (int r = 0; r < rows; r++)
        acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0, g = 0, j = 0; b < blocks; b++) {  /* block b is the j-th of group g */
        __m512i wv[8];
        tile_block(L, w, b, wv);
        if (pf)
            for (int64_t c = b * pf_bytes / blocks; c < (b + 1) * pf_bytes / blocks; c += 64)
                _mm_prefetch(pf + c, _MM_HINT_T0);
        const int group_ends = ov && j + 1 == per;
        const __m512 sg = _mm512_loadu_ps(sv + g * 16), og = group_ends ? _mm512_loadu_ps(ov + g * 16) : sg;
        for (int r = 0; r < rows; r++) {
            const int64_t m = m0 + r;
            const int32_t *x4 = (const int32_t *)(in->xq + m * k + b * 32), *qs = in->qs + m * (k / 16) + 2 * b;
            const __m512 dx = _mm512_set1_ps(in->dx[m * blocks + b]);
            if (g16) {
                for (int h = 0; h < 2; h++) {
                    __m512i d = _mm512_sub_epi32(tile_dot(wv, x4, 4 * h, 4 * h + 4, 1), _mm512_set1_epi32(128 * qs[h]));
                    const int64_t gh = 2 * b + h;
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(_mm512_loadu_ps(sv + gh * 16), dx),
                                             acc[r]);
                    if (ov)
                        acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(ov + gh * 16),
                                                 _mm512_set1_ps(in->xs[m * groups + gh]), acc[r]);
                }
            } else {
                __m512i d = tile_dot(wv, x4, 0, 8, 1);
                if (q8)
                    d = _mm512_sub_epi32(d, _mm512_set1_epi32(128 * (qs[0] + qs[1])));
                __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sg, dx), acc[r]);
                if (group_ends)
                    v = _mm512_fmadd_ps(og, _mm512_set1_ps(in->xs[m * groups + g]), v);
                acc[r] = v;
            }
        }
        if (++j == per) {
            j = 0;
            g++;
        }
    }
    store_rows(L, acc, m0, rows, y, ys, add, n0, keep);
}

/* One input row (decoding one token) of an int4 layer, or a q8 layer in groups of 32 or more: the same arithmetic as
 * tile_rows, but the products are made with each row's codes as they lie, two blocks a register, and the 16 rows'
 * sums of four then gathered into lanes. For one input row that costs fewer instructions than transposing the codes,
 * and reads each row's bytes in order. */
static void tile_row(const Lin *L, const QInput *in, const uint8_t *const *w, const float *sv, const float *ov,
                     int64_t m, float *y, int add, int64_t n0, __mmask16 keep, const char *pf, int64_t pf_bytes) {
    const int64_t k = L->k, blocks = k / 32, groups = k / L->group, per = L->group / 32;
    const int q8 = L->kind == LIN_Q8;
    const __m512i flip = _mm512_set1_epi8((char)0x80), nibble = _mm512_set1_epi8(0x0F);
    const __m512i pair = _mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3);
    const int32_t *qs = in->qs + m * (k / 16);
    __m512 f = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b += 2) {
        __m512i sums[2];
        if (pf)  /* the next tile's weights, a share every pair of blocks */
            for (int64_t c = b * pf_bytes / blocks; c < (b + 2) * pf_bytes / blocks; c += 64)
                _mm_prefetch(pf + c, _MM_HINT_T0);
        if (b + 1 == blocks) {  /* an odd block left: as tile_rows takes it */
            __m512i wv[8];
            tile_block(L, w, b, wv);
            sums[0] = tile_dot(wv, (const int32_t *)(in->xq + m * k + b * 32), 0, 8, 4);
        } else {
            const __m512i x = _mm512_loadu_si512(in->xq + m * k + b * 32);
            __m512i d[16], e[8], g[4];
            for (int r = 0; r < 16; r++) {  /* lanes 0-7: block b's sums of four of row r, 8-15: block b + 1's */
                __m512i q;
                if (q8) {
                    q = _mm512_xor_si512(_mm512_loadu_si512(w[r] + b * 32), flip);
                } else {  /* 128-bit lanes: block b's even elements (high nibbles), its odd ones, then block b + 1's */
                    q = _mm512_permutexvar_epi64(pair, _mm512_castsi256_si512(
                                                           _mm256_loadu_si256((const __m256i *)(w[r] + b * 16))));
                    q = _mm512_and_si512(_mm512_mask_srli_epi16(q, 0x00FF00FF, q, 4), nibble);
                }
                d[r] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, x);
            }
            for (int i = 0; i < 8; i++)  /* per 128-bit lane: rows 2i, 2i + 1, two sums each */
                e[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(d[2 * i], d[2 * i + 1]),
                                        _mm512_unpackhi_epi32(d[2 * i], d[2 * i + 1]));
            for (int i = 0; i < 4; i++)  /* per 128-bit lane: rows 4i..4i + 3, one sum each */
                g[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(e[2 * i], e[2 * i + 1]),
                                        _mm512_unpackhi_epi64(e[2 * i], e[2 * i + 1]));
            /* lanes 0 + 1 are block b, 2 + 3 block b + 1 */
            const __m512i h01 = _mm512_add_epi32(_mm512_shuffle_i32x4(g[0], g[1], 0x88),
                                                 _mm512_shuffle_i32x4(g[0], g[1], 0xDD));
            const __m512i h23 = _mm512_add_epi32(_mm512_shuffle_i32x4(g[2], g[3], 0x88),
                                                 _mm512_shuffle_i32x4(g[2], g[3], 0xDD));
            sums[0] = _mm512_shuffle_i32x4(h01, h23, 0x88);
            sums[1] = _mm512_shuffle_i32x4(h01, h23, 0xDD);
        }
        for (int64_t i = 0; i < 2 && b + i < blocks; i++) {
            const int64_t c = b + i, g = c / per;
            __m512i s = sums[i];
            if (q8)
                s = _mm512_sub_epi32(s, _mm512_set1_epi32(128 * (qs[2 * c] + qs[2 * c + 1])));
            f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s),
                                _mm512_mul_ps(_mm512_loadu_ps(sv + g * 16), _mm512_set1_ps(in->dx[m * blocks + c])), f);
            if (ov && (c + 1) % per == 0)
                f = _mm512_fmadd_ps(_mm512_loadu_ps(ov + g * 16), _mm512_set1_ps(in->xs[m * groups + g]), f);
        }
    }
    const __m512 bias = L->bias ? _mm512_maskz_loadu_ps(keep, L->bias + n0) : _mm512_setzero_ps();
    float *dst = y + n0;
    __m512 v = _mm512_add_ps(f, bias);
    if (add)
        v = _mm512_add_ps(_mm512_maskz_loadu_ps(keep, dst), v);
    _mm512_mask_storeu_ps(dst, keep, v);
}

/* Output rows [lo, hi) of an integer layer for M input rows, 16 at a time (linear_rows_from's AVX-512 case). */
static void tile_linear(const Lin *L, const QInput *in, int64_t M, float *y, int64_t ys, int add, int64_t lo,
                        int64_t hi) {
    const int64_t k = L->k, groups = k / L->group, row_bytes = L->kind == LIN_INT4 ? k / 2 : k;
    const int half = (int)L->half, esize = half ? 2 : 4;
    float sv[groups * TILE_N], ov[groups * TILE_N];
    for (int64_t n0 = lo; n0 < hi; n0 += TILE_N) {
        const uint8_t *w[TILE_N], *s[TILE_N], *z[TILE_N];
        for (int l = 0; l < TILE_N; l++) {
            const int64_t n = n0 + l < hi ? n0 + l : hi - 1;  /* lanes past hi repeat the last row, never stored */
            w[l] = (const uint8_t *)L->w + n * row_bytes;
            s[l] = (const uint8_t *)L->scale + n * groups * esize;
            z[l] = L->zero ? (const uint8_t *)L->zero + n * groups * esize : NULL;
        }
        tile_scales(s, groups, half, sv);
        if (L->zero && L->zero_m8)  /* -8 times an fp32 scale: exactly the offset stored */
            for (int64_t i = 0; i < groups * TILE_N; i += 16)
                _mm512_storeu_ps(ov + i, _mm512_mul_ps(_mm512_loadu_ps(sv + i), _mm512_set1_ps(-8.0f)));
        else if (L->zero)
            tile_scales(z, groups, half, ov);
        const __mmask16 keep = hi - n0 >= TILE_N ? 0xFFFF : (__mmask16)((1u << (hi - n0)) - 1);
        const float *o = L->zero ? ov : NULL;
        /* The next tile's rows (contiguous) are prefetched a share a block while this one is read: with 16 rows
         * read across at once, the hardware prefetcher alone leaves decoding ~1.7x slower. */
        const int64_t pn = n0 + TILE_N;
        const char *next = pn < hi ? (const char *)L->w + pn * row_bytes : NULL;
        const int64_t nb = (hi - pn < TILE_N ? hi - pn : TILE_N) * row_bytes;
        if (next) {  /* and its scales and offsets, read first thing in the next tile */
            const int64_t sb = (hi - pn < TILE_N ? hi - pn : TILE_N) * groups * esize;
            for (int64_t c = 0; c < sb; c += 64) {
                _mm_prefetch((const char *)L->scale + pn * groups * esize + c, _MM_HINT_T0);
                if (L->zero && !L->zero_m8)
                    _mm_prefetch((const char *)L->zero + pn * groups * esize + c, _MM_HINT_T0);
            }
        }
        for (int64_t m0 = 0; m0 < M; m0 += TILE_M) {
            const char *pf = m0 == 0 ? next : NULL;
            if (M - m0 > TILE_M) {
                const int rows = M - m0 < TILE_MB ? (int)(M - m0) : TILE_MB;
                tile_many(L, in, w, sv, o, m0, rows, y, ys, add, n0, keep, pf, nb);
                m0 += rows - TILE_M;
                continue;
            }
            if (M - m0 == 1 && L->group >= 32) {
                tile_row(L, in, w, sv, o, m0, y + m0 * ys, add, n0, keep, pf, nb);
                continue;
            }
            switch (M - m0 < TILE_M ? M - m0 : TILE_M) {
            case 1: tile_rows(L, in, w, sv, o, m0, 1, y, ys, add, n0, keep, pf, nb); break;
            case 2: tile_rows(L, in, w, sv, o, m0, 2, y, ys, add, n0, keep, pf, nb); break;
            case 3: tile_rows(L, in, w, sv, o, m0, 3, y, ys, add, n0, keep, pf, nb); break;
            case 4: tile_rows(L, in, w, sv, o, m0, 4, y, ys, add, n0, keep, pf, nb); break;
            case 5: tile_rows(L, in, w, sv, o, m0, 5, y, ys, add, n0, keep, pf, nb); break;
            case 6: tile_rows(L, in, w, sv, o, m0, 6, y, ys, add, n0, keep, pf, nb); break;
            case 7: tile_rows(L, in, w, sv, o, m0, 7, y, ys, add, n0, keep, pf, nb); break;
            default: tile_rows(L, in, w, sv, o, m0, 8, y, ys, add, n0, keep, pf, nb);
            }
        }
    }
}
#endif

/* Where an integer layer's input for M rows lies in work (at least M * (k / 16 + k / 32 + k / 4 + k / 4) floats). */
static QInput q_input_at(const Lin *L, int64_t M, float *work) {
    const int64_t k = L->k;
    float *xs = work, *dx = xs + M * (k / L->group);
    int32_t *qs = (int32_t *)(dx + M * (k / 32));
    return (QInput){xs, dx, qs, (int8_t *)(qs + M * (k / 16))};
}

/* Rows [lo, hi) of an integer layer's input (QInput) from x. */
static void q_input_rows(const Lin *L, const float *x, QInput in, int64_t lo, int64_t hi) {
    const int64_t k = L->k, groups = k / L->group, blocks = k / 32;
    const int shift = L->group >= 32 ? __builtin_ctzll(L->group / 32) : 0;  /* groups of 2^n blocks */
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t m = lo; m < hi; m++) {
        const float *xm = x + m * k;
        float *xs = in.xs + m * groups;
        for (int64_t g = 0; g < groups; g++)
            xs[g] = 0.0f;
        for (int64_t b = 0; b < blocks; b++) {
            const float *xb = xm + b * 32;
            __m256 v[4];
            for (int j = 0; j < 4; j++)
                v[j] = _mm256_loadu_ps(xb + 8 * j);
            if (L->in_scale)
                for (int j = 0; j < 4; j++)
                    v[j] = _mm256_div_ps(v[j], _mm256_loadu_ps(L->in_scale + b * 32 + 8 * j));
            if (L->kind == LIN_INT4) {  /* even elements, then odd: shuffle within lanes, then put the lanes right */
                __m256 e0 = _mm256_shuffle_ps(v[0], v[1], 0x88), o0 = _mm256_shuffle_ps(v[0], v[1], 0xDD);
                __m256 e1 = _mm256_shuffle_ps(v[2], v[3], 0x88), o1 = _mm256_shuffle_ps(v[2], v[3], 0xDD);
                v[0] = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e0), 0xD8));
                v[1] = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e1), 0xD8));
                v[2] = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o0), 0xD8));
                v[3] = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o1), 0xD8));
            }
            __m256 amax = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                        _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
            const float d = hmax(amax) / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
            in.dx[m * blocks + b] = d;
            const __m256 iv = _mm256_set1_ps(inv);
            __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v[0], iv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v[1], iv));
            __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v[2], iv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v[3], iv));
            /* The offsets multiply the sum of the inputs as rounded, d * sum(q), as llama.cpp's Q8_1 does: the same
             * x then meets every part of the weight. With the exact sum, the codes' part (q * scale, never negative
             * in Q4_1) would meet the rounding errors alone, and their sum grow with the offset: that cost the
             * default model 1.7% perplexity against its float weights, this 0.05%. */
            const int32_t qlo = hsum_i32(_mm256_add_epi32(i0, i1)), qhi = hsum_i32(_mm256_add_epi32(i2, i3));
            const float lo = (float)qlo, hi = (float)qhi;
            in.qs[m * (k / 16) + 2 * b] = qlo;
            in.qs[m * (k / 16) + 2 * b + 1] = qhi;
            if (L->group == 16) {  /* q8 groups of 16: two sums a block */
                xs[2 * b] += d * lo;
                xs[2 * b + 1] += d * hi;
            } else {
                xs[b >> shift] += d * (lo + hi);
            }
            __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
            _mm256_storeu_si256((__m256i *)(in.xq + m * k + b * 32), _mm256_permutevar8x32_epi32(packed, order));
        }
    }
}

#define DISPATCH(fn, w, x, rows, k, out) \
    switch (rows) { \
    case 1: fn(w, x, 1, k, out); break; \
    case 2: fn(w, x, 2, k, out); break; \
    case 3: fn(w, x, 3, k, out); break; \
    default: fn(w, x, 4, k, out); \
    }

#define DISPATCH_Q(fn, w, sc, zp, half, in, m0, rows, k, group, out) \
    switch (rows) { \
    case 1: fn(w, sc, zp, half, in, m0, 1, k, group, out); break; \
    case 2: fn(w, sc, zp, half, in, m0, 2, k, group, out); break; \
    case 3: fn(w, sc, zp, half, in, m0, 3, k, group, out); break; \
    default: fn(w, sc, zp, half, in, m0, 4, k, group, out); \
    }

/* A spinning barrier: the phases of a decode step are tens of microseconds, too short to put threads to sleep. */
typedef struct {
    atomic_int waiting, phase;
} Barrier;

static void barrier_wait(Barrier *b, int nt) {
    if (nt == 1)
        return;
    int phase = atomic_load_explicit(&b->phase, memory_order_acquire);
    if (atomic_fetch_add_explicit(&b->waiting, 1, memory_order_acq_rel) == nt - 1) {
        atomic_store_explicit(&b->waiting, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&b->phase, 1, memory_order_release);
    } else {
        while (atomic_load_explicit(&b->phase, memory_order_acquire) == phase)
            _mm_pause();
    }
}

static inline void span(int64_t n, int t, int nt, int64_t *lo, int64_t *hi) {
    *lo = n * t / nt;
    *hi = n * (t + 1) / nt;
}

/* A layer's LoRA input for the rows of a step: xa = (x A^T) * mask, [M, rank], of which row m uses only the
 * columns [cols[2m], cols[2m + 1]) of its own adapter. */
typedef struct {
    const float *xa;
    int64_t rank;
    const int64_t *cols;
} LoraIn;

static inline int is_integer(const Lin *L) { return L->kind == LIN_INT4 || L->kind == LIN_Q8; }

/* Output rows [lo, hi) of y = x W^T (+ bias, + LoRA) for M rows of x (stride L->k); y has row stride ys.
 * in: an integer layer's input, made from x (q_input_rows). add: accumulate into y (the residual stream).
 * lora: NULL when no row uses an adapter. */
static void linear_rows_from(const Lin *L, const float *x, const QInput *in, int64_t M, float *y, int64_t ys,
                             int add, const LoraIn *lora, int64_t lo, int64_t hi) {
    const int64_t k = L->k, groups = L->kind == LIN_INT4 || L->kind == LIN_Q8 ? k / L->group : 0;
    const int64_t row_bytes = L->kind == LIN_F32 ? k * 4 : L->kind == LIN_INT4 ? k / 2 : k;
    const int half = (int)L->half;
    float out[4];
    int64_t first = lo;  /* the first output row left for the loop below */
#if ISA_AVX512
    if (is_integer(L)) {
        tile_linear(L, in, M, y, ys, add, lo, hi);
        first = hi;
    }
#endif
    for (int64_t n = first; n < hi; n++) {
        /* A touch 8 rows ahead starts the hardware prefetcher on them early (+7% read speed measured here). */
        _mm_prefetch((const char *)L->w + (n + 8) * row_bytes, _MM_HINT_T0);
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            int rows = M - m0 < 4 ? (int)(M - m0) : 4;
            if (L->kind == LIN_F32)
                DISPATCH(dot4_f32, (const float *)L->w + n * k, x + m0 * k, rows, k, out)
            else if (L->kind == LIN_INT4)
                DISPATCH_Q(dot4_i4, (const uint8_t *)L->w + n * (k / 2), scales_from(L->scale, n * groups, half),
                           scales_from(L->zero, n * groups, half), half, in, m0, rows, k, L->group, out)
            else if (L->kind == LIN_Q8)
                DISPATCH_Q(dot4_q8, (const int8_t *)L->w + n * k, scales_from(L->scale, n * groups, half),
                           scales_from(L->zero, n * groups, half), half, in, m0, rows, k, L->group, out)
            else {
                DISPATCH(dot4_i8, (const int8_t *)L->w + n * k, x + m0 * k, rows, k, out);
                for (int r = 0; r < rows; r++)
                    out[r] *= ((const float *)L->scale)[n];
            }
            for (int r = 0; r < rows; r++) {
                float v = out[r] + (L->bias ? L->bias[n] : 0.0f);
                float *dst = y + (m0 + r) * ys + n;
                *dst = add ? *dst + v : v;
            }
        }
    }
    if (!lora || !L->lora_a)
        return;
    /* y[m, lo:hi] += xa[m, j] * B^T[j, lo:hi] over the columns j of row m's adapter: vectors along the outputs. */
    for (int64_t m = 0; m < M; m++) {
        for (int64_t j = lora->cols[2 * m]; j < lora->cols[2 * m + 1]; j++) {
            const float a = lora->xa[m * lora->rank + j], *b = L->lora_b + j * L->n;
            float *dst = y + m * ys;
            int64_t n = lo;
            for (; n + 8 <= hi; n += 8)
                _mm256_storeu_ps(dst + n, _mm256_fmadd_ps(_mm256_set1_ps(a), _mm256_loadu_ps(b + n),
                                                          _mm256_loadu_ps(dst + n)));
            for (; n < hi; n++)
                dst[n] += a * b[n];
        }
    }
}

/* linear_rows_from with the input made here, in this thread's work space (a decode step's few rows). */
static void linear_rows(const Lin *L, const float *x, int64_t M, float *y, int64_t ys, int add, const LoraIn *lora,
                        float *work, int64_t lo, int64_t hi) {
    QInput in = {0};
    if (is_integer(L) && lo < hi) {
        in = q_input_at(L, M, work);
        q_input_rows(L, x, in, 0, M);
    }
    linear_rows_from(L, x, &in, M, y, ys, add, lora, lo, hi);
}

/* y = x W^T (+ bias) for M rows on their own (quant.py's layers outside decode_step). work: an integer layer's
 * input, M * (k / 16 + k / 32 + k / 2) floats, made once and shared by the threads. */
void linear_forward(const Lin *L, const float *x, int64_t M, float *y, float *work, int nthreads) {
    QInput in = is_integer(L) ? q_input_at(L, M, work) : (QInput){0};
    #pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t lo, hi;
        if (is_integer(L)) {
            span(M, t, nt, &lo, &hi);
            q_input_rows(L, x, in, lo, hi);
            #pragma omp barrier
        }
        span(L->n, t, nt, &lo, &hi);
        linear_rows_from(L, x, &in, M, y, L->n, 0, NULL, lo, hi);
    }
}

/* Tasks [lo, hi) of the LoRA down-projections of the layers in lins (sharing input x): xa = (x A^T) * mask. */
static void lora_in(const Lin *const *lins, int count, const float *x, int64_t M, const float *mask,
                    int64_t rank, float *xa, int t, int nt) {
    int64_t total = count * M * rank, lo, hi;
    span(total, t, nt, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) {
        int64_t which = i / (M * rank), m = i / rank % M, j = i % rank;
        const Lin *L = lins[which];
        float *dst = xa + (which * M + m) * rank + j;
        const float w = mask[m * rank + j];  /* 1, or a row's share of a mix of adapters (top-2 routing) */
        *dst = L->lora_a && w != 0.0f ? w * dot(L->lora_a + j * L->k, x + m * L->k, L->k) : 0.0f;
    }
}

/* The LoRA inputs of the layers in lins, when a row uses an adapter on any of them; then all threads meet. */
static void lora_phase(const Lin *const *lins, int count, const float *x, int64_t M, const float *mask,
                       int64_t rank, float *xa, int t, int nt, Barrier *bar) {
    int any = 0;
    for (int i = 0; i < count; i++)
        any |= lins[i]->lora_a != NULL;
    if (!mask || !any)
        return;
    lora_in(lins, count, x, M, mask, rank, xa, t, nt);
    barrier_wait(bar, nt);
}

static void rmsnorm(float *out, const float *x, const float *w, int64_t d, float eps) {
    float ss = 0.0f;
    for (int64_t i = 0; i < d; i++)
        ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / (float)d + eps);
    for (int64_t i = 0; i < d; i++)
        out[i] = x[i] * r * w[i];
}

/* RMSNorm of the M rows of x into out, the rows shared between the threads; then all threads meet. */
static void norm_rows(float *out, const float *x, const float *w, int64_t M, int64_t d, float eps, int t, int nt,
                      Barrier *bar) {
    int64_t lo, hi;
    span(M, t, nt, &lo, &hi);
    for (int64_t r = lo; r < hi; r++)
        rmsnorm(out + r * d, x + r * d, w, d, eps);
    barrier_wait(bar, nt);
}

/* Rotary embedding in the rotate-half layout (pairs i and i + d/2), as the model's apply_rope. */
static void rope(float *x, const float *c, const float *s, int64_t half) {
    for (int64_t i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * c[i] - b * s[i];
        x[i + half] = b * c[i] + a * s[i];
    }
}

/* exp(x) for 8 floats: 2^n * p(r) with x = n ln2 + r, |r| <= ln2/2 (Cephes' expf polynomial, ~1 ulp). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* Where row r keeps the key (or value) of position p of KV head g in one layer's buffer. */
static inline int64_t kv_at(const Cache *c, int64_t r, int64_t g, int64_t p, int64_t hd) {
    return c->table[r * c->table_stride + p / c->block_size] * c->block_stride + g * c->head_stride
           + p % c->block_size * hd;
}

/* 8 fp16 values as fp32 */
static inline __m256 load_h8(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

/* a . b for fp32 a and fp16 b (k a multiple of 16), summed as dot() sums */
static inline float dot_h(const float *a, const uint16_t *b, int64_t k) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load_h8(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load_h8(b + i + 8), s1);
    }
    return hsum(_mm256_add_ps(s0, s1));
}

/* n values (a multiple of 8) to fp16, rounded to nearest even as torch converts them */
static inline void store_h(uint16_t *dst, const float *src, int64_t n) {
    for (int64_t i = 0; i < n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
}

/* scores[t] = q . k[t] * scale for the n contiguous keys of one block (hd a multiple of 16), 8 positions at a time
 * with the 8 dot products reduced together; returns their maximum. */
static float block_scores(const float *q, const uint16_t *kc, int64_t n, int64_t hd, float *scores) {
    const int64_t n8 = n & ~7;
    const float s = 1.0f / sqrtf((float)hd);
    const __m256 scale = _mm256_set1_ps(s);
    __m256 mx = _mm256_set1_ps(-INFINITY);
    for (int64_t t = 0; t < n8; t += 8) {
        __m256 acc[8];
        for (int j = 0; j < 8; j++)
            acc[j] = _mm256_setzero_ps();
        for (int64_t i = 0; i < hd; i += 8) {
            __m256 qv = _mm256_loadu_ps(q + i);
            for (int j = 0; j < 8; j++)
                acc[j] = _mm256_fmadd_ps(qv, load_h8(kc + (t + j) * hd + i), acc[j]);
        }
        /* Reduce the 8 accumulators to one vector of 8 sums: lane j = position t + j. */
        __m256 s01 = _mm256_hadd_ps(acc[0], acc[1]), s23 = _mm256_hadd_ps(acc[2], acc[3]);
        __m256 s45 = _mm256_hadd_ps(acc[4], acc[5]), s67 = _mm256_hadd_ps(acc[6], acc[7]);
        __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
        __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20), hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
        __m256 sc = _mm256_mul_ps(_mm256_add_ps(lo, hi), scale);
        _mm256_storeu_ps(scores + t, sc);
        mx = _mm256_max_ps(mx, sc);
    }
    float m = -INFINITY, lanes[8];
    _mm256_storeu_ps(lanes, mx);
    for (int j = 0; j < 8; j++)
        m = lanes[j] > m ? lanes[j] : m;
    for (int64_t t = n8; t < n; t++) {
        scores[t] = dot_h(q, kc + t * hd, hd) * s;
        m = scores[t] > m ? scores[t] : m;
    }
    return m;
}

/* o[j] = sum over positions t < n of scores[t] * v[t][i + 8j .. i + 8j + 7], for j < lanes (always inlined: a constant
 * count keeps the accumulators in registers). */
static inline __attribute__((always_inline)) void weigh_values(const uint16_t *v, const Cache *c, int64_t r,
                                                               int64_t g, int64_t i, int64_t n, int64_t hd,
                                                               const float *scores, __m256 *o, int lanes) {
    for (int j = 0; j < lanes; j++)
        o[j] = _mm256_setzero_ps();
    for (int64_t t0 = 0; t0 < n; t0 += c->block_size) {
        const uint16_t *vc = v + kv_at(c, r, g, t0, hd) + i;
        const int64_t len = n - t0 < c->block_size ? n - t0 : c->block_size;
        for (int64_t t = 0; t < len; t++) {
            const __m256 p = _mm256_set1_ps(scores[t0 + t]);
            for (int j = 0; j < lanes; j++)
                o[j] = _mm256_fmadd_ps(p, load_h8(vc + t * hd + 8 * j), o[j]);
        }
    }
}

/* Query head q of row r over positions 0..pos of its KV head g, block by block. */
static void attend(const float *q, const Cache *c, int64_t l, int64_t r, int64_t g, int64_t pos, int64_t hd,
                   float *scores, float *out) {
    const int64_t n = pos + 1, n8 = n & ~7, bs = c->block_size;
    float m = -INFINITY;
    for (int64_t t0 = 0; t0 < n; t0 += bs) {
        float bm = block_scores(q, c->k[l] + kv_at(c, r, g, t0, hd), n - t0 < bs ? n - t0 : bs, hd, scores + t0);
        m = bm > m ? bm : m;
    }
    __m256 sum = _mm256_setzero_ps(), mv = _mm256_set1_ps(m);
    for (int64_t t = 0; t < n8; t += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + t), mv));
        _mm256_storeu_ps(scores + t, e);
        sum = _mm256_add_ps(sum, e);
    }
    float total = hsum(sum);
    for (int64_t t = n8; t < n; t++) {
        scores[t] = expf(scores[t] - m);
        total += scores[t];
    }
    /* The values' weighted sum, 64 components at a time: each position's row across 8 accumulators, so the sums of
     * a long context are 8 independent chains rather than 2 (each component still sums the positions in order). */
    const __m256 inv = _mm256_set1_ps(1.0f / total);
    for (int64_t i = 0; i < hd; i += 64) {
        __m256 o[8];
        if (hd - i >= 64)
            weigh_values(c->v[l], c, r, g, i, n, hd, scores, o, 8);
        else
            weigh_values(c->v[l], c, r, g, i, n, hd, scores, o, (int)(hd - i) / 8);
        for (int j = 0; j < 8 && i + 8 * j < hd; j++)
            _mm256_storeu_ps(out + i + 8 * j, _mm256_mul_ps(o[j], inv));
    }
}

/* Row t of a table (a Lin whose row t is token t's vector), in fp32. */
static void table_row(const Lin *E, int64_t t, float *out) {
    const int64_t k = E->k, groups = E->kind == LIN_INT4 || E->kind == LIN_Q8 ? k / E->group : 0;
    if (E->kind == LIN_F32) {
        memcpy(out, (const float *)E->w + t * k, k * sizeof(float));
    } else if (E->kind == LIN_INT8) {
        const int8_t *q = (const int8_t *)E->w + t * k;
        for (int64_t i = 0; i < k; i++)
            out[i] = (float)q[i] * ((const float *)E->scale)[t];
    } else {
        const int half = (int)E->half;
        const void *sc = scales_from(E->scale, t * groups, half), *zp = scales_from(E->zero, t * groups, half);
        for (int64_t g = 0; g < groups; g++)
            for (int64_t i = g * E->group; i < (g + 1) * E->group; i++) {
                const uint8_t byte = ((const uint8_t *)E->w)[(t * k + i) / 2];
                const float q = E->kind == LIN_Q8 ? (float)((const int8_t *)E->w)[t * k + i]
                                                  : (float)(byte >> (i & 1 ? 0 : 4) & 0x0F);
                out[i] = q * scale_at(sc, g, half) + (zp ? scale_at(zp, g, half) : 0.0f);
            }
    }
}

/* One new token in each of M rows, row m at position pos[m]: its keys and values are written into the cache, and
 * the logits of rows logits_from..M-1 into logits [M - logits_from, vocab] (a prompt's rows want none, or only the
 * last's). Every row's keys and values are stored before any row attends, so rows may be consecutive positions of
 * one sequence: a prompt, computed as decoding it token by token would. mask: [M, lora_rank], which adapter columns
 * each row uses (NULL: none). */
void decode_step(const Model *m, const Scratch *s, const Cache *c, const int64_t *tokens, const int64_t *pos,
                 int64_t M, const float *mask, float *logits, int64_t logits_from, int nthreads) {
    const int64_t D = m->dim, F = m->hidden, hd = m->head_dim, half = hd / 2, R = m->lora_rank;
    const int64_t qn = m->n_heads * hd, kvn = m->n_kv_heads * hd, group = m->n_heads / m->n_kv_heads;
    Barrier bar = {0, 0};
    int64_t cols[2 * MAX_ROWS];  /* each row's adapter columns, where its mask is non-zero */
    for (int64_t r = 0; mask && r < M; r++) {
        int64_t first = R, last = 0;
        for (int64_t j = 0; j < R; j++)
            if (mask[r * R + j] != 0.0f) {
                first = j < first ? j : first;
                last = j + 1;
            }
        cols[2 * r] = first < last ? first : 0;
        cols[2 * r + 1] = last;
    }
    LoraIn li[7];  /* q, k, v, o, gate, up, down */
    for (int i = 0; i < 7; i++)
        li[i] = (LoraIn){s->xa + i * M * R, R, cols};
#define LORA(i) (mask ? &li[i] : NULL)

    #pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t lo, hi;
        float *scores = s->scores + t * s->scores_len, *work = s->work + t * s->work_len;

        span(M, t, nt, &lo, &hi);
        for (int64_t r = lo; r < hi; r++) {
            table_row(&m->embed, tokens[r], s->x + r * D);
            for (int64_t i = 0; i < half; i++) {
                float a = (float)pos[r] * m->inv_freq[i];
                s->cos[r * half + i] = cosf(a);
                s->sin[r * half + i] = sinf(a);
            }
        }
        barrier_wait(&bar, nt);

        for (int64_t l = 0; l < m->n_layers; l++) {
            const Layer *L = &m->layers[l];
            float *xa = s->xa;  /* [7 layers' worth, M, R]: q, k, v, o, gate, up, down */
            const int64_t xs = M * R;

            norm_rows(s->xn, s->x, L->attn_norm, M, D, m->eps, t, nt, &bar);
            const Lin *qkv[3] = {&L->q, &L->k, &L->v}, *o[1] = {&L->o}, *gu[2] = {&L->gate, &L->up};
            const Lin *down[1] = {&L->down};
            lora_phase(qkv, 3, s->xn, M, mask, R, xa, t, nt, &bar);

            /* q, k and v as one range of output rows, so the threads get equal shares. */
            span(qn + 2 * kvn, t, nt, &lo, &hi);
            float *outs[3] = {s->q, s->k, s->v};
            int64_t base = 0;
            for (int i = 0; i < 3; i++) {
                int64_t n = qkv[i]->n, a = lo - base, b = hi - base;
                a = a < 0 ? 0 : a;
                b = b > n ? n : b;
                if (a < b)
                    linear_rows(qkv[i], s->xn, M, outs[i], n, 0, LORA(i), work, a, b);
                base += n;
            }
            barrier_wait(&bar, nt);

            /* Rotate and store each row's new keys and values, then attend: one task per (row, query head). */
            span(M * m->n_kv_heads, t, nt, &lo, &hi);
            for (int64_t task = lo; task < hi; task++) {
                int64_t r = task / m->n_kv_heads, g = task % m->n_kv_heads;
                float *kr = s->k + r * kvn + g * hd;
                rope(kr, s->cos + r * half, s->sin + r * half, half);
                store_h(c->k[l] + kv_at(c, r, g, pos[r], hd), kr, hd);
                store_h(c->v[l] + kv_at(c, r, g, pos[r], hd), s->v + r * kvn + g * hd, hd);
            }
            barrier_wait(&bar, nt);
            span(M * m->n_heads, t, nt, &lo, &hi);
            for (int64_t task = lo; task < hi; task++) {
                int64_t r = task / m->n_heads, h = task % m->n_heads;
                float *qh = s->q + r * qn + h * hd;
                rope(qh, s->cos + r * half, s->sin + r * half, half);
                attend(qh, c, l, r, h / group, pos[r], hd, scores, s->att + r * qn + h * hd);
            }
            barrier_wait(&bar, nt);
            lora_phase(o, 1, s->att, M, mask, R, xa + 3 * xs, t, nt, &bar);

            span(D, t, nt, &lo, &hi);
            linear_rows(&L->o, s->att, M, s->x, D, 1, LORA(3), work, lo, hi);
            barrier_wait(&bar, nt);

            norm_rows(s->xn, s->x, L->mlp_norm, M, D, m->eps, t, nt, &bar);
            lora_phase(gu, 2, s->xn, M, mask, R, xa + 4 * xs, t, nt, &bar);

            span(F, t, nt, &lo, &hi);
            linear_rows(&L->gate, s->xn, M, s->gate, F, 0, LORA(4), work, lo, hi);
            linear_rows(&L->up, s->xn, M, s->up, F, 0, LORA(5), work, lo, hi);
            for (int64_t r = 0; r < M; r++)
                for (int64_t n = lo; n < hi; n++) {
                    float g = s->gate[r * F + n];
                    s->gate[r * F + n] = g / (1.0f + expf(-g)) * s->up[r * F + n];
                }
            barrier_wait(&bar, nt);
            lora_phase(down, 1, s->gate, M, mask, R, xa + 6 * xs, t, nt, &bar);

            span(D, t, nt, &lo, &hi);
            linear_rows(&L->down, s->gate, M, s->x, D, 1, LORA(6), work, lo, hi);
            barrier_wait(&bar, nt);
        }

        if (logits_from < M) {
            const int64_t L0 = logits_from * D;
            norm_rows(s->xn + L0, s->x + L0, m->norm, M - logits_from, D, m->eps, t, nt, &bar);
            span(m->vocab, t, nt, &lo, &hi);
            linear_rows(&m->head, s->xn + L0, M - logits_from, logits, m->vocab, 0, NULL, work, lo, hi);
        }
    }
}

/* Sum of n floats read by nthreads threads, each streaming its own slice: the memory's read speed, which bounds
 * decoding (benchmarks/decode.py divides by it). */
float stream_sum(const float *a, int64_t n, int nthreads) {
    float total = 0.0f;
    #pragma omp parallel num_threads(nthreads) reduction(+ : total)
    {
        int64_t lo, hi;
        span(n / 32, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (int64_t i = lo * 32; i < hi * 32; i += 32) {
            s0 = _mm256_add_ps(s0, _mm256_loadu_ps(a + i));
            s1 = _mm256_add_ps(s1, _mm256_loadu_ps(a + i + 8));
            s2 = _mm256_add_ps(s2, _mm256_loadu_ps(a + i + 16));
            s3 = _mm256_add_ps(s3, _mm256_loadu_ps(a + i + 24));
        }
        total += hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    }
    return total;
}

/* Per-token int8 activations on a tensor-wide quantizer (rag/embed.py's Int8Linear): each row x of [M, K] is
 * mapped onto [0, 1] by its own range, u = (x - lo) / r, so one scale for the whole of u is every row's own. */
void rows_unit(const float *x, int64_t M, int64_t K, float *u, float *lo, float *r) {
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < M; i++) {
        const float *xi = x + i * K;
        float *ui = u + i * K;
        int64_t k = 0;
        __m256 mn = _mm256_set1_ps(INFINITY), mx = _mm256_set1_ps(-INFINITY);
        for (; k + 8 <= K; k += 8) {
            __m256 v = _mm256_loadu_ps(xi + k);
            mn = _mm256_min_ps(mn, v);
            mx = _mm256_max_ps(mx, v);
        }
        float tmn[8], tmx[8], a = INFINITY, b = -INFINITY;
        _mm256_storeu_ps(tmn, mn);
        _mm256_storeu_ps(tmx, mx);
        for (int j = 0; j < 8; j++) {
            a = fminf(a, tmn[j]);
            b = fmaxf(b, tmx[j]);
        }
        for (; k < K; k++) {
            a = fminf(a, xi[k]);
            b = fmaxf(b, xi[k]);
        }
        float range = fmaxf(b - a, 1e-12f), inv = 1.0f / range;
        lo[i] = a;
        r[i] = range;
        __m256 va = _mm256_set1_ps(a), vi = _mm256_set1_ps(inv);
        for (k = 0; k + 8 <= K; k += 8)
            _mm256_storeu_ps(ui + k, _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xi + k), va), vi));
        for (; k < K; k++)
            ui[k] = (xi[k] - a) * inv;
    }
}

/* erf for 8 floats: Abramowitz & Stegun 7.1.26, absolute error below 1.5e-7. */
static inline __m256 erf8(__m256 x) {
    const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0f));
    const __m256 z = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
    const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), z,
                                                                           _mm256_set1_ps(1.0f)));
    __m256 p = _mm256_set1_ps(1.061405429f);
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
    p = _mm256_mul_ps(p, t);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(z, z)));
    return _mm256_or_ps(_mm256_fnmadd_ps(p, e, _mm256_set1_ps(1.0f)), sign);
}

/* The other half of rows_unit: y = r * (W u) + lo * W.sum(1) + bias for each row of [M, N], in place, then the
 * exact (erf) GELU where asked. */
void rows_affine(float *y, int64_t M, int64_t N, const float *lo, const float *r, const float *row_sums,
                 const float *bias, int gelu) {
    const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f), rsqrt2 = _mm256_set1_ps(0.70710678f);
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < M; i++) {
        float *yi = y + i * N;
        const __m256 vr = _mm256_set1_ps(r[i]), vl = _mm256_set1_ps(lo[i]);
        int64_t n = 0;
        for (; n + 8 <= N; n += 8) {
            __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(yi + n), vr,
                                       _mm256_fmadd_ps(vl, _mm256_loadu_ps(row_sums + n), _mm256_loadu_ps(bias + n)));
            if (gelu)
                v = _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, erf8(_mm256_mul_ps(v, rsqrt2))));
            _mm256_storeu_ps(yi + n, v);
        }
        for (; n < N; n++) {
            float v = yi[n] * r[i] + lo[i] * row_sums[n] + bias[n];
            yi[n] = gelu ? 0.5f * v * (1.0f + erff(v * 0.70710678f)) : v;
        }
    }
}

typedef struct {
    const char *name;
    int64_t value;
} AbiEntry;

#define CONSTANT(c) {#c, c}
#define SIZE(S) {#S, sizeof(S)}
#define FIELD(S, f) {#S "." #f, offsetof(S, f)}

static const AbiEntry abi[] = {
    CONSTANT(MAX_ROWS), CONSTANT(LIN_F32), CONSTANT(LIN_INT8), CONSTANT(LIN_INT4), CONSTANT(LIN_Q8),
    CONSTANT(LIN_F32_BLOCK), CONSTANT(LIN_INT8_BLOCK), CONSTANT(LIN_INT4_BLOCK), CONSTANT(LIN_Q8_BLOCK),
    CONSTANT(HEAD_DIM_BLOCK), CONSTANT(ISA_AVX512),
    SIZE(Lin), FIELD(Lin, kind), FIELD(Lin, w), FIELD(Lin, scale), FIELD(Lin, zero), FIELD(Lin, in_scale),
    FIELD(Lin, group), FIELD(Lin, half), FIELD(Lin, bias), FIELD(Lin, lora_a), FIELD(Lin, lora_b), FIELD(Lin, n),
    FIELD(Lin, k), FIELD(Lin, zero_m8),
    SIZE(Layer), FIELD(Layer, attn_norm), FIELD(Layer, mlp_norm), FIELD(Layer, q), FIELD(Layer, k), FIELD(Layer, v),
    FIELD(Layer, o), FIELD(Layer, gate), FIELD(Layer, up), FIELD(Layer, down),
    SIZE(Model), FIELD(Model, n_layers), FIELD(Model, dim), FIELD(Model, hidden), FIELD(Model, n_heads),
    FIELD(Model, n_kv_heads), FIELD(Model, head_dim), FIELD(Model, vocab), FIELD(Model, lora_rank),
    FIELD(Model, eps), FIELD(Model, inv_freq), FIELD(Model, embed), FIELD(Model, norm), FIELD(Model, head),
    FIELD(Model, layers),
    SIZE(Scratch), FIELD(Scratch, x), FIELD(Scratch, xn), FIELD(Scratch, q), FIELD(Scratch, k), FIELD(Scratch, v),
    FIELD(Scratch, att), FIELD(Scratch, gate), FIELD(Scratch, up), FIELD(Scratch, xa), FIELD(Scratch, cos),
    FIELD(Scratch, sin), FIELD(Scratch, scores), FIELD(Scratch, work), FIELD(Scratch, scores_len),
    FIELD(Scratch, work_len),
    SIZE(Cache), FIELD(Cache, k), FIELD(Cache, v), FIELD(Cache, table), FIELD(Cache, table_stride),
    FIELD(Cache, block_size), FIELD(Cache, block_stride), FIELD(Cache, head_stride),
    {NULL, 0},
};

/* The table above: name and value pairs, ending with a NULL name (native.abi() reads it). */
const AbiEntry *fw_abi(void) { return abi; }
