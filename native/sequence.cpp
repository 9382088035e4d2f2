#include "sequence.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>

namespace caprl {

PromptCursor advance(const std::vector<PromptPart> & parts, PromptCursor at, int32_t n) {
    while (n > 0 && at.part < parts.size()) {
        const PromptPart & p = parts[at.part];
        const int32_t k = std::min(n, p.n_cells() - at.done);
        at.done += k;
        at.cells += k;
        n -= k;
        if (!p.media) at.n_past += k;
        if (at.done < p.n_cells()) break;
        // M-RoPE: what follows an image continues at its start + max(rows, cols), not + cells.
        if (p.media) at.n_past += p.media_pos;
        at.part++;
        at.done = 0;
    }
    return at;
}

int32_t cells_left(const std::vector<PromptPart> & parts, const PromptCursor & at) {
    if (at.part >= parts.size()) return 0;
    int32_t left = -at.done;
    for (size_t i = at.part; i < parts.size(); i++) left += parts[i].n_cells();
    return left;
}

const char * seq_state_name(SeqState s) {
    switch (s) {
        case SeqState::kPrefilling: return "prefilling";
        case SeqState::kDecoding: return "decoding";
        case SeqState::kPreempted: return "preempted";
        case SeqState::kFinished: return "finished";
    }
    return "?";
}

namespace {

// The state machine, in one place.
bool allowed(SeqState from, SeqState to) {
    switch (to) {
        case SeqState::kDecoding: return from == SeqState::kPrefilling || from == SeqState::kPreempted;  // prompt in
        case SeqState::kPreempted: return from != SeqState::kFinished;  // cells taken back (again, if need be)
        case SeqState::kFinished: return from != SeqState::kFinished;
        case SeqState::kPrefilling: return false;  // only where a sequence starts
    }
    return false;
}

}  // namespace

void Sequence::set_state(SeqState to) {
    if (!allowed(state_, to)) {
        fprintf(stderr, "caprl engine: sequence %lld/%d: no transition %s -> %s\n", (long long) req.id, index, seq_state_name(state_),
                seq_state_name(to));
        abort();
    }
    state_ = to;
}

void Sequence::end(Ending e) {
    if (finished()) return;
    ending = std::move(e);
    set_state(SeqState::kFinished);
}

bool Sequence::has_images() const {
    return std::any_of(parts.begin(), parts.end(), [](const PromptPart & p) { return p.media != nullptr; });
}

}  // namespace caprl
