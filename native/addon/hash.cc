// SHA-256 of page batches on the libuv thread pool, for the checkpoint store
// (storage/hash.ts). The store hashes every page it receives and every page
// it reads back; on the JS thread that costs ~0.6 GB/s of one core through
// node:crypto's one-call-per-page API and stalls the sockets meanwhile. Here a
// batch is hashed by OpenSSL (SHA-NI where the CPU has it) on a pool thread,
// with no copy of the page bytes, while the event loop keeps serving.
//
//   sha256Pages(pages, pageSize?) -> Promise<Buffer>
//     pages: one Buffer/Uint8Array holding whole pages of pageSize bytes
//            (default 4096): one hash per page;
//         or an array whose elements are Buffers/Uint8Arrays (each hashed
//            whole, any length) or null/undefined (32 zero bytes: the
//            all-zero hash, never the SHA-256 of anything the store holds).
//     resolves with n x 32 bytes of digests, in input order.
//
// Bad arguments throw at the call (nothing is queued): an Error with code
// EINVAL (native/addon/errors.h), INVALID_ARGUMENT through src/native.ts. The input
// is kept alive until the work is done (a reference to it, or to a private
// copy of the array, so the caller may reuse its array at once); the bytes
// must not be modified, transferred or detached while the call is pending
// (the same contract as fs.write). The work owns nothing else: there is no
// handle to close; at environment teardown node waits for queued work.
#include <errno.h>
#include <napi.h>
#include <openssl/sha.h>
#include <string.h>

#include <string>
#include <vector>

#include "errors.h"

namespace {

constexpr size_t kDigest = 32;

struct Span {
  const uint8_t *p;
  size_t n;
  bool present;
};

class HashWorker : public Napi::AsyncWorker {
 public:
  HashWorker(Napi::Env env, Napi::Object keep, std::vector<Span> spans)
      : Napi::AsyncWorker(env), keep_(Napi::Persistent(keep)), spans_(std::move(spans)), d_(Napi::Promise::Deferred::New(env)) {}

  Napi::Promise Promise() { return d_.Promise(); }

  void Execute() override {
    out_.resize(spans_.size() * kDigest);
    uint8_t *o = out_.data();
    for (const Span &s : spans_) {
      if (s.present) SHA256(s.p, s.n, o);
      else memset(o, 0, kDigest);
      o += kDigest;
    }
  }

  void OnOK() override {
    Napi::Env env = Env();
    d_.Resolve(Napi::Buffer<uint8_t>::Copy(env, out_.data(), out_.size()));
  }

  void OnError(const Napi::Error &e) override { d_.Reject(e.Value()); }

 private:
  Napi::ObjectReference keep_;
  std::vector<Span> spans_;
  std::vector<uint8_t> out_;
  Napi::Promise::Deferred d_;
};

bool view_of(const Napi::Value &v, const uint8_t **p, size_t *n) {
  if (!v.IsTypedArray()) return false;
  Napi::TypedArray t = v.As<Napi::TypedArray>();
  if (t.TypedArrayType() != napi_uint8_array) return false;
  Napi::Uint8Array u = v.As<Napi::Uint8Array>();
  *p = u.Data();
  *n = u.ByteLength();
  return true;
}

Napi::Value Sha256Pages(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  size_t page = 4096;
  if (info.Length() >= 2 && !info[1].IsUndefined()) {
    if (!info[1].IsNumber()) exa_addon::throw_errno(env, EINVAL, "sha256Pages: pageSize must be a number");
    double ps = info[1].As<Napi::Number>().DoubleValue();
    if (!(ps >= 1 && ps <= (1 << 30)) || ps != static_cast<double>(static_cast<size_t>(ps))) {
      exa_addon::throw_errno(env, EINVAL, "sha256Pages: pageSize must be an integer from 1 to 2^30, got " + info[1].ToString().Utf8Value());
    }
    page = static_cast<size_t>(ps);
  }
  if (info.Length() < 1) exa_addon::throw_errno(env, EINVAL, "sha256Pages: pages must be a Buffer or an array of Buffers");
  const Napi::Value arg = info[0];
  std::vector<Span> spans;
  const uint8_t *p = nullptr;
  size_t n = 0;
  if (view_of(arg, &p, &n)) {
    if (n % page != 0) {
      exa_addon::throw_errno(env, EINVAL, "sha256Pages: a buffer of " + std::to_string(n) + " bytes is not a whole number of " + std::to_string(page) + "-byte pages");
    }
    spans.reserve(n / page);
    for (size_t o = 0; o < n; o += page) spans.push_back({p + o, page, true});
    auto *w = new HashWorker(env, arg.As<Napi::Object>(), std::move(spans));
    Napi::Promise pr = w->Promise();
    w->Queue();
    return pr;
  }
  if (!arg.IsArray()) exa_addon::throw_errno(env, EINVAL, "sha256Pages: pages must be a Buffer or an array of Buffers");
  Napi::Array a = arg.As<Napi::Array>();
  const uint32_t len = a.Length();
  // A private copy of the array keeps every element alive whatever the caller does with its own.
  Napi::Array keep = Napi::Array::New(env, len);
  spans.reserve(len);
  for (uint32_t i = 0; i < len; i++) {
    Napi::Value e = a.Get(i);
    if (e.IsNull() || e.IsUndefined()) {
      spans.push_back({nullptr, 0, false});
      continue;
    }
    if (!view_of(e, &p, &n)) {
      exa_addon::throw_errno(env, EINVAL, "sha256Pages: element " + std::to_string(i) + " is neither a Buffer nor null");
    }
    keep.Set(i, e);
    spans.push_back({p, n, true});
  }
  auto *w = new HashWorker(env, keep, std::move(spans));
  Napi::Promise pr = w->Promise();
  w->Queue();
  return pr;
}

}  // namespace

/* Called from Init() in native/addon/addon.cc. */
void exa_addon_register_hash(Napi::Env env, Napi::Object exports) {
  exports.Set("sha256Pages", Napi::Function::New(env, Sha256Pages));
}
