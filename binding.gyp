# The native addon: the Linux file system calls Node's fs module does not expose (fallocate, SEEK_DATA/
# SEEK_HOLE, posix_fadvise, preadv2 with RWF_NOWAIT, batched pwrite) and the NBD reply writer
# (socket_writer.cc). Built with `npx node-gyp rebuild`; the TypeScript wrapper is src/native/native.ts.
{
  "targets": [
    {
      "target_name": "vdisk_native",
      "sources": ["src/native/vdisk_native.cc", "src/native/socket_writer.cc"],
      "dependencies": ["<!(node -p \"require('node-addon-api').targets\"):node_addon_api_except"],
      "defines": ["NAPI_VERSION=8", "_GNU_SOURCE"],
      "cflags_cc": ["-std=c++17", "-Wall", "-Wextra"],
    }
  ]
}
