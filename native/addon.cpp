// The Node-API surface: converts JS objects to the engine's plain structs and back.
// Shapes are documented in src/engine/native-types.ts; JS validates requests before they get here.
#include "addon-image.h"
#include "addon-vision.h"
#include "engine.h"

#include <napi.h>

#include <memory>

#ifndef CAPRL_LLAMA_COMMIT
#define CAPRL_LLAMA_COMMIT "unknown"
#endif

namespace caprl {
namespace {

std::string get_string(const Napi::Object & o, const char * key, const std::string & def = "") {
    Napi::Value v = o.Get(key);
    return v.IsString() ? v.As<Napi::String>().Utf8Value() : def;
}

double get_number(const Napi::Object & o, const char * key, double def) {
    Napi::Value v = o.Get(key);
    return v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : def;
}

bool get_bool(const Napi::Object & o, const char * key, bool def) {
    Napi::Value v = o.Get(key);
    return v.IsBoolean() ? v.As<Napi::Boolean>().Value() : def;
}

Napi::Object require_object(const Napi::Value & v, const char * what) {
    if (!v.IsObject()) throw Napi::TypeError::New(v.Env(), std::string(what) + " must be an object");
    return v.As<Napi::Object>();
}

SamplingParams to_sampling(const Napi::Object & o) {
    SamplingParams p;
    p.temperature = (float) get_number(o, "temperature", p.temperature);
    p.top_p = (float) get_number(o, "topP", p.top_p);
    p.top_k = (int32_t) get_number(o, "topK", p.top_k);
    p.min_p = (float) get_number(o, "minP", p.min_p);
    p.repetition_penalty = (float) get_number(o, "repetitionPenalty", p.repetition_penalty);
    p.presence_penalty = (float) get_number(o, "presencePenalty", p.presence_penalty);
    p.frequency_penalty = (float) get_number(o, "frequencyPenalty", p.frequency_penalty);
    p.seed = (int64_t) get_number(o, "seed", (double) p.seed);
    p.max_tokens = (int32_t) get_number(o, "maxTokens", p.max_tokens);
    p.min_tokens = (int32_t) get_number(o, "minTokens", p.min_tokens);
    p.ignore_eos = get_bool(o, "ignoreEos", p.ignore_eos);
    p.logprobs = (int32_t) get_number(o, "logprobs", p.logprobs);
    Napi::Value stop = o.Get("stop");
    if (stop.IsArray()) {
        Napi::Array a = stop.As<Napi::Array>();
        for (uint32_t i = 0; i < a.Length(); i++) p.stop.push_back(a.Get(i).ToString().Utf8Value());
    }
    Napi::Value ids = o.Get("stopTokenIds");
    if (ids.IsArray()) {
        Napi::Array a = ids.As<Napi::Array>();
        for (uint32_t i = 0; i < a.Length(); i++) p.stop_token_ids.push_back(a.Get(i).ToNumber().Int32Value());
    }
    return p;
}

Request to_request(const Napi::Object & o) {
    Request r;
    r.id = (int64_t) get_number(o, "id", 0);
    r.n = (int32_t) get_number(o, "n", 1);
    r.prompt = get_string(o, "prompt");
    Napi::Value images = o.Get("images");
    if (images.IsArray()) {
        Napi::Array a = images.As<Napi::Array>();
        for (uint32_t i = 0; i < a.Length(); i++) {
            Napi::Object io = require_object(a.Get(i), "image");
            auto img = std::make_shared<Image>();
            img->width = (uint32_t) get_number(io, "width", 0);
            img->height = (uint32_t) get_number(io, "height", 0);
            Napi::Value rgb = io.Get("rgb");
            if (!rgb.IsBuffer()) throw Napi::TypeError::New(o.Env(), "image.rgb must be a Buffer");
            auto buf = rgb.As<Napi::Buffer<unsigned char>>();
            img->rgb.assign(buf.Data(), buf.Data() + buf.Length());
            r.images.push_back(std::move(img));
        }
    }
    r.sampling = to_sampling(require_object(o.Get("sampling"), "sampling"));
    return r;
}

Napi::Object to_js(Napi::Env env, const Timings & t) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("queued", t.queued);
    if (t.prefill) o.Set("prefill", *t.prefill);
    if (t.decode) o.Set("decode", *t.decode);
    if (t.image_encode) o.Set("imageEncode", *t.image_encode);
    return o;
}

Napi::Value to_js(Napi::Env env, const Event & ev) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("id", Napi::Number::New(env, (double) ev.id));
    o.Set("index", Napi::Number::New(env, ev.index));
    Napi::Array toks = Napi::Array::New(env, ev.tokens.size());
    for (size_t i = 0; i < ev.tokens.size(); i++) toks.Set((uint32_t) i, Napi::Number::New(env, ev.tokens[i]));
    o.Set("tokens", toks);
    o.Set("text", Napi::String::New(env, ev.text));
    if (ev.has_logprobs) {
        Napi::Array lps = Napi::Array::New(env, ev.logprobs.size());
        for (size_t i = 0; i < ev.logprobs.size(); i++) {
            const TokenLogprob & lp = ev.logprobs[i];
            Napi::Object l = Napi::Object::New(env);
            l.Set("token", lp.token);
            l.Set("text", lp.text);
            l.Set("logprob", lp.logprob);
            Napi::Array top = Napi::Array::New(env, lp.top.size());
            for (size_t k = 0; k < lp.top.size(); k++) {
                Napi::Object t = Napi::Object::New(env);
                t.Set("token", lp.top[k].token);
                t.Set("text", lp.top[k].text);
                t.Set("logprob", lp.top[k].logprob);
                top.Set((uint32_t) k, t);
            }
            l.Set("top", top);
            lps.Set((uint32_t) i, l);
        }
        o.Set("logprobs", lps);
    }
    if (ev.accepted) {
        Napi::Object a = Napi::Object::New(env);
        a.Set("promptTokens", ev.accepted->prompt_tokens);
        a.Set("maxTokens", ev.accepted->max_tokens);
        o.Set("accepted", a);
    }
    if (ev.finish) {
        const Finish & f = *ev.finish;
        Napi::Object fo = Napi::Object::New(env);
        fo.Set("reason", finish_reason_name(f.reason));
        fo.Set("promptTokens", f.prompt_tokens);
        fo.Set("completionTokens", f.completion_tokens);
        if (!f.error.empty()) fo.Set("error", f.error);
        if (f.error_kind != ErrorKind::kNone) fo.Set("errorKind", error_kind_name(f.error_kind));
        if (!f.error_param.empty()) fo.Set("errorParam", f.error_param);
        if (!f.error_code.empty()) fo.Set("errorCode", f.error_code);
        if (f.stopped_by_text) fo.Set("stoppedBy", *f.stopped_by_text);
        else if (f.stopped_by_token) fo.Set("stoppedBy", *f.stopped_by_token);
        if (f.timings) fo.Set("timings", to_js(env, *f.timings));
        o.Set("finish", fo);
    }
    return o;
}

using EventBatch = std::vector<Event>;

void deliver(Napi::Env env, Napi::Function callback, std::nullptr_t *, EventBatch * batch) {
    std::unique_ptr<EventBatch> owned(batch);
    if (env == nullptr || callback.IsEmpty()) return;
    Napi::Array arr = Napi::Array::New(env, owned->size());
    for (size_t i = 0; i < owned->size(); i++) arr.Set((uint32_t) i, to_js(env, (*owned)[i]));
    callback.Call({arr});
}

using EventTsfn = Napi::TypedThreadSafeFunction<std::nullptr_t, EventBatch, deliver>;

// Joins the engine thread off the JS thread, then resolves close()'s promise.
class CloseWorker : public Napi::AsyncWorker {
  public:
    CloseWorker(Napi::Env env, std::shared_ptr<Engine> engine, EventTsfn * tsfn)
        : Napi::AsyncWorker(env), engine_(std::move(engine)), tsfn_(tsfn), deferred_(Napi::Promise::Deferred::New(env)) {}
    Napi::Promise promise() { return deferred_.Promise(); }
    void Execute() override { engine_->stop(); }
    void OnOK() override {
        tsfn_->Release();
        deferred_.Resolve(Env().Undefined());
    }

  private:
    std::shared_ptr<Engine> engine_;
    EventTsfn * tsfn_;
    Napi::Promise::Deferred deferred_;
};

class EngineWrap : public Napi::ObjectWrap<EngineWrap> {
  public:
    static Napi::Function Init(Napi::Env env) {
        return DefineClass(env, "Engine", {
            InstanceMethod("info", &EngineWrap::Info),
            InstanceMethod("submit", &EngineWrap::Submit),
            InstanceMethod("flush", &EngineWrap::Flush),
            InstanceMethod("cancel", &EngineWrap::Cancel),
            InstanceMethod("tokenize", &EngineWrap::Tokenize),
            InstanceMethod("tokenizePrompt", &EngineWrap::TokenizePrompt),
            InstanceMethod("detokenize", &EngineWrap::Detokenize),
            InstanceMethod("applyChatTemplate", &EngineWrap::ApplyChatTemplate),
            InstanceMethod("stats", &EngineWrap::Stats),
            InstanceMethod("close", &EngineWrap::Close),
        });
    }

    EngineWrap(const Napi::CallbackInfo & info) : Napi::ObjectWrap<EngineWrap>(info) {
        Napi::Env env = info.Env();
        Napi::Object o = require_object(info[0], "options");
        if (!info[1].IsFunction()) throw Napi::TypeError::New(env, "onEvents must be a function");
        EngineOptions opts;  // each field's default is its own (native/types.h)
        opts.model = get_string(o, "model");
        opts.mmproj = get_string(o, "mmproj");
        opts.n_ctx = (uint32_t) get_number(o, "nCtx", opts.n_ctx);
        opts.kv_cache_bytes = (uint64_t) get_number(o, "kvCacheBytes", (double) opts.kv_cache_bytes);
        opts.memory_fraction = get_number(o, "memoryFraction", opts.memory_fraction);
        opts.max_model_len = (uint32_t) get_number(o, "maxModelLen", opts.max_model_len);
        const double max_seqs = get_number(o, "maxSeqs", opts.max_seqs);
        if (!(max_seqs >= 0 && max_seqs <= 65536)) throw Napi::RangeError::New(env, "maxSeqs must be 0 (fit the KV cache) or positive");
        opts.max_seqs = (uint32_t) max_seqs;
        opts.n_batch = (uint32_t) get_number(o, "nBatch", opts.n_batch);
        opts.n_ubatch = (uint32_t) get_number(o, "nUbatch", opts.n_ubatch);
        opts.n_threads = (int32_t) get_number(o, "nThreads", opts.n_threads);
        opts.n_vision_threads = (int32_t) get_number(o, "nVisionThreads", opts.n_vision_threads);
        opts.n_sampling_threads = (int32_t) get_number(o, "nSamplingThreads", opts.n_sampling_threads);
        opts.n_gpu_layers = (int32_t) get_number(o, "nGpuLayers", opts.n_gpu_layers);
        opts.chat_template = get_string(o, "chatTemplate", opts.chat_template);
        opts.log_level = get_string(o, "logLevel", opts.log_level);
        opts.image_cache_bytes = (size_t) get_number(o, "imageCacheBytes", (double) opts.image_cache_bytes);
        opts.vision_encoder = get_string(o, "visionEncoder", opts.vision_encoder);
        if (opts.vision_encoder != "llama.cpp" && opts.vision_encoder != "caprl") {
            throw Napi::RangeError::New(env, "visionEncoder must be 'llama.cpp' or 'caprl'");
        }
        if (opts.model.empty()) throw Napi::TypeError::New(env, "options.model is required");
        if (opts.n_batch < 1) throw Napi::RangeError::New(env, "nBatch must be positive");
        const int kv_modes = (opts.n_ctx > 0) + (opts.kv_cache_bytes > 0) + (opts.memory_fraction > 0);
        if (kv_modes != 1 || (opts.n_ctx > 0 && opts.n_ctx < 16) || opts.memory_fraction > 1) {
            throw Napi::RangeError::New(env, "give exactly one of nCtx (>= 16), kvCacheBytes (> 0) or memoryFraction (in (0, 1])");
        }

        tsfn_ = EventTsfn::New(env, info[1].As<Napi::Function>(), "caprl-engine-events", 0, 1);
        try {
            EventTsfn * tsfn = &tsfn_;
            engine_ = std::make_shared<Engine>(opts, [tsfn](std::vector<Event> && events) {
                tsfn->NonBlockingCall(new EventBatch(std::move(events)));
            });
        } catch (const std::exception & e) {
            tsfn_.Release();
            throw Napi::Error::New(env, e.what());
        }
    }

    ~EngineWrap() override {
        if (engine_ && !closed_) {
            engine_->stop();
            tsfn_.Release();
        }
    }

  private:
    Engine & engine(Napi::Env env) {
        if (!engine_ || closed_) throw Napi::Error::New(env, "engine is closed");
        return *engine_;
    }

    Napi::Value Info(const Napi::CallbackInfo & info) {
        const EngineInfo & i = engine(info.Env()).info();
        Napi::Env env = info.Env();
        Napi::Object o = Napi::Object::New(env);
        o.Set("chatTemplate", i.chat_template);
        o.Set("mediaMarker", i.media_marker);
        o.Set("nCtx", i.n_ctx);
        o.Set("maxModelLen", i.max_model_len);
        o.Set("nCtxTrain", i.n_ctx_train);
        o.Set("nVocab", i.n_vocab);
        o.Set("hasVision", i.has_vision);
        o.Set("imagePromptRows", i.image_prompt_rows);
        Napi::Array devs = Napi::Array::New(env, i.devices.size());
        for (size_t k = 0; k < i.devices.size(); k++) devs.Set((uint32_t) k, i.devices[k]);
        o.Set("devices", devs);
        o.Set("maxSeqs", i.max_seqs);
        o.Set("nLayers", i.n_layers);
        o.Set("nGpuLayers", i.n_gpu_layers);
        Napi::Object th = Napi::Object::New(env);
        th.Set("model", i.threads.model);
        th.Set("vision", i.threads.vision);
        th.Set("cpuTurns", i.threads.cpu_turns);
        o.Set("threads", th);
        const KvCacheReport & kv = i.kv_cache;
        Napi::Object k = Napi::Object::New(env);
        k.Set("sizedBy", kv.sized_by);
        k.Set("layout", kv.layout);
        k.Set("device", kv.device);
        k.Set("onGpu", kv.on_gpu);
        k.Set("deviceTotalBytes", (double) kv.device_total_bytes);
        k.Set("deviceFreeBytes", (double) kv.device_free_bytes);
        k.Set("tokens", kv.tokens);
        k.Set("bytes", (double) kv.bytes);
        k.Set("bytesPerToken", kv.bytes_per_token);
        k.Set("computeBytes", (double) kv.compute_bytes);
        k.Set("nonKvBytes", (double) kv.non_kv_bytes);
        k.Set("memoryFraction", kv.memory_fraction);
        o.Set("kvCache", k);
        const auto & ve = i.vision_encoder;
        if (ve.kind.empty()) {
            o.Set("visionEncoder", env.Null());
        } else {
            Napi::Object v = Napi::Object::New(env);
            v.Set("kind", ve.kind);
            v.Set("maxPatches", (double) ve.max_patches);
            v.Set("devices", vision_memory_to_js(env, ve.memory));
            o.Set("visionEncoder", v);
        }
        return o;
    }

    Napi::Value Submit(const Napi::CallbackInfo & info) {
        engine(info.Env()).submit(to_request(require_object(info[0], "request")));
        return info.Env().Undefined();
    }

    Napi::Value Flush(const Napi::CallbackInfo & info) {
        engine(info.Env()).flush_submitted();
        return info.Env().Undefined();
    }

    Napi::Value Cancel(const Napi::CallbackInfo & info) {
        engine(info.Env()).cancel((int64_t) info[0].ToNumber().DoubleValue());
        return info.Env().Undefined();
    }

    Napi::Value Tokenize(const Napi::CallbackInfo & info) {
        Napi::Env env = info.Env();
        auto toks = engine(env).tokenize(info[0].ToString().Utf8Value(), info[1].ToBoolean(), info[2].ToBoolean());
        Napi::Array a = Napi::Array::New(env, toks.size());
        for (size_t i = 0; i < toks.size(); i++) a.Set((uint32_t) i, toks[i]);
        return a;
    }

    // tokenizePrompt(prompt, imageSizes, addSpecial): the parts as the engine takes the prompt,
    // text parts as token ids and images as their KV cells; throws with the engine's message.
    Napi::Value TokenizePrompt(const Napi::CallbackInfo & info) {
        Napi::Env env = info.Env();
        if (!info[1].IsArray()) throw Napi::TypeError::New(env, "imageSizes must be an array");
        Napi::Array sizes = info[1].As<Napi::Array>();
        std::vector<ImagePtr> images;
        for (uint32_t i = 0; i < sizes.Length(); i++) {
            Napi::Object o = require_object(sizes.Get(i), "image size");
            auto img = std::make_shared<Image>();
            img->width = (uint32_t) get_number(o, "width", 0);
            img->height = (uint32_t) get_number(o, "height", 0);
            images.push_back(std::move(img));
        }
        PreparedPrompt p = engine(env).tokenize_prompt(info[0].ToString().Utf8Value(), std::move(images), info[2].ToBoolean());
        if (p.failed()) throw Napi::Error::New(env, p.error.message);
        Napi::Array out = Napi::Array::New(env, p.parts.size());
        for (size_t k = 0; k < p.parts.size(); k++) {
            const PromptPart & part = p.parts[k];
            if (part.media) {
                out.Set((uint32_t) k, part.n_cells());
                continue;
            }
            Napi::Array toks = Napi::Array::New(env, part.tokens.size());
            for (size_t i = 0; i < part.tokens.size(); i++) toks.Set((uint32_t) i, part.tokens[i]);
            out.Set((uint32_t) k, toks);
        }
        return out;
    }

    Napi::Value Detokenize(const Napi::CallbackInfo & info) {
        Napi::Env env = info.Env();
        if (!info[0].IsArray()) throw Napi::TypeError::New(env, "tokens must be an array");
        Napi::Array a = info[0].As<Napi::Array>();
        std::vector<llama_token> toks(a.Length());
        const int32_t n_vocab = engine(env).info().n_vocab;
        for (uint32_t i = 0; i < a.Length(); i++) {
            toks[i] = a.Get(i).ToNumber().Int32Value();
            if (toks[i] < 0 || toks[i] >= n_vocab) throw Napi::RangeError::New(env, "token id out of range");
        }
        return Napi::String::New(env, engine(env).detokenize(toks));
    }

    Napi::Value ApplyChatTemplate(const Napi::CallbackInfo & info) {
        Napi::Env env = info.Env();
        if (!info[0].IsArray()) throw Napi::TypeError::New(env, "messages must be an array");
        Napi::Array a = info[0].As<Napi::Array>();
        std::vector<ChatMessage> msgs;
        for (uint32_t i = 0; i < a.Length(); i++) {
            Napi::Object m = require_object(a.Get(i), "message");
            msgs.push_back({get_string(m, "role"), get_string(m, "content")});
        }
        try {
            return Napi::String::New(env, engine(env).apply_chat_template(msgs, info[1].ToBoolean()));
        } catch (const std::exception & e) {
            throw Napi::Error::New(env, std::string("chat template failed: ") + e.what());
        }
    }

    Napi::Value Stats(const Napi::CallbackInfo & info) {
        Napi::Env env = info.Env();
        EngineStats s = engine(env).stats();
        Napi::Object o = Napi::Object::New(env);
#define CAPRL_STAT_SET(type, name, js) o.Set(js, (double) s.name);
        CAPRL_ENGINE_STATS(CAPRL_STAT_SET)
#undef CAPRL_STAT_SET
        Napi::Array step_tokens = Napi::Array::New(env, s.step_tokens.size());
        for (size_t k = 0; k < s.step_tokens.size(); k++) step_tokens.Set((uint32_t) k, (double) s.step_tokens[k]);
        o.Set("stepTokens", step_tokens);
        return o;
    }

    Napi::Value Close(const Napi::CallbackInfo & info) {
        Napi::Env env = info.Env();
        if (closed_) {
            auto d = Napi::Promise::Deferred::New(env);
            d.Resolve(env.Undefined());
            return d.Promise();
        }
        closed_ = true;
        auto * worker = new CloseWorker(env, engine_, &tsfn_);
        Napi::Promise p = worker->promise();
        worker->Queue();
        return p;
    }

    std::shared_ptr<Engine> engine_;
    EventTsfn tsfn_;
    bool closed_ = false;
};

Napi::Value BuildInfo(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    Napi::Object o = Napi::Object::New(env);
    o.Set("llamaCommit", CAPRL_LLAMA_COMMIT);
#ifdef CAPRL_CUDA
    o.Set("cuda", true);
#else
    o.Set("cuda", false);
#endif
    o.Set("system", llama_print_system_info());
    return o;
}

// The GPUs ggml sees (none on a CPU build), before any engine exists: JS picks how to size the
// KV cache from them (vLLM's --gpu-memory-utilization default applies where a GPU holds it).
Napi::Value GpuDevices(const Napi::CallbackInfo & info) {
    Napi::Env env = info.Env();
    Napi::Array out = Napi::Array::New(env);
    for (size_t i = 0; i < ggml_backend_dev_count(); i++) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        if (!is_gpu_device(dev)) continue;
        const DeviceMemory mem = device_memory(dev);
        Napi::Object d = Napi::Object::New(env);
        d.Set("name", ggml_backend_dev_name(dev));
        d.Set("description", ggml_backend_dev_description(dev));
        d.Set("totalBytes", (double) mem.total);
        d.Set("freeBytes", (double) mem.free);
        out.Set(out.Length(), d);
    }
    return out;
}

// The engine's limits, where JS states them (help texts, the --max-num-seqs cap).
Napi::Value EngineLimits(const Napi::CallbackInfo & info) {
    Napi::Object o = Napi::Object::New(info.Env());
    o.Set("maxSeqs", (double) llama_max_parallel_sequences());
    o.Set("autoMinSeqs", kAutoMinSeqs);
    return o;
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
    exports.Set("Engine", EngineWrap::Init(env));
    exports.Set("buildInfo", Napi::Function::New(env, BuildInfo));
    exports.Set("gpuDevices", Napi::Function::New(env, GpuDevices));
    exports.Set("engineLimits", Napi::Function::New(env, EngineLimits));
    exports.Set("VisionEncoder", vision_encoder_class(env));
    exports.Set("resizeRgb", resize_rgb_function(env));
    return exports;
}

}  // namespace
}  // namespace caprl

static Napi::Object InitModule(Napi::Env env, Napi::Object exports) {
    return caprl::Init(env, exports);
}

NODE_API_MODULE(caprl_engine, InitModule)
