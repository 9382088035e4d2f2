// Turns a sequence's token pieces into releasable text: holds back what could still
// become a stop string and any incomplete UTF-8 character at the end.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace caprl {

class TextStream {
  public:
    explicit TextStream(std::vector<std::string> stops);

    // Appends one token's piece and returns the text that can be released now.
    // When a stop string completes, returns the text before it and sets matched().
    std::string push(const std::string & piece);

    // Releases everything still held (at the end of the request).
    std::string flush();

    const std::optional<std::string> & matched() const { return matched_; }

  private:
    std::vector<std::string> stops_;
    size_t hold_ = 0;  // longest stop string minus one
    std::string pending_;
    std::optional<std::string> matched_;
};

// Length of the longest prefix of s that does not end inside a UTF-8 character.
size_t utf8_complete_prefix(const std::string & s, size_t len);

}  // namespace caprl
