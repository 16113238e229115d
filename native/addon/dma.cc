// node-addon-api binding over RDMA API remoting: the agent-side DMA backend
// (native/dma) and the workload-side frontend (native/libexa/dma.c).
//
// Threading: every function runs on the JS thread. Blocking waits run on the
// libuv pool (AsyncWorker) and settle promises on the JS thread; callback-mode
// completions arrive on libexa's per-queue thread and reach JS through a
// thread-safe function. Errors carry `code` = errno name, like addon.cc.
//
// Ownership: DmaWrap owns the exa_dma; QueueWrap owns its queue's TSFN and is
// invalidated (q = nullptr) when its queue or session is closed. A queue or
// session with a wait in flight refuses to close (EBUSY) rather than free
// memory a pool thread is using.
#include <errno.h>
#include <napi.h>
#include <string.h>

#include <map>
#include <memory>
#include <set>
#include <string>

#include "../ckpt/ckpt.h"
#include "../dma/backend.h"
#include "errors.h"
#include "exa.h"
#include "exa_dma_net.h"

exa::Agent *exa_addon_agent(const Napi::Value &v);
exa_ctx *exa_addon_workload_ctx(const Napi::Value &v);
extern "C" int exa__dma_test_post_raw(exa_dma_queue *q, const void *entry, uint64_t advance);

namespace {

using exa_addon::errno_name;
using exa_addon::make_error;
using exa_addon::throw_errno;

std::string str_arg(const Napi::CallbackInfo &info, size_t i, const char *what) {
  if (info.Length() <= i || !info[i].IsString()) throw Napi::TypeError::New(info.Env(), std::string(what) + " must be a string");
  return info[i].As<Napi::String>().Utf8Value();
}
uint64_t u64_arg(const Napi::CallbackInfo &info, size_t i, const char *what) {
  if (info.Length() <= i || !info[i].IsNumber()) throw Napi::TypeError::New(info.Env(), std::string(what) + " must be a number");
  double d = info[i].As<Napi::Number>().DoubleValue();
  if (!(d >= 0) || d > 9007199254740991.0 || d != (double)(uint64_t)d)
    throw_errno(info.Env(), -EINVAL, std::string(what) + " must be a non-negative integer");
  return (uint64_t)d;
}

Napi::Object completion_obj(Napi::Env env, const exa_dma_completion &c) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("tag", (double)c.tag);
  o.Set("len", (double)c.len);
  o.Set("status", c.status);
  o.Set("op", c.op == EXA_DMA_OP_WRITE ? "write" : c.op == EXA_DMA_OP_READ ? "read" : "unknown");
  o.Set("code", c.status < 0 ? Napi::Value(Napi::String::New(env, errno_name(c.status))) : env.Null());
  o.Set("reason", c.reason);
  return o;
}

/* ------------------------------------------------------------ backend (agent side) */

struct BackendWrap {
  std::shared_ptr<exa::dma::Backend> be; /* shared with fence workers on the libuv pool */
  Napi::Reference<Napi::Value> agent_ref; /* the agent must outlive the backend */
  Napi::ThreadSafeFunction on_route_miss;
  bool has_route_miss = false;
  void shut() {
    if (!be) return;
    be->close(); /* joins every thread that could call on_route_miss */
    be.reset();
    agent_ref.Reset();
    if (has_route_miss) {
      has_route_miss = false;
      on_route_miss.Release();
    }
  }
};

BackendWrap *unwrap_backend(const Napi::CallbackInfo &info) {
  if (info.Length() < 1 || !info[0].IsExternal()) throw Napi::TypeError::New(info.Env(), "expected a DMA backend handle");
  auto *w = info[0].As<Napi::External<BackendWrap>>().Data();
  if (!w->be) throw_errno(info.Env(), -ESHUTDOWN, "the DMA backend is closed");
  return w;
}

/* A job id as the control plane passes it: [A-Za-z0-9._-], 1..EXA_NAME_MAX. */
std::string job_arg(const Napi::CallbackInfo &info, size_t i) {
  std::string s = str_arg(info, i, "job");
  bool ok = !s.empty() && s.size() <= EXA_NAME_MAX;
  for (char c : s)
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-')) ok = false;
  if (!ok) throw_errno(info.Env(), -EINVAL, "\"" + s + "\" is not a valid job id");
  return s;
}

/* dmaBackendOpen(agent, socketPath, socketMode?, { listen?, token?, holdTimeoutMs?, onRouteMiss? }?) */
Napi::Value BackendOpen(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  exa::Agent *agent = info.Length() > 0 ? exa_addon_agent(info[0]) : nullptr;
  if (!agent) throw_errno(env, -ESHUTDOWN, "dmaBackendOpen: expected an open agent handle");
  std::string path = str_arg(info, 1, "socketPath");
  unsigned mode = info.Length() > 2 && info[2].IsNumber() ? info[2].As<Napi::Number>().Uint32Value() : 0600;
  exa::dma::BackendOptions opts;
  Napi::Function route_miss;
  /* Every option is checked before anything is created, so a bad one leaks nothing. */
  if (info.Length() > 3 && info[3].IsObject()) {
    Napi::Object o = info[3].As<Napi::Object>();
    Napi::Value v = o.Get("listen");
    if (!v.IsUndefined()) {
      if (!v.IsString()) throw Napi::TypeError::New(env, "dma.listen must be a string (ip:port)");
      opts.listen = v.As<Napi::String>().Utf8Value();
    }
    v = o.Get("token");
    if (!v.IsUndefined()) {
      if (!v.IsString()) throw Napi::TypeError::New(env, "dma.token must be a string");
      opts.token = v.As<Napi::String>().Utf8Value();
      if (opts.token.size() >= EXA_DMA_NET_TEXT) throw_errno(env, -EINVAL, "dma.token is longer than 255 bytes");
    }
    v = o.Get("holdTimeoutMs");
    if (!v.IsUndefined()) {
      double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
      if (!(d >= 1) || d > 86400000) throw_errno(env, -EINVAL, "dma.holdTimeoutMs must be a number between 1 and 86400000");
      opts.hold_timeout_ms = (uint64_t)d;
    }
    v = o.Get("onRouteMiss");
    if (!v.IsUndefined()) {
      if (!v.IsFunction()) throw Napi::TypeError::New(env, "dma.onRouteMiss must be a function");
      route_miss = v.As<Napi::Function>();
    }
  }
  auto w = std::make_unique<BackendWrap>();
  if (!route_miss.IsEmpty()) {
    w->on_route_miss = Napi::ThreadSafeFunction::New(env, route_miss, "exa-dma-route-miss", 0, 1);
    w->on_route_miss.Unref(env); /* a pending route question must not keep the process alive */
    w->has_route_miss = true;
    Napi::ThreadSafeFunction tsfn = w->on_route_miss;
    /* Called on backend threads, which close() joins before the function is released. */
    opts.on_route_miss = [tsfn](const std::string &job) mutable {
      auto *s = new std::string(job);
      napi_status st = tsfn.NonBlockingCall(s, [](Napi::Env env, Napi::Function cb, std::string *s) {
        std::string j = *s;
        delete s;
        cb.Call({Napi::String::New(env, j)});
      });
      if (st != napi_ok) delete s;
    };
  }
  try {
    w->be = std::make_shared<exa::dma::Backend>(agent, path, mode, opts);
  } catch (const exa::Error &e) {
    if (w->has_route_miss) w->on_route_miss.Release();
    w->has_route_miss = false;
    throw_errno(env, e.err, e.what());
  }
  w->agent_ref = Napi::Persistent(info[0]);
  return Napi::External<BackendWrap>::New(env, w.release(), [](Napi::Env, BackendWrap *w) {
    w->shut();
    delete w;
  });
}

Napi::Value BackendClose(const Napi::CallbackInfo &info) {
  if (info.Length() < 1 || !info[0].IsExternal()) throw Napi::TypeError::New(info.Env(), "expected a DMA backend handle");
  info[0].As<Napi::External<BackendWrap>>().Data()->shut(); /* joins every backend thread */
  return info.Env().Undefined();
}

Napi::Value BackendStats(const Napi::CallbackInfo &info) {
  auto s = unwrap_backend(info)->be->stats();
  Napi::Object o = Napi::Object::New(info.Env());
  o.Set("clients", (double)s.clients);
  o.Set("ops", (double)s.ops);
  o.Set("errors", (double)s.errors);
  o.Set("bytes", (double)s.bytes);
  o.Set("remoteOps", (double)s.remote_ops);
  o.Set("remoteBytes", (double)s.remote_bytes);
  o.Set("servedOps", (double)s.served_ops);
  o.Set("servedBytes", (double)s.served_bytes);
  o.Set("heldOps", (double)s.held);
  o.Set("retries", (double)s.retries);
  o.Set("links", (double)s.links);
  o.Set("droppedConnections", (double)s.dropped);
  o.Set("lastDropReason", s.last_drop);
  return o;
}

/* dmaBackendAddress(h) -> "ip:port" the backend listens on for other agents ("" = none) */
Napi::Value BackendAddress(const Napi::CallbackInfo &info) {
  return Napi::String::New(info.Env(), unwrap_backend(info)->be->address());
}

/* dmaSetRoute(h, job, addr | null) */
Napi::Value SetRoute(const Napi::CallbackInfo &info) {
  auto *w = unwrap_backend(info);
  std::string job = job_arg(info, 1);
  if (info.Length() > 2 && info[2].IsString()) {
    std::string a = info[2].As<Napi::String>().Utf8Value();
    if (a.empty() || a.size() > 200 || a.find(':') == std::string::npos) throw_errno(info.Env(), -EINVAL, "route of job " + job + ": \"" + a + "\" is not an ip:port address");
    w->be->set_route(job, &a);
  } else if (info.Length() > 2 && info[2].IsNull()) {
    w->be->set_route(job, nullptr);
  } else throw Napi::TypeError::New(info.Env(), "dmaSetRoute(h, job, addr: string | null)");
  return info.Env().Undefined();
}

class FenceWorker : public Napi::AsyncWorker {
 public:
  FenceWorker(Napi::Env env, std::shared_ptr<exa::dma::Backend> be, std::string job)
      : Napi::AsyncWorker(env), be_(std::move(be)), job_(std::move(job)), d_(Napi::Promise::Deferred::New(env)) {}
  void Execute() override { grants_ = be_->fence(job_); }
  void OnOK() override {
    Napi::Env env = Env();
    Napi::Array a = Napi::Array::New(env, grants_.size());
    for (size_t i = 0; i < grants_.size(); i++) {
      Napi::Object g = Napi::Object::New(env);
      g.Set("buffer", grants_[i].buffer);
      g.Set("peer", grants_[i].peer);
      g.Set("perms", (double)grants_[i].perms);
      a.Set((uint32_t)i, g);
    }
    Napi::Object o = Napi::Object::New(env);
    o.Set("grants", a);
    d_.Resolve(o);
  }
  Napi::Promise Promise() { return d_.Promise(); }

 private:
  std::shared_ptr<exa::dma::Backend> be_;
  std::string job_;
  std::vector<exa::dma::Grant> grants_;
  Napi::Promise::Deferred d_;
};

/* dmaFence(h, job) -> Promise<{ grants }> */
Napi::Value Fence(const Napi::CallbackInfo &info) {
  std::string job;
  BackendWrap *w;
  try {
    w = unwrap_backend(info);
    job = job_arg(info, 1);
  } catch (const Napi::Error &e) { /* a promise API: bad input rejects */
    auto d = Napi::Promise::Deferred::New(info.Env());
    d.Reject(e.Value());
    return d.Promise();
  }
  auto *wk = new FenceWorker(info.Env(), w->be, job);
  auto p = wk->Promise();
  wk->Queue();
  return p;
}

/* dmaBuffers(h) -> [{ job, name, size, grants: [{ peer, perms }] }] */
Napi::Value Buffers(const Napi::CallbackInfo &info) {
  auto *w = unwrap_backend(info);
  Napi::Env env = info.Env();
  auto list = w->be->buffers();
  auto arr = Napi::Array::New(env, list.size());
  for (size_t i = 0; i < list.size(); i++) {
    auto o = Napi::Object::New(env);
    o.Set("job", list[i].owner);
    o.Set("name", list[i].name);
    o.Set("size", Napi::Number::New(env, (double)list[i].size));
    auto gs = Napi::Array::New(env, list[i].grants.size());
    for (size_t k = 0; k < list[i].grants.size(); k++) {
      auto go = Napi::Object::New(env);
      go.Set("peer", list[i].grants[k].first);
      go.Set("perms", Napi::Number::New(env, list[i].grants[k].second));
      gs.Set((uint32_t)k, go);
    }
    o.Set("grants", gs);
    arr.Set((uint32_t)i, o);
  }
  return arr;
}

Napi::Value Unfence(const Napi::CallbackInfo &info) {
  auto *w = unwrap_backend(info);
  w->be->unfence(job_arg(info, 1));
  return info.Env().Undefined();
}

/* dmaMoved(h, job, addr) */
Napi::Value Moved(const Napi::CallbackInfo &info) {
  auto *w = unwrap_backend(info);
  std::string job = job_arg(info, 1);
  std::string a = str_arg(info, 2, "addr");
  if (a.empty() || a.size() > 200 || a.find(':') == std::string::npos) throw_errno(info.Env(), -EINVAL, "dmaMoved: \"" + a + "\" is not an ip:port address");
  w->be->moved(job, a);
  return info.Env().Undefined();
}

/* dmaExpect(h, job, grants: {buffer, peer, perms}[], timeoutMs) */
Napi::Value Expect(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  auto *w = unwrap_backend(info);
  std::string job = job_arg(info, 1);
  if (info.Length() < 3 || !info[2].IsArray()) throw Napi::TypeError::New(env, "dmaExpect: grants must be an array");
  Napi::Array a = info[2].As<Napi::Array>();
  std::vector<exa::dma::Grant> gs;
  for (uint32_t i = 0; i < a.Length(); i++) {
    Napi::Value v = a.Get(i);
    if (!v.IsObject()) throw Napi::TypeError::New(env, "dmaExpect: every grant must be { buffer, peer, perms }");
    Napi::Object g = v.As<Napi::Object>();
    if (!g.Get("buffer").IsString() || !g.Get("peer").IsString() || !g.Get("perms").IsNumber())
      throw Napi::TypeError::New(env, "dmaExpect: every grant must be { buffer: string, peer: string, perms: number }");
    unsigned perms = g.Get("perms").As<Napi::Number>().Uint32Value();
    if (perms & ~3u) throw_errno(env, -EINVAL, "dmaExpect: unknown permission bits " + std::to_string(perms));
    gs.push_back({g.Get("buffer").As<Napi::String>().Utf8Value(), g.Get("peer").As<Napi::String>().Utf8Value(), perms});
  }
  uint64_t t = u64_arg(info, 3, "timeoutMs");
  w->be->expect(job, gs, t);
  return env.Undefined();
}

/* dmaTcpBaseline(h, msgBytes, totalBytes, window, spanBytes) -> ns (benchmark baseline; blocks the JS thread) */
Napi::Value TcpBaseline(const Napi::CallbackInfo &info) {
  auto *w = unwrap_backend(info);
  try {
    uint64_t ns = w->be->tcp_baseline(u64_arg(info, 1, "msgBytes"), u64_arg(info, 2, "totalBytes"), (uint32_t)u64_arg(info, 3, "window"),
                                     u64_arg(info, 4, "spanBytes"));
    return Napi::Number::New(info.Env(), (double)ns);
  } catch (const exa::Error &e) {
    throw_errno(info.Env(), e.err, e.what());
  }
}

/* dmaEngineDirect(backend, srcJob, srcBuf, dstJob, dstBuf, len, iters, span) -> ns (benchmark baseline) */
Napi::Value EngineDirect(const Napi::CallbackInfo &info) {
  auto *w = unwrap_backend(info);
  try {
    uint64_t ns = w->be->engine_direct(str_arg(info, 1, "srcJob"), str_arg(info, 2, "srcBuf"), str_arg(info, 3, "dstJob"),
                                       str_arg(info, 4, "dstBuf"), u64_arg(info, 5, "len"), (uint32_t)u64_arg(info, 6, "iters"),
                                       u64_arg(info, 7, "span"));
    return Napi::Number::New(info.Env(), (double)ns);
  } catch (const exa::Error &e) {
    throw_errno(info.Env(), e.err, e.what());
  }
}

/* ------------------------------------------------------------ frontend (workload side) */

struct QueueWrap;

struct DmaWrap {
  exa_dma *d = nullptr;
  std::map<std::string, exa_dma_buf *> bufs;
  std::map<std::string, Napi::Reference<Napi::ArrayBuffer>> abs;
  std::set<QueueWrap *> queues;
  Napi::Reference<Napi::Value> workload_ref; /* the exa_ctx must outlive the session */
};

struct QueueWrap {
  DmaWrap *dw = nullptr;
  exa_dma_queue *q = nullptr;
  bool callback = false;
  Napi::ThreadSafeFunction tsfn;
  int waits = 0; /* AsyncWorkers using q */
  void invalidate() {
    q = nullptr;
    if (callback) {
      callback = false;
      tsfn.Release();
    }
  }
};

DmaWrap *unwrap_dma(const Napi::CallbackInfo &info) {
  if (info.Length() < 1 || !info[0].IsExternal()) throw Napi::TypeError::New(info.Env(), "expected a DMA session handle");
  auto *w = info[0].As<Napi::External<DmaWrap>>().Data();
  if (!w->d) throw_errno(info.Env(), -ESHUTDOWN, "the DMA session is closed");
  return w;
}
QueueWrap *unwrap_queue(const Napi::CallbackInfo &info) {
  if (info.Length() < 1 || !info[0].IsExternal()) throw Napi::TypeError::New(info.Env(), "expected a DMA queue handle");
  auto *w = info[0].As<Napi::External<QueueWrap>>().Data();
  if (!w->q) throw_errno(info.Env(), -ESHUTDOWN, "the DMA queue is closed");
  return w;
}
exa_dma_buf *buf_arg(const Napi::CallbackInfo &info, DmaWrap *w, size_t i) {
  std::string name = str_arg(info, i, "buffer name");
  auto it = w->bufs.find(name);
  if (it == w->bufs.end()) throw_errno(info.Env(), -ENOENT, "no local DMA buffer \"" + name + "\" in this session");
  return it->second;
}

void close_session(Napi::Env env, DmaWrap *w) {
  if (!w->d) return;
  for (auto *q : w->queues)
    if (q->waits) throw_errno(env, -EBUSY, "a DMA queue of this session has a wait in progress");
  exa_dma_close(w->d); /* joins the callback threads: no completion is delivered after this */
  w->d = nullptr;
  for (auto *q : w->queues) q->invalidate();
  w->queues.clear();
  for (auto &kv : w->abs)
    if (!kv.second.IsEmpty()) kv.second.Value().Detach();
  w->abs.clear();
  w->bufs.clear();
  w->workload_ref.Reset();
}

/* dmaOpen(workload, socketPath | null) */
Napi::Value DmaOpen(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  exa_ctx *ctx = info.Length() > 0 ? exa_addon_workload_ctx(info[0]) : nullptr;
  if (!ctx) throw_errno(env, -ESHUTDOWN, "dmaOpen: expected an attached workload handle");
  std::string sock = info.Length() > 1 && info[1].IsString() ? info[1].As<Napi::String>().Utf8Value() : "";
  exa_dma *d = nullptr;
  int r = exa_dma_open(ctx, sock.empty() ? nullptr : sock.c_str(), &d);
  if (r < 0) throw_errno(env, r, exa_last_error());
  auto *w = new DmaWrap();
  w->d = d;
  w->workload_ref = Napi::Persistent(info[0]);
  return Napi::External<DmaWrap>::New(env, w, [](Napi::Env env, DmaWrap *w) {
    try {
      close_session(env, w);
    } catch (...) {
      /* a wait still in flight at GC time cannot happen: the worker holds a reference */
    }
    delete w;
  });
}

Napi::Value DmaClose(const Napi::CallbackInfo &info) {
  if (info.Length() < 1 || !info[0].IsExternal()) throw Napi::TypeError::New(info.Env(), "expected a DMA session handle");
  close_session(info.Env(), info[0].As<Napi::External<DmaWrap>>().Data());
  return info.Env().Undefined();
}

Napi::Value DmaAlloc(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  auto *w = unwrap_dma(info);
  std::string name = str_arg(info, 1, "name");
  uint64_t size = u64_arg(info, 2, "size");
  exa_dma_buf *b = nullptr;
  int r = exa_dma_alloc(w->d, name.c_str(), (size_t)size, &b);
  if (r < 0) throw_errno(env, r, exa_last_error());
  w->bufs[name] = b;
  // the mapping belongs to libexa: the ArrayBuffer is detached when the buffer is freed
  Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(env, exa_dma_buf_addr(b), exa_dma_buf_size(b), [](Napi::Env, void *) {});
  w->abs[name] = Napi::Persistent(ab);
  return ab;
}

Napi::Value DmaFree(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  auto *w = unwrap_dma(info);
  std::string name = str_arg(info, 1, "name");
  exa_dma_buf *b = buf_arg(info, w, 1);
  int r = exa_dma_free(w->d, b);
  if (r < 0) throw_errno(env, r, exa_last_error());
  w->bufs.erase(name);
  auto it = w->abs.find(name);
  if (it != w->abs.end()) {
    if (!it->second.IsEmpty()) it->second.Value().Detach();
    w->abs.erase(it);
  }
  return env.Undefined();
}

/* dmaGrant(d, name, peerJob, perms) */
Napi::Value DmaGrant(const Napi::CallbackInfo &info) {
  auto *w = unwrap_dma(info);
  exa_dma_buf *b = buf_arg(info, w, 1);
  std::string peer = str_arg(info, 2, "peer job");
  int r = exa_dma_grant(w->d, b, peer.c_str(), (unsigned)u64_arg(info, 3, "perms"));
  if (r < 0) throw_errno(info.Env(), r, exa_last_error());
  return info.Env().Undefined();
}

/* dmaLookup(d, peerJob, name) -> { handle, size, perms } */
Napi::Value DmaLookup(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  auto *w = unwrap_dma(info);
  std::string peer = str_arg(info, 1, "peer job");
  std::string name = str_arg(info, 2, "name");
  exa_dma_remote h = 0;
  size_t size = 0;
  unsigned perms = 0;
  int r = exa_dma_lookup(w->d, peer.c_str(), name.c_str(), &h, &size, &perms);
  if (r < 0) throw_errno(env, r, exa_last_error());
  Napi::Object o = Napi::Object::New(env);
  o.Set("handle", (double)h);
  o.Set("size", (double)size);
  o.Set("perms", (double)perms);
  return o;
}

/* dmaQueueCreate(d, onCompletion | null): a function selects callback mode, null polling mode */
Napi::Value QueueCreate(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  auto *w = unwrap_dma(info);
  bool cbmode = info.Length() > 1 && info[1].IsFunction();
  auto *qw = new QueueWrap();
  qw->dw = w;
  if (cbmode) {
    qw->tsfn = Napi::ThreadSafeFunction::New(env, info[1].As<Napi::Function>(), "exa-dma-completions", 0, 1);
    qw->callback = true;
  }
  auto deliver = [](const exa_dma_completion *c, void *user) {
    auto *qw = (QueueWrap *)user;
    auto *copy = new exa_dma_completion(*c);
    /* Blocking: completions are never dropped; the queue thread waits for the JS queue instead. */
    napi_status st = qw->tsfn.BlockingCall(copy, [](Napi::Env env, Napi::Function cb, exa_dma_completion *c) {
      Napi::Object o = completion_obj(env, *c);
      delete c;
      cb.Call({o});
    });
    if (st != napi_ok) delete copy;
  };
  int r = exa_dma_queue_create(w->d, cbmode ? EXA_DMA_CALLBACK : EXA_DMA_POLL, cbmode ? (exa_dma_callback)deliver : nullptr,
                               qw, &qw->q);
  if (r < 0) {
    if (cbmode) qw->tsfn.Release();
    delete qw;
    throw_errno(env, r, exa_last_error());
  }
  w->queues.insert(qw);
  return Napi::External<QueueWrap>::New(env, qw, [](Napi::Env, QueueWrap *qw) {
    /* never collected while its session is open: the session handle is collected first or the
     * user destroyed the queue; either way q is null here */
    if (qw->q && qw->dw && qw->dw->d) {
      exa_dma_queue_destroy(qw->q);
      qw->dw->queues.erase(qw);
      qw->invalidate();
    }
    delete qw;
  });
}

Napi::Value QueueDestroy(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsExternal()) throw Napi::TypeError::New(env, "expected a DMA queue handle");
  auto *qw = info[0].As<Napi::External<QueueWrap>>().Data();
  if (!qw->q) return env.Undefined();
  if (qw->waits) throw_errno(env, -EBUSY, "the DMA queue has a wait in progress");
  int r = exa_dma_queue_destroy(qw->q); /* joins the callback thread */
  qw->dw->queues.erase(qw);
  qw->invalidate();
  if (r < 0) throw_errno(env, r, exa_last_error());
  return env.Undefined();
}

/* dmaPost(q, op, localName, localOff, remoteHandle, remoteOff, len, tag) */
Napi::Value QueuePost(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  auto *qw = unwrap_queue(info);
  std::string op = str_arg(info, 1, "op");
  exa_dma_buf *b = buf_arg(info, qw->dw, 2);
  uint64_t loff = u64_arg(info, 3, "localOffset"), rh = u64_arg(info, 4, "remote"), roff = u64_arg(info, 5, "remoteOffset"),
           len = u64_arg(info, 6, "length"), tag = u64_arg(info, 7, "tag");
  int r;
  if (op == "write") r = exa_dma_write(qw->q, b, loff, (exa_dma_remote)rh, roff, len, tag);
  else if (op == "read") r = exa_dma_read(qw->q, b, loff, (exa_dma_remote)rh, roff, len, tag);
  else throw_errno(env, -EINVAL, "op must be \"write\" or \"read\"");
  if (r < 0) throw_errno(env, r, exa_last_error());
  return env.Undefined();
}

Napi::Value QueuePoll(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  auto *qw = unwrap_queue(info);
  int max = (int)std::min<uint64_t>(u64_arg(info, 1, "max"), 1024);
  if (max < 1) max = 1;
  std::unique_ptr<exa_dma_completion[]> c(new exa_dma_completion[max]);
  int n = exa_dma_poll(qw->q, c.get(), max);
  if (n < 0) throw_errno(env, n, exa_last_error());
  Napi::Array a = Napi::Array::New(env, n);
  for (int i = 0; i < n; i++) a.Set((uint32_t)i, completion_obj(env, c[i]));
  return a;
}

class WaitWorker : public Napi::AsyncWorker {
 public:
  WaitWorker(Napi::Env env, Napi::Value qh, QueueWrap *qw, int max, int timeout)
      : Napi::AsyncWorker(env), qw_(qw), max_(max), timeout_(timeout), c_(new exa_dma_completion[max]),
        d_(Napi::Promise::Deferred::New(env)) {
    ref_ = Napi::Persistent(qh);
    qw_->waits++;
  }
  void Execute() override {
    n_ = exa_dma_wait(qw_->q, c_.get(), max_, timeout_);
    if (n_ < 0) msg_ = exa_last_error();
  }
  void OnOK() override {
    qw_->waits--;
    if (n_ < 0) {
      d_.Reject(make_error(Env(), n_, msg_).Value());
      return;
    }
    Napi::Array a = Napi::Array::New(Env(), n_);
    for (int i = 0; i < n_; i++) a.Set((uint32_t)i, completion_obj(Env(), c_[i]));
    d_.Resolve(a);
  }
  Napi::Promise Promise() { return d_.Promise(); }

 private:
  QueueWrap *qw_;
  int max_, timeout_, n_ = 0;
  std::unique_ptr<exa_dma_completion[]> c_;
  Napi::Promise::Deferred d_;
  Napi::Reference<Napi::Value> ref_;
  std::string msg_;
};

/* dmaWait(q, max, timeoutMs) -> Promise<Completion[]> (empty on timeout) */
Napi::Value QueueWait(const Napi::CallbackInfo &info) {
  auto *qw = unwrap_queue(info);
  int max = (int)std::min<uint64_t>(u64_arg(info, 1, "max"), 1024);
  if (max < 1) max = 1;
  int timeout = info.Length() > 2 && info[2].IsNumber() ? info[2].As<Napi::Number>().Int32Value() : -1;
  auto *wk = new WaitWorker(info.Env(), info[0], qw, max, timeout);
  auto p = wk->Promise();
  wk->Queue();
  return p;
}

/* dmaSync(d, op, localName, localOff, remoteHandle, remoteOff, len): blocks the calling (JS) thread */
Napi::Value DmaSync(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  auto *w = unwrap_dma(info);
  std::string op = str_arg(info, 1, "op");
  exa_dma_buf *b = buf_arg(info, w, 2);
  uint64_t loff = u64_arg(info, 3, "localOffset"), rh = u64_arg(info, 4, "remote"), roff = u64_arg(info, 5, "remoteOffset"),
           len = u64_arg(info, 6, "length");
  int r;
  if (op == "write") r = exa_dma_write_sync(w->d, b, loff, (exa_dma_remote)rh, roff, len);
  else if (op == "read") r = exa_dma_read_sync(w->d, b, loff, (exa_dma_remote)rh, roff, len);
  else throw_errno(env, -EINVAL, "op must be \"write\" or \"read\"");
  if (r < 0) throw_errno(env, r, exa_last_error());
  return env.Undefined();
}

/* dmaTestPostRaw(q, Uint8Array(64), advance): test hook, a raw request ring entry */
Napi::Value TestPostRaw(const Napi::CallbackInfo &info) {
  auto *qw = unwrap_queue(info);
  if (info.Length() < 2 || !info[1].IsTypedArray() || info[1].As<Napi::Uint8Array>().ByteLength() != 64)
    throw Napi::TypeError::New(info.Env(), "dmaTestPostRaw(q, Uint8Array(64), advance)");
  auto u8 = info[1].As<Napi::Uint8Array>();
  int r = exa__dma_test_post_raw(qw->q, u8.Data(), u64_arg(info, 2, "advance"));
  if (r < 0) throw_errno(info.Env(), r, exa_last_error());
  return info.Env().Undefined();
}

}  // namespace

void exa_addon_register_dma(Napi::Env env, Napi::Object exports) {
  exports.Set("dmaBackendOpen", Napi::Function::New(env, BackendOpen));
  exports.Set("dmaBackendClose", Napi::Function::New(env, BackendClose));
  exports.Set("dmaBackendStats", Napi::Function::New(env, BackendStats));
  exports.Set("dmaEngineDirect", Napi::Function::New(env, EngineDirect));
  exports.Set("dmaBackendAddress", Napi::Function::New(env, BackendAddress));
  exports.Set("dmaSetRoute", Napi::Function::New(env, SetRoute));
  exports.Set("dmaFence", Napi::Function::New(env, Fence));
  exports.Set("dmaUnfence", Napi::Function::New(env, Unfence));
  exports.Set("dmaBuffers", Napi::Function::New(env, Buffers));
  exports.Set("dmaMoved", Napi::Function::New(env, Moved));
  exports.Set("dmaExpect", Napi::Function::New(env, Expect));
  exports.Set("dmaTcpBaseline", Napi::Function::New(env, TcpBaseline));
  exports.Set("dmaOpen", Napi::Function::New(env, DmaOpen));
  exports.Set("dmaClose", Napi::Function::New(env, DmaClose));
  exports.Set("dmaAlloc", Napi::Function::New(env, DmaAlloc));
  exports.Set("dmaFree", Napi::Function::New(env, DmaFree));
  exports.Set("dmaGrant", Napi::Function::New(env, DmaGrant));
  exports.Set("dmaLookup", Napi::Function::New(env, DmaLookup));
  exports.Set("dmaQueueCreate", Napi::Function::New(env, QueueCreate));
  exports.Set("dmaQueueDestroy", Napi::Function::New(env, QueueDestroy));
  exports.Set("dmaPost", Napi::Function::New(env, QueuePost));
  exports.Set("dmaPoll", Napi::Function::New(env, QueuePoll));
  exports.Set("dmaWait", Napi::Function::New(env, QueueWait));
  exports.Set("dmaSync", Napi::Function::New(env, DmaSync));
  exports.Set("dmaTestPostRaw", Napi::Function::New(env, TestPostRaw));
}
