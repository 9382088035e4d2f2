#include "types.h"

namespace caprl {

const char * finish_reason_name(FinishReason r) {
    switch (r) {
        case FinishReason::kStop: return "stop";
        case FinishReason::kLength: return "length";
        case FinishReason::kAbort: return "abort";
        case FinishReason::kError: return "error";
    }
    return "error";
}

const char * error_kind_name(ErrorKind k) {
    switch (k) {
        case ErrorKind::kNone: return "";
        case ErrorKind::kClient: return "client";
        case ErrorKind::kCapacity: return "capacity";
        case ErrorKind::kInternal: return "internal";
    }
    return "internal";
}

}  // namespace caprl
