// The addon's one mapping of errno values to error objects: `code` is the
// errno name (src/native.ts folds it onto ExaError codes), `errno` the number.
// Shared by every translation unit of the addon (addon.cc, dma.cc).
#pragma once

#include <napi.h>

#include <string>

namespace exa_addon {

const char *errno_name(int e);
Napi::Error make_error(Napi::Env env, int err, const std::string &msg);
[[noreturn]] void throw_errno(Napi::Env env, int err, const std::string &msg);

}  // namespace exa_addon
