// Switches and tuning knobs read from the environment (A/B measurements). Callers read them once (a function-local
// static) and keep the meaning of unset / other values in their own comment.
#pragma once
#include <cstdlib>
#include <cstring>

namespace linflow {

// True when the variable `name` is set to exactly `value`.
inline bool env_is(const char* name, const char* value) {
  const char* e = std::getenv(name);
  return e != nullptr && std::strcmp(e, value) == 0;
}

// The variable's integer value (atoi), 0 when unset.
inline int env_int(const char* name) {
  const char* e = std::getenv(name);
  return e != nullptr ? std::atoi(e) : 0;
}

}  // namespace linflow
