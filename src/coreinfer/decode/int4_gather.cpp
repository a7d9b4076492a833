// Token-level gathered 4- and 8-bit product on the CPU: y = W[:, keep] @ x_hat[keep], keep = |x| > threshold
// per sequence, reading only the kept inputs' codes. x_hat is the kept x rounded per group of 32 inputs to
// int8 (scale: the group's largest kept |x| / 127), as llama.cpp rounds every activation (Q8_0).
//
// Why integers, and why int8: the first version of this kernel unpacked every code to fp32 and multiplied in
// floats, which cost more than the bytes it saved (token-level decoding at 0.57x dense int4 on SmolLM2). A
// second joined pairs of kept inputs into int16 lanes for vpdpwssd; at two widenings and two interleaves per
// 128 weights it still took twice the dense kernel's time with every input kept. Here four kept inputs
// (a, b, c, d) of one scale group are joined on the fly into the byte quads vpdpbusd multiplies (AVX-512 VNNI;
// vpmaddubsw + vpmaddwd on AVX2): their 32-byte blocks are interleaved bytewise, then by 16-bit words
// (vpunpck{l,h}bw, vpunpck{l,h}wd), so each 32-bit lane holds the four inputs' codes of two outputs (low and
// high nibbles), multiplied by the broadcast word (x_a, x_b, x_c, x_d): 8 shuffles for 512 weights.
//
// Layout (int4_gather.py): per plane, tiles of TB 64-output blocks; a tile is one slab, its rows one per input,
// each row the tile's blocks (32 bytes per block of 4-bit codes, 64 of 8-bit), so a kept input's codes in a
// tile are one contiguous run. Within a block the outputs are permuted so that the interleaving gives them back
// in order: 4-bit output 8v + l (v < 8, l < 8) sits in byte 16(l/4) + 4(v/2) + l%4, nibble v%2; 8-bit output
// 8v + l in byte 32(v/4) + 16(l/4) + 4(v%4) + l%4. Scales and mins (w = s * code + m) are fp16,
// [P, in / group, outp], group 32 or 16 (GGUF's Q6_K).
//
// y[b, r] = sum_p sum_g  s[p,g,r] * step_b * sum_{n in keep_b, g} q[b,n] code[p,n,r]  +  m[p,g,r] * sum_{n in keep_b, g} x_hat[b,n]

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace gather {

constexpr int ROUND = 32;  // inputs per int8 rounding scale
constexpr int BLOCK = 64;  // outputs per block
constexpr int VECS = 8;    // vectors of 8 outputs per block

// One sequence's kept inputs, per weight-scale group, in quads: entries 4e .. 4e + 3 of rows are quad e's
// inputs and bytes 4e .. 4e + 3 of q its int8 values (so its broadcast word is one 32-bit load). A group's
// last quad is filled up with its first input, times 0.
struct Kept {
  std::vector<int32_t> rows;     // [4 * quads]
  std::vector<int8_t> q;         // [4 * quads]
  std::vector<int32_t> start;    // [S + 1]: each scale group's first quad
  std::vector<float> step;       // [S]: x_hat = step * q
  std::vector<float> sum;        // [S]: the group's sum of kept x_hat (the mins' term)
  int64_t count = 0;             // inputs kept
  int32_t word(int32_t e) const {
    int32_t w;
    std::memcpy(&w, q.data() + 4 * e, 4);
    return w;
  }
};

// This runs for every product of every decoded token, before the threads start, so it is branch-free, and
// with AVX-512 takes 16 inputs at a time (vpcompressd to registers; its memory form is slow on Zen 4).
#ifdef __AVX512F__
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {  // bf16 is fp32's high half
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

// Appends the kept ones of 16 inputs from `base` (AVX-512: their int8 values q and keep mask; else values v,
// int8 q and the threshold) to rows and qs, and returns the sum of their q.
struct Appender {
  int32_t* rows;
  int8_t* qs;
  int64_t used = 0;
#ifdef __AVX512F__
  int32_t put16(__m512i q, __mmask16 keep, int32_t base) {
    const __m512i index = _mm512_add_epi32(_mm512_set1_epi32(base), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    _mm512_storeu_si512(rows + used, _mm512_maskz_compress_epi32(keep, index));  // register form: fast on Zen 4
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qs + used), _mm512_cvtepi32_epi8(_mm512_maskz_compress_epi32(keep, q)));
    used += __builtin_popcount(keep);
    return _mm512_mask_reduce_add_epi32(keep, q);
  }
#else
  int32_t put(const float* v, const int32_t* q, float t, int n, int32_t base) {
    int32_t total = 0;
    for (int i = 0; i < n; ++i) {
      const bool keep = std::fabs(v[i]) > t;
      rows[used] = base + i;
      qs[used] = static_cast<int8_t>(q[i]);
      total += keep ? q[i] : 0;
      used += keep;
    }
    return total;
  }
#endif
  void fill(int64_t from) {  // the last quad of a group, with its first input times 0
    for (; used % 4; ++used) {
      rows[used] = rows[from];
      qs[used] = 0;
    }
  }
};

template <typename T>
void select(const T* x, int64_t in, int64_t group, double threshold, Kept& k) {
  const int64_t groups = in / group, rounds = in / ROUND, per_round = ROUND / group;
  k.rows.resize(in + 4 * groups + 16);  // every input, 3 of filling per group, and a vector's overhang
  k.q.resize(in + 4 * groups + 64);
  k.start.resize(groups + 1);
  k.step.resize(groups);
  k.sum.resize(groups);
  const float t = threshold < 0 ? -1.f : static_cast<float>(threshold);
  Appender out{k.rows.data(), k.q.data()};
  int64_t count = 0;
  for (int64_t r = 0; r < rounds; ++r) {
    const int32_t base = static_cast<int32_t>(r * ROUND);
#ifdef __AVX512F__
    const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
    const __m512 v[2] = {load16(x + base), load16(x + base + 16)};
    __m512 a[2];
    __mmask16 keep[2];
    float largest = 0.f;
    for (int h = 0; h < 2; ++h) {
      a[h] = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v[h]), magnitude));
      keep[h] = _mm512_cmp_ps_mask(a[h], _mm512_set1_ps(t), _CMP_GT_OQ);
      largest = std::max(largest, _mm512_reduce_max_ps(_mm512_maskz_mov_ps(keep[h], a[h])));
    }
    const float inverse = largest > 0.f ? 127.f / largest : 0.f, step = largest / 127.f;
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    __m512i q[2];
    for (int h = 0; h < 2; ++h)  // round to nearest even, as std::nearbyint
      q[h] = _mm512_min_epi32(hi, _mm512_max_epi32(lo, _mm512_cvtps_epi32(_mm512_mul_ps(v[h], _mm512_set1_ps(inverse)))));
    auto put = [&](int h) { return out.put16(q[h], keep[h], base + 16 * h); };
#else
    float v[ROUND], largest = 0.f;
    for (int n = 0; n < ROUND; ++n) {
      v[n] = static_cast<float>(x[base + n]);
      const float a = std::fabs(v[n]);
      largest = std::max(largest, a > t ? a : 0.f);
    }
    const float inverse = largest > 0.f ? 127.f / largest : 0.f, step = largest / 127.f;
    int32_t q[ROUND];
    for (int n = 0; n < ROUND; ++n) q[n] = static_cast<int32_t>(std::nearbyint(std::clamp(v[n] * inverse, -127.f, 127.f)));
    auto put = [&](int h) { return out.put(v + 16 * h, q + 16 * h, t, 16, base + 16 * h); };
#endif
    for (int64_t sub = 0; sub < per_round; ++sub) {  // the scale groups of this round: 32 inputs, or two of 16
      const int64_t g = r * per_round + sub, from = out.used;
      const int halves = static_cast<int>(2 / per_round);
      k.start[g] = static_cast<int32_t>(from / 4);
      k.step[g] = step;
      int32_t total = 0;
      for (int h = static_cast<int>(sub) * halves; h < (sub + 1) * halves; ++h) total += put(h);
      count += out.used - from;
      out.fill(from);
      k.sum[g] = step * static_cast<float>(total);
    }
  }
  k.start[groups] = static_cast<int32_t>(out.used / 4);
  k.count = count;
}

// The codes of 8 outputs of four inputs, one 32-bit lane per output: dot(acc, codes, x) adds
// sum_i code_i * x_i (codes unsigned bytes, x four signed bytes) to each lane.
#ifdef __AVX512F__
inline __m256i dot4(__m256i acc, __m256i codes, __m256i x) { return _mm256_dpbusd_epi32(acc, codes, x); }
inline __m256i dot8(__m256i acc, __m256i codes, __m256i x) { return _mm256_dpbusd_epi32(acc, codes, x); }
#else
// vpmaddubsw saturates at 2^15: two 4-bit codes times int8 stay below (2 * 15 * 127); 8-bit codes go in halves.
inline __m256i dot4(__m256i acc, __m256i codes, __m256i x) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(codes, x), _mm256_set1_epi16(1)));
}
inline __m256i dot8(__m256i acc, __m256i codes, __m256i x) {
  const __m256i nibble = _mm256_set1_epi8(15);
  const __m256i lo = _mm256_maddubs_epi16(_mm256_and_si256(codes, nibble), x);
  const __m256i hi = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(codes, 4), nibble), x);
  return _mm256_add_epi32(_mm256_add_epi32(acc, _mm256_madd_epi16(lo, _mm256_set1_epi16(1))),
                          _mm256_madd_epi16(hi, _mm256_set1_epi16(16)));
}
#endif

inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// One quad's products over a block: 32 bytes of each of the four rows interleaved into four vectors, r,
// whose lane 4L + j holds byte 16L + 4r + j of every row.
inline void interleave(const uint8_t* a, const uint8_t* b, const uint8_t* c, const uint8_t* d, __m256i (&r)[4]) {
  const __m256i A = load32(a), B = load32(b), C = load32(c), D = load32(d);
  const __m256i ab_lo = _mm256_unpacklo_epi8(A, B), ab_hi = _mm256_unpackhi_epi8(A, B);
  const __m256i cd_lo = _mm256_unpacklo_epi8(C, D), cd_hi = _mm256_unpackhi_epi8(C, D);
  r[0] = _mm256_unpacklo_epi16(ab_lo, cd_lo);
  r[1] = _mm256_unpackhi_epi16(ab_lo, cd_lo);
  r[2] = _mm256_unpacklo_epi16(ab_hi, cd_hi);
  r[3] = _mm256_unpackhi_epi16(ab_hi, cd_hi);
}

#ifdef __AVX512F__
// The same interleaving of 64 bytes of each row: it works within 128-bit lanes, so each vector holds the
// 256-bit version's vector of the first 32 bytes in its low half and of the next 32 in its high half.
inline void interleave(const uint8_t* a, const uint8_t* b, const uint8_t* c, const uint8_t* d, __m512i (&r)[4]) {
  const __m512i A = _mm512_loadu_si512(a), B = _mm512_loadu_si512(b), C = _mm512_loadu_si512(c), D = _mm512_loadu_si512(d);
  const __m512i ab_lo = _mm512_unpacklo_epi8(A, B), ab_hi = _mm512_unpackhi_epi8(A, B);
  const __m512i cd_lo = _mm512_unpacklo_epi8(C, D), cd_hi = _mm512_unpackhi_epi8(C, D);
  r[0] = _mm512_unpacklo_epi16(ab_lo, cd_lo);
  r[1] = _mm512_unpackhi_epi16(ab_lo, cd_lo);
  r[2] = _mm512_unpacklo_epi16(ab_hi, cd_hi);
  r[3] = _mm512_unpackhi_epi16(ab_hi, cd_hi);
}
#endif

template <int BITS>
inline void quad_sums(__m256i (&sums)[VECS], const uint8_t* const (&row)[4], int64_t off, int32_t word) {
  const __m256i x = _mm256_set1_epi32(word);
  __m256i r[4];
  if constexpr (BITS == 4) {  // vector 2r + nibble
    interleave(row[0] + off, row[1] + off, row[2] + off, row[3] + off, r);
    const __m256i nibble = _mm256_set1_epi8(15);
    for (int q = 0; q < 4; ++q) {
      sums[2 * q] = dot4(sums[2 * q], _mm256_and_si256(r[q], nibble), x);
      sums[2 * q + 1] = dot4(sums[2 * q + 1], _mm256_and_si256(_mm256_srli_epi16(r[q], 4), nibble), x);
    }
  } else {  // vector 4h + r, half h of the block's 64 bytes
    for (int h = 0; h < 2; ++h) {
      interleave(row[0] + off + 32 * h, row[1] + off + 32 * h, row[2] + off + 32 * h, row[3] + off + 32 * h, r);
      for (int q = 0; q < 4; ++q) sums[4 * h + q] = dot8(sums[4 * h + q], r[q], x);
    }
  }
}

inline __m256 halves(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

template <int BITS> constexpr int64_t block_bytes() { return BLOCK * BITS / 8; }

// Software prefetch of the kept rows `prefetch_groups` groups on while this group's are multiplied (into L2): the kept
// rows are a sparse walk the hardware prefetchers do not follow. Each quad step issues `prefetch_lines` of
// them (0: off). Half the inputs kept, 2 threads, from memory (time over the dense kernel's): SmolLM2's
// gate+up x2.26 without, x1.08 with; a 1B down projection [2048, 8192] x2.0 without, x0.85 with.
int prefetch_lines = 4;
int prefetch_groups = 2;

// The lines of a group's kept rows in one tile's slab, fetched a few at a time (no division: this runs in
// the innermost loop).
struct Prefetcher {
  const uint8_t* slab;
  int64_t row_bytes;
  const int32_t* row = nullptr;  // the next row to fetch
  const int32_t* last = nullptr;
  int64_t line = 0;              // the next line's byte offset in that row
  void aim(const Kept& k, int64_t g) {  // at group g's rows
    row = k.rows.data() + 4 * k.start[g];
    last = k.rows.data() + 4 * k.start[g + 1];
    line = 0;
  }
  void some(int n) {
    for (; n > 0 && row < last; --n) {
      _mm_prefetch(reinterpret_cast<const char*>(slab + *row * row_bytes + line), _MM_HINT_T1);
      line += 64;
      if (line >= row_bytes) {
        line = 0;
        ++row;
      }
    }
  }
};

// One group's products of 8 outputs into y: y[o .. o + 8) += sums * scale * step + min * x_sum.
inline void scale_into(float* y, int64_t o, __m256i sums, const at::Half* s_row, const at::Half* m_row, __m256 steps,
                       __m256 x_sums) {
  __m256 acc = _mm256_loadu_ps(y + o);
  acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(halves(s_row + o), steps), acc);
  acc = _mm256_fmadd_ps(halves(m_row + o), x_sums, acc);
  _mm256_storeu_ps(y + o, acc);
}

// Block blk of scale group g (quads [begin, end)) added into y, 256-bit vectors.
template <int BITS>
inline void group_block(const uint8_t* slab, int64_t row_bytes, const Kept& k, int32_t begin, int32_t end,
                        int64_t blk, Prefetcher& ahead, const at::Half* s_row, const at::Half* m_row, float step,
                        float x_sum, float* y) {
  __m256i sums[VECS];
#pragma GCC unroll 8
  for (int i = 0; i < VECS; ++i) sums[i] = _mm256_setzero_si256();
  const int64_t off = blk * block_bytes<BITS>();
  for (int32_t e = begin; e < end; ++e) {
    if (prefetch_lines) ahead.some(prefetch_lines);
    const int32_t* q = k.rows.data() + 4 * e;
    const uint8_t* const row[4] = {slab + q[0] * row_bytes, slab + q[1] * row_bytes, slab + q[2] * row_bytes,
                                   slab + q[3] * row_bytes};
    quad_sums<BITS>(sums, row, off, k.word(e));
  }
  const __m256 steps = _mm256_set1_ps(step), x_sums = _mm256_set1_ps(x_sum);
  for (int v = 0; v < VECS; ++v) scale_into(y, blk * BLOCK + 8 * v, sums[v], s_row, m_row, steps, x_sums);
}

#ifdef __AVX512F__
// Blocks blk and blk + 1 at once in 512-bit vectors (AVX-512): interleaving a 64-byte load of two 4-bit blocks
// (or one 8-bit block) gives, in each vector, the 256-bit version's vector of the first block (or half) in its
// low half and the second's in its high half: one layout for both ISAs, and half the instructions per weight.
template <int BITS>
inline void group_block_pair(const uint8_t* slab, int64_t row_bytes, const Kept& k, int32_t begin, int32_t end,
                             int64_t blk, Prefetcher& ahead, const at::Half* s_row, const at::Half* m_row, float step,
                             float x_sum, float* y) {
  __m512i sums[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) sums[i] = _mm512_setzero_si512();  // (a range-for became a rep stos to the stack)
  const int64_t off = blk * block_bytes<BITS>();
  const __m512i nibble = _mm512_set1_epi8(15);
  Prefetcher fetch = ahead;  // in registers for the loop
  for (int32_t e = begin; e < end; ++e) {
    if (prefetch_lines) fetch.some(2 * prefetch_lines);
    const int32_t* q = k.rows.data() + 4 * e;
    const __m512i x = _mm512_set1_epi32(k.word(e));
    for (int h = 0; h < BITS / 4; ++h) {  // 4-bit: one 64-byte load per row; 8-bit: two
      const int64_t at = off + 64 * h;
      __m512i r[4];
      interleave(slab + q[0] * row_bytes + at, slab + q[1] * row_bytes + at, slab + q[2] * row_bytes + at,
                 slab + q[3] * row_bytes + at, r);
      for (int j = 0; j < 4; ++j) {
        if constexpr (BITS == 4) {
          sums[2 * j] = _mm512_dpbusd_epi32(sums[2 * j], _mm512_and_si512(r[j], nibble), x);
          sums[2 * j + 1] = _mm512_dpbusd_epi32(sums[2 * j + 1], _mm512_and_si512(_mm512_srli_epi16(r[j], 4), nibble), x);
        } else {
          sums[4 * h + j] = _mm512_dpbusd_epi32(sums[4 * h + j], r[j], x);
        }
      }
    }
  }
  ahead = fetch;
  const __m256 steps = _mm256_set1_ps(step), x_sums = _mm256_set1_ps(x_sum);
  for (int i = 0; i < 8; ++i) {
    // 4-bit: vector i of block blk (low half) and of blk + 1 (high); 8-bit: vectors i % 4 and 4 + i % 4 of block blk + i / 4
    const int64_t low = BITS == 4 ? blk * BLOCK + 8 * i : (blk + i / 4) * BLOCK + 8 * (i % 4);
    const int64_t high = BITS == 4 ? low + BLOCK : low + 32;
    scale_into(y, low, _mm512_castsi512_si256(sums[i]), s_row, m_row, steps, x_sums);
    scale_into(y, high, _mm512_extracti64x4_epi64(sums[i], 1), s_row, m_row, steps, x_sums);
  }
}
#endif

// Scale groups [g0, g1) of one sequence's tile (blocks [first, first + blocks) of plane p) into y (fp32, the
// tile's first output).
template <int BITS>
void tile_product(const uint8_t* slab, const at::Half* scales, const at::Half* mins, int64_t g0, int64_t g1,
                  int64_t outp, int64_t first, int64_t blocks, const Kept& k, float* y) {
  const int64_t row_bytes = blocks * block_bytes<BITS>();
  Prefetcher ahead{slab, row_bytes};
  if (prefetch_lines) {
    for (int64_t g = g0; g < std::min(g0 + prefetch_groups, g1); ++g) {
      ahead.aim(k, g);
      ahead.some(1 << 30);
    }
  }
  for (int64_t g = g0; g < g1; ++g) {
    const int32_t begin = k.start[g], end = k.start[g + 1];
    if (begin == end) continue;  // nothing kept in this group: it adds nothing
    if (prefetch_lines && g + prefetch_groups < g1) ahead.aim(k, g + prefetch_groups);
    const at::Half* s_row = scales + g * outp + first * BLOCK;
    const at::Half* m_row = mins + g * outp + first * BLOCK;
    int64_t blk = 0;
#ifdef __AVX512F__
    for (; blk + 2 <= blocks; blk += 2)
      group_block_pair<BITS>(slab, row_bytes, k, begin, end, blk, ahead, s_row, m_row, k.step[g], k.sum[g], y);
#endif
    for (; blk < blocks; ++blk)
      group_block<BITS>(slab, row_bytes, k, begin, end, blk, ahead, s_row, m_row, k.step[g], k.sum[g], y);
  }
}

// Work items [begin, end) into out (fp32, [splits, B, outp]; each item zeroes its part): item i is tile i / splits, its scale
// groups cut in `splits` near-equal ranges, range i % splits added into out[i % splits].
template <int BITS>
void run_items(const uint8_t* codes, const at::Half* scales, const at::Half* mins, int64_t planes, int64_t in,
               int64_t group, int64_t outp, int64_t tb, int64_t splits, const Kept* kept, int64_t batch, float* out,
               int64_t begin, int64_t end) {
  const int64_t groups = in / group, nblocks = outp / BLOCK;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t t = item / splits, split = item % splits;
    const int64_t first = t * tb, blocks = std::min(first + tb, nblocks) - first;
    const int64_t g0 = groups * split / splits, g1 = groups * (split + 1) / splits;
    for (int64_t b = 0; b < batch; ++b)  // each item zeroes the sums it adds into
      std::fill_n(out + (split * batch + b) * outp + first * BLOCK, blocks * BLOCK, 0.f);
    for (int64_t p = 0; p < planes; ++p) {
      const uint8_t* slab = codes + p * in * (outp * BITS / 8) + first * block_bytes<BITS>() * in;
      for (int64_t b = 0; b < batch; ++b)
        tile_product<BITS>(slab, scales + p * groups * outp, mins + p * groups * outp, g0, g1, outp, first, blocks,
                           kept[b], out + (split * batch + b) * outp + first * BLOCK);
    }
  }
}

}  // namespace gather

// x [B, in] (fp32 or bf16); codes [P, in * outp * bits / 8] uint8 (tile slabs, see the layout above), bits 4
// or 8; scales, mins [P, in / group, outp] fp16, group 32 or 16. tile_blocks: the layout's 64-output blocks per
// tile. Returns y [B, out_features] in x's dtype and the number of inputs kept per sequence. threshold < 0
// keeps every input (the dense product).
std::tuple<at::Tensor, std::vector<int64_t>> gather_mm(const at::Tensor& x, const at::Tensor& codes,
                                                       const at::Tensor& scales, const at::Tensor& mins,
                                                       int64_t out_features, int64_t tile_blocks, double threshold,
                                                       int64_t bits) {
  using namespace gather;
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [B, in] matrix");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be fp32 or bf16");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous(), "codes: [P, in * outp * bits / 8] uint8");
  TORCH_CHECK(bits == 4 || bits == 8, "bits: 4 or 8");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && mins.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  mins.is_contiguous() && scales.sizes() == mins.sizes(), "scales and mins: contiguous fp16, one shape");
  const int64_t batch = x.size(0), in = x.size(1), planes = codes.size(0), outp = scales.size(2);
  TORCH_CHECK(in % ROUND == 0 && outp % BLOCK == 0 && out_features <= outp && codes.size(1) == in * outp * bits / 8, "shapes");
  TORCH_CHECK(scales.size(0) == planes && scales.size(1) > 0 && in % scales.size(1) == 0, "scale shape");
  const int64_t group = in / scales.size(1);
  TORCH_CHECK(group == 32 || group == 16, "group: 32 or 16 inputs per scale");
  TORCH_CHECK(tile_blocks > 0, "tile_blocks");
  // Reused from call to call, one set per calling thread: this runs for every product of every decoded
  // token, and select's resizes allocate only when a call needs more than every call before it.
  thread_local std::vector<Kept> kept;
  if (static_cast<int64_t>(kept.size()) < batch) kept.resize(batch);
  const Kept* selected = kept.data();  // the workers below must read this thread's sets, not their own
  std::vector<int64_t> counts(batch);
  for (int64_t b = 0; b < batch; ++b) {
    if (x.scalar_type() == at::kBFloat16) select(x.data_ptr<at::BFloat16>() + b * in, in, group, threshold, kept[b]);
    else select(x.data_ptr<float>() + b * in, in, group, threshold, kept[b]);
    counts[b] = kept[b].count;
  }
  // Fewer tiles than threads: the inputs are cut between threads too, each adding into its own sums.
  const int64_t tiles = (outp / BLOCK + tile_blocks - 1) / tile_blocks;
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads() / tiles, in / group));
  at::Tensor parts = at::empty({splits, batch, outp}, x.options().dtype(at::kFloat));
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const at::Half* s = scales.data_ptr<at::Half>();
  const at::Half* m = mins.data_ptr<at::Half>();
  float* a = parts.data_ptr<float>();
  at::parallel_for(0, tiles * splits, 1, [&](int64_t begin, int64_t end) {
    if (bits == 8) run_items<8>(c, s, m, planes, in, group, outp, tile_blocks, splits, selected, batch, a, begin, end);
    else run_items<4>(c, s, m, planes, in, group, outp, tile_blocks, splits, selected, batch, a, begin, end);
  });
  for (int64_t split = 1; split < splits; ++split)  // the threads' sums into the first's
    for (int64_t i = 0; i < batch * outp; ++i) a[i] += a[split * batch * outp + i];
  at::Tensor acc = parts[0];
  at::Tensor y = out_features == outp ? acc : acc.narrow(1, 0, out_features);
  if (x.scalar_type() != at::kFloat) y = y.to(x.scalar_type());
  else if (out_features != outp) y = y.contiguous();
  return {y, counts};
}

// Tuning knobs for measurement (not part of the product's interface): prefetch lines per step, groups ahead.
void set_tuning(int64_t prefetch, int64_t ahead) { gather::prefetch_lines = static_cast<int>(prefetch); gather::prefetch_groups = static_cast<int>(ahead); }
