// N-API addon over libsanlock (Debian sanlock 3.8.x).
//
// Low-level binding: the typed API lives in src/index.ts. Every call that
// talks to the sanlock daemon (and may block) runs in a Napi::AsyncWorker and
// returns a Promise. A failing call rejects with an Error whose `code` is the
// negative sanlock/errno return value and whose `op` names the call.
//
// Only sanlock_register() (connect + one send, no reply), fd handling and the
// hang-up watcher run synchronously on the JS thread.

#include <napi.h>
#include <uv.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include <linux/openat2.h>  // confined file access
#include <sys/syscall.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

extern "C" {
#include <sanlock.h>
#include <sanlock_admin.h>
#include <sanlock_resource.h>
#include <sanlock_rv.h>
}

namespace {

bool g_used = false;  // set once any call reached libsanlock (run dir is then fixed)

// ---------------------------------------------------------------- errors

std::string Describe(int rv) {
  if (rv <= -200) {
    const char* s = sanlock_strerror(rv);
    if (s != nullptr) return s;
    return "sanlock error";
  }
  return strerror(-rv);
}

Napi::Error MakeError(Napi::Env env, const std::string& op, int rv) {
  std::string msg = "sanlock " + op + " failed: " + Describe(rv) + " (" + std::to_string(rv) + ")";
  Napi::Error err = Napi::Error::New(env, msg);
  err.Set("code", Napi::Number::New(env, rv));
  err.Set("op", Napi::String::New(env, op));
  return err;
}

Napi::Value ThrowTypeError(Napi::Env env, const std::string& msg) {
  Napi::TypeError::New(env, msg).ThrowAsJavaScriptException();
  return env.Undefined();
}

// ---------------------------------------------------------------- generic promise worker

using ExecFn = std::function<int()>;
using ResultFn = std::function<Napi::Value(Napi::Env, int)>;

class PromiseWorker : public Napi::AsyncWorker {
 public:
  PromiseWorker(Napi::Env env, std::string op, ExecFn exec, ResultFn result, bool rejectNegative)
      : Napi::AsyncWorker(env, "sanlock"),
        deferred_(Napi::Promise::Deferred::New(env)),
        op_(std::move(op)),
        exec_(std::move(exec)),
        result_(std::move(result)),
        rejectNegative_(rejectNegative) {}

  Napi::Promise Promise() { return deferred_.Promise(); }

  void Execute() override { rv_ = exec_(); }

  void OnOK() override {
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    if (rejectNegative_ && rv_ < 0) {
      deferred_.Reject(MakeError(env, op_, rv_).Value());
      return;
    }
    if (result_) {
      deferred_.Resolve(result_(env, rv_));
    } else {
      deferred_.Resolve(env.Undefined());
    }
  }

  void OnError(const Napi::Error& e) override { deferred_.Reject(e.Value()); }

 private:
  Napi::Promise::Deferred deferred_;
  std::string op_;
  ExecFn exec_;
  ResultFn result_;
  bool rejectNegative_;
  int rv_ = 0;
};

Napi::Value Queue(Napi::Env env, const std::string& op, ExecFn exec, ResultFn result = nullptr,
                  bool rejectNegative = true) {
  g_used = true;
  auto* w = new PromiseWorker(env, op, std::move(exec), std::move(result), rejectNegative);
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

// ---------------------------------------------------------------- argument parsing

bool GetString(Napi::Env env, const Napi::Object& o, const char* key, size_t maxLen, bool required,
               std::string* out) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) {
    if (required) {
      ThrowTypeError(env, std::string("sanlock: missing string field '") + key + "'");
      return false;
    }
    out->clear();
    return true;
  }
  if (!v.IsString()) {
    ThrowTypeError(env, std::string("sanlock: field '") + key + "' must be a string");
    return false;
  }
  *out = v.As<Napi::String>().Utf8Value();
  if (out->size() > maxLen) {
    ThrowTypeError(env, std::string("sanlock: field '") + key + "' longer than " + std::to_string(maxLen) +
                            " bytes");
    return false;
  }
  return true;
}

bool GetU64(Napi::Env env, const Napi::Object& o, const char* key, uint64_t def, uint64_t* out) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) {
    *out = def;
    return true;
  }
  if (v.IsBigInt()) {
    bool lossless = true;
    *out = v.As<Napi::BigInt>().Uint64Value(&lossless);
    return true;
  }
  if (!v.IsNumber()) {
    ThrowTypeError(env, std::string("sanlock: field '") + key + "' must be a number");
    return false;
  }
  double d = v.As<Napi::Number>().DoubleValue();
  if (d < 0 || d != static_cast<double>(static_cast<uint64_t>(d))) {
    ThrowTypeError(env, std::string("sanlock: field '") + key + "' must be a non-negative integer");
    return false;
  }
  *out = static_cast<uint64_t>(d);
  return true;
}

bool ArgU32(const Napi::CallbackInfo& info, size_t i, uint32_t* out) {
  if (info.Length() <= i || info[i].IsUndefined()) {
    *out = 0;
    return true;
  }
  if (!info[i].IsNumber()) {
    ThrowTypeError(info.Env(), "sanlock: argument " + std::to_string(i) + " must be a number");
    return false;
  }
  *out = info[i].As<Napi::Number>().Uint32Value();
  return true;
}

bool ArgI32(const Napi::CallbackInfo& info, size_t i, int32_t* out) {
  if (info.Length() <= i || !info[i].IsNumber()) {
    ThrowTypeError(info.Env(), "sanlock: argument " + std::to_string(i) + " must be a number");
    return false;
  }
  *out = info[i].As<Napi::Number>().Int32Value();
  return true;
}

// A sanlk_resource followed by its disks, as one heap block.
struct ResBuf {
  std::vector<uint8_t> mem;
  sanlk_resource* res() { return reinterpret_cast<sanlk_resource*>(mem.data()); }
};

// JS: {lockspace, name, disks: [{path, offset}], lver?, flags?}
bool ParseResource(Napi::Env env, const Napi::Value& v, ResBuf* out, bool needLockspace = true) {
  if (!v.IsObject()) {
    ThrowTypeError(env, "sanlock: resource must be an object");
    return false;
  }
  Napi::Object o = v.As<Napi::Object>();
  std::string ls, name;
  if (!GetString(env, o, "lockspace", SANLK_NAME_LEN, needLockspace, &ls)) return false;
  if (!GetString(env, o, "name", SANLK_NAME_LEN, needLockspace, &name)) return false;
  Napi::Value dv = o.Get("disks");
  if (!dv.IsArray()) {
    ThrowTypeError(env, "sanlock: resource.disks must be an array");
    return false;
  }
  Napi::Array disks = dv.As<Napi::Array>();
  uint32_t n = disks.Length();
  if (n < 1 || n > SANLK_MAX_DISKS) {
    ThrowTypeError(env, "sanlock: resource needs 1.." + std::to_string(SANLK_MAX_DISKS) + " disks");
    return false;
  }
  out->mem.assign(sizeof(sanlk_resource) + n * sizeof(sanlk_disk), 0);
  sanlk_resource* r = out->res();
  memcpy(r->lockspace_name, ls.data(), ls.size());
  memcpy(r->name, name.data(), name.size());
  r->num_disks = n;
  for (uint32_t i = 0; i < n; i++) {
    Napi::Value d = disks.Get(i);
    if (!d.IsObject()) {
      ThrowTypeError(env, "sanlock: disk must be an object");
      return false;
    }
    std::string path;
    if (!GetString(env, d.As<Napi::Object>(), "path", SANLK_PATH_LEN - 1, true, &path)) return false;
    uint64_t off = 0;
    if (!GetU64(env, d.As<Napi::Object>(), "offset", 0, &off)) return false;
    memcpy(r->disks[i].path, path.data(), path.size());
    r->disks[i].offset = off;
  }
  uint64_t lver = 0, flags = 0;
  if (!GetU64(env, o, "lver", 0, &lver)) return false;
  if (!GetU64(env, o, "flags", 0, &flags)) return false;
  r->lver = lver;
  r->flags = static_cast<uint32_t>(flags);
  if (lver) r->flags |= SANLK_RES_LVER;
  return true;
}

bool ParseResources(Napi::Env env, const Napi::Value& v, std::vector<ResBuf>* out, bool allowEmpty) {
  if (!v.IsArray()) {
    ThrowTypeError(env, "sanlock: resources must be an array");
    return false;
  }
  Napi::Array a = v.As<Napi::Array>();
  uint32_t n = a.Length();
  if ((n == 0 && !allowEmpty) || n > SANLK_MAX_RESOURCES) {
    ThrowTypeError(env, "sanlock: 1.." + std::to_string(SANLK_MAX_RESOURCES) + " resources per call");
    return false;
  }
  out->resize(n);
  for (uint32_t i = 0; i < n; i++) {
    if (!ParseResource(env, a.Get(i), &(*out)[i])) return false;
  }
  return true;
}

// JS: {name, hostId, path, offset, flags?}
bool ParseLockspace(Napi::Env env, const Napi::Value& v, sanlk_lockspace* ls, bool needPath) {
  if (!v.IsObject()) {
    ThrowTypeError(env, "sanlock: lockspace must be an object");
    return false;
  }
  Napi::Object o = v.As<Napi::Object>();
  memset(ls, 0, sizeof(*ls));
  std::string name, path;
  if (!GetString(env, o, "name", SANLK_NAME_LEN, true, &name)) return false;
  if (!GetString(env, o, "path", SANLK_PATH_LEN - 1, needPath, &path)) return false;
  uint64_t hostId = 0, off = 0, flags = 0;
  if (!GetU64(env, o, "hostId", 0, &hostId)) return false;
  if (!GetU64(env, o, "offset", 0, &off)) return false;
  if (!GetU64(env, o, "flags", 0, &flags)) return false;
  memcpy(ls->name, name.data(), name.size());
  memcpy(ls->host_id_disk.path, path.data(), path.size());
  ls->host_id_disk.offset = off;
  ls->host_id = hostId;
  ls->flags = static_cast<uint32_t>(flags);
  return true;
}

// ---------------------------------------------------------------- result conversion

std::string FixedStr(const char* s, size_t max) { return std::string(s, strnlen(s, max)); }

Napi::Object ResourceToJs(Napi::Env env, const sanlk_resource* r) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("lockspace", FixedStr(r->lockspace_name, SANLK_NAME_LEN));
  o.Set("name", FixedStr(r->name, SANLK_NAME_LEN));
  o.Set("lver", Napi::Number::New(env, static_cast<double>(r->lver)));
  o.Set("flags", Napi::Number::New(env, r->flags));
  Napi::Array disks = Napi::Array::New(env, r->num_disks);
  for (uint32_t i = 0; i < r->num_disks && i < SANLK_MAX_DISKS; i++) {
    Napi::Object d = Napi::Object::New(env);
    d.Set("path", FixedStr(r->disks[i].path, SANLK_PATH_LEN));
    d.Set("offset", Napi::Number::New(env, static_cast<double>(r->disks[i].offset)));
    disks.Set(i, d);
  }
  o.Set("disks", disks);
  return o;
}

Napi::Object HostToJs(Napi::Env env, const sanlk_host* h) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("hostId", Napi::Number::New(env, static_cast<double>(h->host_id)));
  o.Set("generation", Napi::Number::New(env, static_cast<double>(h->generation)));
  o.Set("timestamp", Napi::Number::New(env, static_cast<double>(h->timestamp)));
  o.Set("ioTimeout", Napi::Number::New(env, h->io_timeout));
  o.Set("flags", Napi::Number::New(env, h->flags));
  return o;
}

Napi::Object LockspaceToJs(Napi::Env env, const sanlk_lockspace* ls) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("name", FixedStr(ls->name, SANLK_NAME_LEN));
  o.Set("hostId", Napi::Number::New(env, static_cast<double>(ls->host_id)));
  o.Set("flags", Napi::Number::New(env, ls->flags));
  o.Set("path", FixedStr(ls->host_id_disk.path, SANLK_PATH_LEN));
  o.Set("offset", Napi::Number::New(env, static_cast<double>(ls->host_id_disk.offset)));
  return o;
}

// ---------------------------------------------------------------- process / registration

// setRunDir(dir): setenv SANLOCK_RUN_DIR before libsanlock first connects.
Napi::Value SetRunDir(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) return ThrowTypeError(env, "setRunDir(dir: string)");
  std::string dir = info[0].As<Napi::String>().Utf8Value();
  const char* cur = getenv("SANLOCK_RUN_DIR");
  if (g_used && (cur == nullptr || dir != cur)) {
    Napi::Error::New(env,
                     "sanlock: SANLOCK_RUN_DIR is read once per process; it cannot be changed after the "
                     "first call to the daemon")
        .ThrowAsJavaScriptException();
    return env.Undefined();
  }
  setenv("SANLOCK_RUN_DIR", dir.c_str(), 1);
  return env.Undefined();
}

Napi::Value Register(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  g_used = true;
  int fd = sanlock_register();
  if (fd < 0) {
    MakeError(env, "register", fd).ThrowAsJavaScriptException();
    return env.Undefined();
  }
  int fl = fcntl(fd, F_GETFD);
  if (fl < 0 || fcntl(fd, F_SETFD, fl | FD_CLOEXEC) < 0) {
    int e = errno;
    close(fd);
    MakeError(env, "register(FD_CLOEXEC)", -e).ThrowAsJavaScriptException();
    return env.Undefined();
  }
  return Napi::Number::New(env, fd);
}

Napi::Value CloseFd(const Napi::CallbackInfo& info) {
  int32_t fd;
  if (!ArgI32(info, 0, &fd)) return info.Env().Undefined();
  if (fd >= 0) close(fd);
  return info.Env().Undefined();
}

Napi::Value GetCloexec(const Napi::CallbackInfo& info) {
  int32_t fd;
  if (!ArgI32(info, 0, &fd)) return info.Env().Undefined();
  int fl = fcntl(fd, F_GETFD);
  if (fl < 0) return Napi::Boolean::New(info.Env(), false);
  return Napi::Boolean::New(info.Env(), (fl & FD_CLOEXEC) != 0);
}

// ---------------------------------------------------------------- hang-up watcher

// new HangupWatcher(fd, callback): watches a registered fd with uv_poll
// (UV_DISCONNECT); calls callback(reason) once when the daemon side hangs up.
// The handle is unref'd: it never keeps the event loop alive by itself.
class HangupWatcher : public Napi::ObjectWrap<HangupWatcher> {
 public:
  static Napi::Function Init(Napi::Env env) {
    return DefineClass(env, "HangupWatcher", {InstanceMethod("stop", &HangupWatcher::Stop)});
  }

  HangupWatcher(const Napi::CallbackInfo& info) : Napi::ObjectWrap<HangupWatcher>(info) {
    Napi::Env env = info.Env();
    if (info.Length() < 2 || !info[0].IsNumber() || !info[1].IsFunction()) {
      ThrowTypeError(env, "new HangupWatcher(fd: number, cb: (reason: string) => void)");
      return;
    }
    fd_ = info[0].As<Napi::Number>().Int32Value();
    cb_ = Napi::Persistent(info[1].As<Napi::Function>());
    ctx_ = std::make_unique<Napi::AsyncContext>(env, "sanlock.hangup");
    uv_loop_t* loop = nullptr;
    if (napi_get_uv_event_loop(env, &loop) != napi_ok || loop == nullptr) {
      Napi::Error::New(env, "sanlock: no uv loop").ThrowAsJavaScriptException();
      return;
    }
    poll_ = new uv_poll_t;
    int rv = uv_poll_init(loop, poll_, fd_);
    if (rv != 0) {
      delete poll_;
      poll_ = nullptr;
      MakeError(env, "uv_poll_init", rv).ThrowAsJavaScriptException();
      return;
    }
    // uv_poll_init() switches the fd to O_NONBLOCK; libsanlock's send/recv on
    // the registered connection (worker threads) need a blocking fd: undo it.
    // epoll does not care; our own peek uses MSG_DONTWAIT.
    {
      int fl = fcntl(fd_, F_GETFL);
      if (fl >= 0) fcntl(fd_, F_SETFL, fl & ~O_NONBLOCK);
    }
    poll_->data = this;
    rv = uv_poll_start(poll_, UV_DISCONNECT, &HangupWatcher::OnPoll);
    if (rv != 0) {
      CloseHandle();
      MakeError(env, "uv_poll_start", rv).ThrowAsJavaScriptException();
      return;
    }
    uv_unref(reinterpret_cast<uv_handle_t*>(poll_));
  }

  ~HangupWatcher() override { CloseHandle(); }

 private:
  static void OnPoll(uv_poll_t* h, int status, int events) {
    auto* self = static_cast<HangupWatcher*>(h->data);
    if (self == nullptr) return;
    std::string reason;
    if (status < 0) {
      reason = std::string("poll error: ") + uv_strerror(status);
    } else if (events & UV_DISCONNECT) {
      reason = "disconnect";
    } else {
      char c;
      ssize_t n = recv(self->fd_, &c, 1, MSG_PEEK | MSG_DONTWAIT);
      if (n == 0) {
        reason = "eof";
      } else if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
        reason = std::string("recv: ") + strerror(errno);
      } else {
        return;  // spurious / pending reply data: not a hang-up
      }
    }
    self->Fire(reason);
  }

  void Fire(const std::string& reason) {
    CloseHandle();
    if (fired_) return;
    fired_ = true;
    Napi::Env env = cb_.Env();
    Napi::HandleScope scope(env);
    // napi_make_callback needs an object receiver (undefined throws).
    cb_.MakeCallback(env.Global(), {Napi::String::New(env, reason)}, *ctx_);
    if (env.IsExceptionPending()) {
      // surface it like any other uncaught exception thrown from a callback
      Napi::Error e = env.GetAndClearPendingException();
      napi_fatal_exception(env, e.Value());
    }
  }

  Napi::Value Stop(const Napi::CallbackInfo& info) {
    CloseHandle();
    return info.Env().Undefined();
  }

  void CloseHandle() {
    if (poll_ == nullptr) return;
    uv_poll_stop(poll_);
    poll_->data = nullptr;
    uv_close(reinterpret_cast<uv_handle_t*>(poll_), [](uv_handle_t* h) { delete reinterpret_cast<uv_poll_t*>(h); });
    poll_ = nullptr;
  }

  int fd_ = -1;
  bool fired_ = false;
  uv_poll_t* poll_ = nullptr;
  Napi::FunctionReference cb_;
  std::unique_ptr<Napi::AsyncContext> ctx_;
};

// ---------------------------------------------------------------- resource leases

// killpath(sock, flags, path, args)
Napi::Value Killpath(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int32_t sock;
  uint32_t flags;
  if (!ArgI32(info, 0, &sock) || !ArgU32(info, 1, &flags)) return env.Undefined();
  if (info.Length() < 4 || !info[2].IsString() || !info[3].IsString())
    return ThrowTypeError(env, "killpath(sock, flags, path: string, args: string)");
  std::string path = info[2].As<Napi::String>().Utf8Value();
  std::string args = info[3].As<Napi::String>().Utf8Value();
  if (path.size() >= SANLK_HELPER_PATH_LEN || args.size() >= SANLK_HELPER_ARGS_LEN)
    return ThrowTypeError(env, "killpath: path and args must each be shorter than 128 bytes");
  auto p = std::make_shared<std::vector<char>>(SANLK_HELPER_PATH_LEN, 0);
  auto a = std::make_shared<std::vector<char>>(SANLK_HELPER_ARGS_LEN, 0);
  memcpy(p->data(), path.data(), path.size());
  memcpy(a->data(), args.data(), args.size());
  return Queue(env, "killpath", [=]() { return sanlock_killpath(sock, flags, p->data(), a->data()); });
}

// restrict(sock, flags)
Napi::Value Restrict(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int32_t sock;
  uint32_t flags;
  if (!ArgI32(info, 0, &sock) || !ArgU32(info, 1, &flags)) return env.Undefined();
  return Queue(env, "restrict", [=]() { return sanlock_restrict(sock, flags); });
}

// acquire(sock, pid, flags, resources[], ownerName?)
Napi::Value Acquire(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int32_t sock, pid;
  uint32_t flags;
  if (!ArgI32(info, 0, &sock) || !ArgI32(info, 1, &pid) || !ArgU32(info, 2, &flags)) return env.Undefined();
  auto res = std::make_shared<std::vector<ResBuf>>();
  if (info.Length() < 4 || !ParseResources(env, info[3], res.get(), false)) return env.Undefined();
  auto opt = std::make_shared<sanlk_options>();
  memset(opt.get(), 0, sizeof(sanlk_options));
  bool haveOpt = false;
  if (info.Length() > 4 && info[4].IsString()) {
    std::string owner = info[4].As<Napi::String>().Utf8Value();
    if (owner.size() > SANLK_NAME_LEN) return ThrowTypeError(env, "acquire: owner name longer than 48 bytes");
    memcpy(opt->owner_name, owner.data(), owner.size());
    haveOpt = true;
  }
  std::string op = sock >= 0 ? "acquire" : "acquire(pid " + std::to_string(pid) + ")";
  return Queue(env, op, [=]() {
    std::vector<sanlk_resource*> ptrs;
    for (auto& r : *res) ptrs.push_back(r.res());
    return sanlock_acquire(sock, pid, flags, static_cast<int>(ptrs.size()), ptrs.data(),
                           haveOpt ? opt.get() : nullptr);
  });
}

// release(sock, pid, flags, resources[])  (resources may be empty with SANLK_REL_ALL)
Napi::Value Release(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int32_t sock, pid;
  uint32_t flags;
  if (!ArgI32(info, 0, &sock) || !ArgI32(info, 1, &pid) || !ArgU32(info, 2, &flags)) return env.Undefined();
  auto res = std::make_shared<std::vector<ResBuf>>();
  if (info.Length() < 4 || !ParseResources(env, info[3], res.get(), (flags & SANLK_REL_ALL) != 0))
    return env.Undefined();
  std::string op = sock >= 0 ? "release" : "release(pid " + std::to_string(pid) + ")";
  return Queue(env, op, [=]() {
    std::vector<sanlk_resource*> ptrs;
    for (auto& r : *res) ptrs.push_back(r.res());
    return sanlock_release(sock, pid, flags, static_cast<int>(ptrs.size()), ptrs.empty() ? nullptr : ptrs.data());
  });
}

// convert(sock, pid, flags, resource)
Napi::Value Convert(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int32_t sock, pid;
  uint32_t flags;
  if (!ArgI32(info, 0, &sock) || !ArgI32(info, 1, &pid) || !ArgU32(info, 2, &flags)) return env.Undefined();
  auto res = std::make_shared<ResBuf>();
  if (info.Length() < 4 || !ParseResource(env, info[3], res.get())) return env.Undefined();
  return Queue(env, "convert", [=]() { return sanlock_convert(sock, pid, flags, res->res()); });
}

// inquire(sock, pid) -> resource[]
Napi::Value Inquire(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int32_t sock, pid;
  if (!ArgI32(info, 0, &sock) || !ArgI32(info, 1, &pid)) return env.Undefined();
  struct Out {
    int count = 0;
    sanlk_resource** args = nullptr;
    ~Out() {
      if (args) {
        for (int i = 0; i < count; i++) free(args[i]);
        free(args);
      }
    }
  };
  auto out = std::make_shared<Out>();
  std::string op = sock >= 0 ? "inquire" : "inquire(pid " + std::to_string(pid) + ")";
  return Queue(
      env, op,
      [=]() {
        int count = 0;
        char* state = nullptr;
        int rv = sanlock_inquire(sock, pid, 0, &count, &state);
        if (rv < 0) {
          free(state);
          return rv;
        }
        if (state != nullptr && count > 0 && state[0] != '\0') {
          rv = sanlock_state_to_args(state, &out->count, &out->args);
        }
        free(state);
        return rv;
      },
      [=](Napi::Env e, int) -> Napi::Value {
        Napi::Array a = Napi::Array::New(e, out->count);
        for (int i = 0; i < out->count; i++) a.Set(static_cast<uint32_t>(i), ResourceToJs(e, out->args[i]));
        return a;
      });
}

// acquireInquire(sock, pid, flags, resources[], ownerName?) -> resource[] | null
// An acquire, then on the same worker thread an inquire of the holder's leases (their lvers:
// the fencing tokens). One hop to the thread pool and back instead of two: a caller that needs
// the lver of what it just acquired pays one daemon round trip more, not a second trip through
// the event loop. Resolves to null when the acquire succeeded but the inquire failed.
Napi::Value AcquireInquire(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int32_t sock, pid;
  uint32_t flags;
  if (!ArgI32(info, 0, &sock) || !ArgI32(info, 1, &pid) || !ArgU32(info, 2, &flags)) return env.Undefined();
  auto res = std::make_shared<std::vector<ResBuf>>();
  if (info.Length() < 4 || !ParseResources(env, info[3], res.get(), false)) return env.Undefined();
  auto opt = std::make_shared<sanlk_options>();
  memset(opt.get(), 0, sizeof(sanlk_options));
  bool haveOpt = false;
  if (info.Length() > 4 && info[4].IsString()) {
    std::string owner = info[4].As<Napi::String>().Utf8Value();
    if (owner.size() > SANLK_NAME_LEN) return ThrowTypeError(env, "acquire: owner name longer than 48 bytes");
    memcpy(opt->owner_name, owner.data(), owner.size());
    haveOpt = true;
  }
  struct Out {
    bool inquired = false;
    int count = 0;
    sanlk_resource** args = nullptr;
    ~Out() {
      if (args) {
        for (int i = 0; i < count; i++) free(args[i]);
        free(args);
      }
    }
  };
  auto out = std::make_shared<Out>();
  std::string op = sock >= 0 ? "acquire" : "acquire(pid " + std::to_string(pid) + ")";
  return Queue(
      env, op,
      [=]() {
        std::vector<sanlk_resource*> ptrs;
        for (auto& r : *res) ptrs.push_back(r.res());
        int rv = sanlock_acquire(sock, pid, flags, static_cast<int>(ptrs.size()), ptrs.data(),
                                 haveOpt ? opt.get() : nullptr);
        if (rv < 0) return rv;
        int count = 0;
        char* state = nullptr;
        int irv = sanlock_inquire(sock, pid, 0, &count, &state);
        if (irv >= 0) {
          irv = (state != nullptr && count > 0 && state[0] != '\0') ? sanlock_state_to_args(state, &out->count, &out->args) : 0;
          out->inquired = irv >= 0;
        }
        free(state);
        return rv;
      },
      [=](Napi::Env e, int) -> Napi::Value {
        if (!out->inquired) return e.Null();
        Napi::Array a = Napi::Array::New(e, out->count);
        for (int i = 0; i < out->count; i++) a.Set(static_cast<uint32_t>(i), ResourceToJs(e, out->args[i]));
        return a;
      });
}

// request(flags, forceMode, resource)
Napi::Value Request(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint32_t flags, force;
  if (!ArgU32(info, 0, &flags) || !ArgU32(info, 1, &force)) return env.Undefined();
  auto res = std::make_shared<ResBuf>();
  if (info.Length() < 3 || !ParseResource(env, info[2], res.get())) return env.Undefined();
  return Queue(env, "request", [=]() { return sanlock_request(flags, force, res->res()); });
}

// setLvb(flags, resource, buffer)
Napi::Value SetLvb(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint32_t flags;
  if (!ArgU32(info, 0, &flags)) return env.Undefined();
  auto res = std::make_shared<ResBuf>();
  if (info.Length() < 3 || !ParseResource(env, info[1], res.get())) return env.Undefined();
  if (!info[2].IsBuffer()) return ThrowTypeError(env, "setLvb: value must be a Buffer");
  auto buf = info[2].As<Napi::Buffer<char>>();
  auto data = std::make_shared<std::vector<char>>(buf.Data(), buf.Data() + buf.Length());
  return Queue(env, "set_lvb", [=]() {
    return sanlock_set_lvb(flags, res->res(), data->data(), static_cast<int>(data->size()));
  });
}

// getLvb(flags, resource, len) -> Buffer
Napi::Value GetLvb(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint32_t flags, len;
  if (!ArgU32(info, 0, &flags)) return env.Undefined();
  auto res = std::make_shared<ResBuf>();
  if (info.Length() < 3 || !ParseResource(env, info[1], res.get())) return env.Undefined();
  if (!ArgU32(info, 2, &len)) return env.Undefined();
  if (len == 0 || len > 4096) return ThrowTypeError(env, "getLvb: len must be 1..4096");
  auto data = std::make_shared<std::vector<char>>(len, 0);
  return Queue(
      env, "get_lvb",
      [=]() { return sanlock_get_lvb(flags, res->res(), data->data(), static_cast<int>(data->size())); },
      [=](Napi::Env e, int) -> Napi::Value { return Napi::Buffer<char>::Copy(e, data->data(), data->size()); });
}

// ---------------------------------------------------------------- lockspaces

// addLockspace(ls, flags, ioTimeout)
Napi::Value AddLockspace(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto ls = std::make_shared<sanlk_lockspace>();
  uint32_t flags, io;
  if (info.Length() < 1 || !ParseLockspace(env, info[0], ls.get(), true)) return env.Undefined();
  if (!ArgU32(info, 1, &flags) || !ArgU32(info, 2, &io)) return env.Undefined();
  return Queue(env, "add_lockspace", [=]() { return sanlock_add_lockspace_timeout(ls.get(), flags, io); });
}

// inqLockspace(ls, flags) -> raw rv (0 | -EINPROGRESS | -ENOENT ...), never rejects on rv
Napi::Value InqLockspace(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto ls = std::make_shared<sanlk_lockspace>();
  uint32_t flags;
  if (info.Length() < 1 || !ParseLockspace(env, info[0], ls.get(), false)) return env.Undefined();
  if (!ArgU32(info, 1, &flags)) return env.Undefined();
  return Queue(
      env, "inq_lockspace", [=]() { return sanlock_inq_lockspace(ls.get(), flags); },
      [](Napi::Env e, int rv) -> Napi::Value { return Napi::Number::New(e, rv); }, false);
}

// remLockspace(ls, flags)
Napi::Value RemLockspace(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto ls = std::make_shared<sanlk_lockspace>();
  uint32_t flags;
  if (info.Length() < 1 || !ParseLockspace(env, info[0], ls.get(), false)) return env.Undefined();
  if (!ArgU32(info, 1, &flags)) return env.Undefined();
  return Queue(env, "rem_lockspace", [=]() { return sanlock_rem_lockspace(ls.get(), flags); });
}

// getLockspaces() -> lockspace[]
Napi::Value GetLockspaces(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  struct Out {
    sanlk_lockspace* lss = nullptr;
    int count = 0;
    ~Out() { free(lss); }
  };
  auto out = std::make_shared<Out>();
  return Queue(
      env, "get_lockspaces",
      [=]() {
        int rv = sanlock_get_lockspaces(&out->lss, &out->count, 0);
        if (rv == -ENOSPC) rv = 0;  // partial list: count says what we have
        return rv;
      },
      [=](Napi::Env e, int) -> Napi::Value {
        Napi::Array a = Napi::Array::New(e);
        for (int i = 0; i < out->count && out->lss; i++) a.Set(static_cast<uint32_t>(i), LockspaceToJs(e, &out->lss[i]));
        return a;
      });
}

// getHosts(lsName, hostId) -> host[]
Napi::Value GetHosts(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) return ThrowTypeError(env, "getHosts(name: string, hostId)");
  std::string name = info[0].As<Napi::String>().Utf8Value();
  if (name.size() > SANLK_NAME_LEN) return ThrowTypeError(env, "getHosts: lockspace name longer than 48 bytes");
  uint32_t hostId;
  if (!ArgU32(info, 1, &hostId)) return env.Undefined();
  struct Out {
    sanlk_host* hss = nullptr;
    int count = 0;
    ~Out() { free(hss); }
  };
  auto out = std::make_shared<Out>();
  auto nm = std::make_shared<std::vector<char>>(SANLK_NAME_LEN + 1, 0);
  memcpy(nm->data(), name.data(), name.size());
  return Queue(
      env, "get_hosts", [=]() { return sanlock_get_hosts(nm->data(), hostId, &out->hss, &out->count, 0); },
      [=](Napi::Env e, int) -> Napi::Value {
        Napi::Array a = Napi::Array::New(e);
        for (int i = 0; i < out->count && out->hss; i++) a.Set(static_cast<uint32_t>(i), HostToJs(e, &out->hss[i]));
        return a;
      });
}

// ---------------------------------------------------------------- formatting / reading

// writeLockspace(ls, maxHosts, flags, ioTimeout)
Napi::Value WriteLockspace(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto ls = std::make_shared<sanlk_lockspace>();
  uint32_t maxHosts, flags, io;
  if (info.Length() < 1 || !ParseLockspace(env, info[0], ls.get(), true)) return env.Undefined();
  if (!ArgU32(info, 1, &maxHosts) || !ArgU32(info, 2, &flags) || !ArgU32(info, 3, &io)) return env.Undefined();
  return Queue(env, "write_lockspace",
               [=]() { return sanlock_write_lockspace(ls.get(), static_cast<int>(maxHosts), flags, io); });
}

// readLockspace(ls) -> {lockspace, ioTimeout}
Napi::Value ReadLockspace(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto ls = std::make_shared<sanlk_lockspace>();
  if (info.Length() < 1 || !ParseLockspace(env, info[0], ls.get(), true)) return env.Undefined();
  auto io = std::make_shared<uint32_t>(0);
  return Queue(
      env, "read_lockspace", [=]() { return sanlock_read_lockspace(ls.get(), 0, io.get()); },
      [=](Napi::Env e, int) -> Napi::Value {
        Napi::Object o = LockspaceToJs(e, ls.get());
        o.Set("ioTimeout", Napi::Number::New(e, *io));
        return o;
      });
}

// writeResource(res, maxHosts, numHosts, flags)
Napi::Value WriteResource(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto res = std::make_shared<ResBuf>();
  uint32_t maxHosts, numHosts, flags;
  if (info.Length() < 1 || !ParseResource(env, info[0], res.get())) return env.Undefined();
  if (!ArgU32(info, 1, &maxHosts) || !ArgU32(info, 2, &numHosts) || !ArgU32(info, 3, &flags)) return env.Undefined();
  return Queue(env, "write_resource", [=]() {
    return sanlock_write_resource(res->res(), static_cast<int>(maxHosts), static_cast<int>(numHosts), flags);
  });
}

// readResource(res) -> resource
Napi::Value ReadResource(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto res = std::make_shared<ResBuf>();
  if (info.Length() < 1 || !ParseResource(env, info[0], res.get(), false)) return env.Undefined();
  return Queue(
      env, "read_resource", [=]() { return sanlock_read_resource(res->res(), 0); },
      [=](Napi::Env e, int) -> Napi::Value { return ResourceToJs(e, res->res()); });
}

// readResourceOwners(res) -> {resource, owners: host[]}
Napi::Value ReadResourceOwners(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto res = std::make_shared<ResBuf>();
  if (info.Length() < 1 || !ParseResource(env, info[0], res.get(), false)) return env.Undefined();
  struct Out {
    sanlk_host* hss = nullptr;
    int count = 0;
    ~Out() { free(hss); }
  };
  auto out = std::make_shared<Out>();
  return Queue(
      env, "read_resource_owners",
      [=]() { return sanlock_read_resource_owners(res->res(), 0, &out->hss, &out->count); },
      [=](Napi::Env e, int) -> Napi::Value {
        Napi::Object o = Napi::Object::New(e);
        o.Set("resource", ResourceToJs(e, res->res()));
        Napi::Array a = Napi::Array::New(e);
        for (int i = 0; i < out->count && out->hss; i++) a.Set(static_cast<uint32_t>(i), HostToJs(e, &out->hss[i]));
        o.Set("owners", a);
        return o;
      });
}

// align(path) -> bytes
Napi::Value Align(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) return ThrowTypeError(env, "align(path: string)");
  std::string path = info[0].As<Napi::String>().Utf8Value();
  if (path.size() >= SANLK_PATH_LEN) return ThrowTypeError(env, "align: path too long");
  auto disk = std::make_shared<sanlk_disk>();
  memset(disk.get(), 0, sizeof(sanlk_disk));
  memcpy(disk->path, path.data(), path.size());
  return Queue(
      env, "align", [=]() { return sanlock_align(disk.get()); },
      [](Napi::Env e, int rv) -> Napi::Value { return Napi::Number::New(e, rv); });
}

// version() -> {version, proto}
Napi::Value Version(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto v = std::make_shared<std::pair<uint32_t, uint32_t>>(0, 0);
  return Queue(
      env, "version", [=]() { return sanlock_version(0, &v->first, &v->second); },
      [=](Napi::Env e, int) -> Napi::Value {
        Napi::Object o = Napi::Object::New(e);
        o.Set("version", Napi::Number::New(e, v->first));
        o.Set("proto", Napi::Number::New(e, v->second));
        return o;
      });
}

Napi::Value Strerror(const Napi::CallbackInfo& info) {
  int32_t rv;
  if (!ArgI32(info, 0, &rv)) return info.Env().Undefined();
  return Napi::String::New(info.Env(), Describe(rv));
}

// ---------------------------------------------------------------- unix socket peer credentials
// The lease-manager's host-local socket names a lease holder by the pid the kernel reports
// for the connected peer (SO_PEERCRED), never by a number the caller sends.

Napi::Value PeerCredentials(const Napi::CallbackInfo& info) {
  int32_t fd;
  if (!ArgI32(info, 0, &fd)) return info.Env().Undefined();
  struct ucred cred;
  socklen_t len = sizeof(cred);
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    int e = errno;
    Napi::Error err = Napi::Error::New(info.Env(), std::string("getsockopt(SO_PEERCRED): ") + strerror(e));
    err.Set("code", Napi::Number::New(info.Env(), -e));
    err.ThrowAsJavaScriptException();
    return info.Env().Undefined();
  }
  Napi::Object out = Napi::Object::New(info.Env());
  out.Set("pid", Napi::Number::New(info.Env(), cred.pid));
  out.Set("uid", Napi::Number::New(info.Env(), cred.uid));
  out.Set("gid", Napi::Number::New(info.Env(), cred.gid));
  return out;
}


// ============================================================== confined file access
// (storage confinement, issue 13) openBeneath(root, relative, flags, mode): opens `root`
// refusing a symlink in any of its components, then `relative` beneath it with openat2
// RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV | RESOLVE_NO_MAGICLINKS. Runs on the
// thread pool (shared storage can be slow); resolves to the fd, or rejects with an Error whose
// `code` is the errno name (ELOOP, EXDEV, ENOENT ...) like Node's own fs errors.

class OpenBeneathWorker : public Napi::AsyncWorker {
 public:
  OpenBeneathWorker(Napi::Env env, std::string root, std::string relative, int flags, int mode)
      : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)), root_(std::move(root)),
        relative_(std::move(relative)), flags_(flags), mode_(mode) {}
  Napi::Promise Promise() { return deferred_.Promise(); }

 protected:
  void Execute() override {
    struct open_how root_how;
    memset(&root_how, 0, sizeof root_how);
    root_how.flags = O_PATH | O_DIRECTORY | O_CLOEXEC;
    root_how.resolve = RESOLVE_NO_SYMLINKS;
    int rootfd = static_cast<int>(syscall(SYS_openat2, AT_FDCWD, root_.c_str(), &root_how, sizeof root_how));
    if (rootfd < 0) {
      errno_ = errno;
      step_ = "root";
      return;
    }
    struct open_how how;
    memset(&how, 0, sizeof how);
    how.flags = static_cast<uint64_t>(static_cast<unsigned>(flags_)) | O_CLOEXEC;
    how.mode = (flags_ & (O_CREAT | O_TMPFILE)) ? static_cast<uint64_t>(mode_) : 0;
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV | RESOLVE_NO_MAGICLINKS;
    fd_ = static_cast<int>(syscall(SYS_openat2, rootfd, relative_.c_str(), &how, sizeof how));
    if (fd_ < 0) {
      errno_ = errno;
      step_ = "path";
    }
    close(rootfd);
  }
  void OnOK() override {
    Napi::Env env = Env();
    if (errno_ == 0) {
      deferred_.Resolve(Napi::Number::New(env, fd_));
      return;
    }
    const char* name = uv_err_name(uv_translate_sys_error(errno_));
    std::string target = step_ == std::string("root") ? root_ : root_ + " beneath: " + relative_;
    Napi::Error err = Napi::Error::New(env, std::string(name) + ": " + strerror(errno_) + ", openat2 " + target);
    err.Set("code", Napi::String::New(env, name));
    err.Set("errno", Napi::Number::New(env, -errno_));
    err.Set("syscall", Napi::String::New(env, "openat2"));
    err.Set("step", Napi::String::New(env, step_));
    deferred_.Reject(err.Value());
  }

 private:
  Napi::Promise::Deferred deferred_;
  std::string root_;
  std::string relative_;
  int flags_;
  int mode_;
  int fd_ = -1;
  int errno_ = 0;
  const char* step_ = "";
};

Napi::Value OpenBeneath(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 4 || !info[0].IsString() || !info[1].IsString() || !info[2].IsNumber() || !info[3].IsNumber()) {
    return ThrowTypeError(env, "openBeneath(root: string, relative: string, flags: number, mode: number)");
  }
  std::string root = info[0].As<Napi::String>().Utf8Value();
  std::string relative = info[1].As<Napi::String>().Utf8Value();
  if (root.empty() || root[0] != '/' || root.find('\0') != std::string::npos || relative.empty() ||
      relative.find('\0') != std::string::npos) {
    return ThrowTypeError(env, "openBeneath: root must be absolute, relative must not be empty");
  }
  auto* w = new OpenBeneathWorker(env, std::move(root), std::move(relative), info[2].As<Napi::Number>().Int32Value(),
                                  info[3].As<Napi::Number>().Int32Value());
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

// Confined steps (issue 17: CPU per create): what a transaction does to one name — open it (or
// its parent) beneath the root as openBeneath does, then the calls on what was opened — as ONE
// thread-pool job instead of one per system call (each round trip through the pool costs more
// CPU than the call itself). Same resolution rules as openBeneath: the root without symlinks,
// everything under it RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV | RESOLVE_NO_MAGICLINKS;
// single names (mkdir, rename, lstat) act through their opened parent and never follow a link.
// Errors reject like openBeneath's (code = errno name, plus errno, syscall, step).

static int OpenRootNoSymlinks(const std::string& root) {
  struct open_how how;
  memset(&how, 0, sizeof how);
  how.flags = O_PATH | O_DIRECTORY | O_CLOEXEC;
  how.resolve = RESOLVE_NO_SYMLINKS;
  return static_cast<int>(syscall(SYS_openat2, AT_FDCWD, root.c_str(), &how, sizeof how));
}

static int OpenConfined(int dirfd, const std::string& relative, int flags, int mode) {
  struct open_how how;
  memset(&how, 0, sizeof how);
  how.flags = static_cast<uint64_t>(static_cast<unsigned>(flags)) | O_CLOEXEC;
  how.mode = (flags & (O_CREAT | O_TMPFILE)) ? static_cast<uint64_t>(mode) : 0;
  how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV | RESOLVE_NO_MAGICLINKS;
  return static_cast<int>(syscall(SYS_openat2, dirfd, relative.c_str(), &how, sizeof how));
}

class ConfinedStepWorker : public Napi::AsyncWorker {
 public:
  enum Kind { kCreate, kMkdir, kSync, kRename, kLstat, kSyncClose };
  ConfinedStepWorker(Napi::Env env, Kind kind, std::string root)
      : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)), kind_(kind), root_(std::move(root)) {}
  Napi::Promise Promise() { return deferred_.Promise(); }

  std::string rel_, name_, rel2_, name2_;
  int flags_ = 0, mode_ = 0, gid_ = -1, fd_ = -1;
  std::vector<char> data_;
  int64_t truncate_ = -1;
  bool sync_ = false, keepOpen_ = false;

 protected:
  void Execute() override {
    if (kind_ == kSyncClose) {
      if (fsync(fd_) != 0) Fail("fsync");
      close(fd_);
      fd_ = -1;
      return;
    }
    int rootfd = OpenRootNoSymlinks(root_);
    if (rootfd < 0) return Fail("root", "openat2");
    switch (kind_) {
      case kCreate: Create(rootfd); break;
      case kMkdir: Mkdir(rootfd); break;
      case kSync: Sync(rootfd); break;
      case kRename: Rename(rootfd); break;
      case kLstat: Lstat(rootfd); break;
      case kSyncClose: break;
    }
    close(rootfd);
  }

  void OnOK() override {
    Napi::Env env = Env();
    if (errno_ != 0) {
      const char* name = uv_err_name(uv_translate_sys_error(errno_));
      std::string target = step_ == std::string("root") ? root_ : root_ + " beneath: " + (name_.empty() ? rel_ : rel_ + "/" + name_);
      Napi::Error err = Napi::Error::New(env, std::string(name) + ": " + strerror(errno_) + ", " + syscall_ + " " + target);
      err.Set("code", Napi::String::New(env, name));
      err.Set("errno", Napi::Number::New(env, -errno_));
      err.Set("syscall", Napi::String::New(env, syscall_));
      err.Set("step", Napi::String::New(env, step_));
      deferred_.Reject(err.Value());
      return;
    }
    if (kind_ == kCreate) {
      Napi::Object out = Napi::Object::New(env);
      out.Set("fd", Napi::Number::New(env, fd_));
      out.Set("blocks", Napi::Number::New(env, static_cast<double>(st_.st_blocks)));
      deferred_.Resolve(out);
    } else if (kind_ == kLstat && missing_) {
      deferred_.Resolve(env.Null());
    } else if (kind_ == kLstat) {
      Napi::Object out = Napi::Object::New(env);
      out.Set("dev", Napi::Number::New(env, static_cast<double>(st_.st_dev)));
      out.Set("ino", Napi::Number::New(env, static_cast<double>(st_.st_ino)));
      out.Set("mode", Napi::Number::New(env, st_.st_mode));
      out.Set("nlink", Napi::Number::New(env, static_cast<double>(st_.st_nlink)));
      out.Set("uid", Napi::Number::New(env, st_.st_uid));
      out.Set("gid", Napi::Number::New(env, st_.st_gid));
      out.Set("rdev", Napi::Number::New(env, static_cast<double>(st_.st_rdev)));
      out.Set("size", Napi::Number::New(env, static_cast<double>(st_.st_size)));
      out.Set("blksize", Napi::Number::New(env, static_cast<double>(st_.st_blksize)));
      out.Set("blocks", Napi::Number::New(env, static_cast<double>(st_.st_blocks)));
      out.Set("atimeMs", Napi::Number::New(env, st_.st_atim.tv_sec * 1e3 + st_.st_atim.tv_nsec / 1e6));
      out.Set("mtimeMs", Napi::Number::New(env, st_.st_mtim.tv_sec * 1e3 + st_.st_mtim.tv_nsec / 1e6));
      out.Set("ctimeMs", Napi::Number::New(env, st_.st_ctim.tv_sec * 1e3 + st_.st_ctim.tv_nsec / 1e6));
      deferred_.Resolve(out);
    } else {
      deferred_.Resolve(env.Undefined());
    }
  }

 private:
  void Fail(const char* step, const char* call = nullptr) {
    errno_ = errno;
    step_ = step;
    syscall_ = call ? call : step;
  }

  bool Own(int fd) {
    if (gid_ >= 0 && fchown(fd, static_cast<uid_t>(-1), static_cast<gid_t>(gid_)) != 0) return Fail("fchown"), false;
    if (fchmod(fd, static_cast<mode_t>(mode_)) != 0) return Fail("fchmod"), false;
    return true;
  }

  void Create(int rootfd) {
    int fd = OpenConfined(rootfd, rel_, O_RDWR | O_CREAT | O_EXCL, mode_);
    if (fd < 0) return Fail("path", "openat2");
    bool ok = Own(fd);
    for (size_t at = 0; ok && at < data_.size();) {
      ssize_t n = pwrite(fd, data_.data() + at, data_.size() - at, static_cast<off_t>(at));
      if (n < 0 && errno == EINTR) continue;
      if (n == 0) errno = EIO;  // a file system that writes nothing would loop here forever
      if (n <= 0) ok = false, Fail("write");
      else at += static_cast<size_t>(n);
    }
    if (ok && truncate_ >= 0 && ftruncate(fd, static_cast<off_t>(truncate_)) != 0) ok = false, Fail("ftruncate");
    if (ok && sync_ && fsync(fd) != 0) ok = false, Fail("fsync");
    if (ok && fstat(fd, &st_) != 0) ok = false, Fail("fstat");
    if (ok && keepOpen_) {
      fd_ = fd;
    } else {
      close(fd);
    }
  }

  void Mkdir(int rootfd) {
    int parent = OpenConfined(rootfd, rel_, O_PATH | O_DIRECTORY, 0);
    if (parent < 0) return Fail("parent", "openat2");
    if (mkdirat(parent, name_.c_str(), static_cast<mode_t>(mode_)) != 0) {
      Fail("mkdir");
    } else {
      int dir = OpenConfined(parent, name_, O_RDONLY | O_DIRECTORY, 0);
      if (dir < 0) {
        Fail("path", "openat2");
      } else {
        Own(dir);
        close(dir);
      }
    }
    close(parent);
  }

  void Sync(int rootfd) {
    int fd = OpenConfined(rootfd, rel_, flags_, 0);
    if (fd < 0) return Fail("path", "openat2");
    if (fsync(fd) != 0) Fail("fsync");
    close(fd);
  }

  void Rename(int rootfd) {
    int from = OpenConfined(rootfd, rel_, O_PATH | O_DIRECTORY, 0);
    if (from < 0) return Fail("parent", "openat2");
    int to = rel2_ == rel_ ? from : OpenConfined(rootfd, rel2_, O_PATH | O_DIRECTORY, 0);
    if (to < 0) {
      Fail("parent", "openat2");
    } else if (renameat(from, name_.c_str(), to, name2_.c_str()) != 0) {
      Fail("rename");
    }
    if (to >= 0 && to != from) close(to);
    close(from);
  }

  // A missing name (or parent) is an answer, not an error: resolves null (no Error built for it).
  void Lstat(int rootfd) {
    int parent = OpenConfined(rootfd, rel_, O_PATH | O_DIRECTORY, 0);
    if (parent < 0) {
      if (errno == ENOENT) missing_ = true;
      else Fail("parent", "openat2");
      return;
    }
    // An empty name: the directory itself (the root: rel ".").
    if ((name_.empty() ? fstat(parent, &st_) : fstatat(parent, name_.c_str(), &st_, AT_SYMLINK_NOFOLLOW)) != 0) {
      if (errno == ENOENT) missing_ = true;
      else Fail("lstat");
    }
    close(parent);
  }

  Napi::Promise::Deferred deferred_;
  Kind kind_;
  std::string root_;
  struct stat st_;
  bool missing_ = false;
  int errno_ = 0;
  const char* step_ = "";
  const char* syscall_ = "";
};

static bool ConfinedArgs(const Napi::CallbackInfo& info, size_t strings, size_t numbers) {
  if (info.Length() < strings + numbers) return false;
  for (size_t i = 0; i < strings; i++) {
    if (!info[i].IsString()) return false;
    std::string s = info[i].As<Napi::String>().Utf8Value();
    if (s.find('\0') != std::string::npos || (i == 0 && (s.empty() || s[0] != '/'))) return false;
  }
  for (size_t i = strings; i < strings + numbers; i++) {
    if (!info[i].IsNumber()) return false;
  }
  return true;
}

// A single name inside its parent: not empty (except for lstat of the parent itself), no '/', not '.' or '..'.
static bool PlainName(const std::string& name, bool allowEmpty) {
  if (name.empty()) return allowEmpty;
  return name.find('/') == std::string::npos && name != "." && name != "..";
}

static Napi::Value Queue(ConfinedStepWorker* w) {
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

// createBeneath(root, relative, mode, gid, data: Buffer | null, truncateTo, sync, keepOpen) -> {fd, blocks}:
// a new file (O_EXCL), its group (gid >= 0) and exact mode, data written at 0, truncated (>= 0),
// fsynced, fstat'ed; fd is -1 unless keepOpen (then the caller closes it).
Napi::Value CreateBeneath(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!ConfinedArgs(info, 2, 2) || info.Length() < 8 || !(info[4].IsBuffer() || info[4].IsNull()) || !info[5].IsNumber())
    return ThrowTypeError(env, "createBeneath(root, relative, mode, gid, data | null, truncateTo, sync, keepOpen)");
  auto* w = new ConfinedStepWorker(env, ConfinedStepWorker::kCreate, info[0].As<Napi::String>().Utf8Value());
  w->rel_ = info[1].As<Napi::String>().Utf8Value();
  w->mode_ = info[2].As<Napi::Number>().Int32Value();
  w->gid_ = info[3].As<Napi::Number>().Int32Value();
  if (info[4].IsBuffer()) {
    auto b = info[4].As<Napi::Buffer<char>>();
    w->data_.assign(b.Data(), b.Data() + b.Length());
  }
  w->truncate_ = info[5].As<Napi::Number>().Int64Value();
  w->sync_ = info[6].ToBoolean();
  w->keepOpen_ = info[7].ToBoolean();
  return Queue(w);
}

// mkdirBeneath(root, parentRelative, name, mode, gid): mkdirat in the opened parent, then the new
// directory's group (gid >= 0) and exact mode through a descriptor opened beneath that parent.
Napi::Value MkdirBeneath(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!ConfinedArgs(info, 3, 2) || !PlainName(info[2].As<Napi::String>().Utf8Value(), false))
    return ThrowTypeError(env, "mkdirBeneath(root, parentRelative, name, mode, gid)");
  auto* w = new ConfinedStepWorker(env, ConfinedStepWorker::kMkdir, info[0].As<Napi::String>().Utf8Value());
  w->rel_ = info[1].As<Napi::String>().Utf8Value();
  w->name_ = info[2].As<Napi::String>().Utf8Value();
  w->mode_ = info[3].As<Napi::Number>().Int32Value();
  w->gid_ = info[4].As<Napi::Number>().Int32Value();
  return Queue(w);
}

// syncBeneath(root, relative, flags): open (flags, e.g. O_RDONLY | O_DIRECTORY), fsync, close.
Napi::Value SyncBeneath(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!ConfinedArgs(info, 2, 1)) return ThrowTypeError(env, "syncBeneath(root, relative, flags)");
  auto* w = new ConfinedStepWorker(env, ConfinedStepWorker::kSync, info[0].As<Napi::String>().Utf8Value());
  w->rel_ = info[1].As<Napi::String>().Utf8Value();
  w->flags_ = info[2].As<Napi::Number>().Int32Value();
  return Queue(w);
}

// renameBeneath(root, fromParent, fromName, toParent, toName): renameat between opened parents.
Napi::Value RenameBeneath(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!ConfinedArgs(info, 5, 0) || !PlainName(info[2].As<Napi::String>().Utf8Value(), false) ||
      !PlainName(info[4].As<Napi::String>().Utf8Value(), false))
    return ThrowTypeError(env, "renameBeneath(root, fromParent, fromName, toParent, toName)");
  auto* w = new ConfinedStepWorker(env, ConfinedStepWorker::kRename, info[0].As<Napi::String>().Utf8Value());
  w->rel_ = info[1].As<Napi::String>().Utf8Value();
  w->name_ = info[2].As<Napi::String>().Utf8Value();
  w->rel2_ = info[3].As<Napi::String>().Utf8Value();
  w->name2_ = info[4].As<Napi::String>().Utf8Value();
  return Queue(w);
}

// lstatBeneath(root, parentRelative, name) -> stat fields, or null if there is no such name (or
// parent): fstatat(AT_SYMLINK_NOFOLLOW) in the opened parent; name "" stats the parent itself.
Napi::Value LstatBeneath(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!ConfinedArgs(info, 3, 0) || !PlainName(info[2].As<Napi::String>().Utf8Value(), true))
    return ThrowTypeError(env, "lstatBeneath(root, parentRelative, name)");
  auto* w = new ConfinedStepWorker(env, ConfinedStepWorker::kLstat, info[0].As<Napi::String>().Utf8Value());
  w->rel_ = info[1].As<Napi::String>().Utf8Value();
  w->name_ = info[2].As<Napi::String>().Utf8Value();
  return Queue(w);
}

// syncClose(fd): fsync then close (closed even if the fsync fails).
Napi::Value SyncClose(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsNumber()) return ThrowTypeError(env, "syncClose(fd)");
  auto* w = new ConfinedStepWorker(env, ConfinedStepWorker::kSyncClose, "/");
  w->fd_ = info[0].As<Napi::Number>().Int32Value();
  return Queue(w);
}

void InitConfinedFs(Napi::Env env, Napi::Object exports) {
  exports.Set("openBeneath", Napi::Function::New(env, OpenBeneath));
  exports.Set("createBeneath", Napi::Function::New(env, CreateBeneath));
  exports.Set("mkdirBeneath", Napi::Function::New(env, MkdirBeneath));
  exports.Set("syncBeneath", Napi::Function::New(env, SyncBeneath));
  exports.Set("renameBeneath", Napi::Function::New(env, RenameBeneath));
  exports.Set("lstatBeneath", Napi::Function::New(env, LstatBeneath));
  exports.Set("syncClose", Napi::Function::New(env, SyncClose));
}
// ========================================================== end of confined file access

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("setRunDir", Napi::Function::New(env, SetRunDir));
  exports.Set("register", Napi::Function::New(env, Register));
  exports.Set("closeFd", Napi::Function::New(env, CloseFd));
  exports.Set("getCloexec", Napi::Function::New(env, GetCloexec));
  exports.Set("HangupWatcher", HangupWatcher::Init(env));
  exports.Set("killpath", Napi::Function::New(env, Killpath));
  exports.Set("restrict", Napi::Function::New(env, Restrict));
  exports.Set("acquire", Napi::Function::New(env, Acquire));
  exports.Set("acquireInquire", Napi::Function::New(env, AcquireInquire));
  exports.Set("release", Napi::Function::New(env, Release));
  exports.Set("convert", Napi::Function::New(env, Convert));
  exports.Set("inquire", Napi::Function::New(env, Inquire));
  exports.Set("request", Napi::Function::New(env, Request));
  exports.Set("setLvb", Napi::Function::New(env, SetLvb));
  exports.Set("getLvb", Napi::Function::New(env, GetLvb));
  exports.Set("addLockspace", Napi::Function::New(env, AddLockspace));
  exports.Set("inqLockspace", Napi::Function::New(env, InqLockspace));
  exports.Set("remLockspace", Napi::Function::New(env, RemLockspace));
  exports.Set("getLockspaces", Napi::Function::New(env, GetLockspaces));
  exports.Set("getHosts", Napi::Function::New(env, GetHosts));
  exports.Set("writeLockspace", Napi::Function::New(env, WriteLockspace));
  exports.Set("readLockspace", Napi::Function::New(env, ReadLockspace));
  exports.Set("writeResource", Napi::Function::New(env, WriteResource));
  exports.Set("readResource", Napi::Function::New(env, ReadResource));
  exports.Set("readResourceOwners", Napi::Function::New(env, ReadResourceOwners));
  exports.Set("align", Napi::Function::New(env, Align));
  exports.Set("version", Napi::Function::New(env, Version));
  exports.Set("strerror", Napi::Function::New(env, Strerror));
  InitConfinedFs(env, exports);  // confined file access (block above Init)
  exports.Set("peerCredentials", Napi::Function::New(env, PeerCredentials));
  return exports;
}

}  // namespace

NODE_API_MODULE(sanlock_addon, Init)
