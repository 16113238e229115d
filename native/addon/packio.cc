// Batched positional reads of pack files for the LevelDB store
// (storage/leveldb.ts): a restore of a 1 GiB image names 262,144 pages; one
// fs.read per page (a promise, a libuv round trip and a JS Buffer each) cost
// more than the bytes. Here one call reads many ranges on a libuv pool
// thread straight into one destination buffer (ranges of one file with holes
// of at most 32 KiB between them in one preadv(2), the holes into a sink;
// the rest with pread(2)) and, optionally,
// checks every 4096-byte page of it against its expected SHA-256 (OpenSSL,
// as native/addon/hash.cc) in the same pass, while the bytes are in cache.
//
//   packRead(ops, dst, hashes?) -> Promise<{ got: Int32Array, ok: Uint8Array | null }>
//     ops:    Float64Array, 4 numbers per range: fd, file offset, length,
//             offset in dst (integers; length > 0; the range inside dst).
//     dst:    Buffer/Uint8Array receiving the bytes.
//     hashes: optional Buffer of (dst.length / 4096) x 32 bytes: page i of dst
//             is checked against hashes[32i..32i+32) after all reads.
//     got[i]: bytes read for range i (fewer than its length at end of file),
//             or -errno when pread failed (EBADF for a closed fd, ...).
//     ok[i]:  1 when page i of dst hashes to its expected value, else 0
//             (null when no hashes were given).
//
//   packWrite(fd, position, bufs) -> Promise<number>
//     Writes the buffers back to back at `position` (a multiple of 4096; the
//     total a multiple of 4096) with pwrite on a pool thread, through an
//     aligned scratch buffer (a buffer that is itself 4096-aligned and whole
//     pages is written from where it lies, without the copy), so `fd` may be
//     opened with O_DIRECT: the page
//     cache is bypassed (measured here: buffered writes of fresh page-cache
//     pages cost 0.3-2.2 CPU s per GiB in this VM, depending on whether the
//     host had to back the memory again; an O_DIRECT write from a reused
//     buffer costs one memcpy). Resolves with the bytes written; rejects with
//     the errno of a failed write (EINVAL when fd is O_DIRECT and the file
//     system refuses it, ...).
//
//   packAdvise(ops) -> Promise<number>
//     ops: Float64Array, 3 numbers per span: fd, offset, length. Asks the
//     kernel to read the spans into the page cache (posix_fadvise
//     WILLNEED) on a pool thread, in order; resolves with the number of spans
//     the kernel accepted. A restore names its pages up front: scattered
//     pages of increments lie in dense runs of a pack, and reading those runs
//     ahead in large requests replaces thousands of 4 KiB random reads from a
//     cold cache (the kernel does no readahead for a random pread pattern).
//
// Bad arguments throw at the call (nothing is queued): an Error with code
// EINVAL (native/addon/errors.h), INVALID_ARGUMENT through src/native.ts.
// Ownership: the scratch buffers of packWrite (4 MiB each, 4096-aligned) are
// kept in a process-wide free list of at most 4 (taken out while a write uses
// one) and freed at process exit by the OS, or when the environment is torn
// down (an env cleanup hook frees the idle ones).
// The file descriptors belong to the caller, which must keep them
// open until the promise settles (storage/leveldb.ts counts reads in flight
// per pack and closes a pack's fd only when none is); dst and hashes are kept
// alive by references until the work is done and must not be modified
// meanwhile (the contract of fs.read). The work owns nothing else: there is
// no handle to close; at environment teardown node waits for queued work.
#include <errno.h>
#include <fcntl.h>
#include <napi.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>

#include <stdlib.h>

#include <cmath>
#include <mutex>
#include <string>
#include <vector>

#include "errors.h"
#include "exa_sha256.h"

namespace {

constexpr size_t kPage = 4096;
constexpr size_t kDigest = 32;

struct Op {
  int fd;
  off_t off;
  size_t len;
  size_t dst;
};

class PackReadWorker : public Napi::AsyncWorker {
 public:
  PackReadWorker(Napi::Env env, Napi::Object dstObj, uint8_t *dst, size_t dstLen, Napi::Object hashObj, const uint8_t *hashes,
                 std::vector<Op> ops)
      : Napi::AsyncWorker(env),
        dstRef_(Napi::Persistent(dstObj)),
        dst_(dst),
        dstLen_(dstLen),
        hashes_(hashes),
        ops_(std::move(ops)),
        d_(Napi::Promise::Deferred::New(env)) {
    if (hashes) hashRef_ = Napi::Persistent(hashObj);
  }

  Napi::Promise Promise() { return d_.Promise(); }

  void Execute() override {
    got_.assign(ops_.size(), 0);
    // Ranges of one file that lie close together are read with ONE preadv:
    // the bytes between them go to a scratch sink. A restore of a checkpoint
    // deep in a chain names runs of 1-3 pages of its base pack between pages
    // replaced by increments (and the increments' surviving pages lie in
    // their packs with small holes too); one system call per run cost more
    // than reading the holes (a 4 KiB copy from the page cache is ~0.3 us, a
    // pread ~1.5 us).
    const size_t n = ops_.size();
    std::vector<uint32_t> &order = order_;
    order.resize(n);
    for (size_t i = 0; i < n; i++) order[i] = static_cast<uint32_t>(i);
    std::sort(order.begin(), order.end(), [this](uint32_t a, uint32_t b) {
      const Op &x = ops_[a], &y = ops_[b];
      return x.fd != y.fd ? x.fd < y.fd : x.off < y.off;
    });
    size_t i = 0;
    while (i < n) {
      const Op &first = ops_[order[i]];
      off_t end = first.off + static_cast<off_t>(first.len);
      size_t j = i + 1, iovs = 1;
      while (j < n) {
        const Op &o = ops_[order[j]];
        if (o.fd != first.fd || o.off < end || static_cast<size_t>(o.off - end) > kMaxGap) break;
        size_t need = o.off > end ? 2 : 1;
        if (iovs + need > kMaxIov) break;
        iovs += need;
        end = o.off + static_cast<off_t>(o.len);
        j++;
      }
      if (j > i + 1 && ReadMerged(i, j, end)) {
        i = j;
        continue;
      }
      for (size_t k = i; k < j; k++) ReadOne(order[k]);
      i = j;
    }
    if (hashes_) {
      const size_t pages = dstLen_ / kPage;
      ok_.resize(pages);
      // In blocks (the multi-buffer engine hashes several pages at once, exa_sha256.h).
      constexpr size_t kBlock = 64;
      uint8_t md[kBlock * kDigest];
      for (size_t p = 0; p < pages; p += kBlock) {
        const size_t n = std::min(kBlock, pages - p);
        exa::sha256_pages(dst_ + p * kPage, n, kPage, md);
        for (size_t i = 0; i < n; i++) ok_[p + i] = memcmp(md + i * kDigest, hashes_ + (p + i) * kDigest, kDigest) == 0 ? 1 : 0;
      }
    }
  }

  void OnOK() override {
    Napi::Env env = Env();
    Napi::Object res = Napi::Object::New(env);
    Napi::Int32Array got = Napi::Int32Array::New(env, got_.size());
    if (!got_.empty()) memcpy(got.Data(), got_.data(), got_.size() * sizeof(int32_t));
    res.Set("got", got);
    if (hashes_) {
      Napi::Uint8Array ok = Napi::Uint8Array::New(env, ok_.size());
      if (!ok_.empty()) memcpy(ok.Data(), ok_.data(), ok_.size());
      res.Set("ok", ok);
    } else {
      res.Set("ok", env.Null());
    }
    d_.Resolve(res);
  }

  void OnError(const Napi::Error &e) override { d_.Reject(e.Value()); }

 private:
  /** Largest hole read into the sink between two ranges of one preadv, and iovecs per call. */
  static constexpr size_t kMaxGap = 8 * kPage;
  static constexpr size_t kMaxIov = 512;

  void ReadOne(uint32_t i) {
    const Op &o = ops_[i];
    size_t done = 0;
    int32_t res = 0;
    while (done < o.len) {
      ssize_t r = pread(o.fd, dst_ + o.dst + done, o.len - done, o.off + static_cast<off_t>(done));
      if (r < 0) {
        if (errno == EINTR) continue;
        res = -errno;
        break;
      }
      if (r == 0) break;  // end of file: a short range
      done += static_cast<size_t>(r);
    }
    got_[i] = res < 0 ? res : static_cast<int32_t>(done);
  }

  /**
   * Read ops order_[i..j) (one fd, ascending, not overlapping, holes of at
   * most kMaxGap) with one preadv. False when it read less than everything
   * (end of file, an error): the caller then reads each range alone, which
   * reports short ranges and errors per range.
   */
  bool ReadMerged(size_t i, size_t j, off_t end) {
    static thread_local uint8_t sink[kMaxGap];
    iov_.clear();
    const Op &first = ops_[order_at(i)];
    off_t at = first.off;
    for (size_t k = i; k < j; k++) {
      const Op &o = ops_[order_at(k)];
      if (o.off > at) iov_.push_back({sink, static_cast<size_t>(o.off - at)});
      iov_.push_back({dst_ + o.dst, o.len});
      at = o.off + static_cast<off_t>(o.len);
    }
    const size_t total = static_cast<size_t>(end - first.off);
    ssize_t r;
    do r = preadv(first.fd, iov_.data(), static_cast<int>(iov_.size()), first.off);
    while (r < 0 && errno == EINTR);
    if (r < 0 || static_cast<size_t>(r) != total) return false;
    for (size_t k = i; k < j; k++) got_[order_at(k)] = static_cast<int32_t>(ops_[order_at(k)].len);
    return true;
  }
  uint32_t order_at(size_t k) const { return order_[k]; }

  std::vector<uint32_t> order_;
  std::vector<struct iovec> iov_;
  Napi::ObjectReference dstRef_;
  Napi::ObjectReference hashRef_;
  uint8_t *dst_;
  size_t dstLen_;
  const uint8_t *hashes_;
  std::vector<Op> ops_;
  std::vector<int32_t> got_;
  std::vector<uint8_t> ok_;
  Napi::Promise::Deferred d_;
};

// ---- packWrite ----

constexpr size_t kScratch = 4u << 20;
constexpr size_t kKeepScratch = 4;
std::mutex scratch_mu;
std::vector<void *> scratch_free;

void *scratch_take() {
  {
    std::lock_guard<std::mutex> g(scratch_mu);
    if (!scratch_free.empty()) {
      void *p = scratch_free.back();
      scratch_free.pop_back();
      return p;
    }
  }
  void *p = nullptr;
  return posix_memalign(&p, kPage, kScratch) == 0 ? p : nullptr;
}
void scratch_give(void *p) {
  std::lock_guard<std::mutex> g(scratch_mu);
  if (scratch_free.size() < kKeepScratch) scratch_free.push_back(p);
  else free(p);
}
void scratch_release_all(void *) {
  std::lock_guard<std::mutex> g(scratch_mu);
  for (void *p : scratch_free) free(p);
  scratch_free.clear();
}

struct Src {
  const uint8_t *p;
  size_t n;
};

class PackWriteWorker : public Napi::AsyncWorker {
 public:
  PackWriteWorker(Napi::Env env, Napi::Object keep, int fd, off_t pos, std::vector<Src> src, size_t total)
      : Napi::AsyncWorker(env), keep_(Napi::Persistent(keep)), fd_(fd), pos_(pos), src_(std::move(src)), total_(total),
        d_(Napi::Promise::Deferred::New(env)) {}

  Napi::Promise Promise() { return d_.Promise(); }

  void Execute() override {
    // A source that starts on a page boundary and is whole pages goes to
    // pwrite as it is (received page data is laid out so: src/grpc-recv-pool.ts);
    // anything else through the aligned scratch buffer. The scratch buffer is
    // taken only when needed.
    uint8_t *buf = nullptr;
    size_t fill = 0;
    off_t at = pos_;
    for (const Src &s : src_) {
      if (fill == 0 && reinterpret_cast<uintptr_t>(s.p) % kPage == 0 && s.n % kPage == 0) {
        if (!write_all(s.p, s.n, at)) break;
        at += static_cast<off_t>(s.n);
        continue;
      }
      size_t so = 0;
      while (so < s.n) {
        if (!buf && !(buf = static_cast<uint8_t *>(scratch_take()))) {
          err_ = ENOMEM;
          return;
        }
        size_t n = std::min(kScratch - fill, s.n - so);
        memcpy(buf + fill, s.p + so, n);
        fill += n;
        so += n;
        if (fill == kScratch) {
          if (!write_all(buf, fill, at)) break;
          at += static_cast<off_t>(fill);
          fill = 0;
        }
      }
      if (err_ != 0) break;
    }
    if (err_ == 0 && fill > 0) write_all(buf, fill, at);
    if (buf) scratch_give(buf);
  }

  // pwrite n bytes from p at `at`; counts them in done_, sets err_ on failure.
  bool write_all(const uint8_t *p, size_t n, off_t at) {
    size_t off = 0;
    while (off < n) {
      ssize_t r = pwrite(fd_, p + off, n - off, at + static_cast<off_t>(off));
      if (r < 0) {
        if (errno == EINTR) continue;
        err_ = errno;
        return false;
      }
      if (r == 0) {
        err_ = EIO;
        return false;
      }
      off += static_cast<size_t>(r);
      done_ += static_cast<size_t>(r);
    }
    return true;
  }

  void OnOK() override {
    Napi::Env env = Env();
    if (err_ != 0) {
      d_.Reject(exa_addon::make_error(env, err_, std::string("packWrite: write of ") + std::to_string(total_) + " bytes at " + std::to_string(pos_) +
                                                     " failed after " + std::to_string(done_) + ": " + strerror(err_))
                    .Value());
      return;
    }
    d_.Resolve(Napi::Number::New(env, static_cast<double>(done_)));
  }

  void OnError(const Napi::Error &e) override { d_.Reject(e.Value()); }

 private:
  Napi::ObjectReference keep_;
  int fd_;
  off_t pos_;
  std::vector<Src> src_;
  size_t total_;
  size_t done_ = 0;
  int err_ = 0;
  Napi::Promise::Deferred d_;
};

Napi::Value PackWrite(const Napi::CallbackInfo &info);

class PackAdviseWorker : public Napi::AsyncWorker {
 public:
  PackAdviseWorker(Napi::Env env, std::vector<Op> spans)
      : Napi::AsyncWorker(env), spans_(std::move(spans)), d_(Napi::Promise::Deferred::New(env)) {}
  Napi::Promise Promise() { return d_.Promise(); }
  void Execute() override {
    for (const Op &o : spans_) {
      if (posix_fadvise(o.fd, o.off, static_cast<off_t>(o.len), POSIX_FADV_WILLNEED) == 0) ok_++;
    }
  }
  void OnOK() override { d_.Resolve(Napi::Number::New(Env(), static_cast<double>(ok_))); }
  void OnError(const Napi::Error &e) override { d_.Reject(e.Value()); }

 private:
  std::vector<Op> spans_;
  size_t ok_ = 0;
  Napi::Promise::Deferred d_;
};

bool u8_view(const Napi::Value &v, uint8_t **p, size_t *n) {
  if (!v.IsTypedArray()) return false;
  Napi::TypedArray t = v.As<Napi::TypedArray>();
  if (t.TypedArrayType() != napi_uint8_array) return false;
  Napi::Uint8Array u = v.As<Napi::Uint8Array>();
  *p = u.Data();
  *n = u.ByteLength();
  return true;
}

bool whole(double x, double max) { return std::isfinite(x) && x >= 0 && x <= max && x == std::floor(x); }

Napi::Value PackRead(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2) exa_addon::throw_errno(env, EINVAL, "packRead: expected (ops: Float64Array, dst: Buffer, hashes?: Buffer)");
  if (!info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array) {
    exa_addon::throw_errno(env, EINVAL, "packRead: ops must be a Float64Array (fd, offset, length, dst offset per range)");
  }
  Napi::Float64Array ops = info[0].As<Napi::Float64Array>();
  uint8_t *dst = nullptr;
  size_t dstLen = 0;
  if (!u8_view(info[1], &dst, &dstLen)) exa_addon::throw_errno(env, EINVAL, "packRead: dst must be a Buffer or Uint8Array");
  const uint8_t *hashes = nullptr;
  Napi::Object hashObj;
  if (info.Length() >= 3 && !info[2].IsUndefined() && !info[2].IsNull()) {
    uint8_t *h = nullptr;
    size_t hn = 0;
    if (!u8_view(info[2], &h, &hn)) exa_addon::throw_errno(env, EINVAL, "packRead: hashes must be a Buffer or Uint8Array");
    if (dstLen % kPage != 0) {
      exa_addon::throw_errno(env, EINVAL, "packRead: with hashes, dst must be whole 4096-byte pages, got " + std::to_string(dstLen) + " bytes");
    }
    if (hn != dstLen / kPage * kDigest) {
      exa_addon::throw_errno(env, EINVAL, "packRead: hashes are " + std::to_string(hn) + " bytes, expected " + std::to_string(dstLen / kPage * kDigest) +
                                              " (32 per page of dst)");
    }
    hashes = h;
    hashObj = info[2].As<Napi::Object>();
  }
  const size_t n = ops.ElementLength();
  if (n % 4 != 0) exa_addon::throw_errno(env, EINVAL, "packRead: ops has " + std::to_string(n) + " numbers, not a multiple of 4");
  std::vector<Op> v;
  v.reserve(n / 4);
  const double *o = ops.Data();
  for (size_t i = 0; i < n; i += 4) {
    const double fd = o[i], off = o[i + 1], len = o[i + 2], at = o[i + 3];
    // (The message is built only on failure: this loop runs once per range of every restore.)
    auto which = [i]() { return "packRead: range " + std::to_string(i / 4); };
    if (!whole(fd, 2147483647.0)) exa_addon::throw_errno(env, EINVAL, which() + ": fd must be a non-negative integer");
    if (!whole(off, 9007199254740991.0)) exa_addon::throw_errno(env, EINVAL, which() + ": file offset must be a non-negative integer");
    if (!whole(len, 1073741824.0) || len == 0) exa_addon::throw_errno(env, EINVAL, which() + ": length must be an integer from 1 to 2^30");
    if (!whole(at, 9007199254740991.0) || at + len > static_cast<double>(dstLen)) {
      exa_addon::throw_errno(env, EINVAL, which() + ": bytes " + std::to_string(static_cast<uint64_t>(at)) + ".." +
                                              std::to_string(static_cast<uint64_t>(at + len)) + " are outside dst (" + std::to_string(dstLen) + " bytes)");
    }
    v.push_back({static_cast<int>(fd), static_cast<off_t>(off), static_cast<size_t>(len), static_cast<size_t>(at)});
  }
  auto *w = new PackReadWorker(env, info[1].As<Napi::Object>(), dst, dstLen, hashObj, hashes, std::move(v));
  Napi::Promise pr = w->Promise();
  w->Queue();
  return pr;
}

Napi::Value PackWrite(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  if (info.Length() < 3) exa_addon::throw_errno(env, EINVAL, "packWrite: expected (fd: number, position: number, bufs: Buffer[])");
  if (!info[0].IsNumber() || !whole(info[0].As<Napi::Number>().DoubleValue(), 2147483647.0)) {
    exa_addon::throw_errno(env, EINVAL, "packWrite: fd must be a non-negative integer");
  }
  const double pos = info[1].IsNumber() ? info[1].As<Napi::Number>().DoubleValue() : -1;
  if (!whole(pos, 9007199254740991.0) || std::fmod(pos, static_cast<double>(kPage)) != 0) {
    exa_addon::throw_errno(env, EINVAL, "packWrite: position must be a non-negative multiple of 4096");
  }
  if (!info[2].IsArray()) exa_addon::throw_errno(env, EINVAL, "packWrite: bufs must be an array of Buffers");
  Napi::Array a = info[2].As<Napi::Array>();
  const uint32_t len = a.Length();
  Napi::Array keep = Napi::Array::New(env, len);
  std::vector<Src> src;
  src.reserve(len);
  size_t total = 0;
  for (uint32_t i = 0; i < len; i++) {
    Napi::Value e = a.Get(i);
    uint8_t *p = nullptr;
    size_t n = 0;
    if (!u8_view(e, &p, &n)) exa_addon::throw_errno(env, EINVAL, "packWrite: element " + std::to_string(i) + " is not a Buffer");
    keep.Set(i, e);
    if (n > 0) src.push_back({p, n});
    total += n;
  }
  if (total == 0 || total % kPage != 0) {
    exa_addon::throw_errno(env, EINVAL, "packWrite: " + std::to_string(total) + " bytes is not a positive multiple of 4096");
  }
  auto *w = new PackWriteWorker(env, keep, static_cast<int>(info[0].As<Napi::Number>().DoubleValue()), static_cast<off_t>(pos), std::move(src), total);
  Napi::Promise pr = w->Promise();
  w->Queue();
  return pr;
}

// alignedBuffer(size) -> Buffer whose bytes start on a 4096-byte boundary
// (posix_memalign), freed when the Buffer is collected; V8 is told about the
// memory (AdjustExternalMemory) so that garbage ones are collected in time.
Napi::Value AlignedBuffer(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  const double size = info.Length() > 0 && info[0].IsNumber() ? info[0].As<Napi::Number>().DoubleValue() : -1;
  if (!whole(size, 2147483647.0) || size == 0) exa_addon::throw_errno(env, EINVAL, "alignedBuffer: size must be a positive integer below 2 GiB");
  const size_t n = static_cast<size_t>(size);
  void *p = nullptr;
  if (posix_memalign(&p, kPage, n) != 0) exa_addon::throw_errno(env, ENOMEM, "alignedBuffer: out of memory for " + std::to_string(n) + " bytes");
  Napi::MemoryManagement::AdjustExternalMemory(env, static_cast<int64_t>(n));
  return Napi::Buffer<uint8_t>::New(env, static_cast<uint8_t *>(p), n, [n](Napi::Env e, uint8_t *q) {
    free(q);
    Napi::MemoryManagement::AdjustExternalMemory(e, -static_cast<int64_t>(n));
  });
}

Napi::Value PackAdvise(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array) {
    exa_addon::throw_errno(env, EINVAL, "packAdvise: ops must be a Float64Array (fd, offset, length per span)");
  }
  Napi::Float64Array ops = info[0].As<Napi::Float64Array>();
  const size_t n = ops.ElementLength();
  if (n % 3 != 0) exa_addon::throw_errno(env, EINVAL, "packAdvise: ops has " + std::to_string(n) + " numbers, not a multiple of 3");
  std::vector<Op> v;
  v.reserve(n / 3);
  const double *o = ops.Data();
  for (size_t i = 0; i < n; i += 3) {
    if (!whole(o[i], 2147483647.0) || !whole(o[i + 1], 9007199254740991.0) || !whole(o[i + 2], 9007199254740991.0) || o[i + 2] == 0) {
      exa_addon::throw_errno(env, EINVAL, "packAdvise: span " + std::to_string(i / 3) + ": fd, offset and length must be non-negative integers, length > 0");
    }
    v.push_back({static_cast<int>(o[i]), static_cast<off_t>(o[i + 1]), static_cast<size_t>(o[i + 2]), 0});
  }
  auto *w = new PackAdviseWorker(env, std::move(v));
  Napi::Promise pr = w->Promise();
  w->Queue();
  return pr;
}

}  // namespace

/* Called from Init() in native/addon/addon.cc. */
void exa_addon_register_packio(Napi::Env env, Napi::Object exports) {
  exports.Set("packRead", Napi::Function::New(env, PackRead));
  exports.Set("packWrite", Napi::Function::New(env, PackWrite));
  exports.Set("packAdvise", Napi::Function::New(env, PackAdvise));
  exports.Set("alignedBuffer", Napi::Function::New(env, AlignedBuffer));
  napi_add_env_cleanup_hook(env, scratch_release_all, nullptr);
}
