// node-addon-api binding over the native parts of exackpt: the agent-side
// checkpointer (native/ckpt) and the workload library (native/libexa).
//
// Threading contract: JavaScript is only ever touched on the main thread.
// Agent threads (IO, saver, fault handler) reach JS through thread-safe
// functions; the main-thread callback ("pump") then resolves whatever promises
// can be resolved from the native state. Errors thrown to JS are Error objects
// with `code` = errno name (e.g. 'ENOENT') and `errno`; src/native.ts maps them
// onto ExaError codes.
#include <errno.h>
#include <napi.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "../ckpt/ckpt.h"
#include "errors.h"
#include "exa.h"

void exa_addon_register_dma(Napi::Env env, Napi::Object exports); /* native/addon/dma.cc */
void exa_addon_register_hash(Napi::Env env, Napi::Object exports); /* native/addon/hash.cc */
void exa_addon_register_packio(Napi::Env env, Napi::Object exports); /* native/addon/packio.cc */
void exa_addon_register_pageindex(Napi::Env env, Napi::Object exports); /* native/addon/pageindex.cc */

namespace exa_addon {

const char *errno_name(int e) {
  switch (e < 0 ? -e : e) {
    case ENOENT: return "ENOENT";
    case EEXIST: return "EEXIST";
    case EINVAL: return "EINVAL";
    case EACCES: return "EACCES";
    case EPERM: return "EPERM";
    case ENOMEM: return "ENOMEM";
    case EBUSY: return "EBUSY";
    case ECONNREFUSED: return "ECONNREFUSED";
    case ECONNRESET: return "ECONNRESET";
    case EPROTO: return "EPROTO";
    case ENOTSUP: return "ENOTSUP";
    case ESRCH: return "ESRCH";
    case ETIMEDOUT: return "ETIMEDOUT";
    case EADDRINUSE: return "EADDRINUSE";
    case ENAMETOOLONG: return "ENAMETOOLONG";
    case ESHUTDOWN: return "ESHUTDOWN";
    case ECANCELED: return "ECANCELED";
    case EPIPE: return "EPIPE";
    case EAGAIN: return "EAGAIN";
    case EBADF: return "EBADF";
    default: return "EIO";
  }
}

Napi::Error make_error(Napi::Env env, int err, const std::string &msg) {
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("code", Napi::String::New(env, errno_name(err)));
  e.Set("errno", Napi::Number::New(env, err < 0 ? -err : err));
  return e;
}

[[noreturn]] void throw_errno(Napi::Env env, int err, const std::string &msg) { throw make_error(env, err, msg); }

}  // namespace exa_addon

namespace {

using exa_addon::errno_name;
using exa_addon::make_error;
using exa_addon::throw_errno;

std::string arg_string(const Napi::CallbackInfo &info, size_t i, const char *what) {
  if (info.Length() <= i || !info[i].IsString()) throw Napi::TypeError::New(info.Env(), std::string(what) + " must be a string");
  return info[i].As<Napi::String>().Utf8Value();
}

/* ------------------------------------------------------------ agent side */

struct AgentWrap {
  std::unique_ptr<exa::Agent> agent;
  Napi::ThreadSafeFunction events;
  bool closed = false;
  void close() {
    if (closed) return;
    closed = true;
    agent->close(); /* joins the IO thread: no more events after this */
    events.Release();
  }
};

AgentWrap *unwrap_agent(const Napi::CallbackInfo &info) {
  if (info.Length() < 1 || !info[0].IsExternal()) throw Napi::TypeError::New(info.Env(), "expected an agent handle");
  auto *w = info[0].As<Napi::External<AgentWrap>>().Data();
  if (w->closed) throw_errno(info.Env(), -ESHUTDOWN, "the agent is closed");
  return w;
}

Napi::Value AgentOpen(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsObject() || !info[1].IsFunction())
    throw Napi::TypeError::New(env, "agentOpen(options, onEvent)");
  Napi::Object o = info[0].As<Napi::Object>();
  exa::AgentOptions opts;
  if (!o.Get("socketPath").IsString()) throw Napi::TypeError::New(env, "options.socketPath must be a string");
  opts.socket_path = o.Get("socketPath").As<Napi::String>().Utf8Value();
  if (o.Get("shadowBudgetBytes").IsNumber()) opts.shadow_budget = (size_t)o.Get("shadowBudgetBytes").As<Napi::Number>().DoubleValue();
  if (o.Get("socketMode").IsNumber()) opts.socket_mode = o.Get("socketMode").As<Napi::Number>().Uint32Value();
  if (o.Get("allowUids").IsArray()) {
    Napi::Array a = o.Get("allowUids").As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); i++) opts.allow_uids.push_back(a.Get(i).As<Napi::Number>().Uint32Value());
  }
  /* tenants: [{ tenant, uids: number[], jobs: string[], prefixes: string[] }] (src/tenants.ts, checked there) */
  if (o.Get("tenants").IsArray()) {
    Napi::Array a = o.Get("tenants").As<Napi::Array>();
    auto strings = [&](Napi::Object t, const char *key) {
      std::vector<std::string> v;
      if (!t.Get(key).IsArray()) throw Napi::TypeError::New(env, std::string("options.tenants[].") + key + " must be an array");
      Napi::Array x = t.Get(key).As<Napi::Array>();
      for (uint32_t k = 0; k < x.Length(); k++) {
        if (!x.Get(k).IsString()) throw Napi::TypeError::New(env, std::string("options.tenants[].") + key + " must hold strings");
        v.push_back(x.Get(k).As<Napi::String>().Utf8Value());
      }
      return v;
    };
    for (uint32_t i = 0; i < a.Length(); i++) {
      if (!a.Get(i).IsObject() || !a.Get(i).As<Napi::Object>().Get("tenant").IsString() || !a.Get(i).As<Napi::Object>().Get("uids").IsArray())
        throw Napi::TypeError::New(env, "options.tenants[] must be { tenant, uids, jobs, prefixes }");
      Napi::Object t = a.Get(i).As<Napi::Object>();
      exa::TenantUids tu;
      tu.tenant = t.Get("tenant").As<Napi::String>().Utf8Value();
      Napi::Array u = t.Get("uids").As<Napi::Array>();
      for (uint32_t k = 0; k < u.Length(); k++) {
        if (!u.Get(k).IsNumber()) throw Napi::TypeError::New(env, "options.tenants[].uids must hold numbers");
        tu.uids.push_back(u.Get(k).As<Napi::Number>().Uint32Value());
      }
      tu.jobs = strings(t, "jobs");
      tu.prefixes = strings(t, "prefixes");
      opts.tenants.push_back(std::move(tu));
    }
  }
  auto *w = new AgentWrap();
  w->events = Napi::ThreadSafeFunction::New(
      env, info[1].As<Napi::Function>(), "exa-agent-events", 0, 1);
  Napi::ThreadSafeFunction tsfn = w->events;
  try {
    w->agent = std::make_unique<exa::Agent>(opts, [tsfn](const exa::AgentEvent &ev) mutable {
      auto *copy = new exa::AgentEvent(ev);
      napi_status st = tsfn.NonBlockingCall(copy, [](Napi::Env env, Napi::Function cb, exa::AgentEvent *e) {
        static const char *kinds[] = {"attached", "detached", "checkpoint-request", "log"};
        Napi::Object o = Napi::Object::New(env);
        o.Set("kind", kinds[e->kind]);
        o.Set("job", e->job);
        o.Set("pid", e->pid);
        o.Set("uid", e->uid);
        o.Set("text", e->text);
        delete e;
        cb.Call({o});
      });
      if (st != napi_ok) delete copy;
    });
  } catch (const exa::Error &e) {
    w->events.Release();
    delete w;
    throw_errno(env, e.err, e.what());
  }
  return Napi::External<AgentWrap>::New(env, w, [](Napi::Env, AgentWrap *w) {
    w->close();
    delete w;
  });
}

Napi::Value AgentClose(const Napi::CallbackInfo &info) {
  if (info.Length() < 1 || !info[0].IsExternal()) throw Napi::TypeError::New(info.Env(), "expected an agent handle");
  info[0].As<Napi::External<AgentWrap>>().Data()->close();
  return info.Env().Undefined();
}

Napi::Value AgentJobs(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  auto *w = unwrap_agent(info);
  auto jobs = w->agent->jobs();
  Napi::Array out = Napi::Array::New(env, jobs.size());
  for (size_t i = 0; i < jobs.size(); i++) {
    auto &j = jobs[i];
    Napi::Object o = Napi::Object::New(env);
    o.Set("id", j.id);
    o.Set("pid", j.pid);
    o.Set("uid", j.uid);
    o.Set("asyncTracking", j.async_tracking);
    o.Set("userModeOnly", j.user_mode_only);
    o.Set("busy", j.busy);
    o.Set("checkpoints", (double)j.checkpoints);
    Napi::Array rs = Napi::Array::New(env, j.regions.size());
    for (size_t k = 0; k < j.regions.size(); k++) {
      Napi::Object r = Napi::Object::New(env);
      r.Set("name", j.regions[k].name);
      r.Set("size", (double)j.regions[k].size);
      r.Set("address", std::to_string(j.regions[k].addr));
      rs.Set((uint32_t)k, r);
    }
    o.Set("regions", rs);
    out.Set((uint32_t)i, o);
  }
  return out;
}

Napi::Object stats_to_js(Napi::Env env, const exa::CkptStats &s) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("pauseUs", (double)s.pause_us);
  o.Set("resyncPauseUs", (double)s.resync_pause_us);
  o.Set("resyncTotalUs", (double)s.resync_total_us);
  o.Set("resyncStops", (double)s.resync_stops);
  o.Set("saveUs", (double)s.save_us);
  o.Set("pauseStopUs", (double)s.pause_stop_us);
  o.Set("pauseScanUs", (double)s.pause_scan_us);
  o.Set("pauseProtectUs", (double)s.pause_protect_us);
  o.Set("pauseCopyUs", (double)s.pause_copy_us);
  o.Set("preprotectUs", (double)s.preprotect_us);
  o.Set("dirtyPages", (double)s.dirty_pages);
  o.Set("pagesSaved", (double)s.pages_saved);
  o.Set("zeroPages", (double)s.zero_pages);
  o.Set("bytesSaved", (double)s.bytes_saved);
  o.Set("shadowCopies", (double)s.shadow_copies);
  o.Set("shadowPeakBytes", (double)s.shadow_peak_bytes);
  Napi::Array f = Napi::Array::New(env, 4);
  for (uint32_t i = 0; i < 4; i++) f.Set(i, (double)s.faults[i]);
  o.Set("faults", f);
  o.Set("shadowWaits", (double)s.shadow_waits);
  o.Set("batches", (double)s.batches);
  o.Set("syncRegions", s.sync_regions);
  o.Set("copyRegions", s.copy_regions);
  return o;
}

struct SessionWrap;
using SessionRef = std::shared_ptr<SessionWrap>;
void pump(Napi::Env env, const SessionRef &sw);
inline void pump_cb(Napi::Env env, Napi::Function, SessionRef *ctx, void *) {
  if (env) pump(env, *ctx);
}
using SessionTsfn = Napi::TypedThreadSafeFunction<SessionRef, void, pump_cb>;

struct SessionWrap {
  std::shared_ptr<exa::Session> s;
  SessionTsfn tsfn;
  bool tsfn_alive = true;
  bool begun = false;
  std::vector<Napi::Promise::Deferred> begin, next, result;
};

Napi::Object batch_to_js(Napi::Env env, std::unique_ptr<exa::Batch> b) {
  Napi::Object o = Napi::Object::New(env);
  size_t n = b->count();
  auto u32 = [&](const std::vector<uint32_t> &v) {
    Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(env, v.size() * 4);
    if (!v.empty()) memcpy(ab.Data(), v.data(), v.size() * 4);
    return Napi::Uint32Array::New(env, v.size(), ab, 0);
  };
  auto u8 = [&](const std::vector<uint8_t> &v) {
    Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(env, v.size());
    if (!v.empty()) memcpy(ab.Data(), v.data(), v.size());
    return Napi::Uint8Array::New(env, v.size(), ab, 0);
  };
  o.Set("count", (double)n);
  o.Set("regions", u32(b->region));
  o.Set("pages", u32(b->page));
  o.Set("zero", u8(b->zero));
  o.Set("hashes", u8(b->hash));
  // page bytes: hand the native buffer over without copying; freed when JS collects it
  auto *data = new std::vector<uint8_t>(std::move(b->data));
  size_t len = data->size();
  Napi::ArrayBuffer ab = len ? Napi::ArrayBuffer::New(env, data->data(), len,
                                                      [](Napi::Env, void *, std::vector<uint8_t> *d) { delete d; }, data)
                             : Napi::ArrayBuffer::New(env, 0);
  if (!len) delete data;
  o.Set("data", Napi::Uint8Array::New(env, len, ab, 0));
  return o;
}

/* Main thread: settle whatever can be settled. */
void pump(Napi::Env env, const SessionRef &sw) {
  auto st = sw->s->state();
  Napi::Value handle_for_begin;
  if (st != exa::Session::PAUSING && !sw->begun) {
    sw->begun = true;
    auto pend = std::move(sw->begin);
    sw->begin.clear();
    for (auto &d : pend) {
      if (st == exa::Session::FAILED) d.Reject(make_error(env, -EIO, sw->s->error()).Value());
      else d.Resolve(env.Undefined());
    }
  }
  while (!sw->next.empty()) {
    auto b = sw->s->pop();
    if (b) {
      auto d = sw->next.front();
      sw->next.erase(sw->next.begin());
      d.Resolve(batch_to_js(env, std::move(b)));
      continue;
    }
    st = sw->s->state();
    if (st == exa::Session::DONE || st == exa::Session::FAILED || st == exa::Session::CANCELLED) {
      auto pend = std::move(sw->next);
      sw->next.clear();
      for (auto &d : pend) {
        if (st == exa::Session::DONE) d.Resolve(env.Null());
        else d.Reject(make_error(env, st == exa::Session::CANCELLED ? -ECANCELED : -EIO, sw->s->error()).Value());
      }
    }
    break;
  }
  st = sw->s->state();
  if (!sw->result.empty() && (st == exa::Session::DONE || st == exa::Session::FAILED || st == exa::Session::CANCELLED)) {
    auto pend = std::move(sw->result);
    sw->result.clear();
    for (auto &d : pend) {
      if (st == exa::Session::DONE) d.Resolve(stats_to_js(env, sw->s->stats()));
      else d.Reject(make_error(env, st == exa::Session::CANCELLED ? -ECANCELED : -EIO, sw->s->error()).Value());
    }
  }
  if (sw->tsfn_alive) {
    // keep the process alive only while someone awaits this checkpoint
    if (sw->begin.empty() && sw->next.empty() && sw->result.empty()) sw->tsfn.Unref(env);
    else sw->tsfn.Ref(env);
  }
}

SessionRef &unwrap_session(const Napi::CallbackInfo &info) {
  if (info.Length() < 1 || !info[0].IsExternal()) throw Napi::TypeError::New(info.Env(), "expected a checkpoint session handle");
  return *info[0].As<Napi::External<SessionRef>>().Data();
}

exa::CkptOptions parse_ckpt_options(Napi::Env env, Napi::Value v) {
  exa::CkptOptions o;
  if (!v.IsObject()) return o;
  Napi::Object x = v.As<Napi::Object>();
  if (x.Get("mode").IsString()) {
    std::string m = x.Get("mode").As<Napi::String>().Utf8Value();
    if (m == "auto") o.mode = exa::CkptMode::AUTO;
    else if (m == "sync") o.mode = exa::CkptMode::SYNC;
    else if (m == "copy") o.mode = exa::CkptMode::COPY;
    else throw_errno(env, -EINVAL, "checkpoint mode must be auto, sync or copy, not \"" + m + "\"");
  }
  if (x.Get("full").IsBoolean()) o.full = x.Get("full").As<Napi::Boolean>().Value();
  if (x.Get("leaveStopped").IsBoolean()) o.leave_stopped = x.Get("leaveStopped").As<Napi::Boolean>().Value();
  if (x.Get("preprotect").IsBoolean()) o.preprotect = x.Get("preprotect").As<Napi::Boolean>().Value();
  if (x.Get("batchBytes").IsNumber()) o.batch_bytes = (size_t)x.Get("batchBytes").As<Napi::Number>().DoubleValue();
  if (x.Get("queueDepth").IsNumber()) o.queue_depth = x.Get("queueDepth").As<Napi::Number>().Uint32Value();
  if (x.Get("testReference").IsBoolean()) o.test_reference = x.Get("testReference").As<Napi::Boolean>().Value();
  if (x.Get("testHold").IsObject()) {
    Napi::Object h = x.Get("testHold").As<Napi::Object>();
    std::string when = h.Get("when").IsString() ? h.Get("when").As<Napi::String>().Utf8Value() : "before";
    o.hold_when = when == "during" ? exa::HoldWhen::DURING : exa::HoldWhen::BEFORE;
    if (!h.Get("region").IsString() || !h.Get("page").IsNumber()) throw_errno(env, -EINVAL, "testHold needs region and page");
    o.hold_region = h.Get("region").As<Napi::String>().Utf8Value();
    o.hold_page = (uint64_t)h.Get("page").As<Napi::Number>().DoubleValue();
  }
  return o;
}

/* checkpointBegin(agent, job, options) -> { session, paused: Promise<void> } */
Napi::Value CheckpointBegin(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  auto *w = unwrap_agent(info);
  std::string job = arg_string(info, 1, "job");
  exa::CkptOptions opts = parse_ckpt_options(env, info.Length() > 2 ? info[2] : env.Undefined());
  auto sw = std::make_shared<SessionWrap>();
  auto *ctx = new SessionRef(sw); /* the thread-safe function's reference, dropped in its finalizer */
  sw->tsfn = SessionTsfn::New(env, "exa-checkpoint", 0, 1, ctx, [](Napi::Env, void *, SessionRef *c) {
    (*c)->tsfn_alive = false;
    delete c;
  });
  SessionTsfn tsfn = sw->tsfn;
  try {
    sw->s = w->agent->checkpoint(
        job, opts, [tsfn]() mutable { tsfn.NonBlockingCall(); }, [tsfn]() mutable { tsfn.Release(); });
  } catch (const exa::Error &e) {
    sw->tsfn.Release();
    throw_errno(env, e.err, e.what());
  }
  auto d = Napi::Promise::Deferred::New(env);
  sw->begin.push_back(d);
  sw->tsfn.Ref(env);
  Napi::Object out = Napi::Object::New(env);
  out.Set("session", Napi::External<SessionRef>::New(env, new SessionRef(sw), [](Napi::Env, SessionRef *r) {
            // dropped by JS: stop the saver rather than leave it blocked on a full queue
            if ((*r)->s) (*r)->s->cancel();
            delete r;
          }));
  out.Set("paused", d.Promise());
  return out;
}

Napi::Value CheckpointNext(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  SessionRef &sw = unwrap_session(info);
  auto d = Napi::Promise::Deferred::New(env);
  sw->next.push_back(d);
  pump(env, sw);
  return d.Promise();
}

Napi::Value CheckpointResult(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  SessionRef &sw = unwrap_session(info);
  auto d = Napi::Promise::Deferred::New(env);
  sw->result.push_back(d);
  pump(env, sw);
  return d.Promise();
}

Napi::Value CheckpointStats(const Napi::CallbackInfo &info) {
  return stats_to_js(info.Env(), unwrap_session(info)->s->stats());
}

Napi::Value CheckpointRegions(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  auto t = unwrap_session(info)->s->regions();
  Napi::Array a = Napi::Array::New(env, t.size());
  for (size_t i = 0; i < t.size(); i++) {
    Napi::Object r = Napi::Object::New(env);
    r.Set("name", t[i].name);
    r.Set("size", (double)t[i].size);
    a.Set((uint32_t)i, r);
  }
  return a;
}

Napi::Value CheckpointCancel(const Napi::CallbackInfo &info) {
  unwrap_session(info)->s->cancel();
  return info.Env().Undefined();
}

Napi::Value CheckpointHeld(const Napi::CallbackInfo &info) {
  return Napi::Boolean::New(info.Env(), unwrap_session(info)->s->held());
}

Napi::Value CheckpointTestReference(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  auto ref = unwrap_session(info)->s->take_reference();
  Napi::Array a = Napi::Array::New(env, ref.size());
  for (size_t i = 0; i < ref.size(); i++) a.Set((uint32_t)i, Napi::Buffer<uint8_t>::Copy(env, ref[i].data(), ref[i].size()));
  return a;
}

Napi::Value CheckpointReleaseHold(const Napi::CallbackInfo &info) {
  unwrap_session(info)->s->release_hold();
  return info.Env().Undefined();
}

Napi::Value DeclineRequests(const Napi::CallbackInfo &info) {
  auto *w = unwrap_agent(info);
  std::string job = arg_string(info, 1, "job");
  std::string text = arg_string(info, 2, "text");
  w->agent->decline_requests(job, -ECANCELED, text);
  return info.Env().Undefined();
}

Napi::Value StopAndCopy(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  auto *w = unwrap_agent(info);
  std::string job = arg_string(info, 1, "job");
  uint64_t bytes = 0, us = 0;
  try {
    us = w->agent->stop_and_copy(job, &bytes);
  } catch (const exa::Error &e) {
    throw_errno(env, e.err, e.what());
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("pauseUs", (double)us);
  o.Set("bytes", (double)bytes);
  return o;
}

class RemoteWriteWorker : public Napi::AsyncWorker {
 public:
  RemoteWriteWorker(Napi::Env env, Napi::External<AgentWrap> h, std::string job, std::string region, uint64_t off,
                    std::vector<uint8_t> data)
      : Napi::AsyncWorker(env), ref_(Napi::Persistent(h)), agent_(h.Data()), job_(std::move(job)), region_(std::move(region)),
        off_(off), data_(std::move(data)), d_(Napi::Promise::Deferred::New(env)) {}
  void Execute() override {
    try {
      agent_->agent->remote_write(job_, region_, off_, data_.data(), data_.size());
    } catch (const exa::Error &e) {
      err_ = e.err;
      msg_ = e.what();
    }
  }
  void OnOK() override {
    if (err_) d_.Reject(make_error(Env(), err_, msg_).Value());
    else d_.Resolve(Env().Undefined());
  }
  Napi::Promise Promise() { return d_.Promise(); }

 private:
  Napi::Reference<Napi::External<AgentWrap>> ref_; /* keeps the agent handle alive while we run */
  AgentWrap *agent_;
  std::string job_, region_;
  uint64_t off_;
  std::vector<uint8_t> data_;
  Napi::Promise::Deferred d_;
  int err_ = 0;
  std::string msg_;
};

/* remoteWrite(agent, job, region, offset, bytes) -> Promise<void> (runs on a worker thread: it may wait for the saver) */
/*
 * memfdCreate(name, bytes) -> fd: a memfd of `bytes` sealed against shrinking, owned by the caller
 * (close it with fs.closeSync). Restore staging (src/hostagent/staging.ts) puts checkpoint images
 * in these: the agent maps a job's regions, so it accepts only memfds that cannot shrink under it.
 */
Napi::Value MemfdCreate(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsString() || !info[1].IsNumber()) throw_errno(env, -EINVAL, "memfdCreate(name, bytes)");
  std::string name = info[0].As<Napi::String>().Utf8Value();
  double bytes = info[1].As<Napi::Number>().DoubleValue();
  if (name.empty() || name.size() > 63) throw_errno(env, -EINVAL, "memfdCreate: name must be 1..63 bytes");
  if (!(bytes >= 0) || bytes > 9007199254740991.0 || bytes != (double)(uint64_t)bytes) throw_errno(env, -EINVAL, "memfdCreate: bad size");
  int fd = memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) throw_errno(env, -errno, "memfd_create(" + name + "): " + strerror(errno));
  if (ftruncate(fd, (off_t)bytes) != 0 || fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK) != 0) {
    int e = errno;
    close(fd);
    throw_errno(env, -e, "memfd " + name + " of " + std::to_string((uint64_t)bytes) + " bytes: " + strerror(e));
  }
  return Napi::Number::New(env, fd);
}

Napi::Value RemoteWrite(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  unwrap_agent(info);
  std::string job = arg_string(info, 1, "job");
  std::string region = arg_string(info, 2, "region");
  if (info.Length() < 5 || !info[3].IsNumber() || !info[4].IsTypedArray())
    throw Napi::TypeError::New(env, "remoteWrite(agent, job, region, offset, Uint8Array)");
  double off = info[3].As<Napi::Number>().DoubleValue();
  if (!(off >= 0)) throw_errno(env, -EINVAL, "offset must be a non-negative integer");
  Napi::Uint8Array u8 = info[4].As<Napi::Uint8Array>();
  std::vector<uint8_t> data(u8.Data(), u8.Data() + u8.ByteLength());
  auto *wk = new RemoteWriteWorker(env, info[0].As<Napi::External<AgentWrap>>(), job, region, (uint64_t)off, std::move(data));
  auto p = wk->Promise();
  wk->Queue();
  return p;
}

/* ------------------------------------------------------------ workload side */

struct WorkloadWrap {
  exa_ctx *ctx = nullptr;
  std::map<std::string, Napi::Reference<Napi::ArrayBuffer>> buffers;
};

WorkloadWrap *unwrap_workload(const Napi::CallbackInfo &info) {
  if (info.Length() < 1 || !info[0].IsExternal()) throw Napi::TypeError::New(info.Env(), "expected a workload handle");
  auto *w = info[0].As<Napi::External<WorkloadWrap>>().Data();
  if (!w->ctx) throw_errno(info.Env(), -ESHUTDOWN, "the workload is detached");
  return w;
}

Napi::Value WorkloadAttach(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  std::string sock = info.Length() > 0 && info[0].IsString() ? info[0].As<Napi::String>().Utf8Value() : "";
  std::string job = info.Length() > 1 && info[1].IsString() ? info[1].As<Napi::String>().Utf8Value() : "";
  exa_ctx *ctx = nullptr;
  int r = exa_attach(sock.empty() ? nullptr : sock.c_str(), job.empty() ? nullptr : job.c_str(), &ctx);
  if (r < 0) throw_errno(env, r, exa_last_error());
  auto *w = new WorkloadWrap();
  w->ctx = ctx;
  return Napi::External<WorkloadWrap>::New(env, w, [](Napi::Env, WorkloadWrap *w) {
    if (w->ctx) exa_detach(w->ctx);
    delete w;
  });
}

Napi::Value WorkloadAlloc(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  auto *w = unwrap_workload(info);
  std::string name = arg_string(info, 1, "name");
  if (info.Length() < 3 || !info[2].IsNumber()) throw Napi::TypeError::New(env, "size must be a number");
  double sz = info[2].As<Napi::Number>().DoubleValue();
  if (!(sz >= 0) || sz > 9.0e15) throw_errno(env, -EINVAL, "region \"" + name + "\": size must be a non-negative integer");
  exa_region *g = nullptr;
  int r = exa_region_alloc(w->ctx, name.c_str(), (size_t)sz, 0, &g);
  if (r < 0) throw_errno(env, r, exa_last_error());
  // the mapping belongs to libexa: the ArrayBuffer is detached when the region is freed
  Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(env, exa_region_addr(g), exa_region_size(g), [](Napi::Env, void *) {});
  w->buffers[name] = Napi::Persistent(ab);
  return ab;
}

Napi::Value WorkloadFree(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  auto *w = unwrap_workload(info);
  std::string name = arg_string(info, 1, "name");
  exa_region *g = exa_region_find(w->ctx, name.c_str());
  if (!g) throw_errno(env, -ENOENT, "no region \"" + name + "\" in job " + exa_job_id(w->ctx));
  auto it = w->buffers.find(name);
  int r = exa_region_free(w->ctx, g);
  if (r < 0) throw_errno(env, r, exa_last_error());
  if (it != w->buffers.end()) {
    if (!it->second.IsEmpty()) it->second.Value().Detach();
    w->buffers.erase(it);
  }
  return env.Undefined();
}

Napi::Value WorkloadList(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  auto *w = unwrap_workload(info);
  int n = exa_region_list(w->ctx, nullptr, 0);
  std::vector<exa_region *> v((size_t)std::max(n, 0));
  n = exa_region_list(w->ctx, v.data(), v.size());
  Napi::Array a = Napi::Array::New(env);
  for (size_t i = 0; i < v.size() && (int)i < n; i++) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("name", exa_region_name(v[i]));
    o.Set("size", (double)exa_region_size(v[i]));
    a.Set((uint32_t)i, o);
  }
  return a;
}

class CheckpointWorker : public Napi::AsyncWorker {
 public:
  CheckpointWorker(Napi::Env env, exa_ctx *ctx) : Napi::AsyncWorker(env), ctx_(ctx), d_(Napi::Promise::Deferred::New(env)) {}
  void Execute() override {
    rc_ = exa_checkpoint(ctx_);
    if (rc_ < 0) msg_ = exa_last_error();
  }
  void OnOK() override {
    if (rc_ < 0) d_.Reject(make_error(Env(), rc_, msg_).Value());
    else d_.Resolve(Env().Undefined());
  }
  Napi::Promise Promise() { return d_.Promise(); }

 private:
  exa_ctx *ctx_;
  Napi::Promise::Deferred d_;
  int rc_ = 0;
  std::string msg_;
};

Napi::Value WorkloadCheckpoint(const Napi::CallbackInfo &info) {
  auto *w = unwrap_workload(info);
  auto *wk = new CheckpointWorker(info.Env(), w->ctx);
  auto p = wk->Promise();
  wk->Queue();
  return p;
}

Napi::Value WorkloadDetach(const Napi::CallbackInfo &info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsExternal()) throw Napi::TypeError::New(env, "expected a workload handle");
  auto *w = info[0].As<Napi::External<WorkloadWrap>>().Data();
  if (!w->ctx) return env.Undefined();
  int r = exa_detach(w->ctx);
  w->ctx = nullptr;
  w->buffers.clear();
  if (r < 0) throw_errno(env, r, exa_last_error());
  return env.Undefined();
}

Napi::Value Version(const Napi::CallbackInfo &info) { return Napi::Number::New(info.Env(), EXA_API_VERSION); }

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("version", Napi::Function::New(env, Version));
  exports.Set("agentOpen", Napi::Function::New(env, AgentOpen));
  exports.Set("agentClose", Napi::Function::New(env, AgentClose));
  exports.Set("agentJobs", Napi::Function::New(env, AgentJobs));
  exports.Set("checkpointBegin", Napi::Function::New(env, CheckpointBegin));
  exports.Set("checkpointNext", Napi::Function::New(env, CheckpointNext));
  exports.Set("checkpointResult", Napi::Function::New(env, CheckpointResult));
  exports.Set("checkpointStats", Napi::Function::New(env, CheckpointStats));
  exports.Set("checkpointRegions", Napi::Function::New(env, CheckpointRegions));
  exports.Set("checkpointCancel", Napi::Function::New(env, CheckpointCancel));
  exports.Set("checkpointHeld", Napi::Function::New(env, CheckpointHeld));
  exports.Set("checkpointReleaseHold", Napi::Function::New(env, CheckpointReleaseHold));
  exports.Set("checkpointTestReference", Napi::Function::New(env, CheckpointTestReference));
  exports.Set("declineCheckpointRequests", Napi::Function::New(env, DeclineRequests));
  exports.Set("stopAndCopy", Napi::Function::New(env, StopAndCopy));
  exports.Set("remoteWrite", Napi::Function::New(env, RemoteWrite));
  exports.Set("memfdCreate", Napi::Function::New(env, MemfdCreate));
  exports.Set("workloadAttach", Napi::Function::New(env, WorkloadAttach));
  exports.Set("workloadAlloc", Napi::Function::New(env, WorkloadAlloc));
  exports.Set("workloadFree", Napi::Function::New(env, WorkloadFree));
  exports.Set("workloadList", Napi::Function::New(env, WorkloadList));
  exports.Set("workloadCheckpoint", Napi::Function::New(env, WorkloadCheckpoint));
  exports.Set("workloadDetach", Napi::Function::New(env, WorkloadDetach));
  exa_addon_register_dma(env, exports); /* native/addon/dma.cc */
  exa_addon_register_hash(env, exports); /* native/addon/hash.cc */
  exa_addon_register_packio(env, exports); /* native/addon/packio.cc */
  exa_addon_register_pageindex(env, exports); /* native/addon/pageindex.cc */
  return exports;
}

}  // namespace

/* For native/addon/dma.cc (RDMA remoting): the objects behind the agent and workload handles. */
exa::Agent *exa_addon_agent(const Napi::Value &v) {
  if (!v.IsExternal()) return nullptr;
  auto *w = v.As<Napi::External<AgentWrap>>().Data();
  return w->closed ? nullptr : w->agent.get();
}
exa_ctx *exa_addon_workload_ctx(const Napi::Value &v) {
  if (!v.IsExternal()) return nullptr;
  return v.As<Napi::External<WorkloadWrap>>().Data()->ctx;
}

NODE_API_MODULE(exa_native, Init)
