/* Native CPU codec of diffq-triton: bitstreams (docs/format.md) fused with quantization.
 *
 * Built at first use by diffq_triton/native.py with the system C compiler and called
 * through ctypes, which releases the GIL: Python threads run the pieces of one tensor in
 * parallel. Every function works on the entries [e0, e1) of one tensor, e0 the first entry
 * of a group (or of the tensor's single group), starting at stream bit bit0 = the sum of
 * the widths of the entries before e0. Bytes wholly inside a piece are stored; the two
 * bytes a piece may share with its neighbours are OR-ed atomically, so the caller zeroes
 * them first.
 *
 * Float arithmetic is the reference's, operation for operation and in float32: compile
 * without -ffast-math and with -ffp-contract=off, so that the levels and the weights come
 * out bit-identical to diffq_triton.reference.
 */
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSION
#endif

/* Eight float32 or int32 lanes: one AVX register (two SSE ones), whatever the target. */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

/* Entries per block: the widths, units and levels of a block stay in L1. */
#define BLOCK 1024

typedef struct {
    uint8_t *out;
    int64_t pos;     /* byte of out where acc's bit 0 lands */
    uint64_t acc;    /* pending bits, least significant first */
    int nacc;        /* number of pending bits (< 32 between entries) */
    int shared_head; /* the byte at pos is shared with the previous piece */
} writer;

static inline void put_byte(writer *w, int64_t at, uint8_t v, int shared) {
    if (shared)
        __atomic_fetch_or(w->out + at, v, __ATOMIC_RELAXED);
    else
        w->out[at] = v;
}

static inline void flush32(writer *w) {
    uint32_t v = (uint32_t)w->acc;
    if (__builtin_expect(w->shared_head, 0)) {
        put_byte(w, w->pos, (uint8_t)v, 1);
        put_byte(w, w->pos + 1, (uint8_t)(v >> 8), 0);
        put_byte(w, w->pos + 2, (uint8_t)(v >> 16), 0);
        put_byte(w, w->pos + 3, (uint8_t)(v >> 24), 0);
        w->shared_head = 0;
    } else {
        memcpy(w->out + w->pos, &v, 4);
    }
    w->pos += 4;
    w->acc >>= 32;
    w->nacc -= 32;
}

/* A row of 8 levels of one width b is b whole bytes: four levels make the low 4b bits (one
 * 64-bit word), four the high ones, stored at byte b/2 shifted by the odd nibble. The two
 * 8-byte stores reach 15 bytes past `at`: callers keep them inside their own bytes. */
static inline void store_row(uint8_t *out, int64_t at, const uint64_t *q, unsigned b) {
    uint64_t lo = q[0] | q[1] << b | q[2] << 2 * b | q[3] << 3 * b;
    uint64_t hi = q[4] | q[5] << b | q[6] << 2 * b | q[7] << 3 * b;
    uint64_t top = (lo >> (8 * (b >> 1))) | hi << (4 * (b & 1));
    memcpy(out + at, &lo, 8);
    memcpy(out + at + (b >> 1), &top, 8);
}

/* Append the levels q (widths wb) of one block. Bytes below `limit` belong to this piece
 * alone: while they are far enough ahead, every entry stores the low 32 pending bits
 * unconditionally and advances by 0 or 4 bytes, which has no branch to mispredict (the
 * flush pattern follows the widths); bytes stored early are stored again, complete,
 * later. Near the shared bytes the careful path runs. */
static inline void pack_block(writer *w, const uint16_t *q, const uint8_t *wb, int64_t len,
                              int64_t limit, int rows) {
    int64_t j = 0;
    if (rows && w->nacc == 0 && !w->shared_head) {
        /* Whole rows: no dependency from row to row but the output position. */
        int64_t at = w->pos;
        for (; j + 8 <= len && at + 16 <= limit; j += 8) {
            uint64_t row[8];
            for (int k = 0; k < 8; k++) row[k] = q[j + k];
            store_row(w->out, at, row, wb[j]);
            at += wb[j];
        }
        w->pos = at;
    }
    for (; j < len && w->shared_head; j++) {
        w->acc |= (uint64_t)q[j] << w->nacc;
        w->nacc += wb[j];
        if (w->nacc >= 32) flush32(w);
    }
    /* An entry adds at most 15 bits: fewer than 2 bytes. */
    if (w->pos + 2 * (len - j) + 8 <= limit) {
        uint64_t acc = w->acc;
        int nacc = w->nacc;
        uint8_t *p = w->out + w->pos;
        for (; j < len; j++) {
            acc |= (uint64_t)q[j] << nacc;
            nacc += wb[j];
            uint32_t v = (uint32_t)acc;
            memcpy(p, &v, 4);
            int full = nacc >> 5;
            p += full << 2;
            acc >>= full << 5;
            nacc -= full << 5;
        }
        w->acc = acc;
        w->nacc = nacc;
        w->pos = p - w->out;
        return;
    }
    for (; j < len; j++) {
        w->acc |= (uint64_t)q[j] << w->nacc;
        w->nacc += wb[j];
        if (w->nacc >= 32) flush32(w);
    }
}

static void writer_finish(writer *w) {
    int nbytes = (w->nacc + 7) / 8;
    for (int k = 0; k < nbytes; k++) {
        int shared = (k == 0 && w->shared_head) || (k == nbytes - 1 && (w->nacc & 7));
        put_byte(w, w->pos + k, (uint8_t)(w->acc >> (8 * k)), shared);
    }
}

static inline void writer_init(writer *w, uint8_t *out, int64_t bit0) {
    w->out = out;
    w->pos = bit0 >> 3;
    w->acc = 0;
    w->nacc = (int)(bit0 & 7);
    w->shared_head = w->nacc != 0;
}

/* Widths (and units when wanted) of entries [e, e + len) into wb / ub; (g, left) walk the
 * groups: g the group of entry e, left the entries of g from e on. */
static inline void fill_widths(const uint8_t *bits, int64_t gs, int64_t *g, int64_t *left,
                               int64_t len, uint8_t *wb, const float *unit, float *ub) {
    int64_t j = 0;
    while (j < len) {
        int64_t k = *left < len - j ? *left : len - j;
        uint8_t b = bits[*g];
        /* Groups are often a few entries: a libc memset call per group cost more than the
         * stores (a tenth of the unpack time at group size 8). */
        for (int64_t i = 0; i < k; i++) wb[j + i] = b;
        if (ub) {
            float u = unit[b];
            for (int64_t i = 0; i < k; i++) ub[j + i] = u;
        }
        j += k;
        *left -= k;
        if (*left == 0) {
            (*g)++;
            *left = gs;
        }
    }
}

static inline void start_group(int64_t e0, int64_t gs, int64_t *g, int64_t *left) {
    *g = e0 / gs;
    *left = gs - e0 % gs;
}

MULTIVERSION
static void quantize_block(const float *x, const float *ub, int64_t len, float mn, float safe,
                           uint16_t *q) {
    for (int64_t j = 0; j < len; j++) {
        float t = (x[j] - mn) / safe;
        t = t / ub[j];
        /* Round half to even, as torch.round, for 0 <= t < 2^23: under the default
         * rounding mode, adding and removing 2^23 leaves the nearest integer, ties even. */
        t = (t + 8388608.0f) - 8388608.0f;
        q[j] = (uint16_t)t;
    }
}

/* The rows fast path of dq_quantize_pack, from byte `*at` on: whole rows of 8 entries of one
 * group go from the weights to their b bytes with no staging, while the stores stay below
 * `limit`. Advances the group walk and *at; returns the next entry. */
MULTIVERSION
static int64_t quantize_pack_rows(const float *w, int64_t e, int64_t e1, int64_t gs,
                                  const uint8_t *bits, const float *unit, float mn, float safe,
                                  uint8_t *out, int64_t *at, int64_t limit, int64_t *g,
                                  int64_t *left) {
    while (e + 8 <= e1 && *left >= 8) {
        const unsigned b = bits[*g];
        const float u = unit[b];
        int64_t n = *left < e1 - e ? *left : e1 - e;
        int64_t stop = e + n / 8 * 8;
        for (; e < stop; e += 8) {
            if (*at + 16 > limit) return e;
            v8f t;
            memcpy(&t, w + e, sizeof t);
            t = (t - mn) / safe;
            t = t / u;
            t = (t + 8388608.0f) - 8388608.0f; /* half to even, as in quantize_block */
            v8i qi = __builtin_convertvector(t, v8i);
            uint64_t q[8];
            for (int j = 0; j < 8; j++) q[j] = (uint32_t)qi[j];
            store_row(out, *at, q, b);
            *at += b;
            *left -= 8;
        }
        if (*left != 0) break;
        (*g)++;
        *left = gs;
    }
    return e;
}

/* Quantize float32 weights w (reference.quantize: round(((w - mn)/safe)/unit[b])) and pack
 * the levels of entries [e0, e1). */
void dq_quantize_pack(const float *w, int64_t e0, int64_t e1, int64_t gs, const uint8_t *bits,
                      const float *unit, float mn, float safe, uint8_t *out, int64_t bit0,
                      int64_t bit1, int rows) {
    int64_t limit = bit1 >> 3;
    uint8_t wb[BLOCK];
    float ub[BLOCK];
    uint16_t q[BLOCK];
    int64_t g, left, e = e0;
    writer wr;
    start_group(e0, gs, &g, &left);
    writer_init(&wr, out, bit0);
    if (rows && (bit0 & 7) == 0)
        e = quantize_pack_rows(w, e0, e1, gs, bits, unit, mn, safe, out, &wr.pos, limit, &g,
                               &left);
    for (; e < e1; e += BLOCK) {
        int64_t len = e1 - e < BLOCK ? e1 - e : BLOCK;
        fill_widths(bits, gs, &g, &left, len, wb, unit, ub);
        quantize_block(w + e, ub, len, mn, safe, q);
        pack_block(&wr, q, wb, len, limit, rows);
    }
    writer_finish(&wr);
}

/* Pack integer levels x + add of entries [e0, e1). Returns the number of levels outside
 * [0, 2^b) (nothing meaningful is written then). */
#define DEFINE_PACK(NAME, T)                                                                 \
    /* Levels x + add of one block, masked to their widths, and how many did not fit. */    \
    MULTIVERSION                                                                             \
    static int32_t NAME##_levels(const T *x, int32_t add, const uint8_t *wb, int64_t len,  \
                                 uint16_t *q) {                                              \
        int32_t bad = 0;                                                                     \
        for (int64_t j = 0; j < len; j++) {                                                  \
            uint32_t v = (uint32_t)((int32_t)x[j] + add), w = wb[j];                         \
            bad += (v >> w) != 0;                                                            \
            q[j] = (uint16_t)(v & ((1u << w) - 1));                                          \
        }                                                                                    \
        return bad;                                                                          \
    }                                                                                        \
                                                                                             \
    int64_t NAME(const T *x, int64_t e0, int64_t e1, int64_t gs, const uint8_t *bits,       \
                 int32_t add, uint8_t *out, int64_t bit0, int64_t bit1, int rows) {          \
        uint8_t wb[BLOCK];                                                                   \
        uint16_t q[BLOCK];                                                                   \
        int64_t g, left, bad = 0;                                                            \
        writer wr;                                                                           \
        start_group(e0, gs, &g, &left);                                                      \
        writer_init(&wr, out, bit0);                                                         \
        for (int64_t e = e0; e < e1; e += BLOCK) {                                           \
            int64_t len = e1 - e < BLOCK ? e1 - e : BLOCK;                                   \
            fill_widths(bits, gs, &g, &left, len, wb, 0, 0);                                 \
            bad += NAME##_levels(x + e, add, wb, len, q);                                    \
            pack_block(&wr, q, wb, len, bit1 >> 3, rows);                                    \
        }                                                                                    \
        writer_finish(&wr);                                                                  \
        return bad;                                                                          \
    }

DEFINE_PACK(dq_pack_i16, int16_t)
DEFINE_PACK(dq_pack_u8, uint8_t)

/* Levels of entries [e0, e0 + len) from a stream of nbytes bytes. */
static inline void read_block(const uint8_t *in, int64_t nbytes, int64_t *bitpos,
                              const uint8_t *wb, int64_t len, uint16_t *q) {
    int64_t pos = *bitpos;
    int64_t j = 0;
    for (; j < len; j++) {
        int64_t p = pos >> 3;
        uint64_t v = 0;
        if (__builtin_expect(p + 8 <= nbytes, 1))
            memcpy(&v, in + p, 8);
        else
            memcpy(&v, in + p, (size_t)(nbytes - p));
        q[j] = (uint16_t)((v >> (pos & 7)) & ((1u << wb[j]) - 1));
        pos += wb[j];
    }
    *bitpos = pos;
}

/* The rows path of the unpackers, from stream bit *pos (a byte boundary): the levels of
 * whole rows of 8 entries of one group (two 64-bit loads per row) into q, and their units
 * into ub when given, for at most maxlen entries and while the loads stay in the stream.
 * Advances the group walk and *pos; returns the number of entries read (a multiple of 8). */
static inline int64_t read_rows(const uint8_t *in, int64_t nbytes, int64_t *pos,
                                const uint8_t *bits, const float *unit, int64_t gs, int64_t *g,
                                int64_t *left, int64_t maxlen, uint16_t *q, float *ub) {
    int64_t at = *pos >> 3, j = 0;
    while (j + 8 <= maxlen && *left >= 8 && at + 16 <= nbytes) {
        const unsigned b = bits[*g];
        const uint64_t mask = (1u << b) - 1;
        uint64_t lo, top;
        memcpy(&lo, in + at, 8);
        memcpy(&top, in + at + (b >> 1), 8);
        uint64_t hi = top >> (4 * (b & 1));
        for (int k = 0; k < 4; k++) {
            q[j + k] = (uint16_t)((lo >> (k * b)) & mask);
            q[j + 4 + k] = (uint16_t)((hi >> (k * b)) & mask);
        }
        if (ub) {
            const float u = unit[b];
            for (int k = 0; k < 8; k++) ub[j + k] = u;
        }
        at += b;
        j += 8;
        *left -= 8;
        if (*left == 0) {
            (*g)++;
            *left = gs;
        }
    }
    *pos = at * 8;
    return j;
}

MULTIVERSION
static void dequantize_block(const uint16_t *q, const float *ub, int64_t len, float mn,
                             float span, float *o) {
    for (int64_t j = 0; j < len; j++) {
        float t = (float)q[j] * ub[j];
        t = t * span;
        o[j] = t + mn;
    }
}

/* The levels (and units, when ub is given) of the next block of at most `remaining`
 * entries from stream bit *pos: whole rows when they start on a byte, entry by entry
 * otherwise. Advances the group walk and *pos; returns the number of entries read. */
static inline int64_t next_levels(const uint8_t *in, int64_t nbytes, int64_t *pos,
                                  const uint8_t *bits, const float *unit, int64_t gs,
                                  int64_t *g, int64_t *left, int64_t remaining, int rows,
                                  uint8_t *wb, uint16_t *q, float *ub) {
    int64_t len = remaining < BLOCK ? remaining : BLOCK;
    int64_t got = rows && (*pos & 7) == 0
                      ? read_rows(in, nbytes, pos, bits, unit, gs, g, left, len, q, ub)
                      : 0;
    if (got) return got;
    fill_widths(bits, gs, g, left, len, wb, unit, ub);
    read_block(in, nbytes, pos, wb, len, q);
    return len;
}

/* Unpack entries [e0, e1) and dequantize them (reference.dequantize: q·unit[b]·span + mn)
 * into float32 o (indexed by entry). */
/* Whole unpackers multiversioned (their inlined row and block readers too): the AVX2 build
 * decodes in a fifth less time; the packers gained nothing measurable from it. */
MULTIVERSION
void dq_unpack_dequantize(const uint8_t *in, int64_t nbytes, int64_t e0, int64_t e1,
                          int64_t gs, const uint8_t *bits, int64_t bit0, const float *unit,
                          float mn, float span, float *o, int rows) {
    uint8_t wb[BLOCK];
    float ub[BLOCK];
    uint16_t q[BLOCK];
    int64_t g, left, pos = bit0;
    start_group(e0, gs, &g, &left);
    for (int64_t e = e0, len; e < e1; e += len) {
        len = next_levels(in, nbytes, &pos, bits, unit, gs, &g, &left, e1 - e, rows, wb, q, ub);
        dequantize_block(q, ub, len, mn, span, o + e);
    }
}

/* Unpack entries [e0, e1) as int16 levels q - sub into o (indexed by entry). */
MULTIVERSION
void dq_unpack_i16(const uint8_t *in, int64_t nbytes, int64_t e0, int64_t e1, int64_t gs,
                   const uint8_t *bits, int64_t bit0, int32_t sub, int16_t *o, int rows) {
    uint8_t wb[BLOCK];
    uint16_t q[BLOCK];
    int64_t g, left, pos = bit0;
    start_group(e0, gs, &g, &left);
    for (int64_t e = e0, len; e < e1; e += len) {
        len = next_levels(in, nbytes, &pos, bits, 0, gs, &g, &left, e1 - e, rows, wb, q, 0);
        for (int64_t j = 0; j < len; j++) o[e + j] = (int16_t)((int32_t)q[j] - sub);
    }
}

/* Sum of n uint8 values (stream bit offsets of pieces). */
int64_t dq_sum_u8(const uint8_t *x, int64_t n) {
    int64_t s = 0;
    for (int64_t i = 0; i < n; i++) s += x[i];
    return s;
}

/* CRC-32 (zlib's: reflected, polynomial 0xEDB88320) of len bytes, len a multiple of 16 and at
 * least 64, continuing from the finished CRC `crc` (zlib.crc32(data, crc) semantics).
 *
 * Carry-less multiplication folding (Gopal et al., "Fast CRC computation for generic
 * polynomials using PCLMULQDQ", Intel, 2009): four 128-bit lanes are folded forward 64 bytes
 * at a time with x^(512±32) mod P, then into one lane with x^(128±32) mod P, then reduced
 * to 64 and 32 bits and by Barrett reduction. Each constant is x^k mod P(x), bit-reflected;
 * the tests compare with zlib on every length and alignment. Returns 0 and sets *ok = 0
 * where the CPU lacks PCLMULQDQ (the caller then uses zlib). */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

__attribute__((target("pclmul,sse4.1"))) static uint32_t crc32_fold(const uint8_t *p,
                                                                      int64_t len,
                                                                      uint32_t state) {
    const __m128i by4 = _mm_set_epi64x(0x1c6e41596, 0x154442bd4);  /* 512+32, 512-32 */
    const __m128i by1 = _mm_set_epi64x(0x0ccaa009e, 0x1751997d0);  /* 128+32, 128-32 */
    const __m128i to32 = _mm_set_epi64x(0, 0x163cd6124);            /* 64 */
    const __m128i barrett = _mm_set_epi64x(0x1f7011641, 0x1db710641); /* mu, P */
    const __m128i low32 = _mm_setr_epi32(-1, 0, -1, 0);
    __m128i lane[4];
    for (int i = 0; i < 4; i++) lane[i] = _mm_loadu_si128((const __m128i *)(p + 16 * i));
    lane[0] = _mm_xor_si128(lane[0], _mm_cvtsi32_si128((int)state));
    p += 64;
    len -= 64;
    for (; len >= 64; p += 64, len -= 64) {
        for (int i = 0; i < 4; i++) {
            __m128i lo = _mm_clmulepi64_si128(lane[i], by4, 0x00);
            __m128i hi = _mm_clmulepi64_si128(lane[i], by4, 0x11);
            __m128i next = _mm_loadu_si128((const __m128i *)(p + 16 * i));
            lane[i] = _mm_xor_si128(_mm_xor_si128(lo, hi), next);
        }
    }
    __m128i acc = lane[0];
    for (int i = 1; i < 4; i++) {
        __m128i lo = _mm_clmulepi64_si128(acc, by1, 0x00);
        __m128i hi = _mm_clmulepi64_si128(acc, by1, 0x11);
        acc = _mm_xor_si128(_mm_xor_si128(lo, hi), lane[i]);
    }
    for (; len >= 16; p += 16, len -= 16) {
        __m128i lo = _mm_clmulepi64_si128(acc, by1, 0x00);
        __m128i hi = _mm_clmulepi64_si128(acc, by1, 0x11);
        acc = _mm_xor_si128(_mm_xor_si128(lo, hi), _mm_loadu_si128((const __m128i *)p));
    }
    /* 128 -> 64 bits */
    __m128i t = _mm_clmulepi64_si128(acc, by1, 0x10);
    acc = _mm_xor_si128(_mm_srli_si128(acc, 8), t);
    /* 64 -> 32 bits */
    t = _mm_srli_si128(acc, 4);
    acc = _mm_clmulepi64_si128(_mm_and_si128(acc, low32), to32, 0x00);
    acc = _mm_xor_si128(acc, t);
    /* Barrett reduction */
    t = _mm_clmulepi64_si128(_mm_and_si128(acc, low32), barrett, 0x10);
    t = _mm_clmulepi64_si128(_mm_and_si128(t, low32), barrett, 0x00);
    acc = _mm_xor_si128(acc, t);
    return (uint32_t)_mm_extract_epi32(acc, 1);
}

uint32_t dq_crc32(const uint8_t *p, int64_t len, uint32_t crc, int32_t *ok) {
    if (!__builtin_cpu_supports("pclmul") || !__builtin_cpu_supports("sse4.1") || len < 64 ||
        len % 16) {
        *ok = 0;
        return 0;
    }
    *ok = 1;
    return ~crc32_fold(p, len, ~crc);
}
#else
uint32_t dq_crc32(const uint8_t *p, int64_t len, uint32_t crc, int32_t *ok) {
    (void)p, (void)len, (void)crc;
    *ok = 0;
    return 0;
}
#endif
