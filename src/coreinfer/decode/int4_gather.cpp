// Token-level gathered 4- and 8-bit product on the CPU (AVX2 + FMA + F16C): y = W[:, keep] @ x[keep],
// keep = |x| > threshold per sequence, reading only the kept inputs' weights.
//
// The weight is stored input-major (see int4_gather.py): for each plane p and input n, the codes of
// all (padded) outputs are contiguous, 64 outputs per block. A 4-bit block is one 32-byte word whose
// 32-bit lane l (0..7) holds outputs 8k + l in its nibble k (0..7); an 8-bit block is two words, word h
// holding outputs 32h + 8k + l in byte k (0..3) of lane l. Eight outputs come out of one 256-bit load
// with an AND (code << bits * k, which converts to float exactly; the power of 2 is undone once per
// group) -- no byte shuffles. 8-bit codes hold GGUF's 5- to 8-bit formats (Q5_0, Q5_1, Q8_0) in one
// plane: half the arithmetic of two 4-bit planes, and one scale row less to read. Scales and mins
// (w = s * code + m) are fp16, [P, in/32, out].
//
// y[b, r] = sum_p sum_g  s[p,g,r] * sum_{n in keep_b, g} x[b,n] code[p,n,r]  +  m[p,g,r] * sum_{n in keep_b, g} x[b,n]
//
// fp32 accumulation; at::parallel_for over 64-output blocks. Built for AVX-512 where the CPU has it (two
// rows per vector, see Vec), else AVX2.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <utility>
#include <vector>

namespace {

constexpr int GROUP = 32;
constexpr int BLOCK = 64;          // outputs per block
// Rows (inputs) interleaved block by block in the layout, so the four rows read together are one
// sequential stream. On a 2-core Xeon (AVX-512 machine, this AVX2 code), Gemma 3's LM head [262144, 640]
// in 8-bit: 18.4 ms with each row contiguous (four streams 1 KB apart), 10.6 ms interleaved.
constexpr int CHUNK = 4;

struct Kept {
  std::vector<int32_t> index;    // kept inputs, in order
  std::vector<float> value;
  std::vector<int32_t> start;    // [G + 1]: each group's first entry in index
  std::vector<float> sum;        // [G]: sum of the kept inputs of each group
};

template <typename T>
void select(const T* x, int64_t in, double threshold, Kept& kept) {
  const int64_t groups = in / GROUP;
  kept.index.clear();
  kept.value.clear();
  kept.index.reserve(in);
  kept.value.reserve(in);
  kept.start.assign(groups + 1, 0);
  kept.sum.assign(groups, 0.f);
  const float t = static_cast<float>(threshold);
  const bool all = threshold < 0;
  for (int64_t g = 0; g < groups; ++g) {
    kept.start[g] = static_cast<int32_t>(kept.index.size());
    float s = 0.f;
    for (int64_t n = g * GROUP; n < (g + 1) * GROUP; ++n) {
      const float v = static_cast<float>(x[n]);
      if (all || std::fabs(v) > t) {
        kept.index.push_back(static_cast<int32_t>(n));
        kept.value.push_back(v);
        s += v;
      }
    }
    kept.sum[g] = s;
  }
  kept.start[groups] = static_cast<int32_t>(kept.index.size());
}

inline __m256 load_halves(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Software prefetch of the tile bytes of the kept rows this many ahead (0: off). On a 2-core AVX2 EPYC,
// one thread, SmolLM2's gate+up [3072, 576]: 329 us without, 181 us at 8 rows, 172 us at 16.
int prefetch_rows = 16;

template <int BITS>
constexpr int64_t block_bytes() { return BLOCK * BITS / 8; }

// Code k of every 32-bit lane of v, AND-ed in place (times 2^(BITS * k); the last one shifted down).
template <int BITS, int K, typename I, typename And, typename Shift>
inline I code_bits(I v, And and_, Shift shift_right) {
  constexpr int per_lane = 32 / BITS;
  if constexpr (K == per_lane - 1) return shift_right(v, 32 - BITS);
  else return and_(v, ((1 << BITS) - 1) << (BITS * K));
}

// The vectors the products run in. AVX2: one row per 256-bit vector. AVX-512: two rows per 512-bit
// vector (row 2j in the low half, row 2j + 1 in the high), so each unpack and multiply-add covers
// twice the weights, and acc holds ROWS partial sums per output (vector q of block blk at
// acc + ROWS * (64 blk + 8 q), the even rows' sums first); scale_into adds them.
#ifdef __AVX512F__
struct Vec {
  using F = __m512;
  using I = __m512i;
  static constexpr int ROWS = 2;
  static I load(const uint8_t* const* rows, int j, int n, int64_t off) {
    const __m256i low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[2 * j] + off));
    const uint8_t* high = rows[std::min(2 * j + 1, n - 1)];  // past the last row: any row, times 0
    return _mm512_inserti64x4(_mm512_castsi256_si512(low), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(high + off)), 1);
  }
  static F value(const float* x, int j, int n) {  // x[2j] in the low half, x[2j + 1] (0 past the last) in the high
    return _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(x[2 * j]), _mm512_set1_ps(2 * j + 1 < n ? x[2 * j + 1] : 0.f));
  }
  template <int BITS, int K>
  static F code(I v) {
    return _mm512_cvtepi32_ps(code_bits<BITS, K>(
        v, [](I a, int m) { return _mm512_and_si512(a, _mm512_set1_epi32(m)); },
        [](I a, int n) { return _mm512_srli_epi32(a, n); }));
  }
  static F load_acc(const float* p) { return _mm512_loadu_ps(p); }
  static void store_acc(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
};
#else
struct Vec {
  using F = __m256;
  using I = __m256i;
  static constexpr int ROWS = 1;
  static I load(const uint8_t* const* rows, int j, int, int64_t off) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[j] + off));
  }
  static F value(const float* x, int j, int) { return _mm256_set1_ps(x[j]); }
  template <int BITS, int K>
  static F code(I v) {
    return _mm256_cvtepi32_ps(code_bits<BITS, K>(
        v, [](I a, int m) { return _mm256_and_si256(a, _mm256_set1_epi32(m)); },
        [](I a, int n) { return _mm256_srli_epi32(a, n); }));
  }
  static F load_acc(const float* p) { return _mm256_loadu_ps(p); }
  static void store_acc(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
};
#endif
constexpr int ACC = Vec::ROWS;  // partial sums per output

// Output vector r (8 outputs from r) of a tile's sums, its partial sums added.
inline __m256 load_sums(const float* acc, int64_t r) {
  if constexpr (ACC == 2) return _mm256_add_ps(_mm256_loadu_ps(acc + 2 * r), _mm256_loadu_ps(acc + 2 * r + 8));
  else return _mm256_loadu_ps(acc + r);
}

// acc += sum_i x[i] * code(rows[i]) for N rows (their tile's bytes), over 64 * blocks outputs.
template <int BITS, int N, int... K>
inline void accumulate(float* acc, const uint8_t* const* rows, const float* x, int64_t blocks,
                       std::integer_sequence<int, K...>) {
  constexpr int per_lane = 32 / BITS, vecs = (N + Vec::ROWS - 1) / Vec::ROWS;
  typename Vec::F xv[vecs];
  for (int j = 0; j < vecs; ++j) xv[j] = Vec::value(x, j, N);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    for (int w = 0; w < BITS / 4; ++w) {
      typename Vec::I v[vecs];
      for (int j = 0; j < vecs; ++j) v[j] = Vec::load(rows, j, N, blk * CHUNK * block_bytes<BITS>() + 32 * w);
      float* a = acc + ACC * (blk * BLOCK + 8 * per_lane * w);
      auto one = [&](auto k) {
        float* at = a + 8 * ACC * k.value;
        typename Vec::F s = Vec::load_acc(at);
        for (int j = 0; j < vecs; ++j) s = Vec::fma(xv[j], Vec::template code<BITS, k.value>(v[j]), s);
        Vec::store_acc(at, s);
      };
      (one(std::integral_constant<int, K>{}), ...);
    }
  }
}

// The same for several sequences that keep the same inputs (a dense batch): acc of sequence s at
// acc + s * stride, its values x[s][0 .. N). Each row's codes are unpacked once for all sequences,
// so a batch of B costs far less than B products (the unpacking is most of the arithmetic).
template <int BITS, int N, int... K>
inline void accumulate_shared(float* acc, int64_t stride, int64_t seqs, const uint8_t* const* rows,
                              const float* const* x, int64_t blocks, std::integer_sequence<int, K...> ks) {
  constexpr int per_lane = 32 / BITS, vecs = (N + Vec::ROWS - 1) / Vec::ROWS;
  if (seqs == 1) return accumulate<BITS, N>(acc, rows, x[0], blocks, ks);  // its values stay in registers
  std::vector<typename Vec::F> xv(seqs * vecs);
  for (int64_t s = 0; s < seqs; ++s)
    for (int j = 0; j < vecs; ++j) xv[s * vecs + j] = Vec::value(x[s], j, N);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    for (int w = 0; w < BITS / 4; ++w) {
      typename Vec::I v[vecs];
      for (int j = 0; j < vecs; ++j) v[j] = Vec::load(rows, j, N, blk * CHUNK * block_bytes<BITS>() + 32 * w);
      const int64_t first = ACC * (blk * BLOCK + 8 * per_lane * w);
      auto one = [&](auto k) {
        typename Vec::F c[vecs];
        for (int j = 0; j < vecs; ++j) c[j] = Vec::template code<BITS, k.value>(v[j]);
        for (int64_t s = 0; s < seqs; ++s) {
          float* a = acc + s * stride + first + 8 * ACC * k.value;
          typename Vec::F sum = Vec::load_acc(a);
          for (int j = 0; j < vecs; ++j) sum = Vec::fma(xv[s * vecs + j], c[j], sum);
          Vec::store_acc(a, sum);
        }
      };
      (one(std::integral_constant<int, K>{}), ...);
    }
  }
}

template <int BITS, int N>
inline void accumulate_rows(float* acc, int64_t stride, int64_t seqs, const uint8_t* const* rows,
                            const float* const* x, int64_t blocks) {
  accumulate_shared<BITS, N>(acc, stride, seqs, rows, x, blocks, std::make_integer_sequence<int, 32 / BITS>{});
}

// Input n's first block in its tile's slab (rows are interleaved CHUNK at a time).
template <int BITS>
inline const uint8_t* row_start(const uint8_t* tile_codes, int32_t n, int64_t row_bytes) {
  return tile_codes + (n / CHUNK) * CHUNK * row_bytes + (n % CHUNK) * block_bytes<BITS>();
}

// Software prefetch of the tile bytes of the kept rows prefetch_rows ahead of entry e (0: off).
template <int BITS>
inline void prefetch(const uint8_t* tile_codes, const Kept& k, int32_t e, int64_t row_bytes, int64_t groups) {
  if (!prefetch_rows) return;
  const int32_t stop = std::min<int32_t>(e + prefetch_rows + 4, k.start[groups]);
  for (int32_t f = e + prefetch_rows; f < stop; ++f) {
    const uint8_t* row = row_start<BITS>(tile_codes, k.index[f], row_bytes);
    for (int64_t off = 0; off < CHUNK * row_bytes; off += CHUNK * block_bytes<BITS>())
      _mm_prefetch(reinterpret_cast<const char*>(row + off), _MM_HINT_T0);
  }
}

// One group's sums into the output tile: y += scale * acc (the power of 2 of each code undone) + min * x_sum.
template <int BITS>
inline void scale_into(float* y_tile, const float* acc, const at::Half* s_row, const at::Half* m_row, float x_sum,
                       int64_t blocks) {
  constexpr int per_lane = 32 / BITS;
  float undo[8];  // vector q of a block: code k = q % per_lane, shifted up by BITS * k unless it is the last
  for (int q = 0; q < 8; ++q) {
    const int k = q % per_lane;
    undo[q] = k == per_lane - 1 ? 1.f : std::ldexp(1.f, -BITS * k);
  }
  const __m256 xs = _mm256_set1_ps(x_sum);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    for (int q = 0; q < 8; ++q) {
      const int64_t r = blk * BLOCK + 8 * q;
      const __m256 s = _mm256_mul_ps(load_halves(s_row + r), _mm256_set1_ps(undo[q]));
      __m256 y = _mm256_loadu_ps(y_tile + r);
      y = _mm256_fmadd_ps(s, load_sums(acc, r), y);
      y = _mm256_fmadd_ps(load_halves(m_row + r), xs, y);
      _mm256_storeu_ps(y_tile + r, y);
    }
  }
}

// Tiles [tile_begin, tile_end) of every sequence's output, into out (fp32, [B, outp]). Tile t is
// blocks [t * tb, (t + 1) * tb) (the last may be narrower), stored as one slab: its rows, one per input,
// each blocks * block_bytes, interleaved CHUNK rows at a time block by block (row_start), so a tile's
// kept rows are read in input order from one contiguous range.
template <int BITS>
void run_tiles(const uint8_t* codes, const at::Half* scales, const at::Half* mins, int64_t planes, int64_t in,
               int64_t outp, int64_t tb, const std::vector<Kept>& kept, bool shared, float* out, int64_t tile_begin,
               int64_t tile_end) {
  const int64_t groups = in / GROUP;
  const int64_t nblocks = outp / BLOCK;
  const int64_t batch = static_cast<int64_t>(kept.size());
  const int64_t stride = tb * BLOCK * ACC;
  const int64_t count = shared ? batch : 1;  // sequences that read each row together
  std::vector<float> acc_buffer(count * stride + 16);
  std::vector<const float*> xs(count);
  float* acc = acc_buffer.data();
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    const int64_t first_block = t * tb;
    const int64_t blocks = std::min(first_block + tb, nblocks) - first_block;
    const int64_t row_bytes = blocks * block_bytes<BITS>();
    const int64_t tile = first_block;
    for (int64_t p = 0; p < planes; ++p) {
      const uint8_t* tile_codes = codes + p * in * (outp * BITS / 8) + first_block * block_bytes<BITS>() * in;
      for (int64_t g = 0; g < groups; ++g) {
        const at::Half* s_row = scales + (p * groups + g) * outp + tile * BLOCK;
        const at::Half* m_row = mins + (p * groups + g) * outp + tile * BLOCK;
        // Sequences b0 .. b0 + count keep the same inputs (kept[b0]'s): all of them in a dense batch,
        // else one at a time. Their rows are read once for all of them.
        for (int64_t b0 = 0; b0 < batch; b0 += count) {
          const Kept& k = kept[b0];
          const int32_t first = k.start[g], last = k.start[g + 1];
          if (first == last) continue;  // nothing kept in this group: it adds nothing
          std::fill(acc, acc + count * stride, 0.f);
          const uint8_t* rows[4];
          for (int32_t e = first; e < last; e += 4) {
            const int n = std::min<int32_t>(4, last - e);
            for (int i = 0; i < n; ++i) rows[i] = row_start<BITS>(tile_codes, k.index[e + i], row_bytes);
            prefetch<BITS>(tile_codes, k, e, row_bytes, groups);
            for (int64_t j = 0; j < count; ++j) xs[j] = kept[b0 + j].value.data() + e;
            switch (n) {
              case 4: accumulate_rows<BITS, 4>(acc, stride, count, rows, xs.data(), blocks); break;
              case 3: accumulate_rows<BITS, 3>(acc, stride, count, rows, xs.data(), blocks); break;
              case 2: accumulate_rows<BITS, 2>(acc, stride, count, rows, xs.data(), blocks); break;
              default: accumulate_rows<BITS, 1>(acc, stride, count, rows, xs.data(), blocks); break;
            }
          }
          for (int64_t j = 0; j < count; ++j)
            scale_into<BITS>(out + (b0 + j) * outp + tile * BLOCK, acc + j * stride, s_row, m_row, kept[b0 + j].sum[g], blocks);
        }
      }
    }
  }
}

}  // namespace

// x [B, in] (fp32 or bf16); codes [P, in * outp * bits / 8] uint8 (tile slabs, see run_tiles), bits 4 or 8;
// scales, mins [P, in / 32, outp] fp16.
// tile_blocks: the layout's 64-output blocks per tile. Returns y [B, out_features] in x's dtype and the number of inputs kept per sequence.
// threshold < 0 keeps every input (the dense product).
std::tuple<at::Tensor, std::vector<int64_t>> gather_mm(const at::Tensor& x, const at::Tensor& codes,
                                                       const at::Tensor& scales, const at::Tensor& mins,
                                                       int64_t out_features, int64_t tile_blocks, double threshold,
                                                       int64_t bits) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [B, in] matrix");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous(), "codes: [P, in * outp * bits / 8] uint8");
  TORCH_CHECK(bits == 4 || bits == 8, "bits: 4 or 8");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && mins.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  mins.is_contiguous(), "scales and mins: contiguous fp16");
  const int64_t batch = x.size(0), in = x.size(1), planes = codes.size(0), outp = scales.size(2);
  TORCH_CHECK(codes.size(1) == in * outp * bits / 8 && in % GROUP == 0 && outp % BLOCK == 0 && out_features <= outp, "shapes");
  TORCH_CHECK(scales.size(0) == planes && scales.size(1) == in / GROUP && scales.size(2) == outp, "scale shape");
  std::vector<Kept> kept(batch);
  std::vector<int64_t> counts(batch);
  for (int64_t b = 0; b < batch; ++b) {
    if (x.scalar_type() == at::kBFloat16)
      select(x.data_ptr<at::BFloat16>() + b * in, in, threshold, kept[b]);
    else if (x.scalar_type() == at::kFloat)
      select(x.data_ptr<float>() + b * in, in, threshold, kept[b]);
    else
      TORCH_CHECK(false, "x must be fp32 or bf16");
    counts[b] = static_cast<int64_t>(kept[b].index.size());
  }
  at::Tensor acc = at::zeros({batch, outp}, x.options().dtype(at::kFloat));
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const at::Half* s = scales.data_ptr<at::Half>();
  const at::Half* m = mins.data_ptr<at::Half>();
  float* a = acc.data_ptr<float>();
  TORCH_CHECK(tile_blocks > 0, "tile_blocks");
  const int64_t tiles = (outp / BLOCK + tile_blocks - 1) / tile_blocks;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    const bool shared = threshold < 0 && batch > 1;
    if (bits == 8) run_tiles<8>(c, s, m, planes, in, outp, tile_blocks, kept, shared, a, begin, end);
    else run_tiles<4>(c, s, m, planes, in, outp, tile_blocks, kept, shared, a, begin, end);
  });
  at::Tensor y = out_features == outp ? acc : acc.narrow(1, 0, out_features);
  if (x.scalar_type() != at::kFloat) y = y.to(x.scalar_type());
  else if (out_features != outp) y = y.contiguous();
  return {y, counts};
}

// Tuning knobs for measurement (not part of the product's interface).
void set_tuning(int64_t prefetch) { prefetch_rows = static_cast<int>(prefetch); }
