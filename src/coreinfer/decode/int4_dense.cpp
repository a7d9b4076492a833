// Dense 4- and 8-bit product with 16-bit integer activations: y = W @ x_hat, where x_hat is x rounded
// per group of 32 inputs to int16 (scale = the group's largest |x| / 32767, 2^-15 of it at most).
//
// Why: the input-major layout of int4_gather.cpp (built so token-level sparsity can skip inputs) reads
// memory at 8-16 GB/s where the machine gives 30, and its fp32 unpack-and-FMA costs one multiply-add
// per weight per sequence, so a batch of 8 took 5-10x one sequence's time. Here the codes are laid out
// output-major, one sequential stream per thread, and an integer multiply-add (vpdpwssd on AVX-512
// VNNI, vpmaddwd + vpaddd on AVX2) takes two weights per 32-bit lane with no conversion to float.
// int16 activations keep the product within 2^-15 of fp32's per group (llama.cpp rounds them to int8).
//
// Layout (int4_dense.py): per plane, per tile of 64 outputs, per group of 32 inputs, one chunk:
//   codes: UNITS words per lane, each word for VECS vectors of 16 outputs (64 bytes each);
//          4-bit: word u holds inputs 8u + k in nibble k; 8-bit: inputs 4u + k in byte k;
//   then the group's fp16 scales and mins (w = scale * code + min): SUB rows of 64 scales, then SUB of
//   64 mins, SUB = 1, or 2 for GGUF's Q6_K, whose scales change every 16 inputs (units [0, U/2) and [U/2, U)).
// A pair (lo, hi) of a word's codes is (word >> SHIFT * j) & MASK: 4-bit j < 4: inputs (8u + j, 8u + j + 4);
// 8-bit j < 2: inputs (4u + j, 4u + j + 2). Each pair multiplies the same two int16 activations in
// every lane, so they are broadcast from one 32-bit word.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace dense {

constexpr int GROUP = 32;
constexpr int VECS = 4;           // vectors of 16 outputs per tile: four independent sums in flight
constexpr int TILE = 16 * VECS;   // outputs per tile
constexpr int PAIRS = GROUP / 2;  // activation pairs per group
constexpr int MAX_SEQS = 4;       // sequences whose sums stay in registers together

template <int BITS> constexpr int units() { return GROUP * BITS / 32; }          // 32-bit words per lane and group
template <int BITS> constexpr int pairs_per_unit() { return 16 / BITS; }         // 4 (4-bit) or 2 (8-bit)
template <int BITS> constexpr int64_t code_bytes() { return TILE * GROUP * BITS / 8; }
template <int BITS, int SUB> constexpr int64_t chunk_bytes() { return code_bytes<BITS>() + 2 * SUB * TILE * 2; }

#ifdef __AVX512F__
struct Ints {
  using I = __m512i;
  using F = __m512;
  static constexpr int LANES = 16;
  static I load(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static I zero() { return _mm512_setzero_si512(); }
  template <int BITS, int J>
  static I pair(I w) {
    constexpr int mask = BITS == 4 ? 0x000F000F : 0x00FF00FF;
    return _mm512_and_si512(J ? _mm512_srli_epi32(w, BITS * J) : w, _mm512_set1_epi32(mask));
  }
  static I dot(I acc, I codes, int32_t x) { return _mm512_dpwssd_epi32(acc, codes, _mm512_set1_epi32(x)); }
  static F to_float(I v) { return _mm512_cvtepi32_ps(v); }
  static F halves(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static F zero_f() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
};
#else
struct Ints {
  using I = __m256i;
  using F = __m256;
  static constexpr int LANES = 8;
  static I load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I zero() { return _mm256_setzero_si256(); }
  template <int BITS, int J>
  static I pair(I w) {
    constexpr int mask = BITS == 4 ? 0x000F000F : 0x00FF00FF;
    return _mm256_and_si256(J ? _mm256_srli_epi32(w, BITS * J) : w, _mm256_set1_epi32(mask));
  }
  static I dot(I acc, I codes, int32_t x) { return _mm256_add_epi32(acc, _mm256_madd_epi16(codes, _mm256_set1_epi32(x))); }
  static F to_float(I v) { return _mm256_cvtepi32_ps(v); }
  static F halves(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static F zero_f() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
};
#endif
constexpr int NV = TILE / Ints::LANES;  // vectors per tile

// One sequence's activations rounded to int16 per group, as the pair words the kernel broadcasts.
struct Rounded {
  std::vector<int32_t> pairs;  // [G * PAIRS]
  std::vector<float> scale;    // [G]: x_hat = scale * q
  std::vector<float> sum;      // [G * SUB]: each scale group's sum of x_hat (the mins' term)
};

template <int BITS, int SUB, typename T>
void round_pairs(const T* x, int64_t in, Rounded& r) {
  const int64_t groups = in / GROUP;
  r.pairs.resize(groups * PAIRS);
  r.scale.resize(groups);
  r.sum.resize(groups * SUB);
  for (int64_t g = 0; g < groups; ++g) {
    float v[GROUP], largest = 0.f;
    for (int n = 0; n < GROUP; ++n) {
      v[n] = static_cast<float>(x[g * GROUP + n]);
      largest = std::max(largest, std::fabs(v[n]));
    }
    const float inverse = largest > 0.f ? 32767.f / largest : 0.f;
    int32_t q[GROUP], total[SUB] = {};
    for (int n = 0; n < GROUP; ++n) {
      q[n] = std::clamp(static_cast<int32_t>(std::nearbyint(v[n] * inverse)), -32767, 32767);
      total[n * SUB / GROUP] += q[n];
    }
    r.scale[g] = largest / 32767.f;
    for (int sub = 0; sub < SUB; ++sub) r.sum[g * SUB + sub] = r.scale[g] * static_cast<float>(total[sub]);
    constexpr int per = pairs_per_unit<BITS>();
    for (int p = 0; p < PAIRS; ++p) {
      const int u = p / per, j = p % per;
      const int lo = BITS == 4 ? 8 * u + j : 4 * u + j, hi = lo + (BITS == 4 ? 4 : 2);
      r.pairs[g * PAIRS + p] = static_cast<int32_t>((static_cast<uint32_t>(q[lo]) & 0xFFFFu) |
                                                    (static_cast<uint32_t>(q[hi]) << 16));
    }
  }
}

// sums[s][k] += the integer products of units [first, first + count) for S sequences over one chunk's codes.
template <int BITS, int S, int... J>
inline void group_sums(typename Ints::I (&sums)[S][NV], const uint8_t* codes, const int32_t* const* pairs,
                       int first, int count, std::integer_sequence<int, J...>) {
  constexpr int per = pairs_per_unit<BITS>();
#pragma GCC unroll 8
  for (int u = first; u < first + count; ++u) {
#pragma GCC unroll 8
    for (int k = 0; k < NV; ++k) {
      const typename Ints::I word = Ints::load(codes + (u * NV + k) * Ints::LANES * 4);
      auto one = [&](auto j) {
        const typename Ints::I part = Ints::template pair<BITS, j.value>(word);
        for (int s = 0; s < S; ++s) sums[s][k] = Ints::dot(sums[s][k], part, pairs[s][u * per + j.value]);
      };
      (one(std::integral_constant<int, J>{}), ...);
    }
  }
}

// Tile t's 64 outputs of S sequences (rounded[0 .. S)) into y[s] (fp32, tile t's first output).
template <int BITS, int SUB, int S>
void tile_product(const uint8_t* stream, int64_t planes, int64_t tiles, int64_t groups, int64_t t,
                  const Rounded* const* rounded, float* const* y) {
  typename Ints::F acc[S][NV];
  for (int s = 0; s < S; ++s)
    for (int k = 0; k < NV; ++k) acc[s][k] = Ints::zero_f();
  for (int64_t p = 0; p < planes; ++p) {
    const uint8_t* chunk = stream + (p * tiles + t) * groups * chunk_bytes<BITS, SUB>();
    for (int64_t g = 0; g < groups; ++g, chunk += chunk_bytes<BITS, SUB>()) {
      const int32_t* pairs[S];
      for (int s = 0; s < S; ++s) pairs[s] = rounded[s]->pairs.data() + g * PAIRS;
      for (int sub = 0; sub < SUB; ++sub) {  // each scale group's integer sums, then its scale and min
        typename Ints::I sums[S][NV];
        for (int s = 0; s < S; ++s)
          for (int k = 0; k < NV; ++k) sums[s][k] = Ints::zero();
        constexpr int count = units<BITS>() / SUB;
        group_sums<BITS, S>(sums, chunk, pairs, sub * count, count,
                            std::make_integer_sequence<int, pairs_per_unit<BITS>()>{});
        const at::Half* scales = reinterpret_cast<const at::Half*>(chunk + code_bytes<BITS>()) + sub * TILE;
        const at::Half* mins = scales + SUB * TILE;
        for (int k = 0; k < NV; ++k) {
          const typename Ints::F scale = Ints::halves(scales + k * Ints::LANES);
          const typename Ints::F minimum = Ints::halves(mins + k * Ints::LANES);
          for (int s = 0; s < S; ++s) {
            const typename Ints::F step = Ints::mul(scale, Ints::set1(rounded[s]->scale[g]));
            acc[s][k] = Ints::fma(Ints::to_float(sums[s][k]), step, acc[s][k]);
            acc[s][k] = Ints::fma(minimum, Ints::set1(rounded[s]->sum[g * SUB + sub]), acc[s][k]);
          }
        }
      }
    }
  }
  for (int s = 0; s < S; ++s)
    for (int k = 0; k < NV; ++k) Ints::store(y[s] + k * Ints::LANES, acc[s][k]);
}

template <int BITS, int SUB>
void tiles_of(const uint8_t* stream, int64_t planes, int64_t tiles, int64_t groups, const std::vector<Rounded>& rounded,
              float* out, int64_t outp, int64_t begin, int64_t end) {
  const int64_t batch = static_cast<int64_t>(rounded.size());
  for (int64_t t = begin; t < end; ++t) {
    for (int64_t b0 = 0; b0 < batch; b0 += MAX_SEQS) {  // up to MAX_SEQS sequences share each load
      const int n = static_cast<int>(std::min<int64_t>(MAX_SEQS, batch - b0));
      const Rounded* r[MAX_SEQS];
      float* y[MAX_SEQS];
      for (int s = 0; s < n; ++s) {
        r[s] = &rounded[b0 + s];
        y[s] = out + (b0 + s) * outp + t * TILE;
      }
      switch (n) {
        case 4: tile_product<BITS, SUB, 4>(stream, planes, tiles, groups, t, r, y); break;
        case 3: tile_product<BITS, SUB, 3>(stream, planes, tiles, groups, t, r, y); break;
        case 2: tile_product<BITS, SUB, 2>(stream, planes, tiles, groups, t, r, y); break;
        default: tile_product<BITS, SUB, 1>(stream, planes, tiles, groups, t, r, y); break;
      }
    }
  }
}

template <int BITS, int SUB>
at::Tensor product(const at::Tensor& x, const at::Tensor& stream, int64_t outp) {
  const int64_t batch = x.size(0), in = x.size(1), planes = stream.size(0);
  const int64_t groups = in / GROUP, tiles = outp / TILE;
  TORCH_CHECK(stream.size(1) == tiles * groups * (chunk_bytes<BITS, SUB>()), "stream size");
  std::vector<Rounded> rounded(batch);
  for (int64_t b = 0; b < batch; ++b) {
    if (x.scalar_type() == at::kBFloat16) round_pairs<BITS, SUB>(x.data_ptr<at::BFloat16>() + b * in, in, rounded[b]);
    else round_pairs<BITS, SUB>(x.data_ptr<float>() + b * in, in, rounded[b]);
  }
  at::Tensor out = at::empty({batch, outp}, x.options().dtype(at::kFloat));
  const uint8_t* s = stream.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    tiles_of<BITS, SUB>(s, planes, tiles, groups, rounded, o, outp, begin, end);
  });
  return out;
}

}  // namespace dense

// x [B, in] fp32 or bf16; stream [P, tiles * in / 32 * chunk] uint8 (int4_dense.py), bits 4 or 8, outp
// the padded outputs (a multiple of 64), group 32 or 16 inputs per scale. Returns y [B, out_features] in x's dtype.
at::Tensor dense_mm(const at::Tensor& x, const at::Tensor& stream, int64_t out_features, int64_t outp, int64_t bits,
                    int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % dense::GROUP == 0, "x must be a contiguous [B, in] matrix, in a multiple of 32");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be fp32 or bf16");
  TORCH_CHECK(stream.dim() == 2 && stream.scalar_type() == at::kByte && stream.is_contiguous(), "stream: [P, n] uint8");
  TORCH_CHECK(bits == 4 || bits == 8, "bits: 4 or 8");
  TORCH_CHECK(outp % dense::TILE == 0 && out_features <= outp, "outp: a multiple of 64, at least out_features");
  TORCH_CHECK(group == 32 || group == 16, "group: 32 or 16");
  at::Tensor y = bits == 8 ? (group == 16 ? dense::product<8, 2>(x, stream, outp) : dense::product<8, 1>(x, stream, outp))
                           : (group == 16 ? dense::product<4, 2>(x, stream, outp) : dense::product<4, 1>(x, stream, outp));
  if (out_features != outp) y = y.narrow(1, 0, out_features).contiguous();
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}
