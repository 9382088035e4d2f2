// The addon's resizeRgb: Pillow's bicubic resize (kernels/image-prep-ref) of an RGB8 image, on
// libuv's pool, for the JS image preparation (src/images/prepare.ts).
#pragma once

#include <napi.h>

namespace caprl {

Napi::Function resize_rgb_function(Napi::Env env);

}  // namespace caprl
