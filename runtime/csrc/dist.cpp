// stepguard's bridge to PyTorch's c10d (the engine of torch.distributed): a TCPStore for the
// rendezvous, ProcessGroupGloo for CPU tensors and, where compiled in (csrc/dist_nccl.cpp),
// ProcessGroupNCCL for CUDA tensors.
//
// Built by runtime/build.rs with -DUSE_C10D_GLOO and csrc/include (the few Gloo declarations
// ProcessGroupGloo.hpp needs; the wheel ships no Gloo headers) before the torch include path.
// Tensors cross as `at::Tensor*` (tch's C_tensor). Every function catches C++ exceptions and
// returns their text (malloc'd, or the static kNoMemory when that copy cannot be allocated:
// never null; freed by sg_dist_free_error) with a kind; nothing throws across `extern "C"`.

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/exception.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <vector>

#ifdef SG_WITH_NCCL
// csrc/dist_nccl.cpp: a ProcessGroupNCCL over `store` (lazy: communicators on first use).
c10::intrusive_ptr<c10d::Backend> sg_nccl_backend(const c10::intrusive_ptr<c10d::Store>& store,
                                                 int rank, int size,
                                                 std::chrono::milliseconds timeout);
#endif

namespace {

// Kinds of error, mirrored by `ffi::Kind` on the Rust side.
enum Kind : int {
  kOther = 0,
  kTimeout = 1,   // c10d::TimeoutError, or a Gloo "Timed out" message
  kNetwork = 2,   // c10::DistNetworkError (a peer closed its connection, refused, reset)
  kStore = 3,     // c10::DistStoreError (the rendezvous store)
  kBackend = 4,   // c10::DistBackendError
};

// Returned when the text of an exception cannot be copied: a failure must never read as
// success (null).
char kNoMemory[] = "stepguard's c10d bridge failed and could not allocate the error's text";

char* error_text(const char* what) noexcept {
  if (what == nullptr) what = "C++ exception without a message in stepguard's c10d bridge";
  size_t n = std::strlen(what);
  char* out = static_cast<char*>(std::malloc(n + 1));
  if (out == nullptr) return kNoMemory;
  std::memcpy(out, what, n + 1);
  return out;
}

template <typename F>
char* guarded(int* kind, F&& f) {
  *kind = kOther;
  try {
    f();
    return nullptr;
  } catch (const c10d::TimeoutError& e) {
    *kind = kTimeout;
    return error_text(e.what_without_backtrace());
  } catch (const c10::DistNetworkError& e) {
    *kind = kNetwork;
    return error_text(e.what_without_backtrace());
  } catch (const c10::DistStoreError& e) {
    *kind = kStore;
    return error_text(e.what_without_backtrace());
  } catch (const c10::DistBackendError& e) {
    *kind = kBackend;
    return error_text(e.what_without_backtrace());
  } catch (const c10::Error& e) {
    return error_text(e.what_without_backtrace());
  } catch (const std::exception& e) {
    // Gloo's own exceptions (gloo::IoException, gloo::EnforceNotMet) are std::runtime_errors.
    return error_text(e.what());
  } catch (...) {
    return error_text("unknown C++ exception in stepguard's c10d bridge");
  }
}

bool is_loopback(const std::string& host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}

using Clock = std::chrono::steady_clock;

// The time left until `deadline`, at least 1 ms (c10d reads 0 as "no timeout"); a TimeoutError
// naming `stage` once it has passed.
std::chrono::milliseconds left_until(Clock::time_point deadline, const char* stage) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  if (left.count() <= 0) {
    C10D_THROW_ERROR(TimeoutError, "the timeout ran out before ", stage);
  }
  return left;
}

std::string joined_key(int rank) { return "stepguard/joined/" + std::to_string(rank); }

// Every rank announces itself under its own key; the rank that serves the store waits for all of
// them until `deadline` and names those that did not come. (TCPStore's own wait for its workers
// counts whole seconds and overshoots the timeout by up to one.)
void join(c10d::Store& store, int rank, int size, bool serve, Clock::time_point deadline,
          const std::string& where) {
  store.set(joined_key(rank), std::vector<std::uint8_t>{1});
  if (!serve) return;
  std::vector<std::string> keys;
  for (int r = 0; r < size; ++r) keys.push_back(joined_key(r));
  try {
    store.wait(keys, left_until(deadline, "every rank joined the store"));
    return;
  } catch (const c10::Error&) {
    // Timed out: name the ranks still missing below (a broken store throws again there).
  }
  std::string missing;
  int count = 0;
  for (int r = 0; r < size; ++r) {
    if (store.check({joined_key(r)})) continue;
    missing += (count++ == 0 ? "" : ", ") + std::to_string(r);
  }
  if (count == 0) return;  // the last one came just as the wait gave up
  C10D_THROW_ERROR(TimeoutError, count == 1 ? "rank " : "ranks ", missing,
                   " did not join the store at ", where, " within the timeout (", size - count,
                   " of ", size, " joined)");
}

}  // namespace

struct SgGroup {
  c10::intrusive_ptr<c10d::Store> tcp;    // the TCPStore (this process's or torchrun's agent's)
  c10::intrusive_ptr<c10d::Store> store;  // its keys of this start of the group
  c10::intrusive_ptr<c10d::Backend> gloo;
  c10::intrusive_ptr<c10d::Backend> nccl;  // created on the first CUDA collective
  std::mutex nccl_mutex;
  int rank = 0;
  int size = 1;
  std::chrono::milliseconds timeout{0};

  c10d::Backend& backend_for(const at::Tensor& t) {
    if (!t.is_cuda()) return *gloo;
#ifdef SG_WITH_NCCL
    std::lock_guard<std::mutex> lock(nccl_mutex);
    if (!nccl) {
      auto prefixed = c10::make_intrusive<c10d::PrefixStore>("nccl", store);
      nccl = sg_nccl_backend(prefixed, rank, size, timeout);
    }
    return *nccl;
#else
    TORCH_CHECK(false,
                "stepguard::dist: a CUDA tensor, but this build has no NCCL backend "
                "(nccl.h was not found when stepguard was compiled)");
#endif
  }
};

extern "C" {

void sg_dist_free_error(char* e) {
  if (e != kNoMemory) std::free(e);
}

bool sg_dist_has_nccl() {
#ifdef SG_WITH_NCCL
  return true;
#else
  return false;
#endif
}

// Rendezvous at host:port (if `serve`, this process serves the TCPStore and waits for the
// others; under torchrun its agent serves it), then the Gloo process group. `timeout_ms` bounds
// the rendezvous as a whole (each stage gets what is left of it) and then every collective.
// A client's TCPStore may still overshoot it (libtorch retries a failed connection after a
// backoff, and waits for the store's first answer without a limit): the Rust side
// (dist/rendezvous.rs) first makes sure the store accepts connections, and gives up on this
// call at the deadline.
char* sg_dist_new(const char* host, int port, int rank, int size, bool serve, uint32_t attempt,
                  int64_t timeout_ms, SgGroup** out, int* kind) {
  return guarded(kind, [&] {
    auto g = std::make_unique<SgGroup>();
    g->rank = rank;
    g->size = size;
    g->timeout = std::chrono::milliseconds(timeout_ms);
    const auto deadline = Clock::now() + g->timeout;
    std::string h(host);
    const std::string where = h + ":" + std::to_string(port);
    c10d::TCPStoreOptions o;
    o.port = static_cast<std::uint16_t>(port);
    o.isServer = serve;
    o.numWorkers = static_cast<std::size_t>(size);
    o.waitWorkers = false;  // `join` below, to the deadline
    o.timeout = g->timeout;
    g->tcp = c10::make_intrusive<c10d::TCPStore>(h, o);
    // Every start of the group (torchrun's restarts keep its agent's store, keys and all) under
    // keys of its own, as PyTorch's rendezvous does: a restart never reads an earlier start's.
    g->store = c10::make_intrusive<c10d::PrefixStore>(
        "/stepguard/attempt_" + std::to_string(attempt), g->tcp);
    join(*g->store, rank, size, serve, deadline, where);
    // Gloo's exchange of addresses goes through the store: both wait what is left.
    const auto left = left_until(deadline, "the Gloo process group was created");
    g->tcp->setTimeout(left);
    g->store->setTimeout(left);
    auto opts = c10d::ProcessGroupGloo::Options::create(left);
    // As torch.distributed: GLOO_SOCKET_IFNAME names the interface; else this host's own
    // address (the default device). On loopback rendezvous, the loopback address.
    const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
    if (ifname != nullptr && *ifname != '\0') {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
    } else if (is_loopback(h)) {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(h));
    } else {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>("gloo", g->store);
    g->gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, size, opts);
    // Past the rendezvous, the whole timeout again: for every collective (their contexts'
    // default) and NCCL's bootstrap through the store (on the first CUDA collective).
    g->gloo->setTimeout(g->timeout);
    g->tcp->setTimeout(g->timeout);
    g->store->setTimeout(g->timeout);
    *out = g.release();
  });
}

void sg_dist_free(SgGroup* g) {
  try {
    delete g;
  } catch (...) {
  }
}

// In-place all-reduce of one tensor: op 0 sum, 1 max, 2 min.
char* sg_dist_all_reduce(SgGroup* g, at::Tensor* t, int op, int* kind) {
  return guarded(kind, [&] {
    std::vector<at::Tensor> ts{*t};
    c10d::AllreduceOptions opts;
    opts.reduceOp = op == 1 ? c10d::ReduceOp::MAX
                            : (op == 2 ? c10d::ReduceOp::MIN : c10d::ReduceOp::SUM);
    opts.timeout = g->timeout;
    auto work = g->backend_for(*t).allreduce(ts, opts);
    work->wait();
  });
}

// In-place broadcast of one tensor from `root`.
char* sg_dist_broadcast(SgGroup* g, at::Tensor* t, int root, int* kind) {
  return guarded(kind, [&] {
    std::vector<at::Tensor> ts{*t};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.timeout = g->timeout;
    auto work = g->backend_for(*t).broadcast(ts, opts);
    work->wait();
  });
}

char* sg_dist_barrier(SgGroup* g, int* kind) {
  return guarded(kind, [&] {
    c10d::BarrierOptions opts;
    opts.timeout = g->timeout;
    g->gloo->barrier(opts)->wait();
  });
}

// Gives a variable whose gradient is undefined a zero gradient, so every rank contributes the
// same tensors to the gradient average.
char* sg_dist_ensure_grad(at::Tensor* t, int* kind) {
  return guarded(kind, [&] {
    if (!t->grad().defined()) t->mutable_grad() = at::zeros_like(*t);
  });
}

}  // extern "C"
