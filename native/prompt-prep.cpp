#include "prompt-prep.h"

#include <functional>
#include <string_view>

namespace caprl {

std::vector<llama_token> tokenize(const llama_vocab * vocab, const std::string & text, bool add_special, bool parse_special) {
    int32_t n = -llama_tokenize(vocab, text.data(), (int32_t) text.size(), nullptr, 0, add_special, parse_special);
    std::vector<llama_token> out(std::max(n, 0));
    n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), out.data(), (int32_t) out.size(), add_special, parse_special);
    out.resize(std::max(n, 0));
    return out;
}

PreparedPrompt prepare_prompt(const PromptPrepContext & ctx, const std::string & prompt, std::vector<ImagePtr> && images, bool add_special,
                              bool sizes_only) {
    PreparedPrompt out;
    out.images = std::move(images);
    const auto fail = [&](const std::string & why, const std::string & param) {
        out.error = Ending{FinishReason::kError, ErrorKind::kClient, why, param, ""};
        return std::move(out);
    };
    if (!out.images.empty() && !ctx.mtmd) {
        return fail("this model has no vision encoder (start the server with --mmproj) and cannot take images", "messages");
    }
    if (!ctx.mtmd) {
        PromptPart p;
        p.tokens = tokenize(ctx.vocab, prompt, add_special, true);
        out.parts.push_back(std::move(p));
    } else {
        std::vector<mtmd::bitmap> bitmaps;
        std::vector<const mtmd_bitmap *> ptrs;
        for (const ImagePtr & ptr : out.images) {
            const Image & img = *ptr;
            if (img.width == 0 || img.height == 0 || (!sizes_only && img.rgb.size() != (size_t) img.width * img.height * 3)) {
                return fail("image buffer does not match its size", "messages");
            }
            // Our encoder preprocesses the pixels itself: mtmd gets a placeholder of the image's
            // size, from which it plans the same tokens and grid without resizing and normalizing
            // the pixels into a float copy (20-30 ms and 13 MB for a 1036x1036 image).
            bitmaps.emplace_back(img.width, img.height, ctx.placeholder_images || sizes_only ? nullptr : img.rgb.data());
            if (sizes_only) {
                ptrs.push_back(bitmaps.back().ptr.get());
                continue;
            }
            // The id keys the image-embedding cache: pixels and size (preprocessing is fixed per mmproj).
            const size_t h = std::hash<std::string_view>{}(std::string_view((const char *) img.rgb.data(), img.rgb.size()));
            const std::string id = std::to_string(img.width) + "x" + std::to_string(img.height) + ":" + std::to_string(h);
            mtmd_bitmap_set_id(bitmaps.back().ptr.get(), id.c_str());
            ptrs.push_back(bitmaps.back().ptr.get());
        }
        // Counted here: mtmd_tokenize reports a mismatch only as a failure (2), like a bad image.
        const std::string marker = mtmd_default_marker();
        size_t markers = 0;
        for (size_t at = prompt.find(marker); at != std::string::npos; at = prompt.find(marker, at + marker.size())) markers++;
        if (markers != out.images.size()) {
            return fail("the prompt has a different number of image markers (" + std::to_string(markers) + ") than images (" +
                            std::to_string(out.images.size()) + " images)",
                        "messages");
        }
        out.chunks = SharedChunks(mtmd_input_chunks_init(), mtmd_input_chunks_free);
        mtmd_input_text text{prompt.c_str(), prompt.size(), add_special, true};
        const int32_t rc = mtmd_tokenize(ctx.mtmd, out.chunks.get(), &text, ptrs.data(), ptrs.size());
        if (rc != 0) return fail("image preprocessing failed", "messages");
        const size_t n = mtmd_input_chunks_size(out.chunks.get());
        for (size_t i = 0; i < n; i++) {
            const mtmd_input_chunk * c = mtmd_input_chunks_get(out.chunks.get(), i);
            PromptPart p;
            if (mtmd_input_chunk_get_type(c) == MTMD_INPUT_CHUNK_TYPE_TEXT) {
                size_t nt = 0;
                const llama_token * toks = mtmd_input_chunk_get_tokens_text(c, &nt);
                p.tokens.assign(toks, toks + nt);
                if (p.tokens.empty()) continue;
            } else {
                p.media = c;
                p.media_cells = (int32_t) mtmd_input_chunk_get_n_tokens(c);
                p.media_pos = (int32_t) mtmd_input_chunk_get_n_pos(c);
                p.non_causal = mtmd_decode_use_non_causal(ctx.mtmd, c);
            }
            out.parts.push_back(std::move(p));
        }
    }
    for (const auto & p : out.parts) out.prompt_cells += p.n_cells();
    if (out.prompt_cells == 0) return fail("the prompt is empty", "messages");
    if (out.parts.back().media) return fail("the prompt must not end with an image", "messages");
    return out;
}

}  // namespace caprl
