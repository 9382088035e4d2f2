#include "text-stream.h"

#include <algorithm>

namespace caprl {

size_t utf8_complete_prefix(const std::string & s, size_t len) {
    // Walk back over continuation bytes to the lead byte of the last character.
    size_t i = len;
    size_t back = 0;
    while (i > 0 && back < 4 && (static_cast<unsigned char>(s[i - 1]) & 0xC0) == 0x80) {
        i--;
        back++;
    }
    if (i == 0) return back == 0 ? 0 : len;  // only continuation bytes: nothing better to do
    const unsigned char lead = static_cast<unsigned char>(s[i - 1]);
    size_t need = 1;
    if ((lead & 0xE0) == 0xC0) need = 2;
    else if ((lead & 0xF0) == 0xE0) need = 3;
    else if ((lead & 0xF8) == 0xF0) need = 4;
    const size_t have = back + 1;
    return have >= need ? len : i - 1;
}

TextStream::TextStream(std::vector<std::string> stops) : stops_(std::move(stops)) {
    stops_.erase(std::remove(stops_.begin(), stops_.end(), std::string()), stops_.end());
    for (const auto & s : stops_) hold_ = std::max(hold_, s.size() - 1);
}

std::string TextStream::push(const std::string & piece) {
    if (matched_) return {};
    pending_ += piece;
    // Earliest complete stop string wins.
    size_t best = std::string::npos;
    const std::string * best_stop = nullptr;
    for (const auto & s : stops_) {
        const size_t p = pending_.find(s);
        if (p != std::string::npos && p < best) {
            best = p;
            best_stop = &s;
        }
    }
    if (best_stop) {
        matched_ = *best_stop;
        std::string out = pending_.substr(0, best);
        pending_.clear();
        return out;
    }
    if (pending_.size() <= hold_) return {};
    size_t release = utf8_complete_prefix(pending_, pending_.size() - hold_);
    std::string out = pending_.substr(0, release);
    pending_.erase(0, release);
    return out;
}

std::string TextStream::flush() {
    if (matched_) return {};
    std::string out;
    out.swap(pending_);
    return out;
}

}  // namespace caprl
