// vdisk_native: the few Linux file calls Node's fs module lacks, for the raw file backing. (The NBD
// reply writer, SocketWriter, lives in socket_writer.cc and is added to the same exports.)
//
// - fallocate(fd, mode, offset, length, cb(err))         punch holes, zero ranges (thread pool)
// - seek(fd, offset, whence, cb(err, offset))            SEEK_DATA / SEEK_HOLE (thread pool)
// - fadvise(fd, offset, length, advice, cb(err))         POSIX_FADV_WILLNEED (thread pool)
// - preadNoWait(fd, buf, bufOffset, length, position)    preadv2(RWF_NOWAIT), synchronous: bytes read,
//                                                        or -1 when the data is not in the page cache
// - pwriteBatch(fd, buffers, positions, cb(err, index))  many positional writes in ONE thread-pool hop:
//                                                        the hand-off, not the copy, is what costs for
//                                                        small writes (see docs/nbd-server.md, Hot path)
//
// Errors are JS Errors shaped like Node's fs errors: `code` is the errno name ("ENXIO", "EOPNOTSUPP"),
// `errno` the negated errno as libuv reports it, `syscall` the call's name. Offsets and lengths are JS
// numbers; they must be non-negative safe integers (checked here: a bad argument is a TypeError/RangeError
// thrown synchronously, never a callback). The async calls run on libuv's thread pool through
// Napi::AsyncWorker; the callback runs on the JS thread, exactly once.
#include <napi.h>

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "socket_writer.h"

#ifndef FALLOC_FL_KEEP_SIZE
#include <linux/falloc.h>
#endif

namespace vdisk {

const char* ErrnoName(int err) {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
  const char* name = strerrorname_np(err);
  if (name != nullptr) return name;
#else
  switch (err) {
    case EAGAIN: return "EAGAIN";
    case EBADF: return "EBADF";
    case EFBIG: return "EFBIG";
    case EINTR: return "EINTR";
    case EINVAL: return "EINVAL";
    case EIO: return "EIO";
    case EISDIR: return "EISDIR";
    case ENODEV: return "ENODEV";
    case ENOSPC: return "ENOSPC";
    case ENOSYS: return "ENOSYS";
    case ENXIO: return "ENXIO";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case EOVERFLOW: return "EOVERFLOW";
    case EPERM: return "EPERM";
    case ESPIPE: return "ESPIPE";
    case ETXTBSY: return "ETXTBSY";
    default: break;
  }
#endif
  return "EUNKNOWN";
}

}  // namespace vdisk

namespace {

using vdisk::ErrnoName;

constexpr double kSafeIntegerMax = 9007199254740991.0;  // Number.MAX_SAFE_INTEGER

Napi::Error ErrnoError(Napi::Env env, int err, const char* syscall) {
  const char* name = ErrnoName(err);
  std::string message = std::string(name) + ": " + strerror(err) + ", " + syscall;
  Napi::Error error = Napi::Error::New(env, message);
  error.Set("code", Napi::String::New(env, name));
  error.Set("errno", Napi::Number::New(env, -err));
  error.Set("syscall", Napi::String::New(env, syscall));
  return error;
}

int32_t ArgInt32(const Napi::CallbackInfo& info, size_t index, const char* name) {
  if (!info[index].IsNumber()) {
    throw Napi::TypeError::New(info.Env(), std::string(name) + " must be a number");
  }
  double value = info[index].As<Napi::Number>().DoubleValue();
  if (!std::isfinite(value) || std::trunc(value) != value || value < INT32_MIN || value > INT32_MAX) {
    throw Napi::RangeError::New(info.Env(), std::string(name) + " must be a 32-bit integer");
  }
  return static_cast<int32_t>(value);
}

// A non-negative safe integer (offsets, lengths).
int64_t ArgInt64(const Napi::CallbackInfo& info, size_t index, const char* name) {
  if (!info[index].IsNumber()) {
    throw Napi::TypeError::New(info.Env(), std::string(name) + " must be a number");
  }
  double value = info[index].As<Napi::Number>().DoubleValue();
  if (!std::isfinite(value) || std::trunc(value) != value || value < 0 || value > kSafeIntegerMax) {
    throw Napi::RangeError::New(info.Env(), std::string(name) + " must be a non-negative safe integer");
  }
  return static_cast<int64_t>(value);
}

Napi::Function ArgCallback(const Napi::CallbackInfo& info, size_t index) {
  if (!info[index].IsFunction()) throw Napi::TypeError::New(info.Env(), "callback must be a function");
  return info[index].As<Napi::Function>();
}

// A thread-pool call that yields an errno (0 = success) and an optional number result.
class ErrnoWorker : public Napi::AsyncWorker {
 public:
  ErrnoWorker(Napi::Function callback, const char* syscall, bool hasResult)
      : Napi::AsyncWorker(callback, syscall), syscall_(syscall), hasResult_(hasResult) {}

 protected:
  void OnOK() override {
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    if (errno_ != 0) {
      Callback().Call({ErrnoError(env, errno_, syscall_).Value()});
    } else if (hasResult_) {
      Callback().Call({env.Null(), Napi::Number::New(env, static_cast<double>(result_))});
    } else {
      Callback().Call({env.Null()});
    }
  }

  const char* syscall_;
  bool hasResult_;
  int errno_ = 0;
  int64_t result_ = 0;
};

class FallocateWorker : public ErrnoWorker {
 public:
  FallocateWorker(Napi::Function cb, int fd, int mode, int64_t offset, int64_t length)
      : ErrnoWorker(cb, "fallocate", false), fd_(fd), mode_(mode), offset_(offset), length_(length) {}

  void Execute() override {
    int rc;
    do {
      rc = fallocate(fd_, mode_, static_cast<off_t>(offset_), static_cast<off_t>(length_));
    } while (rc == -1 && errno == EINTR);
    if (rc == -1) errno_ = errno;
  }

 private:
  int fd_, mode_;
  int64_t offset_, length_;
};

class SeekWorker : public ErrnoWorker {
 public:
  SeekWorker(Napi::Function cb, int fd, int64_t offset, int whence)
      : ErrnoWorker(cb, "lseek", true), fd_(fd), offset_(offset), whence_(whence) {}

  void Execute() override {
    off_t position = lseek(fd_, static_cast<off_t>(offset_), whence_);
    if (position == static_cast<off_t>(-1)) {
      errno_ = errno;
    } else {
      result_ = static_cast<int64_t>(position);
    }
  }

 private:
  int fd_;
  int64_t offset_;
  int whence_;
};

class FadviseWorker : public ErrnoWorker {
 public:
  FadviseWorker(Napi::Function cb, int fd, int64_t offset, int64_t length, int advice)
      : ErrnoWorker(cb, "posix_fadvise", false), fd_(fd), offset_(offset), length_(length), advice_(advice) {}

  void Execute() override {
    // posix_fadvise returns the error number instead of setting errno.
    errno_ = posix_fadvise(fd_, static_cast<off_t>(offset_), static_cast<off_t>(length_), advice_);
  }

 private:
  int fd_;
  int64_t offset_, length_;
  int advice_;
};

// Writes every (buffer, position) pair in order, looping on short writes; stops at the first error and
// reports which write failed. The buffers are kept alive by a reference to their array.
class PwriteBatchWorker : public Napi::AsyncWorker {
 public:
  struct Item {
    const uint8_t* data;
    size_t length;
    int64_t position;
  };

  PwriteBatchWorker(Napi::Function cb, int fd, std::vector<Item> items, Napi::Array keep)
      : Napi::AsyncWorker(cb, "pwrite"), fd_(fd), items_(std::move(items)), keep_(Napi::Persistent(keep)) {}

  void Execute() override {
    for (size_t i = 0; i < items_.size(); i++) {
      const uint8_t* data = items_[i].data;
      size_t left = items_[i].length;
      off_t position = static_cast<off_t>(items_[i].position);
      while (left > 0) {
        ssize_t n = pwrite(fd_, data, left, position);
        if (n < 0) {
          if (errno == EINTR) continue;
          errno_ = errno;
          failed_ = i;
          return;
        }
        data += n;
        left -= static_cast<size_t>(n);
        position += n;
      }
    }
  }

  void OnOK() override {
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    if (errno_ != 0) {
      Callback().Call({ErrnoError(env, errno_, "pwrite").Value(), Napi::Number::New(env, static_cast<double>(failed_))});
    } else {
      Callback().Call({env.Null(), env.Null()});
    }
  }

 private:
  int fd_;
  std::vector<Item> items_;
  Napi::Reference<Napi::Array> keep_;
  int errno_ = 0;
  size_t failed_ = 0;
};

Napi::Value PwriteBatch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = ArgInt32(info, 0, "fd");
  if (!info[1].IsArray() || !info[2].IsArray()) throw Napi::TypeError::New(env, "buffers and positions must be arrays");
  Napi::Array buffers = info[1].As<Napi::Array>();
  Napi::Array positions = info[2].As<Napi::Array>();
  if (buffers.Length() != positions.Length() || buffers.Length() == 0) {
    throw Napi::RangeError::New(env, "buffers and positions must be non-empty and of equal length");
  }
  Napi::Function cb = ArgCallback(info, 3);
  std::vector<PwriteBatchWorker::Item> items;
  items.reserve(buffers.Length());
  for (uint32_t i = 0; i < buffers.Length(); i++) {
    Napi::Value buffer = buffers.Get(i);
    Napi::Value position = positions.Get(i);
    if (!buffer.IsBuffer()) throw Napi::TypeError::New(env, "buffers must hold Buffers");
    if (!position.IsNumber()) throw Napi::TypeError::New(env, "positions must hold numbers");
    double value = position.As<Napi::Number>().DoubleValue();
    if (!std::isfinite(value) || std::trunc(value) != value || value < 0 || value > kSafeIntegerMax) {
      throw Napi::RangeError::New(env, "positions must be non-negative safe integers");
    }
    Napi::Buffer<uint8_t> bytes = buffer.As<Napi::Buffer<uint8_t>>();
    items.push_back({bytes.Data(), bytes.Length(), static_cast<int64_t>(value)});
  }
  (new PwriteBatchWorker(cb, fd, std::move(items), buffers))->Queue();
  return env.Undefined();
}

Napi::Value Fallocate(const Napi::CallbackInfo& info) {
  int fd = ArgInt32(info, 0, "fd");
  int mode = ArgInt32(info, 1, "mode");
  int64_t offset = ArgInt64(info, 2, "offset");
  int64_t length = ArgInt64(info, 3, "length");
  if (length == 0) throw Napi::RangeError::New(info.Env(), "length must be positive");
  Napi::Function cb = ArgCallback(info, 4);
  (new FallocateWorker(cb, fd, mode, offset, length))->Queue();
  return info.Env().Undefined();
}

Napi::Value Seek(const Napi::CallbackInfo& info) {
  int fd = ArgInt32(info, 0, "fd");
  int64_t offset = ArgInt64(info, 1, "offset");
  int whence = ArgInt32(info, 2, "whence");
  if (whence != SEEK_DATA && whence != SEEK_HOLE) {
    throw Napi::RangeError::New(info.Env(), "whence must be SEEK_DATA or SEEK_HOLE");
  }
  Napi::Function cb = ArgCallback(info, 3);
  (new SeekWorker(cb, fd, offset, whence))->Queue();
  return info.Env().Undefined();
}

Napi::Value Fadvise(const Napi::CallbackInfo& info) {
  int fd = ArgInt32(info, 0, "fd");
  int64_t offset = ArgInt64(info, 1, "offset");
  int64_t length = ArgInt64(info, 2, "length");
  int advice = ArgInt32(info, 3, "advice");
  Napi::Function cb = ArgCallback(info, 4);
  (new FadviseWorker(cb, fd, offset, length, advice))->Queue();
  return info.Env().Undefined();
}

Napi::Value PreadNoWait(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = ArgInt32(info, 0, "fd");
  if (!info[1].IsBuffer()) throw Napi::TypeError::New(env, "buffer must be a Buffer");
  Napi::Buffer<uint8_t> buffer = info[1].As<Napi::Buffer<uint8_t>>();
  int64_t bufferOffset = ArgInt64(info, 2, "bufferOffset");
  int64_t length = ArgInt64(info, 3, "length");
  int64_t position = ArgInt64(info, 4, "position");
  if (bufferOffset > static_cast<int64_t>(buffer.Length()) ||
      length > static_cast<int64_t>(buffer.Length()) - bufferOffset) {
    throw Napi::RangeError::New(env, "bufferOffset + length is beyond the end of the buffer");
  }
  struct iovec iov;
  iov.iov_base = buffer.Data() + bufferOffset;
  iov.iov_len = static_cast<size_t>(length);
  ssize_t n;
  do {
    n = preadv2(fd, &iov, 1, static_cast<off_t>(position), RWF_NOWAIT);
  } while (n == -1 && errno == EINTR);
  if (n == -1) {
    if (errno == EAGAIN) return Napi::Number::New(env, -1);
    throw ErrnoError(env, errno, "preadv2");
  }
  return Napi::Number::New(env, static_cast<double>(n));
}

void Constant(Napi::Env env, Napi::Object exports, const char* name, int value) {
  exports.DefineProperty(Napi::PropertyDescriptor::Value(name, Napi::Number::New(env, value), napi_enumerable));
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("fallocate", Napi::Function::New(env, Fallocate, "fallocate"));
  exports.Set("seek", Napi::Function::New(env, Seek, "seek"));
  exports.Set("fadvise", Napi::Function::New(env, Fadvise, "fadvise"));
  exports.Set("preadNoWait", Napi::Function::New(env, PreadNoWait, "preadNoWait"));
  exports.Set("pwriteBatch", Napi::Function::New(env, PwriteBatch, "pwriteBatch"));
  vdisk::InitSocketWriter(env, exports);
  Constant(env, exports, "FALLOC_FL_KEEP_SIZE", FALLOC_FL_KEEP_SIZE);
  Constant(env, exports, "FALLOC_FL_PUNCH_HOLE", FALLOC_FL_PUNCH_HOLE);
  Constant(env, exports, "FALLOC_FL_ZERO_RANGE", FALLOC_FL_ZERO_RANGE);
  Constant(env, exports, "SEEK_DATA", SEEK_DATA);
  Constant(env, exports, "SEEK_HOLE", SEEK_HOLE);
  Constant(env, exports, "POSIX_FADV_NORMAL", POSIX_FADV_NORMAL);
  Constant(env, exports, "POSIX_FADV_SEQUENTIAL", POSIX_FADV_SEQUENTIAL);
  Constant(env, exports, "POSIX_FADV_RANDOM", POSIX_FADV_RANDOM);
  Constant(env, exports, "POSIX_FADV_WILLNEED", POSIX_FADV_WILLNEED);
  Constant(env, exports, "POSIX_FADV_DONTNEED", POSIX_FADV_DONTNEED);
  return exports;
}

}  // namespace

NODE_API_MODULE(vdisk_native, Init)
