// Shared between the addon's files: see socket_writer.cc and vdisk_native.cc.
#pragma once

#include <napi.h>

namespace vdisk {

// The errno's name ("EPIPE", "ENXIO"), or "EUNKNOWN".
const char* ErrnoName(int err);

// Adds the SocketWriter class to the addon's exports.
void InitSocketWriter(Napi::Env env, Napi::Object exports);

}  // namespace vdisk
