// GPU check of kernels/image-prep.cu against the CPU reference (kernels/image-prep-ref.cpp).
//
//   nvcc -O2 -std=c++17 -arch=sm_90a -Ikernels kernels/test/gpu-check.cu kernels/image-prep.cu
//        kernels/image-prep-ref.cpp -o gpu-check      (one command line)
//   ./gpu-check [--iters N] [--sizes 224x224,1024x1024] [--dump DIR]
//
// For each input size, on a random RGB image (noise: every byte value, and the bicubic overshoot
// that exercises the clamping), in both resize modes, at the canvas llama.cpp would pick
// (caprl_llama_qwen_target_size with its 8..4096-token limits): runs the reference and the kernel,
// compares every float of both layouts (the device outputs are first filled with NaN, so an
// element the kernel never wrote is a mismatch), and times the kernel with CUDA events.
//
// Tolerance: the two sides are expected to agree exactly (max abs error 0): the resampler is
// integer arithmetic on the same host-computed tables, and the normalization is three IEEE f32
// operations rounded to nearest on both sides (__fdiv_rn/__fsub_rn on the device). The check
// fails above 1e-5, far below the smallest step a one-level uint8 difference makes
// (1/255/0.2758 = 0.0142), so any resampling difference fails it, while a last-bit difference
// from a compiler that contracted or reordered float operations (~5e-7 at |x| <= 2.2) would not.
//
// --dump DIR writes, for each size, the input (img-WxH.rgb) and the reference patches in stretch
// mode (patches-WxH-OWxOH.f32) for kernels/test/hf-check.py (transformers' processor).
//
// Exit: 0 all equal, 1 a mismatch, 2 no CUDA device or a CUDA error, 3 bad usage.
#include "image-prep.h"
#include "image-prep-ref.h"

#include <cuda_runtime.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#define CK(call)                                                                                    \
    do {                                                                                            \
        cudaError_t e_ = (call);                                                                    \
        if (e_ != cudaSuccess) {                                                                    \
            std::fprintf(stderr, "gpu-check: %s failed: %s\n", #call, cudaGetErrorString(e_));      \
            std::exit(2);                                                                           \
        }                                                                                           \
    } while (0)

static const double kTolerance = 1e-5;

static void fill_random(std::vector<uint8_t> &img, uint64_t seed) {
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    for (auto &b : img) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        b = static_cast<uint8_t>(s >> 32);
    }
}

struct Cmp {
    double max_abs = 0;
    size_t mismatches = 0;
};

static Cmp compare(const std::vector<float> &ref, const std::vector<float> &got) {
    Cmp r;
    for (size_t i = 0; i < ref.size(); i++) {
        const double d = std::fabs((double)ref[i] - (double)got[i]);
        if (!(d <= kTolerance)) r.mismatches++;  // NaN (unwritten) counts
        if (d > r.max_abs || std::isnan(d)) r.max_abs = std::isnan(d) ? INFINITY : d;
    }
    return r;
}

int main(int argc, char **argv) {
    int iters = 20;
    std::string sizes = "224x224,1024x1024,1000x700,2048x1536,1280x720,333x517,4000x3000";
    std::string dump;
    for (int i = 1; i < argc; i++) {
        if (!std::strcmp(argv[i], "--iters") && i + 1 < argc) iters = std::atoi(argv[++i]);
        else if (!std::strcmp(argv[i], "--sizes") && i + 1 < argc) sizes = argv[++i];
        else if (!std::strcmp(argv[i], "--dump") && i + 1 < argc) dump = argv[++i];
        else {
            std::fprintf(stderr, "usage: gpu-check [--iters N] [--sizes WxH,...] [--dump DIR]\n");
            return 3;
        }
    }
    int ndev = 0;
    const cudaError_t derr = cudaGetDeviceCount(&ndev);
    if (derr != cudaSuccess || ndev == 0) {
        std::printf("gpu-check: no CUDA device (%s)\n", derr != cudaSuccess ? cudaGetErrorString(derr) : "0 devices");
        return 2;
    }
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    std::printf("gpu-check: %s (sm_%d%d), %d iterations per timing, tolerance %.0e\n", prop.name, prop.major,
                prop.minor, iters, kTolerance);
    cudaStream_t stream;
    CK(cudaStreamCreate(&stream));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));

    bool ok = true;
    size_t pos = 0;
    int case_no = 0;
    while (pos < sizes.size()) {
        size_t comma = sizes.find(',', pos);
        if (comma == std::string::npos) comma = sizes.size();
        const std::string item = sizes.substr(pos, comma - pos);
        pos = comma + 1;
        int w = 0, h = 0;
        if (std::sscanf(item.c_str(), "%dx%d", &w, &h) != 2 || w <= 0 || h <= 0) {
            std::fprintf(stderr, "gpu-check: bad size '%s'\n", item.c_str());
            return 3;
        }
        int ow = 0, oh = 0;
        caprl_llama_qwen_target_size(w, h, 8 * 784, 4096 * 784, &ow, &oh);
        std::vector<uint8_t> img((size_t)w * h * 3);
        fill_random(img, (uint64_t)w * 100003 + h);
        const size_t nchw = caprl_prep_chw_floats(ow, oh), npat = caprl_prep_patch_floats(ow, oh);

        uint8_t *d_rgb = nullptr, *h_rgb = nullptr;
        float *d_chw = nullptr, *d_pat = nullptr;
        CK(cudaMalloc(&d_rgb, img.size()));
        CK(cudaMallocHost(&h_rgb, img.size()));
        std::memcpy(h_rgb, img.data(), img.size());
        CK(cudaMalloc(&d_chw, nchw * sizeof(float)));
        CK(cudaMalloc(&d_pat, npat * sizeof(float)));
        CK(cudaMemcpy(d_rgb, img.data(), img.size(), cudaMemcpyHostToDevice));

        for (int mode : {CAPRL_RESIZE_PAD_CEIL, CAPRL_RESIZE_STRETCH}) {
            std::vector<float> ref_chw(nchw), ref_pat(npat), got_chw(nchw), got_pat(npat);
            const auto c0 = std::chrono::steady_clock::now();
            const int rrc = caprl_image_prep_ref(img.data(), w, h, ow, oh, mode, ref_chw.data(), ref_pat.data());
            const double cpu_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - c0).count();
            if (rrc != 0) {
                std::printf("FAIL %dx%d: reference returned %d\n", w, h, rrc);
                ok = false;
                continue;
            }
            CK(cudaMemset(d_chw, 0xFF, nchw * sizeof(float)));  // NaN everywhere
            CK(cudaMemset(d_pat, 0xFF, npat * sizeof(float)));
            int rc = caprl_image_prep_cuda(d_rgb, w, h, ow, oh, mode, d_chw, d_pat, stream);
            if (rc != 0) {
                std::printf("FAIL %dx%d: caprl_image_prep_cuda returned %d\n", w, h, rc);
                return 2;
            }
            CK(cudaStreamSynchronize(stream));
            CK(cudaMemcpy(got_chw.data(), d_chw, nchw * sizeof(float), cudaMemcpyDeviceToHost));
            CK(cudaMemcpy(got_pat.data(), d_pat, npat * sizeof(float), cudaMemcpyDeviceToHost));
            const Cmp cc = compare(ref_chw, got_chw), cp = compare(ref_pat, got_pat);

            // Timing: kernel alone (image already on the device), then with the upload from pinned memory.
            CK(cudaEventRecord(e0, stream));
            for (int i = 0; i < iters; i++) caprl_image_prep_cuda(d_rgb, w, h, ow, oh, mode, d_chw, d_pat, stream);
            CK(cudaEventRecord(e1, stream));
            CK(cudaEventSynchronize(e1));
            float k_ms = 0;
            CK(cudaEventElapsedTime(&k_ms, e0, e1));
            CK(cudaEventRecord(e0, stream));
            for (int i = 0; i < iters; i++) {
                CK(cudaMemcpyAsync(d_rgb, h_rgb, img.size(), cudaMemcpyHostToDevice, stream));
                caprl_image_prep_cuda(d_rgb, w, h, ow, oh, mode, d_chw, d_pat, stream);
            }
            CK(cudaEventRecord(e1, stream));
            CK(cudaEventSynchronize(e1));
            float u_ms = 0;
            CK(cudaEventElapsedTime(&u_ms, e0, e1));
            CK(cudaGetLastError());

            caprl_prep_plan plan;
            caprl_prep_make_plan(w, h, ow, oh, mode, &plan);
            const bool pass = cc.mismatches == 0 && cp.mismatches == 0;
            ok = ok && pass;
            std::printf("%s %4dx%-4d -> %4dx%-4d %-7s fit %4dx%-4d chw max_abs_err %.3g patches max_abs_err %.3g "
                        "mismatches %zu | gpu %.3f ms/img (+upload %.3f) | cpu ref %.1f ms\n",
                        pass ? "ok  " : "FAIL", w, h, ow, oh, mode == CAPRL_RESIZE_PAD_CEIL ? "pad" : "stretch",
                        plan.fit_w, plan.fit_h, cc.max_abs, cp.max_abs, cc.mismatches + cp.mismatches, k_ms / iters,
                        u_ms / iters, cpu_ms);
            if (!dump.empty() && mode == CAPRL_RESIZE_STRETCH) {
                char name[512];
                std::snprintf(name, sizeof name, "%s/img-%dx%d.rgb", dump.c_str(), w, h);
                FILE *f = std::fopen(name, "wb");
                if (f) { std::fwrite(img.data(), 1, img.size(), f); std::fclose(f); }
                std::snprintf(name, sizeof name, "%s/patches-%dx%d-%dx%d.f32", dump.c_str(), w, h, ow, oh);
                f = std::fopen(name, "wb");
                if (f) { std::fwrite(ref_pat.data(), sizeof(float), ref_pat.size(), f); std::fclose(f); }
            }
            case_no++;
        }
        CK(cudaFree(d_rgb));
        CK(cudaFreeHost(h_rgb));
        CK(cudaFree(d_chw));
        CK(cudaFree(d_pat));
    }
    std::printf("gpu-check: %d cases, %s\n", case_no, ok ? "all equal" : "MISMATCH");
    return ok ? 0 : 1;
}
