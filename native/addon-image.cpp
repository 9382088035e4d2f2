#include "addon-image.h"

#include "image-prep-ref.h"

#include <cstdint>
#include <memory>
#include <vector>

namespace caprl {

namespace {

// Resizes off the JS thread; the source Buffer is held by a reference until the work is done.
class ResizeWorker : public Napi::AsyncWorker {
  public:
    ResizeWorker(Napi::Env env, Napi::Buffer<uint8_t> src, int w, int h, int out_w, int out_h)
        : Napi::AsyncWorker(env), src_ref_(Napi::Persistent(src)), src_(src.Data()), w_(w), h_(h), out_w_(out_w), out_h_(out_h),
          deferred_(Napi::Promise::Deferred::New(env)) {}

    Napi::Promise promise() { return deferred_.Promise(); }

    void Execute() override {
        out_ = std::make_unique<std::vector<uint8_t>>((size_t) out_w_ * out_h_ * 3);
        if (caprl_resize_u8_ref(src_, w_, h_, out_w_, out_h_, CAPRL_RESIZE_STRETCH, out_->data()) != 0) {
            SetError("resizeRgb: the resize was refused");
        }
    }

    void OnOK() override {
        // The vector's memory becomes the Buffer's: no copy of the (megabytes of) pixels.
        std::vector<uint8_t> * v = out_.release();
        deferred_.Resolve(Napi::Buffer<uint8_t>::New(Env(), v->data(), v->size(), [](Napi::Env, uint8_t *, std::vector<uint8_t> * owned) { delete owned; }, v));
    }

    void OnError(const Napi::Error & e) override { deferred_.Reject(e.Value()); }

  private:
    Napi::Reference<Napi::Buffer<uint8_t>> src_ref_;
    const uint8_t * src_;
    int w_, h_, out_w_, out_h_;
    std::unique_ptr<std::vector<uint8_t>> out_;
    Napi::Promise::Deferred deferred_;
};

int side(const Napi::Value & v, const char * name) {
    const double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
    if (!(d >= 1 && d <= CAPRL_PREP_MAX_SIDE) || d != (double) (int) d) {
        throw Napi::RangeError::New(v.Env(), std::string("resizeRgb: ") + name + " must be an integer in 1.." + std::to_string(CAPRL_PREP_MAX_SIDE));
    }
    return (int) d;
}

// resizeRgb(rgb: Buffer, width, height, outWidth, outHeight): Promise<Buffer>
Napi::Value ResizeRgb(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    if (!info[0].IsBuffer()) throw Napi::TypeError::New(env, "resizeRgb: rgb must be a Buffer");
    Napi::Buffer<uint8_t> src = info[0].As<Napi::Buffer<uint8_t>>();
    const int w = side(info[1], "width"), h = side(info[2], "height"), ow = side(info[3], "outWidth"), oh = side(info[4], "outHeight");
    if (src.Length() != (size_t) w * h * 3) throw Napi::RangeError::New(env, "resizeRgb: rgb must hold width * height * 3 bytes");
    auto * worker = new ResizeWorker(env, src, w, h, ow, oh);
    Napi::Promise p = worker->promise();
    worker->Queue();
    return p;
}

}  // namespace

Napi::Function resize_rgb_function(Napi::Env env) { return Napi::Function::New(env, ResizeRgb, "resizeRgb"); }

}  // namespace caprl
