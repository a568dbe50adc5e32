// SocketWriter: the NBD replies of one connection, written to its socket by the event loop when that is
// cheap and by a thread of the connection's own when it is not (see docs/nbd-server.md, "Reply writer").
//
// Why: serving a 64 KiB read from the page cache costs two copies, page cache -> reply buffer (pread) and
// reply buffer -> socket (write). On the event loop both run on one core, which then limits the connection
// while the machine's other core idles (nbdkit runs them on its worker threads). Handing the socket copy
// of large replies to a thread lets the event loop read, parse and pread the next requests meanwhile.
//
// Contract (the JS side is src/protocol/nbd/reply-writer.ts):
// - `send(buffers, count, handoff)` appends buffers[0..count) to the queue, in order. The caller keeps
//   every buffer alive and unchanged until `completed()` has counted it or the writer has stopped.
//   Without `handoff`, when nothing is queued the calling thread writes at once, as much as the socket
//   takes (MSG_DONTWAIT); what is left, and everything sent with `handoff`, the thread writes.
// - `completed()` counts the buffers written in full, in queue order, since the writer was made.
// - The JS callback runs (coalesced) after the thread completes buffers, when writing failed (`error()`
//   names the errno; queued buffers are dropped, nothing more is written) and when the writer has stopped.
// - `close()` stops the writer: queued buffers are dropped, the thread exits, the duplicated descriptor is
//   closed. `stopped()` turns true once no thread can touch a buffer again (then the callback runs).
//
// The writer owns a dup() of the socket's descriptor, so the event loop closing its socket can never make
// the thread write into whatever file reuses that number. Writes use sendmsg(MSG_NOSIGNAL); the descriptor
// is non-blocking (libuv's), so the thread waits for room in poll(2), together with an eventfd that
// close() signals.
#include <napi.h>

#include <errno.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <cstring>
#include <thread>

#include "socket_writer.h"

namespace vdisk {
namespace {

// Buffers one sendmsg takes at most (IOV_MAX is 1024; a reply is one or two buffers).
constexpr size_t kIovMax = 64;

struct Entry {
  const uint8_t* data;
  size_t length;
};

struct State {
  std::mutex mu;
  std::condition_variable wake;
  std::deque<Entry> queue;  // written in order; the head may be written in part
  size_t headWritten = 0;   // bytes of queue.front() already on the socket
  std::atomic<uint64_t> completed{0};
  int fd = -1;       // our dup() of the socket
  int eventFd = -1;  // close() wakes a thread waiting in poll
  int error = 0;     // the errno that stopped writing; 0 = none
  bool closing = false;
  bool threadStarted = false;
  std::atomic<bool> stopped{false};
  std::atomic<bool> notifyPending{false};
  Napi::ThreadSafeFunction notify;
  bool notifyMade = false;  // false when the constructor failed before making `notify`

  ~State() {
    if (fd >= 0) close(fd);
    if (eventFd >= 0) close(eventFd);
  }
};

// Drops `n` written bytes off the queue's head; returns how many entries that completed. Under `mu`.
uint64_t Advance(State& s, size_t n) {
  uint64_t done = 0;
  while (n > 0) {
    Entry& head = s.queue.front();
    size_t left = head.length - s.headWritten;
    if (n < left) {
      s.headWritten += n;
      return done;
    }
    n -= left;
    s.queue.pop_front();
    s.headWritten = 0;
    done++;
  }
  // Zero-length entries at the head are complete as soon as they are reached.
  while (!s.queue.empty() && s.queue.front().length == 0) {
    s.queue.pop_front();
    done++;
  }
  return done;
}

// The head of the queue as an iovec array; returns how many slots it filled. Under `mu`.
size_t Gather(State& s, struct iovec* iov) {
  size_t count = 0;
  size_t skip = s.headWritten;
  for (const Entry& entry : s.queue) {
    if (count == kIovMax) break;
    iov[count].iov_base = const_cast<uint8_t*>(entry.data) + skip;
    iov[count].iov_len = entry.length - skip;
    skip = 0;
    count++;
  }
  return count;
}

ssize_t SendSome(int fd, struct iovec* iov, size_t count) {
  struct msghdr msg = {};
  msg.msg_iov = iov;
  msg.msg_iovlen = count;
  ssize_t n;
  do {
    n = sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
  } while (n < 0 && errno == EINTR);
  return n;
}

// Tells JS to look (at most one call outstanding). Any thread.
void Notify(State& s) {
  if (s.notifyPending.exchange(true)) return;
  s.notify.NonBlockingCall();
}

// Writing failed: drop everything queued, remember why, tell JS. Under `mu`.
void Fail(State& s, int err) {
  if (s.error == 0) s.error = err;
  s.queue.clear();
  s.headWritten = 0;
  Notify(s);
}

void ThreadMain(std::shared_ptr<State> state) {
  State& s = *state;
  struct iovec iov[kIovMax];
  std::unique_lock<std::mutex> lock(s.mu);
  for (;;) {
    s.wake.wait(lock, [&] { return s.closing || !s.queue.empty(); });
    if (s.closing) break;
    size_t count = Gather(s, iov);
    lock.unlock();
    // The event loop only writes while the queue is empty, so while it is not the socket is ours; the
    // entries gathered stay at the queue's head (appends never move them) until Advance drops them.
    ssize_t n = SendSome(s.fd, iov, count);
    int err = n < 0 ? errno : 0;
    if (n < 0 && (err == EAGAIN || err == EWOULDBLOCK)) {
      struct pollfd fds[2] = {{s.fd, POLLOUT, 0}, {s.eventFd, POLLIN, 0}};
      int rc;
      do {
        rc = poll(fds, 2, -1);
      } while (rc < 0 && errno == EINTR);
      lock.lock();
      continue;  // room, a hang-up (the next sendmsg reports it) or close()
    }
    lock.lock();
    if (s.closing) break;
    if (n < 0) {
      Fail(s, err);
      continue;  // wait for close()
    }
    uint64_t done = Advance(s, static_cast<size_t>(n));
    if (done > 0) {
      // Sequentially consistent with notifyPending: JS clears the flag and then reads `completed`, we add
      // to `completed` and then test the flag, so one of the two always sees the other's write.
      s.completed.fetch_add(done);
      Notify(s);  // coalesced: at most one call waits for JS to look
    }
  }
  s.queue.clear();
  // Our reference to the socket goes now, not when the JS object is collected: the peer must see the
  // connection close once the event loop has closed its own descriptor.
  close(s.fd);
  s.fd = -1;
  lock.unlock();
  s.stopped.store(true, std::memory_order_release);
  s.notifyPending.store(false);
  Notify(s);
  s.notify.Release();
}

class SocketWriter : public Napi::ObjectWrap<SocketWriter> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "SocketWriter",
                       {
                           InstanceMethod<&SocketWriter::Send>("send"),
                           InstanceMethod<&SocketWriter::Completed>("completed"),
                           InstanceMethod<&SocketWriter::Error>("error"),
                           InstanceMethod<&SocketWriter::Close>("close"),
                           InstanceMethod<&SocketWriter::Stopped>("stopped"),
                       });
  }

  SocketWriter(const Napi::CallbackInfo& info) : Napi::ObjectWrap<SocketWriter>(info) {
    Napi::Env env = info.Env();
    if (!info[0].IsNumber()) throw Napi::TypeError::New(env, "fd must be a number");
    if (!info[1].IsFunction()) throw Napi::TypeError::New(env, "notify must be a function");
    int fd = info[0].As<Napi::Number>().Int32Value();
    state_ = std::make_shared<State>();
    state_->fd = dup(fd);
    if (state_->fd < 0) throw Napi::Error::New(env, std::string("dup: ") + strerror(errno));
    state_->eventFd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (state_->eventFd < 0) throw Napi::Error::New(env, std::string("eventfd: ") + strerror(errno));
    state_->notify =
        Napi::ThreadSafeFunction::New(env, info[1].As<Napi::Function>(), "vdisk:SocketWriter", 0, 1);
    state_->notifyMade = true;
    // The writer never keeps the process alive by itself; the socket does.
    state_->notify.Unref(env);
  }

  ~SocketWriter() { Stop(); }

 private:
  // send(buffers: Buffer[], count: number, handoff: boolean): number (entries completed so far)
  Napi::Value Send(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!info[0].IsArray()) throw Napi::TypeError::New(env, "buffers must be an array");
    Napi::Array buffers = info[0].As<Napi::Array>();
    uint32_t count = info[1].As<Napi::Number>().Uint32Value();
    bool handoff = info[2].ToBoolean().Value();
    if (count > buffers.Length()) throw Napi::RangeError::New(env, "count is beyond the array");
    State& s = *state_;
    std::unique_lock<std::mutex> lock(s.mu);
    if (s.closing || s.error != 0) {
      // Dropped: the connection is going away (JS learns why from error()).
      return Napi::Number::New(env, static_cast<double>(s.completed.load()));
    }
    bool wasEmpty = s.queue.empty();
    for (uint32_t i = 0; i < count; i++) {
      Napi::Value value = buffers.Get(i);
      if (!value.IsBuffer()) throw Napi::TypeError::New(env, "buffers must hold Buffers");
      Napi::Buffer<uint8_t> buffer = value.As<Napi::Buffer<uint8_t>>();
      s.queue.push_back({buffer.Data(), buffer.Length()});
    }
    if (wasEmpty && !handoff) {
      // Nobody else is writing: as much as the socket takes, now, on this thread.
      struct iovec iov[kIovMax];
      while (!s.queue.empty()) {
        size_t n = Gather(s, iov);
        ssize_t sent = SendSome(s.fd, iov, n);
        if (sent < 0) {
          if (errno == EAGAIN || errno == EWOULDBLOCK) break;
          Fail(s, errno);
          break;
        }
        s.completed.fetch_add(Advance(s, static_cast<size_t>(sent)), std::memory_order_release);
      }
    }
    if (!s.queue.empty()) {
      if (!s.threadStarted) {
        s.threadStarted = true;
        std::thread(ThreadMain, state_).detach();
      }
      s.wake.notify_one();
    }
    return Napi::Number::New(env, static_cast<double>(s.completed.load(std::memory_order_acquire)));
  }

  Napi::Value Completed(const Napi::CallbackInfo& info) {
    // JS looked: the next completion may notify again (see ThreadMain for the order of the two).
    state_->notifyPending.store(false);
    return Napi::Number::New(info.Env(), static_cast<double>(state_->completed.load()));
  }

  Napi::Value Error(const Napi::CallbackInfo& info) {
    std::lock_guard<std::mutex> lock(state_->mu);
    if (state_->error == 0) return info.Env().Null();
    return Napi::String::New(info.Env(), ErrnoName(state_->error));
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    Stop();
    return info.Env().Undefined();
  }

  Napi::Value Stopped(const Napi::CallbackInfo& info) {
    return Napi::Boolean::New(info.Env(), state_->stopped.load(std::memory_order_acquire));
  }

  void Stop() {
    State& s = *state_;
    std::unique_lock<std::mutex> lock(s.mu);
    if (s.closing) return;
    s.closing = true;
    s.queue.clear();
    s.headWritten = 0;
    if (s.threadStarted) {
      // The thread drops its own reference to `notify` and reports `stopped` when it leaves.
      uint64_t one = 1;
      ssize_t ignored = write(s.eventFd, &one, sizeof one);
      (void)ignored;
      s.wake.notify_one();
      return;
    }
    if (s.fd >= 0) close(s.fd);
    s.fd = -1;
    lock.unlock();
    s.stopped.store(true, std::memory_order_release);
    if (s.notifyMade) s.notify.Release();
  }

  std::shared_ptr<State> state_;
};

}  // namespace

void InitSocketWriter(Napi::Env env, Napi::Object exports) {
  exports.Set("SocketWriter", SocketWriter::Define(env));
}

}  // namespace vdisk
