// Test driver exposing the CPU reference (kernels/image-prep-ref.cpp) to the JS tests
// (test/kernels.test.ts compiles it with g++ into a temp folder and compares its outputs with an
// independent TypeScript implementation and with Pillow's known values).
//
//   ref-check prep IN.rgb W H OUT_W OUT_H MODE OUT_PREFIX [both|chw|patches]
//       writes OUT_PREFIX.u8 (the uint8 canvas), and OUT_PREFIX.chw / OUT_PREFIX.patches (f32,
//       prefilled with NaN so unwritten elements show), prints "rc fit_w fit_h off_x off_y"
//   ref-check coeffs IN_SIZE OUT_SIZE      prints "ksize", then bounds, then weights, one line each
//   ref-check target < lines "w h min_pixels max_pixels"   prints "rc out_w out_h" per line
//   ref-check plan   < lines "w h out_w out_h mode"        prints "rc fit_w fit_h off_x off_y" per line
//   ref-check lut                          prints the 768 normalized values as f32 bit patterns
#include "../image-prep-ref.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

static bool write_file(const char *path, const void *data, size_t n) {
    FILE *f = std::fopen(path, "wb");
    if (!f) return false;
    const bool ok = std::fwrite(data, 1, n, f) == n;
    return std::fclose(f) == 0 && ok;
}

static int usage() {
    std::fprintf(stderr, "usage: ref-check prep|coeffs|target|plan|lut ...\n");
    return 3;
}

int main(int argc, char **argv) {
    if (argc < 2) return usage();
    const char *cmd = argv[1];
    if (!std::strcmp(cmd, "prep")) {
        if (argc < 9) return usage();
        const char *in = argv[2];
        const int w = std::atoi(argv[3]), h = std::atoi(argv[4]), ow = std::atoi(argv[5]), oh = std::atoi(argv[6]);
        const int mode = std::atoi(argv[7]);
        const std::string prefix = argv[8];
        const char *layouts = argc > 9 ? argv[9] : "both";
        std::vector<uint8_t> img((size_t)w * h * 3);
        FILE *f = std::fopen(in, "rb");
        if (!f || std::fread(img.data(), 1, img.size(), f) != img.size()) {
            std::fprintf(stderr, "ref-check: cannot read %s\n", in);
            return 2;
        }
        std::fclose(f);
        const bool want_chw = std::strcmp(layouts, "patches") != 0, want_pat = std::strcmp(layouts, "chw") != 0;
        const float nan = std::numeric_limits<float>::quiet_NaN();
        std::vector<float> chw(want_chw ? caprl_prep_chw_floats(ow, oh) : 0, nan);
        std::vector<float> pat(want_pat ? caprl_prep_patch_floats(ow, oh) : 0, nan);
        std::vector<uint8_t> canvas((size_t)ow * oh * 3, 0xAB);
        caprl_prep_plan p{};
        const int prc = caprl_prep_make_plan(w, h, ow, oh, mode, &p);
        const int rc = caprl_image_prep_ref(img.data(), w, h, ow, oh, mode, want_chw ? chw.data() : nullptr,
                                            want_pat ? pat.data() : nullptr);
        if (rc == 0) {
            if (caprl_resize_u8_ref(img.data(), w, h, ow, oh, mode, canvas.data()) != 0) return 2;
            if (!write_file((prefix + ".u8").c_str(), canvas.data(), canvas.size())) return 2;
            if (want_chw && !write_file((prefix + ".chw").c_str(), chw.data(), chw.size() * 4)) return 2;
            if (want_pat && !write_file((prefix + ".patches").c_str(), pat.data(), pat.size() * 4)) return 2;
        }
        std::printf("%d %d %d %d %d\n", rc, prc == 0 ? p.fit_w : 0, prc == 0 ? p.fit_h : 0, prc == 0 ? p.off_x : 0,
                    prc == 0 ? p.off_y : 0);
        return 0;
    }
    if (!std::strcmp(cmd, "coeffs")) {
        if (argc < 4) return usage();
        const int in = std::atoi(argv[2]), out = std::atoi(argv[3]);
        const int ksize = caprl_resample_coeffs(in, out, nullptr, nullptr);
        std::printf("%d\n", ksize);
        if (ksize == 0) return 0;
        std::vector<int> bounds((size_t)out * 2);
        std::vector<int32_t> weights((size_t)out * ksize);
        if (caprl_resample_coeffs(in, out, bounds.data(), weights.data()) != ksize) return 2;
        for (size_t i = 0; i < bounds.size(); i++) std::printf(i ? " %d" : "%d", bounds[i]);
        std::printf("\n");
        for (size_t i = 0; i < weights.size(); i++) std::printf(i ? " %d" : "%d", (int)weights[i]);
        std::printf("\n");
        return 0;
    }
    if (!std::strcmp(cmd, "target")) {
        int w, h, mn, mx;
        while (std::scanf("%d %d %d %d", &w, &h, &mn, &mx) == 4) {
            int ow = 0, oh = 0;
            const int rc = caprl_llama_qwen_target_size(w, h, mn, mx, &ow, &oh);
            std::printf("%d %d %d\n", rc, ow, oh);
        }
        return 0;
    }
    if (!std::strcmp(cmd, "plan")) {
        int w, h, ow, oh, mode;
        while (std::scanf("%d %d %d %d %d", &w, &h, &ow, &oh, &mode) == 5) {
            caprl_prep_plan p{};
            const int rc = caprl_prep_make_plan(w, h, ow, oh, mode, &p);
            std::printf("%d %d %d %d %d\n", rc, p.fit_w, p.fit_h, p.off_x, p.off_y);
        }
        return 0;
    }
    if (!std::strcmp(cmd, "lut")) {
        float lut[3 * 256];
        caprl_normalize_lut(lut);
        for (int i = 0; i < 3 * 256; i++) {
            uint32_t bits;
            std::memcpy(&bits, &lut[i], 4);
            std::printf(i ? " %u" : "%u", bits);
        }
        std::printf("\n");
        return 0;
    }
    return usage();
}
