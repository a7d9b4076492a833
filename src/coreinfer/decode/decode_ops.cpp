// The small per-layer pieces of one fp32 decode step on the CPU, each one call instead of 5-15
// ATen ops (see cpu_kernels.py for the measurement that asked for them): the residual add with the
// next RMSNorm, and the attention of one new token per sequence (q/k norms, rope, cache write,
// masked softmax over the cached keys). fp32 in, fp32 out, fp32 accumulation.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace coreinfer_decode {

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  s0 = _mm256_add_ps(s0, s1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
  h = _mm_hadd_ps(h, h);
  h = _mm_hadd_ps(h, h);
  float s = _mm_cvtss_f32(h);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y = x * rsqrt(mean(x^2) + eps) * w, over n entries.
inline void rms_norm_row(const float* x, const float* w, float eps, float* y, int64_t n) {
  const float r = 1.f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * r * w[i];
}

// The dot products of q with 8 consecutive rows of k (row stride hd, hd a multiple of 8), as one
// vector: 8 sums of fmadds, then a transpose-add (hadd tree) instead of 8 horizontal reductions.
inline __m256 dot8(const float* q, const float* k, int64_t hd) {
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t i = 0; i < hd; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + j * hd + i), acc[j]);
  }
  const __m256 s01 = _mm256_hadd_ps(acc[0], acc[1]), s23 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 s45 = _mm256_hadd_ps(acc[4], acc[5]), s67 = _mm256_hadd_ps(acc[6], acc[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);  // each row's two halves
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// exp(x) for x <= 0, within 2 ulp of std::exp (Cephes' expf: 2^n times a degree-6 polynomial of the
// remainder). Below -87.3 (exp < 2^-126) it returns exp(-87.3), about 1e-38: next to the largest score's 1
// it adds nothing, and no subnormal is ever formed.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(two_n));
}

// score[t] = exp(score[t] - best), 0 where score[t] is -inf (masked); returns their sum.
inline float exp_shifted(float* score, int64_t n, float best) {
  const __m256 shift = _mm256_set1_ps(best), masked = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 sum = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 s = _mm256_loadu_ps(score + t);
    const __m256 p = _mm256_andnot_ps(_mm256_cmp_ps(s, masked, _CMP_EQ_OQ), exp8(_mm256_sub_ps(s, shift)));
    _mm256_storeu_ps(score + t, p);
    sum = _mm256_add_ps(sum, p);
  }
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
  h = _mm_hadd_ps(h, h);
  h = _mm_hadd_ps(h, h);
  float total = _mm_cvtss_f32(h);
  for (; t < n; ++t) {
    score[t] = score[t] == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(score[t] - best);
    total += score[t];
  }
  return total;
}

// y[0 .. 64) = inv * sum_t p[t] * v[t * hd + 0 .. 64): one 64-wide slice of a head's output, in registers.
inline void weighted_rows64(const float* p, const float* v, int64_t n, int64_t hd, float inv, float* y) {
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    if (p[t] == 0.f) continue;  // masked slots (and their possibly unwritten values)
    const __m256 w = _mm256_set1_ps(p[t]);
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + t * hd + 8 * j), acc[j]);
  }
  for (int j = 0; j < 8; ++j) _mm256_storeu_ps(y + 8 * j, _mm256_mul_ps(acc[j], _mm256_set1_ps(inv)));
}

}  // namespace coreinfer_decode

// x += norm(delta, post) (post: Gemma's norm of a block's output; undefined: delta itself), then
// returns norm(x, weight). x [B, d] fp32, modified in place.
at::Tensor residual_norm(at::Tensor& x, const at::Tensor& delta, const c10::optional<at::Tensor>& post,
                         const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat, "x: contiguous fp32 [B, d]");
  TORCH_CHECK(delta.sizes() == x.sizes() && delta.is_contiguous() && delta.scalar_type() == at::kFloat, "delta: like x");
  const int64_t batch = x.size(0), d = x.size(1);
  TORCH_CHECK(weight.numel() == d && weight.is_contiguous() && weight.scalar_type() == at::kFloat, "weight: fp32 [d]");
  const bool has_post = post.has_value() && post->defined();
  if (has_post) TORCH_CHECK(post->numel() == d && post->is_contiguous() && post->scalar_type() == at::kFloat, "post: fp32 [d]");
  at::Tensor y = at::empty_like(x);
  float* xs = x.data_ptr<float>();
  const float* ds = delta.data_ptr<float>();
  float* ys = y.data_ptr<float>();
  const float e = static_cast<float>(eps);
  std::vector<float> normed(has_post ? d : 0);
  for (int64_t b = 0; b < batch; ++b) {
    float* row = xs + b * d;
    const float* add = ds + b * d;
    if (has_post) {
      coreinfer_decode::rms_norm_row(add, post->data_ptr<float>(), e, normed.data(), d);
      add = normed.data();
    }
    for (int64_t i = 0; i < d; ++i) row[i] += add[i];
    coreinfer_decode::rms_norm_row(row, weight.data_ptr<float>(), e, ys + b * d, d);
  }
  return y;
}

// One new token per sequence through attention. qkv [B, (H + 2 KV) * hd] fp32 (after any bias);
// cos, signed_sin [B, hd] (rope rows of each sequence's position; signed_sin carries rotate_half's
// minus sign on its first half); keys, values [B, KV, S, hd] fp32, written at `slot`; valid [B, S]
// bool, the slots that hold real tokens (slot included: the caller marks it). Attends to the valid
// slots in [first, slot]. q_norm, k_norm [hd] (Qwen3, Gemma 3) or undefined. Returns [B, H * hd].
at::Tensor attend(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& signed_sin, at::Tensor& keys,
                  at::Tensor& values, const at::Tensor& valid, int64_t heads, int64_t kv_heads, int64_t slot,
                  int64_t first, double scale, const c10::optional<at::Tensor>& q_norm,
                  const c10::optional<at::Tensor>& k_norm, double eps) {
  const int64_t batch = qkv.size(0), hd = keys.size(3), length = keys.size(2);
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.scalar_type() == at::kFloat &&
                  qkv.size(1) == (heads + 2 * kv_heads) * hd, "qkv: contiguous fp32 [B, (H + 2 KV) * hd]");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous() && keys.scalar_type() == at::kFloat &&
                  values.sizes() == keys.sizes() && values.scalar_type() == at::kFloat && keys.size(0) == batch &&
                  keys.size(1) == kv_heads, "keys, values: contiguous fp32 [B, KV, S, hd]");
  TORCH_CHECK(cos.is_contiguous() && signed_sin.is_contiguous() && cos.scalar_type() == at::kFloat &&
                  signed_sin.scalar_type() == at::kFloat && cos.numel() == batch * hd && signed_sin.numel() == batch * hd,
              "cos, signed_sin: contiguous fp32 [B, hd]");
  TORCH_CHECK(valid.is_contiguous() && valid.scalar_type() == at::kBool && valid.size(0) == batch && valid.size(1) >= length,
              "valid: contiguous bool [B, S]");
  TORCH_CHECK(0 <= first && first <= slot && slot < length && heads % kv_heads == 0 && hd % 2 == 0, "slot, first, heads");
  const bool qn = q_norm.has_value() && q_norm->defined(), kn = k_norm.has_value() && k_norm->defined();
  const int64_t group = heads / kv_heads, half = hd / 2, width = (heads + 2 * kv_heads) * hd;
  const int64_t span = slot + 1 - first;
  const float e = static_cast<float>(eps), sc = static_cast<float>(scale);
  at::Tensor out = at::empty({batch, heads * hd}, qkv.options());
  const float* src = qkv.data_ptr<float>();
  const float* cs = cos.data_ptr<float>();
  const float* sn = signed_sin.data_ptr<float>();
  float* k_cache = keys.data_ptr<float>();
  float* v_cache = values.data_ptr<float>();
  const bool* ok = valid.data_ptr<bool>();
  const int64_t valid_stride = valid.size(1);
  float* o = out.data_ptr<float>();

  // Normed, rotated queries [B, H, hd]; the new keys and values go straight into the cache.
  std::vector<float> queries(batch * heads * hd), tmp(hd);
  auto rotate = [&](const float* x, const float* norm, const float* c, const float* s, float* y) {
    const float* in = x;
    if (norm != nullptr) {
      coreinfer_decode::rms_norm_row(x, norm, e, tmp.data(), hd);
      in = tmp.data();
    }
    float rotated[1024];
    TORCH_CHECK(hd <= 1024, "head_dim above 1024");
    for (int64_t i = 0; i < hd; ++i) rotated[i] = in[i] * c[i] + in[i < half ? i + half : i - half] * s[i];
    std::copy(rotated, rotated + hd, y);
  };
  for (int64_t b = 0; b < batch; ++b) {
    const float* row = src + b * width;
    const float *c = cs + b * hd, *s = sn + b * hd;
    for (int64_t h = 0; h < heads; ++h)
      rotate(row + h * hd, qn ? q_norm->data_ptr<float>() : nullptr, c, s, queries.data() + (b * heads + h) * hd);
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t at_slot = ((b * kv_heads + h) * length + slot) * hd;
      rotate(row + (heads + h) * hd, kn ? k_norm->data_ptr<float>() : nullptr, c, s, k_cache + at_slot);
      std::copy(row + (heads + kv_heads + h) * hd, row + (heads + kv_heads + h + 1) * hd, v_cache + at_slot);
    }
  }

  auto one_head = [&](int64_t bh, std::vector<float>& score) {
    const int64_t b = bh / heads, h = bh % heads, kvh = h / group;
    const float* q = queries.data() + bh * hd;
    const float* k = k_cache + ((b * kv_heads + kvh) * length + first) * hd;  // slot `first` on
    const float* v = v_cache + ((b * kv_heads + kvh) * length + first) * hd;
    const bool* mask = ok + b * valid_stride + first;
    int64_t t = 0;
    if (hd % 8 == 0)
      for (; t + 8 <= span; t += 8) _mm256_storeu_ps(score.data() + t, coreinfer_decode::dot8(q, k + t * hd, hd));
    for (; t < span; ++t) score[t] = coreinfer_decode::dot(q, k + t * hd, hd);
    float best = -std::numeric_limits<float>::infinity();
    for (t = 0; t < span; ++t) {  // masked slots may hold anything, even NaN: their scores are replaced
      score[t] = mask[t] ? score[t] * sc : -std::numeric_limits<float>::infinity();
      best = std::max(best, score[t]);
    }
    float* y = o + (b * heads + h) * hd;
    if (best == -std::numeric_limits<float>::infinity()) {  // nothing to attend to
      std::fill(y, y + hd, 0.f);
      return;
    }
    const float inv = 1.f / coreinfer_decode::exp_shifted(score.data(), span, best);
    if (hd % 64 == 0) {
      for (int64_t c = 0; c < hd; c += 64) coreinfer_decode::weighted_rows64(score.data(), v + c, span, hd, inv, y + c);
      return;
    }
    std::fill(y, y + hd, 0.f);
    for (t = 0; t < span; ++t) {
      const float p = score[t];
      if (p == 0.f) continue;
      for (int64_t i = 0; i < hd; ++i) y[i] += p * v[t * hd + i];
    }
    for (int64_t i = 0; i < hd; ++i) y[i] *= inv;
  };
  // Threads only where the work outweighs waking them (a few microseconds).
  const int64_t work = batch * heads * span * hd;
  const int64_t grain = work < (1 << 16) ? batch * heads : 1;
  at::parallel_for(0, batch * heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> score(span);
    for (int64_t bh = begin; bh < end; ++bh) one_head(bh, score);
  });
  return out;
}
