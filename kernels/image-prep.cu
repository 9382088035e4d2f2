// CUDA image preparation for Qwen2.5-VL (contract in image-prep.h).
//
// Two kernels on the caller's stream:
//   1. resize_h: the horizontal resampling pass, input (w x h) -> scratch (fit_w x h), uint8,
//      only when the width changes;
//   2. finish:   one thread per canvas pixel: the vertical pass (when the height changes) read
//      from the scratch image, black outside the fitted picture, normalization, and the writes
//      of both layouts (planar CHW and HF patch rows).
// The filter tables come from the CPU reference (caprl_resample_coeffs, computed on the host in
// double precision exactly as Pillow / llama.cpp do) and all pixel arithmetic is integer, so the
// uint8 canvas is bit-identical to the reference; normalization uses the IEEE round-to-nearest
// intrinsics, so the floats are too, whatever flags (--use_fast_math) this file is built with.
#include "image-prep.h"
#include "image-prep-ref.h"

#include <cuda_runtime.h>

#include <vector>

namespace {

constexpr int kPrecisionBits = CAPRL_RESAMPLE_PRECISION_BITS;

__device__ __forceinline__ uint8_t clip8_dev(int v) {
    return v < 0 ? 0 : v > 255 ? 255 : static_cast<uint8_t>(v);
}

__device__ __forceinline__ float normalize_dev(uint8_t v, int c) {
    const float mean = c == 0 ? CAPRL_CLIP_MEAN_R : c == 1 ? CAPRL_CLIP_MEAN_G : CAPRL_CLIP_MEAN_B;
    const float stdv = c == 0 ? CAPRL_CLIP_STD_R : c == 1 ? CAPRL_CLIP_STD_G : CAPRL_CLIP_STD_B;
    return __fdiv_rn(__fsub_rn(__fdiv_rn(static_cast<float>(v), 255.0f), mean), stdv);
}

__global__ void resize_h_kernel(const uint8_t *__restrict__ src, int in_w, int rows,
                                uint8_t *__restrict__ dst, int out_w,
                                const int *__restrict__ bounds, const int32_t *__restrict__ weights, int ksize) {
    const int x = blockIdx.x * blockDim.x + threadIdx.x;
    const int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= out_w || y >= rows) return;
    const int xmin = bounds[2 * x], xcnt = bounds[2 * x + 1];
    const int32_t *k = weights + (size_t)x * ksize;
    const uint8_t *p = src + ((size_t)y * in_w + xmin) * 3;
    int32_t s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
    for (int i = 0; i < xcnt; i++, p += 3) {
        const int32_t kw = k[i];
        s0 += p[0] * kw;
        s1 += p[1] * kw;
        s2 += p[2] * kw;
    }
    uint8_t *o = dst + ((size_t)y * out_w + x) * 3;
    o[0] = clip8_dev(s0 >> kPrecisionBits);
    o[1] = clip8_dev(s1 >> kPrecisionBits);
    o[2] = clip8_dev(s2 >> kPrecisionBits);
}

struct FinishArgs {
    const uint8_t *src; // fitted picture source: fit_w wide, src_h tall
    int src_h;
    int fit_w, fit_h, off_x, off_y, out_w, out_h;
    const int *vbounds;      // NULL when the height does not change
    const int32_t *vweights;
    int vksize;
    float *chw;
    float *patches;
};

__global__ void finish_kernel(FinishArgs a) {
    const int x = blockIdx.x * blockDim.x + threadIdx.x;
    const int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= a.out_w || y >= a.out_h) return;

    uint8_t v[3] = {0, 0, 0};
    const int fx = x - a.off_x, fy = y - a.off_y;
    if (fx >= 0 && fx < a.fit_w && fy >= 0 && fy < a.fit_h) {
        if (a.vbounds != nullptr) {
            const int ymin = a.vbounds[2 * fy], ycnt = a.vbounds[2 * fy + 1];
            const int32_t *k = a.vweights + (size_t)fy * a.vksize;
            const size_t stride = (size_t)a.fit_w * 3;
            const uint8_t *p = a.src + (size_t)ymin * stride + (size_t)fx * 3;
            int32_t s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
            for (int j = 0; j < ycnt; j++, p += stride) {
                const int32_t kw = k[j];
                s0 += p[0] * kw;
                s1 += p[1] * kw;
                s2 += p[2] * kw;
            }
            v[0] = clip8_dev(s0 >> kPrecisionBits);
            v[1] = clip8_dev(s1 >> kPrecisionBits);
            v[2] = clip8_dev(s2 >> kPrecisionBits);
        } else {
            const uint8_t *p = a.src + ((size_t)fy * a.fit_w + fx) * 3;
            v[0] = p[0];
            v[1] = p[1];
            v[2] = p[2];
        }
    }

    const size_t plane = (size_t)a.out_w * a.out_h;
    constexpr int P = CAPRL_PATCH_SIZE, M = CAPRL_MERGE_SIZE, T = CAPRL_TEMPORAL_PATCH_SIZE;
    size_t prow = 0;
    int py = 0, px = 0;
    if (a.patches != nullptr) {
        const int ph = y / P, pw = x / P;
        py = y % P;
        px = x % P;
        prow = ((size_t)(ph / M) * (a.out_w / P / M) + pw / M) * (M * M) + (ph % M) * M + (pw % M);
    }
#pragma unroll
    for (int c = 0; c < 3; c++) {
        const float f = normalize_dev(v[c], c);
        if (a.chw != nullptr) a.chw[c * plane + (size_t)y * a.out_w + x] = f;
        if (a.patches != nullptr) {
            float *row = a.patches + prow * CAPRL_PATCH_ROW;
#pragma unroll
            for (int t = 0; t < T; t++) row[((c * T + t) * P + py) * P + px] = f;
        }
    }
}

size_t align_up(size_t n) { return (n + 255) & ~(size_t)255; }

}  // namespace

extern "C" int caprl_image_prep_cuda(const uint8_t *rgb_dev, int w, int h, int out_w, int out_h, int mode,
                                     float *out_chw_dev, float *out_patches_dev, struct CUstream_st *stream) {
    if (rgb_dev == nullptr || (out_chw_dev == nullptr && out_patches_dev == nullptr)) return CAPRL_PREP_EINVAL;
    if (out_patches_dev != nullptr && (out_w % CAPRL_GRID_FACTOR != 0 || out_h % CAPRL_GRID_FACTOR != 0)) {
        return CAPRL_PREP_EINVAL;
    }
    caprl_prep_plan p;
    if (caprl_prep_make_plan(w, h, out_w, out_h, mode, &p) != 0) return CAPRL_PREP_EINVAL;
    cudaStream_t st = stream;

    const bool need_h = p.fit_w != w, need_v = p.fit_h != h;
    const int hk = need_h ? caprl_resample_coeffs(w, p.fit_w, nullptr, nullptr) : 0;
    const int vk = need_v ? caprl_resample_coeffs(h, p.fit_h, nullptr, nullptr) : 0;

    // One host block for the tables, one device allocation for tables + scratch image.
    const size_t hb_off = 0;
    const size_t hw_off = hb_off + align_up(sizeof(int) * 2 * (size_t)(need_h ? p.fit_w : 0));
    const size_t vb_off = hw_off + align_up(sizeof(int32_t) * (size_t)(need_h ? p.fit_w : 0) * hk);
    const size_t vw_off = vb_off + align_up(sizeof(int) * 2 * (size_t)(need_v ? p.fit_h : 0));
    const size_t tables_bytes = vw_off + align_up(sizeof(int32_t) * (size_t)(need_v ? p.fit_h : 0) * vk);
    const size_t scratch_bytes = need_h ? (size_t)p.fit_w * h * 3 : 0;

    std::vector<unsigned char> host(tables_bytes);
    if (need_h) {
        caprl_resample_coeffs(w, p.fit_w, reinterpret_cast<int *>(host.data() + hb_off),
                              reinterpret_cast<int32_t *>(host.data() + hw_off));
    }
    if (need_v) {
        caprl_resample_coeffs(h, p.fit_h, reinterpret_cast<int *>(host.data() + vb_off),
                              reinterpret_cast<int32_t *>(host.data() + vw_off));
    }

    unsigned char *dev = nullptr;
    const size_t dev_bytes = tables_bytes + scratch_bytes;
    cudaError_t err = cudaSuccess;
    if (dev_bytes > 0) {
        err = cudaMallocAsync(reinterpret_cast<void **>(&dev), dev_bytes, st);
        if (err != cudaSuccess) return static_cast<int>(err);
    }
    if (tables_bytes > 0) {
        // Pageable source: the call returns once the bytes are staged, so `host` may go away.
        err = cudaMemcpyAsync(dev, host.data(), tables_bytes, cudaMemcpyHostToDevice, st);
    }

    const dim3 block(32, 8);
    const uint8_t *fit_src = rgb_dev;
    if (err == cudaSuccess && need_h) {
        uint8_t *scratch = dev + tables_bytes;
        const dim3 grid((p.fit_w + block.x - 1) / block.x, (h + block.y - 1) / block.y);
        resize_h_kernel<<<grid, block, 0, st>>>(rgb_dev, w, h, scratch, p.fit_w,
                                                reinterpret_cast<const int *>(dev + hb_off),
                                                reinterpret_cast<const int32_t *>(dev + hw_off), hk);
        err = cudaGetLastError();
        fit_src = scratch;
    }
    if (err == cudaSuccess) {
        FinishArgs a;
        a.src = fit_src;
        a.src_h = h;
        a.fit_w = p.fit_w;
        a.fit_h = p.fit_h;
        a.off_x = p.off_x;
        a.off_y = p.off_y;
        a.out_w = out_w;
        a.out_h = out_h;
        a.vbounds = need_v ? reinterpret_cast<const int *>(dev + vb_off) : nullptr;
        a.vweights = need_v ? reinterpret_cast<const int32_t *>(dev + vw_off) : nullptr;
        a.vksize = vk;
        a.chw = out_chw_dev;
        a.patches = out_patches_dev;
        const dim3 grid((out_w + block.x - 1) / block.x, (out_h + block.y - 1) / block.y);
        finish_kernel<<<grid, block, 0, st>>>(a);
        err = cudaGetLastError();
    }
    if (dev != nullptr) {
        const cudaError_t ferr = cudaFreeAsync(dev, st);
        if (err == cudaSuccess) err = ferr;
    }
    return err == cudaSuccess ? 0 : static_cast<int>(err);
}
