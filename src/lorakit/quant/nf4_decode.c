/* NF4 decode for lorakit.quant.native: out[i] = table[code_i] * scale[i / blocksize] in fp32, stored as fp32 or
 * as bf16 rounded to nearest even, NaN as 0xffff: the bits of torch's vectorized .to(torch.bfloat16).
 * Codes are packed two per byte, high nibble first (bitsandbytes' layout). Bit-exact with
 * lorakit.quant.nf4.dequantize_nf4; tested in tests/quant/test_native.py.
 *
 * With AVX-512F: 16 packed bytes -> 32 weights per step: zero-extend the bytes to 16 int32 lanes, split the
 * nibbles, look both up in the 16-entry table held in one register (vpermps), interleave high/low, multiply
 * by the block's scale, round/store. Elsewhere (and for the tail) a scalar loop does the same maths. */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline uint16_t bf16_rne(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0xffff; /* NaN, as torch's vectorized conversion writes it */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static void decode_scalar(const uint8_t *packed, const float *scales, const float *table, void *out,
                          int64_t lo_byte, int64_t hi_byte, int64_t blocksize, int bf16) {
    for (int64_t k = lo_byte; k < hi_byte; k++) {
        float w0 = table[packed[k] >> 4] * scales[(2 * k) / blocksize];
        float w1 = table[packed[k] & 15] * scales[(2 * k + 1) / blocksize];
        if (bf16) {
            ((uint16_t *)out)[2 * k] = bf16_rne(w0);
            ((uint16_t *)out)[2 * k + 1] = bf16_rne(w1);
        } else {
            ((float *)out)[2 * k] = w0;
            ((float *)out)[2 * k + 1] = w1;
        }
    }
}

#if defined(__AVX512F__)
static inline __m256i bf16_rne16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i rounded = _mm512_srli_epi32(
        _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                             _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)))), 16);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0xffff)));
}

/* bytes [lo, hi): lo and hi multiples of 16, blocksize a multiple of 32 (a 16-byte step stays in one block) */
static void decode_avx512(const uint8_t *packed, const float *scales, const float *table, void *out,
                          int64_t lo, int64_t hi, int64_t blocksize, int bf16) {
    const __m512 tab = _mm512_loadu_ps(table);
    const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    const __m512i low4 = _mm512_set1_epi32(15);
    for (int64_t k = lo; k < hi; k += 16) {
        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(packed + k)));
        __m512 vhi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), tab);
        __m512 vlo = _mm512_permutexvar_ps(_mm512_and_si512(b, low4), tab);
        __m512 s = _mm512_set1_ps(scales[(2 * k) / blocksize]);
        __m512 v0 = _mm512_mul_ps(_mm512_permutex2var_ps(vhi, first, vlo), s);
        __m512 v1 = _mm512_mul_ps(_mm512_permutex2var_ps(vhi, second, vlo), s);
        if (bf16) {
            uint16_t *o = (uint16_t *)out + 2 * k;
            _mm256_storeu_si256((__m256i *)o, bf16_rne16(v0));
            _mm256_storeu_si256((__m256i *)(o + 16), bf16_rne16(v1));
        } else {
            float *o = (float *)out + 2 * k;
            _mm512_storeu_ps(o, v0);
            _mm512_storeu_ps(o + 16, v1);
        }
    }
}
#endif

/* n_bytes packed bytes (2 * n_bytes weights) with `threads` OpenMP threads (1: none started) */
void lorakit_nf4_decode(const uint8_t *packed, const float *scales, const float *table, void *out, int64_t n_bytes,
                        int64_t blocksize, int bf16, int threads) {
    const int64_t chunk = 1 << 16; /* bytes per task (128K weights), a multiple of 16 */
    const int64_t tasks = (n_bytes + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && tasks > 1)
    for (int64_t t = 0; t < tasks; t++) {
        int64_t lo = t * chunk, hi = lo + chunk < n_bytes ? lo + chunk : n_bytes, mid = lo;
#if defined(__AVX512F__)
        if (blocksize % 32 == 0) {
            mid = lo + (hi - lo) / 16 * 16;
            decode_avx512(packed, scales, table, out, lo, mid, blocksize, bf16);
        }
#endif
        decode_scalar(packed, scales, table, out, mid, hi, blocksize, bf16);
    }
}

int lorakit_nf4_decode_vectorized(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}
