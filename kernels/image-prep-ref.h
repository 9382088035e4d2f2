/*
 * CPU reference of kernels/image-prep.h: the same function on host memory, plus the pieces the
 * CUDA wrapper shares with it (plan, filter tables, normalization) so both compute the exact same
 * thing. Plain C++17, no dependencies; C ABI so tests and the addon can call it.
 */
#ifndef CAPRL_IMAGE_PREP_REF_H
#define CAPRL_IMAGE_PREP_REF_H

#include "image-prep.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Fixed-point precision of the resampling weights (Pillow / llama.cpp: 32 - 8 - 2). */
#define CAPRL_RESAMPLE_PRECISION_BITS 22

/*
 * Same contract as caprl_image_prep_cuda, on host memory: rgb is w*h*3 bytes, out_chw and
 * out_patches are host buffers (either may be NULL, not both). Returns 0 or CAPRL_PREP_EINVAL.
 */
int caprl_image_prep_ref(const uint8_t *rgb, int w, int h, int out_w, int out_h, int mode,
                         float *out_chw, float *out_patches);

/* Only the resize + padding step: the uint8 RGB canvas (out_w*out_h*3 bytes) that gets normalized. */
int caprl_resize_u8_ref(const uint8_t *rgb, int w, int h, int out_w, int out_h, int mode,
                        uint8_t *out_rgb);

/*
 * Validates the arguments and says where the resized picture goes. Returns 0 or
 * CAPRL_PREP_EINVAL (sizes outside 1..CAPRL_PREP_MAX_SIDE, unknown mode). Whether the canvas
 * is a multiple of 28 is checked by the callers that write patches.
 */
int caprl_prep_make_plan(int w, int h, int out_w, int out_h, int mode, caprl_prep_plan *plan);

/*
 * Pillow bicubic filter table for resampling one dimension from in_size to out_size
 * (in_size != out_size). Returns ksize, the taps per output pixel; with bounds == NULL or
 * weights == NULL it only returns ksize, so callers can size: bounds[2*out_size] gets
 * (first input index, tap count) per output pixel, weights[out_size*ksize] the fixed-point
 * weights (unused taps 0). Returns 0 for invalid sizes.
 */
int caprl_resample_coeffs(int in_size, int out_size, int *bounds, int32_t *weights);

/* lut[c*256 + v] = ((float)v / 255.0f - mean[c]) / std[c]: the normalized value of every byte. */
void caprl_normalize_lut(float lut[3 * 256]);

/*
 * The canvas size llama.cpp's mtmd picks for Qwen2/2.5-VL (mtmd-image.cpp
 * img_tool::calc_size_preserved_ratio with align 28, in its float arithmetic, std::round = half
 * away from zero; llama.cpp's limits are min_pixels = 8*784, max_pixels = 4096*784; 0 disables
 * a limit). Returns 0 or CAPRL_PREP_EINVAL. Note: transformers' smart_resize rounds half to even
 * in double (src/images/qwen-resize.ts), which differs for sides at exact 28*(k+0.5) (e.g. 70).
 */
int caprl_llama_qwen_target_size(int w, int h, int min_pixels, int max_pixels, int *out_w, int *out_h);

#ifdef __cplusplus
}
#endif

#endif /* CAPRL_IMAGE_PREP_REF_H */
