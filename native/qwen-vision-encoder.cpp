#include "qwen-vision-encoder.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "gguf.h"
#include "image-prep-ref.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <fstream>
#include <stdexcept>
#include <thread>

namespace caprl {

namespace {

constexpr int kPatch = CAPRL_PATCH_SIZE;
constexpr int kMerge = CAPRL_MERGE_SIZE;
constexpr int kPatchElems = 3 * kPatch * kPatch;  // one temporal frame of a patch: [c][ky][kx]
// mtmd's Qwen-VL limits (clip.cpp: set_limit_image_tokens(8, 4096)), in pixels.
constexpr int kMinPixels = 8 * CAPRL_GRID_FACTOR * CAPRL_GRID_FACTOR;
constexpr int kMaxPixels = 4096 * CAPRL_GRID_FACTOR * CAPRL_GRID_FACTOR;
// Images per graph: bounds the node count (full-attention blocks add nodes per image).
constexpr size_t kMaxImagesPerGraph = 64;
constexpr size_t kSchedNodes = 65536;
// The largest image mtmd makes (kMaxPixels), in patches: the smallest useful graph capacity.
constexpr int64_t kMaxImagePatches = (int64_t) kMaxPixels / (kPatch * kPatch);
// Window slots a graph may hold per patch: edge windows are padded (a 1036x1036 image fills 86%
// of its slots); a graph past either bound is split.
constexpr int64_t kSlotsPerPatchNum = 5, kSlotsPerPatchDen = 4;
// A two-image graph is reserved only where its buffers take at most this share of the GPU.
constexpr int64_t kMaxComputeShareDen = 10;

struct Layer {
    ggml_tensor *ln1, *q_w, *q_b, *k_w, *k_b, *v_w, *v_b, *o_w, *o_b;
    ggml_tensor *ln2, *gate_w, *gate_b, *up_w, *up_b, *down_w, *down_b;
    bool full_attn;
};

// The host-side inputs of one graph. Tokens are in clip's window order: per image, windows of
// grid_window x grid_window merged units in raster order, units in raster order inside a window,
// the 2x2 patches of a unit together.
struct BatchLayout {
    int64_t n_tokens = 0;
    int64_t n_windows = 0;
    std::vector<float> patches;         // [n_tokens][588]
    std::vector<int32_t> pos_y, pos_x;  // patch row / column of each token
    std::vector<int32_t> win_gather;    // [n_windows][S]: token in each window slot (padding repeats the first)
    std::vector<int32_t> win_scatter;   // [n_tokens]: the slot holding each token
    std::vector<int32_t> win_len;       // real tokens per window
    std::vector<int64_t> image_start;   // first token of each image
    std::vector<int64_t> image_len;
    std::vector<std::vector<int32_t>> unit_row;  // per image: merged unit (raster) -> output row (window order)
};

ggml_tensor * rms(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b, float eps) {
    x = ggml_mul(ctx, ggml_rms_norm(ctx, x, eps), w);
    return b ? ggml_add(ctx, x, b) : x;
}

ggml_tensor * linear(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b) {
    x = ggml_mul_mat(ctx, w, x);
    return b ? ggml_add(ctx, x, b) : x;
}

}  // namespace

struct QwenVisionEncoder::Impl {
    int n_embd = 0, n_head = 0, n_ff = 0, n_layer = 0, n_out = 0, n_wa_pattern = 0, grid_window = 0;
    int n_threads = 1;  // CPU threads: ggml's CPU backend and the pixel preprocessing
    float eps = 1e-6f;
    ggml_backend_t backend = nullptr;
    ggml_backend_t cpu = nullptr;
    ggml_backend_sched_t sched = nullptr;
    ggml_context * ctx_w = nullptr;
    ggml_backend_buffer_t buf_w = nullptr;
    ggml_tensor * patch_w = nullptr;  // both temporal kernels, [588, 2*n_embd]
    ggml_tensor * patch_b = nullptr;
    ggml_tensor *post_ln_w = nullptr, *post_ln_b = nullptr;
    ggml_tensor *mm0_w = nullptr, *mm0_b = nullptr, *mm2_w = nullptr, *mm2_b = nullptr;
    std::vector<Layer> layers;
    int64_t max_patches = kMaxImagePatches;
    Timings timings;  // of the last encode()

    // The graph of one batch and its inputs; owns its context.
    struct Graph {
        ggml_context * ctx = nullptr;
        ggml_cgraph * gf = nullptr;
        ggml_tensor *patches = nullptr, *positions = nullptr, *gather = nullptr, *scatter = nullptr, *mask = nullptr, *out = nullptr;
        ~Graph() { if (ctx) ggml_free(ctx); }
    };

    ~Impl() {
        if (sched) ggml_backend_sched_free(sched);
        if (buf_w) ggml_backend_buffer_free(buf_w);
        if (ctx_w) ggml_free(ctx_w);
        if (backend && backend != cpu) ggml_backend_free(backend);
        if (cpu) ggml_backend_free(cpu);
    }

    void load(const std::string & path);
    BatchLayout layout(const std::vector<const Image *> & images) const;
    ggml_tensor * attention(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v, bool full,
                            const BatchLayout & lay, ggml_tensor * gather, ggml_tensor * scatter, ggml_tensor * mask) const;
    int window_slots() const { return (grid_window * kMerge) * (grid_window * kMerge); }
    int64_t max_slots() const { return max_patches * kSlotsPerPatchNum / kSlotsPerPatchDen; }
    std::unique_ptr<Graph> build(const BatchLayout & lay) const;
    BatchLayout worst_case(int64_t n_images) const;
    std::vector<std::unique_ptr<Graph>> worst_graphs() const;
    void reserve_sizes(size_t sizes[2]);
    void encode_graph(const std::vector<const Image *> & images, std::vector<std::vector<float>> & out);
};

void QwenVisionEncoder::Impl::load(const std::string & path) {
    ggml_context * meta = nullptr;
    gguf_init_params gp{true, &meta};
    gguf_context * gguf = gguf_init_from_file(path.c_str(), gp);
    if (!gguf) throw std::runtime_error("cannot read mmproj " + path);
    struct Guard {
        gguf_context * g;
        ggml_context * m;
        ~Guard() { gguf_free(g); ggml_free(m); }
    } guard{gguf, meta};

    auto key = [&](const char * name, bool required) {
        const int64_t id = gguf_find_key(gguf, name);
        if (id < 0 && required) throw std::runtime_error(std::string("mmproj lacks ") + name);
        return id;
    };
    auto u32 = [&](const char * name, int def) {
        const int64_t id = key(name, def < 0);
        return id < 0 ? def : (int) gguf_get_val_u32(gguf, id);
    };
    const int64_t proj = key("clip.projector_type", true);
    if (std::string(gguf_get_val_str(gguf, proj)) != "qwen2.5vl_merger") {
        throw std::runtime_error("the caprl vision encoder supports Qwen2.5-VL mmproj files only (projector qwen2.5vl_merger)");
    }
    n_embd = u32("clip.vision.embedding_length", -1);
    n_ff = u32("clip.vision.feed_forward_length", -1);
    n_layer = u32("clip.vision.block_count", -1);
    n_head = u32("clip.vision.attention.head_count", -1);
    n_out = u32("clip.vision.projection_dim", -1);
    n_wa_pattern = u32("clip.vision.n_wa_pattern", -1);
    const int window_px = u32("clip.vision.window_size", 0);
    grid_window = (window_px > 0 ? window_px : 112) / kPatch / kMerge;  // 112 px: clip's default
    eps = gguf_get_val_f32(gguf, key("clip.vision.attention.layer_norm_epsilon", true));
    if (u32("clip.vision.patch_size", -1) != kPatch || u32("clip.vision.spatial_merge_size", kMerge) != kMerge) {
        throw std::runtime_error("mmproj patch or merge size differs from Qwen2.5-VL's 14 / 2");
    }
    if (n_head <= 0 || n_embd % n_head != 0 || grid_window <= 0) throw std::runtime_error("mmproj has an unusable vision shape");
    // Pixels are normalized by kernels/image-prep-ref with CLIP's mean/std; the file must agree.
    const float want[2][3] = {{CAPRL_CLIP_MEAN_R, CAPRL_CLIP_MEAN_G, CAPRL_CLIP_MEAN_B}, {CAPRL_CLIP_STD_R, CAPRL_CLIP_STD_G, CAPRL_CLIP_STD_B}};
    const char * norm_keys[2] = {"clip.vision.image_mean", "clip.vision.image_std"};
    for (int k = 0; k < 2; k++) {
        const int64_t id = key(norm_keys[k], true);
        const float * v = (const float *) gguf_get_arr_data(gguf, id);
        if (gguf_get_arr_n(gguf, id) != 3 || std::fabs(v[0] - want[k][0]) > 1e-6f || std::fabs(v[1] - want[k][1]) > 1e-6f ||
            std::fabs(v[2] - want[k][2]) > 1e-6f) {
            throw std::runtime_error("mmproj image mean/std differ from CLIP's, which the caprl encoder's preprocessing uses");
        }
    }

    // Our own context holding copies of the tensors we use; data is read from the file below.
    ggml_init_params ip{ggml_tensor_overhead() * (size_t) (n_layer * 16 + 16), nullptr, true};
    ctx_w = ggml_init(ip);
    struct Load {
        ggml_tensor * t;
        size_t file_off, bytes, dst_off;
    };
    std::vector<Load> loads;
    const size_t data_off = gguf_get_data_offset(gguf);
    auto file_off = [&](const std::string & name) { return data_off + gguf_get_tensor_offset(gguf, gguf_find_tensor(gguf, name.c_str())); };
    auto get = [&](const std::string & name, bool required, std::initializer_list<int64_t> ne) -> ggml_tensor * {
        ggml_tensor * m = ggml_get_tensor(meta, name.c_str());
        if (!m) {
            if (required) throw std::runtime_error("mmproj lacks tensor " + name);
            return nullptr;
        }
        int d = 0;
        for (int64_t n : ne) {
            if (m->ne[d++] != n) throw std::runtime_error("mmproj tensor " + name + " has an unexpected shape");
        }
        ggml_tensor * t = ggml_dup_tensor(ctx_w, m);
        loads.push_back({t, file_off(name), ggml_nbytes(m), 0});
        return t;
    };

    const int64_t C = n_embd;
    // Conv3d (2 x 14 x 14) as its two temporal slices, stored as one [588, 2C] matrix so a
    // single matmul computes both; the halves are summed as clip sums its two conv2d.
    ggml_tensor * p0 = ggml_get_tensor(meta, "v.patch_embd.weight");
    ggml_tensor * p1 = ggml_get_tensor(meta, "v.patch_embd.weight.1");
    if (!p0 || !p1 || p0->type != p1->type || ggml_nelements(p0) != (int64_t) kPatchElems * C ||
        ggml_nelements(p1) != ggml_nelements(p0) || p0->ne[0] != kPatch || p0->ne[2] != 3) {
        throw std::runtime_error("mmproj lacks the two temporal patch-embedding kernels");
    }
    patch_w = ggml_new_tensor_2d(ctx_w, p0->type, kPatchElems, 2 * C);
    loads.push_back({patch_w, file_off("v.patch_embd.weight"), ggml_nbytes(p0), 0});
    loads.push_back({patch_w, file_off("v.patch_embd.weight.1"), ggml_nbytes(p1), ggml_nbytes(p0)});
    patch_b = get("v.patch_embd.bias", false, {C});
    if (ggml_get_tensor(meta, "v.pre_ln.weight")) throw std::runtime_error("mmproj has a pre-layernorm, which Qwen2.5-VL does not");

    for (int il = 0; il < n_layer; il++) {
        const std::string b = "v.blk." + std::to_string(il) + ".";
        Layer L{};
        L.ln1 = get(b + "ln1.weight", true, {C});
        L.q_w = get(b + "attn_q.weight", true, {C, C});
        L.q_b = get(b + "attn_q.bias", true, {C});
        L.k_w = get(b + "attn_k.weight", true, {C, C});
        L.k_b = get(b + "attn_k.bias", true, {C});
        L.v_w = get(b + "attn_v.weight", true, {C, C});
        L.v_b = get(b + "attn_v.bias", true, {C});
        L.o_w = get(b + "attn_out.weight", true, {C, C});
        L.o_b = get(b + "attn_out.bias", true, {C});
        L.ln2 = get(b + "ln2.weight", true, {C});
        L.gate_w = get(b + "ffn_gate.weight", true, {C, n_ff});
        L.gate_b = get(b + "ffn_gate.bias", true, {n_ff});
        L.up_w = get(b + "ffn_up.weight", true, {C, n_ff});
        L.up_b = get(b + "ffn_up.bias", true, {n_ff});
        L.down_w = get(b + "ffn_down.weight", true, {n_ff, C});
        L.down_b = get(b + "ffn_down.bias", true, {C});
        // As clip: windowed blocks, except every n_wa_pattern-th (HF's fullatt_block_indexes).
        L.full_attn = n_wa_pattern <= 0 || (il + 1) % n_wa_pattern == 0;
        layers.push_back(L);
    }
    post_ln_w = get("v.post_ln.weight", true, {C});
    post_ln_b = get("v.post_ln.bias", false, {C});
    mm0_w = get("mm.0.weight", true, {4 * C, 4 * C});
    mm0_b = get("mm.0.bias", true, {4 * C});
    mm2_w = get("mm.2.weight", true, {4 * C, n_out});
    mm2_b = get("mm.2.bias", true, {n_out});

    buf_w = ggml_backend_alloc_ctx_tensors(ctx_w, backend);
    if (!buf_w) throw std::runtime_error("cannot allocate the vision weights on " + std::string(ggml_backend_name(backend)));
    ggml_backend_buffer_set_usage(buf_w, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    std::ifstream f(path, std::ios::binary);
    std::vector<char> bytes;
    for (const Load & l : loads) {
        bytes.resize(l.bytes);
        f.seekg((std::streamoff) l.file_off);
        if (!f.read(bytes.data(), (std::streamsize) l.bytes)) throw std::runtime_error("cannot read mmproj tensor data from " + path);
        ggml_backend_tensor_set(l.t, bytes.data(), l.dst_off, l.bytes);
    }
}

BatchLayout QwenVisionEncoder::Impl::layout(const std::vector<const Image *> & images) const {
    BatchLayout lay;
    const int G = grid_window;
    const int S = (G * kMerge) * (G * kMerge);  // patches in a full window
    std::vector<std::pair<int, int>> canvas;
    // Token order, positions and windows (cheap, in order).
    for (const Image * img : images) {
        int cw = 0, ch = 0;
        canvas_size(img->width, img->height, cw, ch);
        canvas.emplace_back(cw, ch);
        const int pw = cw / CAPRL_GRID_FACTOR, ph = ch / CAPRL_GRID_FACTOR;
        const int64_t start = lay.n_tokens;
        lay.image_start.push_back(start);
        std::vector<int32_t> unit_row((size_t) pw * ph);
        for (int wy = 0; wy < ph; wy += G) {
            for (int wx = 0; wx < pw; wx += G) {
                const int64_t first = lay.n_tokens;
                for (int uy = wy; uy < std::min(wy + G, ph); uy++) {
                    for (int ux = wx; ux < std::min(wx + G, pw); ux++) {
                        unit_row[(size_t) uy * pw + ux] = (int32_t) ((lay.n_tokens - start) / 4);
                        for (int d = 0; d < 4; d++) {
                            lay.pos_y.push_back(uy * kMerge + d / 2);
                            lay.pos_x.push_back(ux * kMerge + d % 2);
                            lay.n_tokens++;
                        }
                    }
                }
                const int32_t len = (int32_t) (lay.n_tokens - first);
                for (int s = 0; s < S; s++) lay.win_gather.push_back((int32_t) (first + (s < len ? s : 0)));
                for (int s = 0; s < len; s++) lay.win_scatter.push_back((int32_t) (lay.n_windows * S + s));
                lay.win_len.push_back(len);
                lay.n_windows++;
            }
        }
        lay.image_len.push_back(lay.n_tokens - start);
        lay.unit_row.push_back(std::move(unit_row));
    }
    // Pixels: each image onto its canvas (resized only when it is not on the grid already, as
    // the server's images are), then every token's 14x14x3 patch normalized straight from the
    // canvas bytes; one image per thread, as the GPU would otherwise wait on this.
    lay.patches.resize((size_t) lay.n_tokens * kPatchElems);
    float lut[3 * 256];
    caprl_normalize_lut(lut);
    std::atomic<size_t> next{0};
    std::atomic<bool> failed{false};
    auto work = [&] {
        std::vector<uint8_t> rgb;
        for (size_t i; (i = next++) < images.size();) {
            const Image * img = images[i];
            const auto [cw, ch] = canvas[i];
            rgb.resize((size_t) 3 * cw * ch);
            if (img->rgb.size() != (size_t) img->width * img->height * 3 ||
                caprl_resize_u8_ref(img->rgb.data(), (int) img->width, (int) img->height, cw, ch, CAPRL_RESIZE_PAD_CEIL, rgb.data()) != 0) {
                failed = true;
                continue;
            }
            for (int64_t t = lay.image_start[i]; t < lay.image_start[i] + lay.image_len[i]; t++) {
                float * dst = &lay.patches[(size_t) t * kPatchElems];
                for (int c = 0; c < 3; c++) {
                    const float * norm = lut + c * 256;
                    for (int ky = 0; ky < kPatch; ky++, dst += kPatch) {
                        const uint8_t * src = &rgb[(((size_t) lay.pos_y[t] * kPatch + ky) * cw + (size_t) lay.pos_x[t] * kPatch) * 3 + c];
                        for (int kx = 0; kx < kPatch; kx++) dst[kx] = norm[src[kx * 3]];
                    }
                }
            }
        }
    };
    std::vector<std::thread> pool;
    for (int k = 1; k < std::min<int>(n_threads, (int) images.size()); k++) pool.emplace_back(work);
    work();
    for (auto & th : pool) th.join();
    if (failed) throw std::runtime_error("image preprocessing failed");
    return lay;
}

ggml_tensor * QwenVisionEncoder::Impl::attention(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v, bool full,
                                                 const BatchLayout & lay, ggml_tensor * gather, ggml_tensor * scatter,
                                                 ggml_tensor * mask) const {
    const int64_t C = n_embd, d_head = n_embd / n_head;
    const float scale = 1.0f / std::sqrt((float) d_head);
    auto fa = [&](ggml_tensor * qq, ggml_tensor * kk, ggml_tensor * vv, ggml_tensor * m) {
        ggml_tensor * o = ggml_flash_attn_ext(ctx, qq, ggml_cast(ctx, kk, GGML_TYPE_F16), ggml_cast(ctx, vv, GGML_TYPE_F16), m, scale, 0.0f, 0.0f);
        ggml_prec_set_acc(o, GGML_PREC_F32);
        return o;  // [d_head, n_head, n_q, batch]
    };
    if (!full) {
        // Every window as one batch entry of S slots: [d_head, S, n_head, n_windows].
        const int64_t S = gather->ne[0] / lay.n_windows;
        auto windows = [&](ggml_tensor * t) {
            t = ggml_get_rows(ctx, ggml_reshape_2d(ctx, t, C, lay.n_tokens), gather);
            return ggml_permute(ctx, ggml_reshape_4d(ctx, t, d_head, n_head, S, lay.n_windows), 0, 2, 1, 3);
        };
        ggml_tensor * o = fa(windows(q), windows(k), windows(v), mask);
        return ggml_get_rows(ctx, ggml_reshape_2d(ctx, o, C, S * lay.n_windows), scatter);
    }
    // Full attention within each image; the images' outputs are joined pairwise (log2 copies).
    std::vector<ggml_tensor *> parts;
    for (size_t i = 0; i < lay.image_start.size(); i++) {
        auto img = [&](ggml_tensor * t) {
            ggml_tensor * view = ggml_view_3d(ctx, t, d_head, n_head, lay.image_len[i], t->nb[1], t->nb[2], lay.image_start[i] * t->nb[2]);
            return ggml_permute(ctx, view, 0, 2, 1, 3);
        };
        parts.push_back(ggml_reshape_2d(ctx, fa(img(q), img(k), img(v), nullptr), C, lay.image_len[i]));
    }
    while (parts.size() > 1) {
        std::vector<ggml_tensor *> next;
        for (size_t i = 0; i + 1 < parts.size(); i += 2) next.push_back(ggml_concat(ctx, parts[i], parts[i + 1], 1));
        if (parts.size() % 2) next.push_back(parts.back());
        parts.swap(next);
    }
    return parts[0];
}

std::unique_ptr<QwenVisionEncoder::Impl::Graph> QwenVisionEncoder::Impl::build(const BatchLayout & lay) const {
    const int64_t C = n_embd, N = lay.n_tokens, d_head = n_embd / n_head;
    const int64_t S = window_slots();
    const bool windowed = std::any_of(layers.begin(), layers.end(), [](const Layer & L) { return !L.full_attn; });

    const size_t n_nodes = 1024 + (size_t) n_layer * (64 + 12 * lay.image_start.size());
    ggml_init_params ip{ggml_tensor_overhead() * n_nodes + ggml_graph_overhead_custom(n_nodes, false), nullptr, true};
    auto g = std::make_unique<Graph>();
    ggml_context * ctx = g->ctx = ggml_init(ip);
    ggml_cgraph * gf = g->gf = ggml_new_graph_custom(ctx, n_nodes, false);

    auto input = [&](ggml_tensor * t) {
        ggml_set_input(t);
        return t;
    };
    ggml_tensor * patches = g->patches = input(ggml_new_tensor_2d(ctx, GGML_TYPE_F32, kPatchElems, N));
    ggml_tensor * positions = g->positions = input(ggml_new_tensor_1d(ctx, GGML_TYPE_I32, 4 * N));
    ggml_tensor *gather = nullptr, *scatter = nullptr, *mask = nullptr;
    if (windowed) {
        gather = g->gather = input(ggml_new_tensor_1d(ctx, GGML_TYPE_I32, S * lay.n_windows));
        scatter = g->scatter = input(ggml_new_tensor_1d(ctx, GGML_TYPE_I32, N));
        mask = g->mask = input(ggml_new_tensor_4d(ctx, GGML_TYPE_F16, S, S, 1, lay.n_windows));
    }

    ggml_tensor * pe = ggml_mul_mat(ctx, patch_w, patches);  // [2C, N]: both temporal slices
    ggml_tensor * x = ggml_add(ctx, ggml_view_2d(ctx, pe, C, N, pe->nb[1], 0), ggml_view_2d(ctx, pe, C, N, pe->nb[1], C * ggml_element_size(pe)));
    if (patch_b) x = ggml_add(ctx, x, patch_b);

    int sections[GGML_MROPE_SECTIONS] = {(int) d_head / 4, (int) d_head / 4, (int) d_head / 4, (int) d_head / 4};
    auto rope = [&](ggml_tensor * t) {
        // clip's 2D rotary embedding for Qwen2-VL/2.5-VL vision (same op, same arguments).
        return ggml_rope_multi(ctx, t, positions, nullptr, (int) d_head / 2, sections, GGML_ROPE_TYPE_VISION, 32768, 10000, 1, 0, 1, 32, 1);
    };
    for (const Layer & L : layers) {
        ggml_tensor * h = rms(ctx, x, L.ln1, nullptr, eps);
        ggml_tensor * q = rope(ggml_reshape_3d(ctx, linear(ctx, h, L.q_w, L.q_b), d_head, n_head, N));
        ggml_tensor * k = rope(ggml_reshape_3d(ctx, linear(ctx, h, L.k_w, L.k_b), d_head, n_head, N));
        ggml_tensor * v = ggml_reshape_3d(ctx, linear(ctx, h, L.v_w, L.v_b), d_head, n_head, N);
        x = ggml_add(ctx, x, linear(ctx, attention(ctx, q, k, v, L.full_attn, lay, gather, scatter, mask), L.o_w, L.o_b));
        h = rms(ctx, x, L.ln2, nullptr, eps);
        ggml_tensor * f = ggml_swiglu_split(ctx, linear(ctx, h, L.gate_w, L.gate_b), linear(ctx, h, L.up_w, L.up_b));
        x = ggml_add(ctx, x, linear(ctx, f, L.down_w, L.down_b));
    }
    // Patch merger: norm per patch, then each unit's 4 consecutive patches as one 4C row.
    x = ggml_reshape_2d(ctx, rms(ctx, x, post_ln_w, post_ln_b, eps), 4 * C, N / 4);
    x = linear(ctx, ggml_gelu(ctx, linear(ctx, x, mm0_w, mm0_b)), mm2_w, mm2_b);
    ggml_set_output(x);
    ggml_build_forward_expand(gf, x);
    g->out = x;
    return g;
}

// Only the sizes matter to the allocator: the worker's largest pass as n_images equal images,
// with every window slot a graph may hold.
BatchLayout QwenVisionEncoder::Impl::worst_case(int64_t n_images) const {
    BatchLayout lay;
    lay.n_tokens = max_patches;
    lay.n_windows = max_slots() / window_slots();
    for (int64_t i = 0; i < n_images; i++) {
        lay.image_start.push_back(i * max_patches / n_images);
        lay.image_len.push_back(max_patches / n_images);
    }
    return lay;
}

// One graph of the largest images, one of the most images: the allocator keeps the larger of
// each buffer, and the full-attention blocks' per-image parts make the two differ.
std::vector<std::unique_ptr<QwenVisionEncoder::Impl::Graph>> QwenVisionEncoder::Impl::worst_graphs() const {
    std::vector<std::unique_ptr<Graph>> out;
    for (int64_t n : {max_patches / kMaxImagePatches, (int64_t) kMaxImagesPerGraph}) out.push_back(build(worst_case(std::max<int64_t>(1, n))));
    return out;
}

// Compute bytes [backend, cpu] the worst-case graphs need; allocates nothing.
void QwenVisionEncoder::Impl::reserve_sizes(size_t sizes[2]) {
    sizes[0] = sizes[1] = 0;
    for (const auto & g : worst_graphs()) {
        size_t s[2] = {0, 0};
        ggml_backend_sched_reserve_size(sched, g->gf, s);
        sizes[0] = std::max(sizes[0], s[0]);
        sizes[1] = std::max(sizes[1], s[1]);
    }
}

void QwenVisionEncoder::Impl::encode_graph(const std::vector<const Image *> & images, std::vector<std::vector<float>> & out) {
    using Clock = std::chrono::steady_clock;
    auto mark = Clock::now();
    const auto lap = [&mark](double & into) {
        const auto now = Clock::now();
        into += std::chrono::duration<double, std::milli>(now - mark).count();
        mark = now;
    };
    const BatchLayout lay = layout(images);
    lap(timings.prep);
    const int64_t N = lay.n_tokens, S = window_slots();
    const auto g = build(lay);
    ggml_tensor *patches = g->patches, *positions = g->positions, *gather = g->gather, *scatter = g->scatter, *mask = g->mask, *x = g->out;
    const bool windowed = gather != nullptr;

    ggml_backend_sched_reset(sched);
    if (!ggml_backend_sched_alloc_graph(sched, g->gf)) throw std::runtime_error("cannot allocate the vision graph");
    lap(timings.build);
    ggml_backend_tensor_set(patches, lay.patches.data(), 0, ggml_nbytes(patches));
    std::vector<int32_t> pos;
    pos.reserve(4 * N);
    for (const auto * sec : {&lay.pos_y, &lay.pos_x, &lay.pos_y, &lay.pos_x}) pos.insert(pos.end(), sec->begin(), sec->end());
    ggml_backend_tensor_set(positions, pos.data(), 0, ggml_nbytes(positions));
    if (windowed) {
        ggml_backend_tensor_set(gather, lay.win_gather.data(), 0, ggml_nbytes(gather));
        ggml_backend_tensor_set(scatter, lay.win_scatter.data(), 0, ggml_nbytes(scatter));
        const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f), ninf = ggml_fp32_to_fp16(-INFINITY);
        std::vector<ggml_fp16_t> m((size_t) S * S * lay.n_windows);
        for (int64_t w = 0; w < lay.n_windows; w++) {
            for (int64_t r = 0; r < S; r++) {
                for (int64_t c = 0; c < S; c++) m[(size_t) (w * S + r) * S + c] = c < lay.win_len[w] ? zero : ninf;
            }
        }
        ggml_backend_tensor_set(mask, m.data(), 0, ggml_nbytes(mask));
    }
    lap(timings.upload);
    if (ggml_backend_sched_graph_compute(sched, g->gf) != GGML_STATUS_SUCCESS) throw std::runtime_error("the vision graph failed");
    lap(timings.compute);

    std::vector<float> all((size_t) n_out * (N / 4));
    ggml_backend_tensor_get(x, all.data(), 0, ggml_nbytes(x));
    // Back to clip's order: merged units in raster order.
    for (size_t i = 0; i < images.size(); i++) {
        const auto & rows = lay.unit_row[i];
        std::vector<float> e(rows.size() * n_out);
        const float * base = all.data() + (size_t) (lay.image_start[i] / 4) * n_out;
        for (size_t r = 0; r < rows.size(); r++) std::copy_n(base + (size_t) rows[r] * n_out, n_out, e.data() + r * n_out);
        out.push_back(std::move(e));
    }
    lap(timings.download);
}

QwenVisionEncoder::QwenVisionEncoder(const std::string & mmproj, bool use_gpu, int n_threads) : impl_(std::make_unique<Impl>()) {
    Impl & m = *impl_;
    m.cpu = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_CPU, nullptr);
    if (!m.cpu) throw std::runtime_error("cannot start ggml's CPU backend");
    // The device choice mtmd makes: the first GPU, else an integrated GPU, else the CPU.
    if (use_gpu) {
        m.backend = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_GPU, nullptr);
        if (!m.backend) m.backend = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_IGPU, nullptr);
    }
    if (!m.backend) m.backend = m.cpu;
    ggml_backend_dev_t dev = ggml_backend_get_device(m.cpu);
    ggml_backend_reg_t reg = dev ? ggml_backend_dev_backend_reg(dev) : nullptr;
    auto set_threads = reg ? (ggml_backend_set_n_threads_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads") : nullptr;
    m.n_threads = std::max(1, n_threads);
    if (set_threads) set_threads(m.cpu, m.n_threads);

    m.load(mmproj);
    ggml_backend_t backends[2] = {m.backend, m.cpu};
    m.sched = ggml_backend_sched_new(backends, nullptr, m.backend == m.cpu ? 1 : 2, kSchedNodes, false, true);
    if (!m.sched) throw std::runtime_error("cannot create the vision scheduler");

    // Two largest images per graph only on a GPU with room to spare: on the CPU a bigger graph
    // buys no speed (its matmuls are already thousands of rows), only memory.
    if (m.backend != m.cpu) {
        m.max_patches = 2 * kMaxImagePatches;
        size_t need[2];
        m.reserve_sizes(need);
        size_t free = 0, total = 0;
        ggml_backend_dev_memory(ggml_backend_get_device(m.backend), &free, &total);
        if (need[0] > total / kMaxComputeShareDen) m.max_patches = kMaxImagePatches;
    }
}

QwenVisionEncoder::~QwenVisionEncoder() = default;

int32_t QwenVisionEncoder::n_embd_out() const { return impl_->n_out; }

std::string QwenVisionEncoder::backend_name() const { return ggml_backend_name(impl_->backend); }

void QwenVisionEncoder::canvas_size(uint32_t w, uint32_t h, int & canvas_w, int & canvas_h) {
    if (caprl_llama_qwen_target_size((int) w, (int) h, kMinPixels, kMaxPixels, &canvas_w, &canvas_h) != 0) {
        throw std::runtime_error("image size out of range");
    }
}

int64_t QwenVisionEncoder::n_patches(const Image & img) {
    int cw = 0, ch = 0;
    canvas_size(img.width, img.height, cw, ch);
    return (int64_t) (cw / kPatch) * (ch / kPatch);
}

std::vector<std::vector<float>> QwenVisionEncoder::encode(const std::vector<const Image *> & images) {
    const Impl & m = *impl_;
    impl_->timings = {};
    std::vector<std::vector<float>> out;
    std::vector<const Image *> part;
    int64_t patches = 0, slots = 0;
    // Graphs within what reserve() sized: patches, padded window slots and image count.
    for (const Image * img : images) {
        int cw = 0, ch = 0;
        canvas_size(img->width, img->height, cw, ch);
        const int64_t uw = cw / CAPRL_GRID_FACTOR, uh = ch / CAPRL_GRID_FACTOR;
        const int64_t p = 4 * uw * uh;
        const int64_t s = ((uw + m.grid_window - 1) / m.grid_window) * ((uh + m.grid_window - 1) / m.grid_window) * m.window_slots();
        if (!part.empty() && (part.size() == kMaxImagesPerGraph || patches + p > m.max_patches || slots + s > m.max_slots())) {
            impl_->encode_graph(part, out);
            part.clear();
            patches = slots = 0;
        }
        part.push_back(img);
        patches += p;
        slots += s;
    }
    if (!part.empty()) impl_->encode_graph(part, out);
    return out;
}

int64_t QwenVisionEncoder::max_patches() const { return impl_->max_patches; }

QwenVisionEncoder::Timings QwenVisionEncoder::last_timings() const { return impl_->timings; }

void QwenVisionEncoder::reserve() {
    Impl & m = *impl_;
    for (const auto & g : m.worst_graphs()) {
        if (!ggml_backend_sched_reserve(m.sched, g->gf)) {
            throw std::runtime_error("cannot reserve the vision encoder's compute buffers on " + backend_name());
        }
    }
}

std::vector<QwenVisionEncoder::DeviceBytes> QwenVisionEncoder::memory() const {
    const Impl & m = *impl_;
    std::vector<DeviceBytes> out;
    std::vector<ggml_backend_t> backends{m.backend};
    if (m.cpu != m.backend) backends.push_back(m.cpu);  // ops the GPU lacks
    for (ggml_backend_t b : backends) {
        ggml_backend_dev_t dev = ggml_backend_get_device(b);
        DeviceBytes d;
        d.device = dev ? ggml_backend_dev_name(dev) : ggml_backend_name(b);
        d.host = dev && ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU;
        d.weights = b == m.backend ? ggml_backend_buffer_get_size(m.buf_w) : 0;
        d.compute = ggml_backend_sched_get_buffer_size(m.sched, b);
        out.push_back(d);
    }
    return out;
}

}  // namespace caprl
