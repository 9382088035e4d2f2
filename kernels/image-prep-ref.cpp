// CPU reference of the image preparation kernels (see image-prep.h for the contract), and the
// CPU path in production (the addon's resizeRgb, our vision encoder's preprocessing): the passes
// are vectorized, with the same integer sums as Pillow's, so the output is Pillow's bit for bit.
// The resampler follows llama.cpp tools/mtmd/mtmd-image.cpp img_tool::resize_pillow, itself a
// port of Pillow's libImaging/Resample.c: same filter, same double-precision coefficient
// computation, same fixed-point rounding, horizontal pass first with a uint8 image between.
#include "image-prep-ref.h"

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
#include <immintrin.h>
#endif

namespace {

constexpr int kPrecisionBits = CAPRL_RESAMPLE_PRECISION_BITS;
constexpr double kBicubicSupport = 2.0;

// Pillow's bicubic filter, a = -0.5 (PyTorch/ggml use -0.75).
double bicubic_filter(double x) {
    constexpr double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

inline uint8_t clip8(int32_t v) {
    return v < 0 ? 0 : v > 255 ? 255 : static_cast<uint8_t>(v);
}

bool valid_side(int s) { return s > 0 && s <= CAPRL_PREP_MAX_SIDE; }

// Where the compiler may, the row pass gets an AVX2 clone (chosen at load time): its inner loop is
// a widening multiply-add over a whole row, which the baseline x86-64 (SSE2) has no 32-bit
// multiply for.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__CUDACC__)
#define CAPRL_ROW_PASS_CLONES __attribute__((target_clones("avx2", "default")))
#define CAPRL_X86_SIMD 1
#else
#define CAPRL_ROW_PASS_CLONES
#define CAPRL_X86_SIMD 0
#endif

// Elements per block of a row: the block's int32 accumulators stay in L1 across its taps.
constexpr size_t kRowBlock = 2048;

// Vertical pass: src (cols x in_rows) -> dst (cols x out_rows). Out row y = sum_j weight[y][j] *
// in row (bounds[y] + j), in fixed point, clipped to uint8; every element is an independent sum,
// so the loop runs along the row (vectorized).
CAPRL_ROW_PASS_CLONES
void resample_vertical(const uint8_t *src, int cols, int in_rows, uint8_t *dst, int out_rows) {
    const size_t row_elems = (size_t)cols * 3;
    const int ksize = caprl_resample_coeffs(in_rows, out_rows, nullptr, nullptr);
    std::vector<int> bounds((size_t)out_rows * 2);
    std::vector<int32_t> weights((size_t)out_rows * ksize);
    caprl_resample_coeffs(in_rows, out_rows, bounds.data(), weights.data());
    int32_t acc[kRowBlock];
    for (int y = 0; y < out_rows; y++) {
        const int ymin = bounds[2 * y], ycnt = bounds[2 * y + 1];
        const int32_t *k = &weights[(size_t)y * ksize];
        uint8_t *out = dst + (size_t)y * row_elems;
        for (size_t b0 = 0; b0 < row_elems; b0 += kRowBlock) {
            const size_t n = std::min(kRowBlock, row_elems - b0);
            for (size_t i = 0; i < n; i++) acc[i] = 1 << (kPrecisionBits - 1);
            for (int j = 0; j < ycnt; j++) {
                const uint8_t *row = src + (size_t)(ymin + j) * row_elems + b0;
                const int32_t kj = k[j];
                for (size_t i = 0; i < n; i++) acc[i] += row[i] * kj;
            }
            for (size_t i = 0; i < n; i++) out[b0 + i] = clip8(acc[i] >> kPrecisionBits);
        }
    }
}

// One row of the horizontal pass over `wide` (the row as int32 RGBX, zero-padded by ksize pixels).
void horizontal_row(const int32_t *wide, const int *bounds, const int32_t *weights, int ksize, int out_w, uint8_t *out) {
    for (int x = 0; x < out_w; x++) {
        const int32_t *k = &weights[(size_t)x * ksize];
        const int32_t *p = &wide[(size_t)bounds[2 * x] * 4];
        int32_t s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
        for (int i = 0; i < ksize; i++, p += 4) {
            s0 += p[0] * k[i];
            s1 += p[1] * k[i];
            s2 += p[2] * k[i];
        }
        out[x * 3 + 0] = clip8(s0 >> kPrecisionBits);
        out[x * 3 + 1] = clip8(s1 >> kPrecisionBits);
        out[x * 3 + 2] = clip8(s2 >> kPrecisionBits);
    }
}

#if CAPRL_X86_SIMD
// The same with SSE4.1: a pixel's three sums are one 4-lane multiply-add per tap (K taps, unrolled
// when K is fixed), two pixels interleaved; the shift is arithmetic and the two saturating packs
// clip to 0..255 as clip8 does.
template <int K>
__attribute__((target("sse4.1"))) inline __m128i taps_sse41(const int32_t *p, const int32_t *k, int ksize) {
    __m128i s = _mm_setr_epi32(1 << (kPrecisionBits - 1), 1 << (kPrecisionBits - 1), 1 << (kPrecisionBits - 1), 0);
    const int n = K > 0 ? K : ksize;
    for (int i = 0; i < n; i++) {
        s = _mm_add_epi32(s, _mm_mullo_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p + 4 * i)), _mm_set1_epi32(k[i])));
    }
    return _mm_srai_epi32(s, kPrecisionBits);
}

template <int K>
__attribute__((target("sse4.1"))) void horizontal_row_sse41(const int32_t *wide, const int *bounds, const int32_t *weights, int ksize,
                                                            int out_w, uint8_t *out) {
    int x = 0;
    for (; x + 1 < out_w; x += 2) {
        const __m128i a = taps_sse41<K>(&wide[(size_t)bounds[2 * x] * 4], &weights[(size_t)x * ksize], ksize);
        const __m128i b = taps_sse41<K>(&wide[(size_t)bounds[2 * x + 2] * 4], &weights[(size_t)(x + 1) * ksize], ksize);
        const __m128i v = _mm_packus_epi16(_mm_packs_epi32(a, b), a);  // bytes: R0 G0 B0 0 R1 G1 B1 0 ...
        alignas(16) uint8_t px[16];
        _mm_store_si128(reinterpret_cast<__m128i *>(px), v);
        out[x * 3 + 0] = px[0];
        out[x * 3 + 1] = px[1];
        out[x * 3 + 2] = px[2];
        out[x * 3 + 3] = px[4];
        out[x * 3 + 4] = px[5];
        out[x * 3 + 5] = px[6];
    }
    if (x < out_w) horizontal_row(wide, bounds + 2 * x, weights + (size_t)x * ksize, ksize, out_w - x, out + x * 3);
}
#endif

// Horizontal pass: src (in_w x rows) -> dst (out_w x rows). Each row is first widened to int32
// RGBX so that a pixel's sums vectorize; the coefficients past a pixel's `xcnt` taps are zero,
// and the row is padded so that every pixel may read all `ksize` of them.
void resample_horizontal(const uint8_t *src, int in_w, int rows, uint8_t *dst, int out_w) {
    const int ksize = caprl_resample_coeffs(in_w, out_w, nullptr, nullptr);
    std::vector<int> bounds((size_t)out_w * 2);
    std::vector<int32_t> weights((size_t)out_w * ksize);
    caprl_resample_coeffs(in_w, out_w, bounds.data(), weights.data());
    std::vector<int32_t> wide(((size_t)in_w + ksize) * 4, 0);
    auto row_fn = horizontal_row;
#if CAPRL_X86_SIMD
    if (__builtin_cpu_supports("sse4.1")) {
        row_fn = ksize == 5 ? horizontal_row_sse41<5> : ksize == 7 ? horizontal_row_sse41<7> : ksize == 9 ? horizontal_row_sse41<9> : horizontal_row_sse41<0>;
    }
#endif
    for (int y = 0; y < rows; y++) {
        const uint8_t *row = src + (size_t)y * in_w * 3;
        for (int x = 0; x < in_w; x++) {
            wide[(size_t)x * 4 + 0] = row[x * 3 + 0];
            wide[(size_t)x * 4 + 1] = row[x * 3 + 1];
            wide[(size_t)x * 4 + 2] = row[x * 3 + 2];
        }
        row_fn(wide.data(), bounds.data(), weights.data(), ksize, out_w, dst + (size_t)y * out_w * 3);
    }
}

}  // namespace

extern "C" int caprl_resample_coeffs(int in_size, int out_size, int *bounds, int32_t *weights) {
    if (!valid_side(in_size) || !valid_side(out_size)) return 0;
    const double scale = static_cast<double>(in_size) / out_size;
    // Upsampling keeps the filter at its size; downsampling widens it (antialiasing).
    const double filterscale = scale < 1.0 ? 1.0 : scale;
    const double support = kBicubicSupport * filterscale;
    const int ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
    if (bounds == nullptr || weights == nullptr) return ksize;

    std::vector<double> pre(ksize);
    const double fxp_scale = std::ldexp(1.0, kPrecisionBits);
    for (int xx = 0; xx < out_size; xx++) {
        const double center = (xx + 0.5) * scale;
        const double ss = 1.0 / filterscale;
        int xmin = static_cast<int>(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = static_cast<int>(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        double ww = 0.0;
        int x = 0;
        for (; x < xmax; x++) {
            const double w = bicubic_filter((x + xmin - center + 0.5) * ss);
            pre[x] = w;
            ww += w;
        }
        for (x = 0; x < xmax; x++) {
            if (ww != 0.0) pre[x] /= ww;
        }
        for (; x < ksize; x++) pre[x] = 0;
        bounds[2 * xx] = xmin;
        bounds[2 * xx + 1] = xmax;
        for (x = 0; x < ksize; x++) {
            // Pillow adds +/- 0.5 then truncates toward zero.
            const double r = pre[x] * fxp_scale + (pre[x] < 0 ? -0.5 : 0.5);
            weights[(size_t)xx * ksize + x] = static_cast<int32_t>(r);
        }
    }
    return ksize;
}

extern "C" int caprl_prep_make_plan(int w, int h, int out_w, int out_h, int mode, caprl_prep_plan *plan) {
    if (plan == nullptr || !valid_side(w) || !valid_side(h) || !valid_side(out_w) || !valid_side(out_h)) {
        return CAPRL_PREP_EINVAL;
    }
    if (mode != CAPRL_RESIZE_PAD_CEIL && mode != CAPRL_RESIZE_STRETCH) return CAPRL_PREP_EINVAL;
    plan->in_w = w;
    plan->in_h = h;
    plan->out_w = out_w;
    plan->out_h = out_h;
    plan->fit_w = out_w;
    plan->fit_h = out_h;
    plan->off_x = 0;
    plan->off_y = 0;
    if (mode == CAPRL_RESIZE_PAD_CEIL && !(w == out_w && h == out_h)) {
        // llama.cpp img_tool::resize, PAD_CEIL branch, in its float arithmetic.
        const float scale_w = static_cast<float>(out_w) / w;
        const float scale_h = static_cast<float>(out_h) / h;
        const float scale = std::min(scale_w, scale_h);
        plan->fit_w = std::min(static_cast<int>(std::ceil(w * scale)), out_w);
        plan->fit_h = std::min(static_cast<int>(std::ceil(h * scale)), out_h);
        plan->off_x = (out_w - plan->fit_w) / 2;
        plan->off_y = (out_h - plan->fit_h) / 2;
    }
    return 0;
}

extern "C" void caprl_normalize_lut(float lut[3 * 256]) {
    const float mean[3] = {CAPRL_CLIP_MEAN_R, CAPRL_CLIP_MEAN_G, CAPRL_CLIP_MEAN_B};
    const float stdv[3] = {CAPRL_CLIP_STD_R, CAPRL_CLIP_STD_G, CAPRL_CLIP_STD_B};
    for (int c = 0; c < 3; c++) {
        for (int v = 0; v < 256; v++) {
            const float x = static_cast<float>(v) / 255.0f;
            lut[c * 256 + v] = (x - mean[c]) / stdv[c];
        }
    }
}

extern "C" int caprl_resize_u8_ref(const uint8_t *rgb, int w, int h, int out_w, int out_h, int mode,
                                   uint8_t *out_rgb) {
    caprl_prep_plan p;
    if (rgb == nullptr || out_rgb == nullptr || caprl_prep_make_plan(w, h, out_w, out_h, mode, &p) != 0) {
        return CAPRL_PREP_EINVAL;
    }
    // The fitted picture: horizontal pass (if the width changes), then vertical (if the height does).
    std::vector<uint8_t> tmp, fit;
    const uint8_t *cur = rgb;
    if (p.fit_w != w) {
        tmp.resize((size_t)p.fit_w * h * 3);
        resample_horizontal(cur, w, h, tmp.data(), p.fit_w);
        cur = tmp.data();
    }
    if (p.fit_h != h) {
        fit.resize((size_t)p.fit_w * p.fit_h * 3);
        resample_vertical(cur, p.fit_w, h, fit.data(), p.fit_h);
        cur = fit.data();
    }
    // Composite onto a black canvas.
    std::fill(out_rgb, out_rgb + (size_t)out_w * out_h * 3, 0);
    for (int y = 0; y < p.fit_h; y++) {
        std::copy(cur + (size_t)y * p.fit_w * 3, cur + (size_t)(y + 1) * p.fit_w * 3,
                  out_rgb + ((size_t)(y + p.off_y) * out_w + p.off_x) * 3);
    }
    return 0;
}

extern "C" int caprl_image_prep_ref(const uint8_t *rgb, int w, int h, int out_w, int out_h, int mode,
                                    float *out_chw, float *out_patches) {
    if (out_chw == nullptr && out_patches == nullptr) return CAPRL_PREP_EINVAL;
    if (out_patches != nullptr && (out_w % CAPRL_GRID_FACTOR != 0 || out_h % CAPRL_GRID_FACTOR != 0)) {
        return CAPRL_PREP_EINVAL;
    }
    if (!valid_side(out_w) || !valid_side(out_h)) return CAPRL_PREP_EINVAL;
    std::vector<uint8_t> canvas((size_t)out_w * out_h * 3);
    const int rc = caprl_resize_u8_ref(rgb, w, h, out_w, out_h, mode, canvas.data());
    if (rc != 0) return rc;
    float lut[3 * 256];
    caprl_normalize_lut(lut);

    const size_t plane = (size_t)out_w * out_h;
    const int P = CAPRL_PATCH_SIZE, M = CAPRL_MERGE_SIZE, T = CAPRL_TEMPORAL_PATCH_SIZE;
    const int grid_w = out_w / P;
    for (int y = 0; y < out_h; y++) {
        for (int x = 0; x < out_w; x++) {
            const uint8_t *px = &canvas[((size_t)y * out_w + x) * 3];
            if (out_chw != nullptr) {
                for (int c = 0; c < 3; c++) out_chw[c * plane + (size_t)y * out_w + x] = lut[c * 256 + px[c]];
            }
            if (out_patches != nullptr) {
                // HF: (t, gh/M, M, P, gw/M, M, P) -> (gh/M, gw/M, M, M, C, T, P, P)
                const int ph = y / P, py = y % P, pw = x / P, pxx = x % P;
                const size_t row = ((size_t)(ph / M) * (grid_w / M) + pw / M) * (M * M) + (ph % M) * M + (pw % M);
                for (int c = 0; c < 3; c++) {
                    for (int t = 0; t < T; t++) {
                        out_patches[row * CAPRL_PATCH_ROW + ((size_t)(c * T + t) * P + py) * P + pxx] =
                            lut[c * 256 + px[c]];
                    }
                }
            }
        }
    }
    return 0;
}

extern "C" int caprl_llama_qwen_target_size(int w, int h, int min_pixels, int max_pixels, int *out_w,
                                            int *out_h) {
    if (out_w == nullptr || out_h == nullptr || w <= 0 || h <= 0 || min_pixels < 0 || max_pixels < 0) {
        return CAPRL_PREP_EINVAL;
    }
    const int f = CAPRL_GRID_FACTOR;
    auto round_by_factor = [f](float x) { return static_cast<int>(std::round(x / static_cast<float>(f))) * f; };
    auto ceil_by_factor = [f](float x) { return static_cast<int>(std::ceil(x / static_cast<float>(f))) * f; };
    auto floor_by_factor = [f](float x) { return static_cast<int>(std::floor(x / static_cast<float>(f))) * f; };
    int w_bar = std::max(f, round_by_factor(static_cast<float>(w)));
    int h_bar = std::max(f, round_by_factor(static_cast<float>(h)));
    if (max_pixels > 0 && (long long)h_bar * w_bar > max_pixels) {
        const float beta = std::sqrt(static_cast<float>(h) * w / max_pixels);
        h_bar = std::max(f, floor_by_factor(h / beta));
        w_bar = std::max(f, floor_by_factor(w / beta));
    } else if (min_pixels > 0 && (long long)h_bar * w_bar < min_pixels) {
        const float beta = std::sqrt(static_cast<float>(min_pixels) / (static_cast<float>(h) * w));
        h_bar = ceil_by_factor(h * beta);
        w_bar = ceil_by_factor(w * beta);
    }
    *out_w = w_bar;
    *out_h = h_bar;
    return 0;
}
