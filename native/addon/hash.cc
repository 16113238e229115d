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
//   sha256VerifyPages(data, want, index?, pageSize?) -> Promise<number>
//     data:  one Buffer/Uint8Array holding pages of pageSize bytes (default 4096);
//     want:  n x 32 bytes, the expected SHA-256 of each page checked;
//     index: optional Uint32Array of n page numbers in data (page i checked is
//            data[index[i]*pageSize ..+pageSize)); omitted = pages 0..n-1 and
//            data must hold exactly n pages.
//     resolves with the first i whose page does not hash to want[32i..32i+32),
//     or -1 when all match. Pages are hashed in blocks of 256 (see sha256_many):
//     pages after the first mismatch in its block are hashed but not compared.
//     For the S3 restore (storage/s3/restore.ts): a range GET's body arrives in
//     one buffer and all its pages are checked in one call, with no copy and
//     no JS object per page.
//
//   sha256Engine() -> string
//     which implementation hashes here: "ipsec-mb VERSION ARCH" (multi-buffer,
//     see sha256_many) or "openssl".
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
#include "exa_sha256.h"

#ifdef EXA_HAVE_IPSEC_MB
// Without this the header's pre-0.53 compatibility names (SHA1, SHA256, ...) clash with OpenSSL's.
#define NO_COMPAT_IMB_API_053
#include <intel-ipsec-mb.h>
#endif

namespace {

constexpr size_t kDigest = 32;

struct Span {
  const uint8_t *p;
  size_t n;
  bool present;
};

// SHA-256 of many independent messages (4 KiB pages, mostly).
//
// With Intel's multi-buffer crypto library (libipsec-mb, Debian package
// libipsec-mb-dev; binding.gyp compiles this in when its header is there) the
// messages are hashed several at a time, interleaved across lanes, which hides
// the latency of the SHA rounds: measured here (Zen 4, SHA-NI, one thread,
// 4 KiB pages, thread CPU time) 2.6-3.1 GB/s against 1.7 GB/s for OpenSSL's
// one-message-at-a-time SHA256(). Without the library, or when its manager
// cannot be set up or refuses a job, OpenSSL's SHA256() does the work. Both
// give the same digests (FIPS 180-4); the tests compare them with node:crypto.
//
// A manager (IMB_MGR) is not thread-safe: each pool thread gets its own,
// made on first use and freed when the thread exits.
#ifdef EXA_HAVE_IPSEC_MB
struct MbState {
  IMB_MGR *mgr = nullptr;
  bool tried = false;
  ~MbState() {
    if (mgr) free_mb_mgr(mgr);
  }
};

// Whether the manager init_mb_mgr_auto() chose for these CPU features
// hashes SHA-256 with the SHA extensions: its "type 2" needs more than
// SHA-NI (GFNI, VAES, ...), and without them it falls back to SIMD lanes.
bool auto_uses_shani(IMB_ARCH arch, uint64_t f) {
  auto has = [f](uint64_t need) { return (f & need) == need; };
  switch (arch) {
    case IMB_ARCH_SSE: return has(IMB_CPUFLAGS_SSE_T2);
    case IMB_ARCH_AVX: return has(IMB_CPUFLAGS_AVX_T2);
    case IMB_ARCH_AVX2: return has(IMB_CPUFLAGS_AVX2_T2);
    case IMB_ARCH_AVX512: return has(IMB_CPUFLAGS_AVX512_T2);
    default: return false;
  }
}

// A manager set up for SHA-256 of pages: the one init_mb_mgr_auto() picks,
// unless that one hashes with SIMD lanes on a CPU that has SHA-NI, then the
// SSE manager, whose SHA-256 runs two lanes on the SHA extensions. Measured
// (4 KiB pages, one thread, thread CPU time) on an EPYC with SHA-NI and AVX2
// but no GFNI, where auto picks AVX2 type 1: 0.7-0.9 GiB/s auto, 1.5-1.7
// GiB/s SSE with SHA-NI, 1.0 GiB/s OpenSSL. On Zen 4 auto picks AVX-512 type 2
// (SHA-NI as well) and stays. Null when the library cannot run here.
IMB_MGR *new_sha_manager(IMB_ARCH *arch_out) {
  IMB_MGR *m = alloc_mb_mgr(0);
  if (!m) return nullptr;
  IMB_ARCH arch = IMB_ARCH_NONE;
  init_mb_mgr_auto(m, &arch);
  if (imb_get_errno(m) != 0 || arch == IMB_ARCH_NONE) {
    free_mb_mgr(m);
    return nullptr;
  }
  const uint64_t f = m->features;
  if (!auto_uses_shani(arch, f) && (f & IMB_FEATURE_SHANI) && (f & IMB_CPUFLAGS_SSE) == IMB_CPUFLAGS_SSE) {
    IMB_MGR *sse = alloc_mb_mgr(0);
    if (sse) {
      init_mb_mgr_sse(sse);
      if (imb_get_errno(sse) == 0) {
        free_mb_mgr(m);
        m = sse;
        arch = IMB_ARCH_SSE;
      } else {
        free_mb_mgr(sse);
      }
    }
  }
  *arch_out = arch;
  return m;
}

IMB_MGR *mb_manager() {
  thread_local MbState st;
  if (!st.tried) {
    st.tried = true;
    IMB_ARCH arch = IMB_ARCH_NONE;
    st.mgr = new_sha_manager(&arch);
  }
  return st.mgr;
}

// Messages longer than this go to OpenSSL: lanes only pay off for many short ones.
constexpr size_t kMbMaxLen = 1 << 20;

bool sha256_many_mb(const Span *spans, size_t count, uint8_t *out) {
  IMB_MGR *m = mb_manager();
  if (!m) return false;
  bool ok = true;
  auto take = [&ok](IMB_JOB *j) {
    if (j->status != IMB_STATUS_COMPLETED) ok = false;
  };
  for (size_t i = 0; i < count; i++) {
    const Span &s = spans[i];
    uint8_t *o = out + i * kDigest;
    if (!s.present) {
      memset(o, 0, kDigest);
      continue;
    }
    if (s.n == 0 || s.n > kMbMaxLen) {
      SHA256(s.p, s.n, o);
      continue;
    }
    IMB_JOB *j = IMB_GET_NEXT_JOB(m);
    j->cipher_mode = IMB_CIPHER_NULL;
    j->cipher_direction = IMB_DIR_ENCRYPT;
    j->chain_order = IMB_ORDER_HASH_CIPHER;
    j->hash_alg = IMB_AUTH_SHA_256;
    j->src = s.p;
    j->hash_start_src_offset_in_bytes = 0;
    j->msg_len_to_hash_in_bytes = s.n;
    j->auth_tag_output = o;
    j->auth_tag_output_len_in_bytes = kDigest;
    IMB_JOB *done = IMB_SUBMIT_JOB(m);
    while (done) {
      take(done);
      done = IMB_GET_COMPLETED_JOB(m);
    }
  }
  IMB_JOB *done;
  while ((done = IMB_FLUSH_JOB(m)) != nullptr) take(done);
  return ok;
}
#endif

void sha256_many(const Span *spans, size_t count, uint8_t *out) {
#ifdef EXA_HAVE_IPSEC_MB
  if (sha256_many_mb(spans, count, out)) return;
#endif
  for (size_t i = 0; i < count; i++) {
    if (spans[i].present) SHA256(spans[i].p, spans[i].n, out + i * kDigest);
    else memset(out + i * kDigest, 0, kDigest);
  }
}

// Which implementation sha256_many() uses on this machine (for benchmarks and tests).
std::string sha256_engine() {
#ifdef EXA_HAVE_IPSEC_MB
  IMB_ARCH arch = IMB_ARCH_NONE;
  IMB_MGR *m = new_sha_manager(&arch);
  if (m) {
    const bool shani = auto_uses_shani(arch, m->features);
    free_mb_mgr(m);
    const char *names[] = {"none", "noaesni", "sse", "avx", "avx2", "avx512"};
    const char *a = arch >= 0 && arch < static_cast<int>(sizeof(names) / sizeof(names[0])) ? names[arch] : "?";
    return std::string("ipsec-mb ") + imb_get_version_str() + " " + a + (shani ? " sha-ni" : "");
  }
#endif
  return "openssl";
}

class HashWorker : public Napi::AsyncWorker {
 public:
  HashWorker(Napi::Env env, Napi::Object keep, std::vector<Span> spans)
      : Napi::AsyncWorker(env), keep_(Napi::Persistent(keep)), spans_(std::move(spans)), d_(Napi::Promise::Deferred::New(env)) {}

  Napi::Promise Promise() { return d_.Promise(); }

  void Execute() override {
    out_.resize(spans_.size() * kDigest);
    sha256_many(spans_.data(), spans_.size(), out_.data());
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

// Checks pages of one buffer against expected digests, stopping at the first mismatch.
class VerifyWorker : public Napi::AsyncWorker {
 public:
  VerifyWorker(Napi::Env env, Napi::Object keep, const uint8_t *data, size_t page, const uint8_t *want, const uint32_t *index, size_t n)
      : Napi::AsyncWorker(env), keep_(Napi::Persistent(keep)), data_(data), page_(page), want_(want), index_(index), n_(n),
        d_(Napi::Promise::Deferred::New(env)) {}

  Napi::Promise Promise() { return d_.Promise(); }

  void Execute() override {
    // In blocks, all pages of a block hashed together (several lanes at once), then compared in order.
    constexpr size_t kBlock = 256;
    Span spans[kBlock];
    uint8_t got[kBlock * kDigest];
    for (size_t from = 0; from < n_; from += kBlock) {
      const size_t count = n_ - from < kBlock ? n_ - from : kBlock;
      for (size_t k = 0; k < count; k++) {
        const size_t at = index_ ? static_cast<size_t>(index_[from + k]) : from + k;
        spans[k] = {data_ + at * page_, page_, true};
      }
      sha256_many(spans, count, got);
      for (size_t k = 0; k < count; k++) {
        if (memcmp(got + k * kDigest, want_ + (from + k) * kDigest, kDigest) != 0) {
          first_ = static_cast<double>(from + k);
          return;
        }
      }
    }
  }

  void OnOK() override { d_.Resolve(Napi::Number::New(Env(), first_)); }

  void OnError(const Napi::Error &e) override { d_.Reject(e.Value()); }

 private:
  Napi::ObjectReference keep_;  // data, want and index, alive until the work is done
  const uint8_t *data_;
  size_t page_;
  const uint8_t *want_;
  const uint32_t *index_;
  size_t n_;
  double first_ = -1;
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

Napi::Value Sha256VerifyPages(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  const char *fn = "sha256VerifyPages: ";
  size_t page = 4096;
  if (info.Length() >= 4 && !info[3].IsUndefined()) {
    if (!info[3].IsNumber()) exa_addon::throw_errno(env, EINVAL, std::string(fn) + "pageSize must be a number");
    double ps = info[3].As<Napi::Number>().DoubleValue();
    if (!(ps >= 1 && ps <= (1 << 30)) || ps != static_cast<double>(static_cast<size_t>(ps))) {
      exa_addon::throw_errno(env, EINVAL, std::string(fn) + "pageSize must be an integer from 1 to 2^30, got " + info[3].ToString().Utf8Value());
    }
    page = static_cast<size_t>(ps);
  }
  const uint8_t *data = nullptr, *want = nullptr;
  size_t dataLen = 0, wantLen = 0;
  if (info.Length() < 1 || !view_of(info[0], &data, &dataLen)) exa_addon::throw_errno(env, EINVAL, std::string(fn) + "data must be a Buffer");
  if (info.Length() < 2 || !view_of(info[1], &want, &wantLen)) exa_addon::throw_errno(env, EINVAL, std::string(fn) + "want must be a Buffer of 32-byte digests");
  if (wantLen % kDigest != 0) {
    exa_addon::throw_errno(env, EINVAL, std::string(fn) + "want holds " + std::to_string(wantLen) + " bytes, not a whole number of 32-byte digests");
  }
  const size_t n = wantLen / kDigest;
  const size_t pages = dataLen / page;
  const uint32_t *index = nullptr;
  Napi::Object keep = Napi::Object::New(env);
  keep.Set("data", info[0]);
  keep.Set("want", info[1]);
  if (info.Length() >= 3 && !info[2].IsUndefined() && !info[2].IsNull()) {
    if (!info[2].IsTypedArray() || info[2].As<Napi::TypedArray>().TypedArrayType() != napi_uint32_array) {
      exa_addon::throw_errno(env, EINVAL, std::string(fn) + "index must be a Uint32Array of page numbers");
    }
    Napi::Uint32Array ix = info[2].As<Napi::Uint32Array>();
    if (ix.ElementLength() != n) {
      exa_addon::throw_errno(env, EINVAL, std::string(fn) + "index has " + std::to_string(ix.ElementLength()) + " page numbers for " + std::to_string(n) + " digests");
    }
    index = ix.Data();
    for (size_t i = 0; i < n; i++) {
      if (index[i] >= pages) {
        exa_addon::throw_errno(env, EINVAL, std::string(fn) + "index[" + std::to_string(i) + "] = " + std::to_string(index[i]) + " is past the " +
                                                std::to_string(pages) + " whole pages of data (" + std::to_string(dataLen) + " bytes)");
      }
    }
    keep.Set("index", info[2]);
  } else if (dataLen != n * page) {
    exa_addon::throw_errno(env, EINVAL, std::string(fn) + "data holds " + std::to_string(dataLen) + " bytes, not the " + std::to_string(n) + " pages of " +
                                            std::to_string(page) + " bytes that want has digests for");
  }
  auto *w = new VerifyWorker(env, keep, data, page, want, index, n);
  Napi::Promise pr = w->Promise();
  w->Queue();
  return pr;
}

}  // namespace

namespace exa {

void sha256_each(const uint8_t *const *msgs, size_t count, size_t len, uint8_t *out) {
  std::vector<Span> spans(count);
  for (size_t i = 0; i < count; i++) spans[i] = Span{msgs[i], len, msgs[i] != nullptr};
  sha256_many(spans.data(), count, out);
}

void sha256_pages(const uint8_t *base, size_t count, size_t len, uint8_t *out) {
  std::vector<Span> spans(count);
  for (size_t i = 0; i < count; i++) spans[i] = Span{base + i * len, len, true};
  sha256_many(spans.data(), count, out);
}

}  // namespace exa

/* Called from Init() in native/addon/addon.cc. */
void exa_addon_register_hash(Napi::Env env, Napi::Object exports) {
  exports.Set("sha256Pages", Napi::Function::New(env, Sha256Pages));
  exports.Set("sha256VerifyPages", Napi::Function::New(env, Sha256VerifyPages));
  exports.Set("sha256Engine", Napi::Function::New(env, [](const Napi::CallbackInfo &info) -> Napi::Value {
    return Napi::String::New(info.Env(), sha256_engine());
  }));
}
