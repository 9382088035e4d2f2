#include "addon-vision.h"

#include "gguf.h"
#include "llama.h"
#include "mtmd-helper.h"
#include "mtmd.h"
#include "qwen-vision-encoder.h"

#include <chrono>
#include <cstring>
#include <memory>
#include <stdexcept>

namespace caprl {

namespace {

// mtmd's path for one image, as the engine takes it: tokenize (preprocess) then encode the chunk.
std::vector<float> encode_with_mtmd(mtmd_context * ctx, int32_t n_embd, const Image & img) {
    mtmd::bitmap bmp(img.width, img.height, img.rgb.data());
    mtmd::input_chunks chunks(mtmd_input_chunks_init());
    const char * marker = mtmd_default_marker();
    mtmd_input_text text{marker, strlen(marker), false, false};
    const mtmd_bitmap * bitmaps[1] = {bmp.ptr.get()};
    if (mtmd_tokenize(ctx, chunks.ptr.get(), &text, bitmaps, 1) != 0) throw std::runtime_error("mtmd_tokenize failed");
    for (size_t i = 0; i < chunks.size(); i++) {
        const mtmd_input_chunk * c = chunks[i];
        if (mtmd_input_chunk_get_type(c) != MTMD_INPUT_CHUNK_TYPE_IMAGE) continue;
        if (mtmd_encode_chunk(ctx, c) != 0) throw std::runtime_error("mtmd_encode_chunk failed");
        const float * out = mtmd_get_output_embd(ctx);
        return std::vector<float>(out, out + (size_t) n_embd * mtmd_input_chunk_get_n_tokens(c));
    }
    throw std::runtime_error("mtmd produced no image chunk");
}

// The embedding size of the mmproj's output (a vocab-only text model does not know its own).
int32_t projection_dim(const std::string & mmproj) {
    gguf_init_params gp{true, nullptr};
    gguf_context * g = gguf_init_from_file(mmproj.c_str(), gp);
    const int64_t id = g ? gguf_find_key(g, "clip.vision.projection_dim") : -1;
    const int32_t n = id >= 0 ? (int32_t) gguf_get_val_u32(g, id) : 0;
    if (g) gguf_free(g);
    if (n <= 0) throw std::runtime_error("cannot read clip.vision.projection_dim from " + mmproj);
    return n;
}

class VisionEncoderWrap : public Napi::ObjectWrap<VisionEncoderWrap> {
  public:
    static Napi::Function Init(Napi::Env env) {
        return DefineClass(env, "VisionEncoder", {InstanceMethod("encode", &VisionEncoderWrap::Encode),
                                                  InstanceMethod("reserve", &VisionEncoderWrap::Reserve),
                                                  InstanceMethod("memory", &VisionEncoderWrap::Memory)});
    }

    // options: { model, mmproj, encoder: 'caprl' | 'llama.cpp', nThreads?, useGpu? }
    VisionEncoderWrap(const Napi::CallbackInfo & info) : Napi::ObjectWrap<VisionEncoderWrap>(info) {
        Napi::Env env = info.Env();
        if (!info[0].IsObject()) throw Napi::TypeError::New(env, "options must be an object");
        Napi::Object o = info[0].As<Napi::Object>();
        const std::string model = o.Get("model").ToString().Utf8Value();
        const std::string mmproj = o.Get("mmproj").ToString().Utf8Value();
        const std::string kind = o.Get("encoder").ToString().Utf8Value();
        const int n_threads = o.Get("nThreads").IsNumber() ? o.Get("nThreads").ToNumber().Int32Value() : 1;
        const bool use_gpu = !o.Get("useGpu").IsBoolean() || o.Get("useGpu").ToBoolean().Value();
        try {
            if (kind == "caprl") {
                ours_ = std::make_unique<QwenVisionEncoder>(mmproj, use_gpu, n_threads);
                return;
            }
            if (kind != "llama.cpp") throw std::runtime_error("encoder must be 'caprl' or 'llama.cpp'");
            llama_backend_init();
            // mtmd wants a text model for its vocab (and checks n_embd against it when it has one).
            llama_model_params mp = llama_model_default_params();
            mp.vocab_only = true;
            model_ = llama_model_load_from_file(model.c_str(), mp);
            if (!model_) throw std::runtime_error("cannot load " + model);
            mtmd_context_params p = mtmd_context_params_default();
            p.use_gpu = use_gpu;
            p.n_threads = n_threads;
            p.print_timings = false;
            p.warmup = false;  // clip then sizes its buffers (and turns flash attention on where supported) at the first image
            mtmd_ = mtmd_init_from_file(mmproj.c_str(), model_, p);
            if (!mtmd_) throw std::runtime_error("cannot load " + mmproj);
            n_embd_ = projection_dim(mmproj);
        } catch (const std::exception & e) {
            throw Napi::Error::New(env, e.what());
        }
    }

    ~VisionEncoderWrap() override {
        if (mtmd_) mtmd_free(mtmd_);
        if (model_) llama_model_free(model_);
    }

  private:
    // encode(images) -> { embeddings: Float32Array[] (rows of nEmbd), nEmbd, ms }: ours in one
    // pass, llama.cpp's one image at a time; ms covers preprocessing and encoding, synchronously.
    Napi::Value Encode(const Napi::CallbackInfo & info) {
        Napi::Env env = info.Env();
        if (!info[0].IsArray()) throw Napi::TypeError::New(env, "images must be an array");
        Napi::Array a = info[0].As<Napi::Array>();
        std::vector<Image> images(a.Length());
        for (uint32_t i = 0; i < a.Length(); i++) {
            Napi::Object io = a.Get(i).As<Napi::Object>();
            images[i].width = io.Get("width").ToNumber().Uint32Value();
            images[i].height = io.Get("height").ToNumber().Uint32Value();
            Napi::Value rgb = io.Get("rgb");
            if (!rgb.IsBuffer()) throw Napi::TypeError::New(env, "image.rgb must be a Buffer");
            auto buf = rgb.As<Napi::Buffer<unsigned char>>();
            if (buf.Length() != (size_t) images[i].width * images[i].height * 3 || images[i].width == 0 || images[i].height == 0) {
                throw Napi::RangeError::New(env, "image buffer does not match its size");
            }
            images[i].rgb.assign(buf.Data(), buf.Data() + buf.Length());
        }
        std::vector<std::vector<float>> out;
        const auto t0 = std::chrono::steady_clock::now();
        try {
            if (ours_) {
                std::vector<const Image *> ptrs;
                for (const Image & img : images) ptrs.push_back(&img);
                out = ours_->encode(ptrs);
            } else {
                for (const Image & img : images) out.push_back(encode_with_mtmd(mtmd_, n_embd_, img));
            }
        } catch (const std::exception & e) {
            throw Napi::Error::New(env, e.what());
        }
        const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        Napi::Object r = Napi::Object::New(env);
        Napi::Array embd = Napi::Array::New(env, out.size());
        for (size_t i = 0; i < out.size(); i++) {
            Napi::Float32Array f = Napi::Float32Array::New(env, out[i].size());
            std::copy(out[i].begin(), out[i].end(), f.Data());
            embd.Set((uint32_t) i, f);
        }
        r.Set("embeddings", embd);
        r.Set("nEmbd", ours_ ? ours_->n_embd_out() : n_embd_);
        r.Set("ms", ms);
        r.Set("backend", ours_ ? ours_->backend_name() : std::string("clip"));
        if (ours_) {
            const QwenVisionEncoder::Timings tm = ours_->last_timings();
            Napi::Object phases = Napi::Object::New(env);
            phases.Set("prepMs", tm.prep);
            phases.Set("buildMs", tm.build);
            phases.Set("uploadMs", tm.upload);
            phases.Set("computeMs", tm.compute);
            phases.Set("downloadMs", tm.download);
            r.Set("phases", phases);
        }
        return r;
    }

    // reserve(): allocates our encoder's compute buffers for its largest graph (no-op for clip).
    Napi::Value Reserve(const Napi::CallbackInfo & info) {
        try {
            if (ours_) ours_->reserve();
        } catch (const std::exception & e) {
            throw Napi::Error::New(info.Env(), e.what());
        }
        return info.Env().Undefined();
    }

    // memory() -> { maxPatches, devices: [...] } for ours, null for clip.
    Napi::Value Memory(const Napi::CallbackInfo & info) {
        Napi::Env env = info.Env();
        if (!ours_) return env.Null();
        Napi::Object r = Napi::Object::New(env);
        r.Set("maxPatches", (double) ours_->max_patches());
        r.Set("devices", vision_memory_to_js(env, ours_->memory()));
        return r;
    }

    std::unique_ptr<QwenVisionEncoder> ours_;
    llama_model * model_ = nullptr;
    mtmd_context * mtmd_ = nullptr;
    int32_t n_embd_ = 0;
};

}  // namespace

Napi::Array vision_memory_to_js(Napi::Env env, const std::vector<QwenVisionEncoder::DeviceBytes> & memory) {
    Napi::Array a = Napi::Array::New(env, memory.size());
    for (size_t i = 0; i < memory.size(); i++) {
        Napi::Object d = Napi::Object::New(env);
        d.Set("device", memory[i].device);
        d.Set("host", memory[i].host);
        d.Set("weightsBytes", (double) memory[i].weights);
        d.Set("computeBytes", (double) memory[i].compute);
        a.Set((uint32_t) i, d);
    }
    return a;
}

Napi::Function vision_encoder_class(Napi::Env env) {
    return VisionEncoderWrap::Init(env);
}

}  // namespace caprl
