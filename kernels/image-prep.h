/*
 * caprl image preparation for Qwen2.5-VL: resize an RGB8 image onto the 28-multiple grid,
 * normalize it with the CLIP mean/std, and lay it out for a vision encoder. C ABI.
 *
 * One call produces either or both of two layouts (pass NULL for one you do not want):
 *   out_chw     - planar normalized f32 image, [3][out_h][out_w] (R plane, G plane, B plane):
 *                 exactly the `inp_raw` tensor llama.cpp's clip graph consumes for one still
 *                 image (clip.cpp clip_image_batch_encode; models/qwen2vl.cpp convolves it with
 *                 two 14x14 conv2d kernels, one per temporal slot, and adds them).
 *   out_patches - HF-order flattened temporal patches, [n_patches][1176] with
 *                 n_patches = (out_h/14)*(out_w/14) and 1176 = 3 channels * 2 temporal * 14 * 14:
 *                 what transformers' Qwen2VLImageProcessor hands the HF vision model
 *                 (`pixel_values`). Rows go by 2x2 merge windows (window-major, then the 4
 *                 patches of a window row-major); within a row: channel, then temporal slot
 *                 (the single image repeated twice), then the 14x14 pixels row-major.
 *
 * Resize: Pillow's separable bicubic (a = -0.5, antialiased when downscaling, 22-bit fixed point,
 * horizontal pass first, uint8 between the passes), which is what llama.cpp's mtmd
 * (mtmd-image.cpp img_tool::resize_pillow) and HF's PIL path both use. The mode says where the
 * resized picture goes on the out_w x out_h canvas:
 *   CAPRL_RESIZE_PAD_CEIL - llama.cpp's Qwen2.5-VL behaviour (hparams.image_resize_pad = PAD_CEIL):
 *                           keep the aspect ratio (scale = min(out_w/w, out_h/h) in float,
 *                           fitted size = min(ceil(side*scale), out side)), centre it, fill
 *                           the rest with black (0,0,0) before normalization.
 *   CAPRL_RESIZE_STRETCH  - HF's behaviour: resize straight to out_w x out_h.
 * When out size == input size both modes copy the pixels untouched (as llama.cpp does).
 *
 * Normalization, per channel c, from the uint8 value v (llama.cpp clip_image_f32::from_u8 then
 * normalize): x = ((float)v / 255.0f - mean[c]) / std[c], in IEEE f32, round to nearest.
 * The CUDA kernel and the CPU reference (image-prep-ref.h) give bit-identical results.
 *
 * Return codes: 0 = success; CAPRL_PREP_EINVAL (< 0) = bad arguments (sizes, NULLs, a patch
 * layout requested for a canvas that is not a multiple of 28); > 0 = a cudaError_t.
 */
#ifndef CAPRL_IMAGE_PREP_H
#define CAPRL_IMAGE_PREP_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CAPRL_PATCH_SIZE 14
#define CAPRL_MERGE_SIZE 2
#define CAPRL_TEMPORAL_PATCH_SIZE 2
/* both sides of the canvas must be multiples of this for the patch layout (and for llama.cpp) */
#define CAPRL_GRID_FACTOR (CAPRL_PATCH_SIZE * CAPRL_MERGE_SIZE)
/* floats per HF patch row: 3 * 2 * 14 * 14 */
#define CAPRL_PATCH_ROW (3 * CAPRL_TEMPORAL_PATCH_SIZE * CAPRL_PATCH_SIZE * CAPRL_PATCH_SIZE)
/* largest side accepted for input or output (llama.cpp refuses resize targets above 65536) */
#define CAPRL_PREP_MAX_SIDE 65536

#define CAPRL_PREP_EINVAL (-1)

/* CLIP (OpenAI) mean and std, as Qwen2.5-VL's preprocessor_config.json gives them. */
#define CAPRL_CLIP_MEAN_R 0.48145466f
#define CAPRL_CLIP_MEAN_G 0.4578275f
#define CAPRL_CLIP_MEAN_B 0.40821073f
#define CAPRL_CLIP_STD_R 0.26862954f
#define CAPRL_CLIP_STD_G 0.26130258f
#define CAPRL_CLIP_STD_B 0.27577711f

typedef enum caprl_resize_mode {
    CAPRL_RESIZE_PAD_CEIL = 0, /* llama.cpp mtmd for Qwen2.5-VL: fit, centre, black padding */
    CAPRL_RESIZE_STRETCH = 1   /* transformers Qwen2VLImageProcessor (PIL): resize to the canvas */
} caprl_resize_mode;

/* Where the resized picture lands on the canvas (see caprl_prep_make_plan in image-prep-ref.h). */
typedef struct caprl_prep_plan {
    int in_w, in_h;   /* source image */
    int out_w, out_h; /* canvas */
    int fit_w, fit_h; /* resized picture, fit_w <= out_w, fit_h <= out_h */
    int off_x, off_y; /* its top-left corner on the canvas */
} caprl_prep_plan;

/* Number of floats each output needs. */
static inline size_t caprl_prep_chw_floats(int out_w, int out_h) {
    return (size_t)3 * (size_t)out_w * (size_t)out_h;
}
static inline size_t caprl_prep_patch_floats(int out_w, int out_h) {
    return (size_t)CAPRL_TEMPORAL_PATCH_SIZE * 3 * (size_t)out_w * (size_t)out_h;
}

/*
 * The CUDA kernel. rgb_dev: w*h*3 bytes (RGBRGB..., rows top to bottom) in device memory;
 * out_chw_dev / out_patches_dev: device buffers of caprl_prep_chw_floats / caprl_prep_patch_floats
 * floats, or NULL. All work is queued on `stream` (NULL = the legacy default stream): filter
 * tables are computed on the host and copied, scratch memory comes from cudaMallocAsync and is
 * freed on the stream. The call returns once the work is queued; synchronize the stream before
 * reading the outputs. Safe to call concurrently on different streams.
 * `stream` is a cudaStream_t (typedef struct CUstream_st *cudaStream_t), spelled so that this
 * header needs no CUDA header.
 */
int caprl_image_prep_cuda(const uint8_t *rgb_dev, int w, int h, int out_w, int out_h, int mode,
                          float *out_chw_dev, float *out_patches_dev, struct CUstream_st *stream);

#ifdef __cplusplus
}
#endif

#endif /* CAPRL_IMAGE_PREP_H */
