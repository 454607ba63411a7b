// stepguard's ATen shim: the multi-tensor operators tch does not bind, and an operator counter.
//
// Built by runtime/build.rs with the flags torch-sys uses (C++17, the same
// _GLIBCXX_USE_CXX11_ABI). Tensors cross as `at::Tensor*` (tch's C_tensor). Every function
// catches C++ exceptions; nothing throws across `extern "C"`. A function returning `char*`
// returns null on success and never null on failure: the exception's text (malloc'd), or the
// static kNoMemory when that copy cannot be allocated; sg_free_error frees either. Outputs are
// `new at::Tensor(...)`, owned by the Rust side.

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_amp_foreach_non_finite_check_and_unscale.h>
#include <ATen/ops/_amp_update_scale.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_foreach_copy.h>
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/_foreach_sub.h>
#include <ATen/ops/_fused_adam.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/_fused_sgd.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/index_copy.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/empty.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/MT19937RNGEngine.h>
#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <ATen/record_function.h>
#include <c10/core/Event.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <cstdint>
#include <optional>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace {

// Set by sg_test_fail_next_error_alloc: the next copy of an error text fails as if malloc had
// returned null (for the test of that path).
thread_local bool g_fail_next_error_alloc = false;

// The error returned when the text of an exception cannot be copied: a failure must never read
// as success (null).
char kNoMemory[] = "stepguard's ATen shim failed and could not allocate the error's text";

char* error_text(const char* what) noexcept {
  if (what == nullptr) what = "C++ exception without a message in stepguard's ATen shim";
  char* out = nullptr;
  if (g_fail_next_error_alloc) {
    g_fail_next_error_alloc = false;
  } else {
    size_t n = std::strlen(what);
    out = static_cast<char*>(std::malloc(n + 1));
    if (out != nullptr) std::memcpy(out, what, n + 1);
  }
  return out != nullptr ? out : kNoMemory;
}

template <typename F>
char* guarded(F&& f) noexcept {
  try {
    f();
    return nullptr;
  } catch (const std::exception& e) {
    return error_text(e.what());
  } catch (...) {
    return error_text("unknown C++ exception in stepguard's ATen shim");
  }
}

// Tensors grouped by (device, dtype), as PyTorch's clip_grad_norm_ groups them: each group is
// one multi-tensor launch on CUDA. `order` receives the input index of each tensor, in group
// order.
std::vector<std::vector<at::Tensor>> groups_of(at::Tensor** ts, size_t n,
                                               std::vector<int64_t>& order) {
  std::vector<std::pair<std::pair<c10::Device, c10::ScalarType>,
                        std::pair<std::vector<at::Tensor>, std::vector<int64_t>>>>
      gs;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = *ts[i];
    auto key = std::make_pair(t.device(), t.scalar_type());
    auto it = gs.begin();
    for (; it != gs.end(); ++it) {
      if (it->first == key) break;
    }
    if (it == gs.end()) {
      gs.push_back({key, {}});
      it = gs.end() - 1;
    }
    it->second.first.push_back(t);
    it->second.second.push_back(static_cast<int64_t>(i));
  }
  std::vector<std::vector<at::Tensor>> out;
  for (auto& g : gs) {
    out.push_back(std::move(g.second.first));
    order.insert(order.end(), g.second.second.begin(), g.second.second.end());
  }
  return out;
}

thread_local long long g_ops = 0;
thread_local int g_depth = 0;
thread_local bool g_counting = false;
thread_local at::CallbackHandle g_handle = 0;

std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction&) {
  if (g_depth++ == 0) ++g_ops;  // operators called directly, not the ones they call
  return nullptr;
}

void on_end(const at::RecordFunction&, at::ObserverContext*) { --g_depth; }

std::vector<at::Tensor> list(at::Tensor** ts, size_t n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (size_t i = 0; i < n; ++i) v.push_back(*ts[i]);
  return v;
}

std::optional<at::Tensor> opt(const at::Tensor* t) {
  if (t == nullptr) return std::nullopt;
  return *t;
}

// The fused kernels loop over their lists and throw at the first tensor they cannot take, after
// updating the ones before it: everything they would refuse is refused here, before any of them
// runs. Parameters: defined, floating, one device and one dtype.
void check_params(const std::vector<at::Tensor>& params) {
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    TORCH_CHECK(p.defined(), "stepguard: parameter ", i, " is undefined");
    TORCH_CHECK(at::isFloatingType(p.scalar_type()), "stepguard: parameter ", i, " is ",
                p.scalar_type(), "; the fused kernels take floating parameters");
    TORCH_CHECK(p.device() == params[0].device() && p.scalar_type() == params[0].scalar_type(),
                "stepguard: parameter ", i, " is ", p.scalar_type(), " on ", p.device(),
                ", parameter 0 ", params[0].scalar_type(), " on ", params[0].device());
  }
}

// Each of `ts` (none, or one per parameter) of its parameter's device, dtype and sizes.
void check_like(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& ts,
                const char* what) {
  TORCH_CHECK(ts.empty() || ts.size() == params.size(), "stepguard: ", ts.size(), " ", what,
              " for ", params.size(), " parameters");
  for (size_t i = 0; i < ts.size(); ++i) {
    const auto& p = params[i];
    const auto& t = ts[i];
    TORCH_CHECK(t.defined(), "stepguard: ", what, " ", i, " is undefined");
    TORCH_CHECK(t.device() == p.device() && t.scalar_type() == p.scalar_type() &&
                    t.sizes() == p.sizes(),
                "stepguard: ", what, " ", i, " is ", t.scalar_type(), " ", t.sizes(), " on ",
                t.device(), ", its parameter ", p.scalar_type(), " ", p.sizes(), " on ",
                p.device());
  }
}

// One step counter per parameter, a single element on the parameter's device.
void check_steps(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& steps) {
  TORCH_CHECK(steps.size() == params.size(), "stepguard: ", steps.size(),
              " step counters for ", params.size(), " parameters");
  for (size_t i = 0; i < steps.size(); ++i) {
    const auto& t = steps[i];
    TORCH_CHECK(t.defined() && t.numel() == 1 && t.device() == params[i].device(),
                "stepguard: step counter ", i, " is not one element on ", params[i].device());
  }
}

// The states of the default random generators (the CPU's and each CUDA device's) at one
// moment, restored into the live generators before a failed call is replayed, so that it draws
// the same numbers (dropout masks) again. An object is reused from call to call (see
// sg_generators_save); the CPU's state is held by value (no allocation).
struct Generators {
  at::mt19937_data_pod cpu{};  // the CPU's Mersenne Twister
  bool has_cpu = false;        // `cpu` was filled by a save
  std::optional<float> cpu_float_normal;
  std::optional<double> cpu_double_normal;
  std::vector<std::pair<c10::DeviceIndex, at::Generator>> cuda;
};

// The live state of the CPU generator's Mersenne Twister, read in place: libtorch's only
// accessor, CPUGeneratorImpl::engine(), returns a copy (2.5 KB, every call). The pointers to
// the two private members come from explicit instantiations, where access checks do not apply
// ([temp.explicit]/12 in C++17); they are formed from the classes' own declarations in
// libtorch's headers, so they follow their layout. Read or written under the generator's mutex.
template <typename Tag, typename Tag::type Member>
struct Expose {
  friend typename Tag::type member(Tag) { return Member; }
};
struct CpuEngine {
  using type = at::mt19937 at::CPUGeneratorImpl::*;
  friend type member(CpuEngine);
};
struct EngineData {
  using type = at::mt19937_data_pod at::mt19937::*;
  friend type member(EngineData);
};
template struct Expose<CpuEngine, &at::CPUGeneratorImpl::engine_>;
template struct Expose<EngineData, &at::mt19937::data_>;

// The CPU's default generator, its handle not copied (lock its mutex_ to use it).
at::CPUGeneratorImpl* default_cpu_generator() {
  return at::detail::getDefaultCPUGenerator().get<at::CPUGeneratorImpl>();
}

const at::mt19937_data_pod& live_state(const at::CPUGeneratorImpl* cpu) {
  return (cpu->*member(CpuEngine{})).*member(EngineData{});
}

// Whether a saved state is still the live one, told without reading all of it: a generator
// that drew numbers since is at another position, or, when it drew a whole multiple of the 624
// words, has twisted its state, which changes every word; four words are compared (a twisted
// state that kept all four is a 2^-128 chance, and would only make a replay draw other masks
// and say "not reproduced").
bool same_state(const at::mt19937_data_pod& a, const at::mt19937_data_pod& b) {
  constexpr size_t last = at::MERSENNE_STATE_N - 1;
  return a.seed_ == b.seed_ && a.left_ == b.left_ && a.next_ == b.next_ &&
         a.seeded_ == b.seeded_ && a.state_[0] == b.state_[0] &&
         a.state_[1] == b.state_[1] && a.state_[last / 2] == b.state_[last / 2] &&
         a.state_[last] == b.state_[last];
}

// Whether CUDA is available (asked once: the answer does not change within a process).
bool has_cuda() {
  static const bool yes = at::globalContext().hasCUDA();
  return yes;
}

}  // namespace

extern "C" {

void sg_free_error(char* e) {
  if (e != kNoMemory) std::free(e);
}

// The next error text of this thread is not allocated, as if malloc failed (tests only).
void sg_test_fail_next_error_alloc() { g_fail_next_error_alloc = true; }

// The identity of `t`: the address of its TensorImpl (0 for an undefined tensor), shared by
// every handle of one tensor (tch's shallow clones, a VarStore's variable and an optimizer's
// copy of it) and unique among live tensors whatever their size; and in `data` where its
// elements live (0 when it has none: zero-size, no storage, not strided).
uintptr_t sg_identity(const at::Tensor* t, uintptr_t* data) noexcept {
  *data = 0;
  if (!t->defined()) return 0;
  try {
    if (t->layout() == c10::kStrided && t->has_storage() && t->numel() > 0) {
      *data = reinterpret_cast<uintptr_t>(t->const_data_ptr());
    }
  } catch (...) {
    *data = 0;
  }
  return reinterpret_cast<uintptr_t>(t->unsafeGetTensorImpl());
}

// Where the CPU fast path may read each tensor of `ts` directly: a defined, strided, contiguous
// CPU tensor of f32 or f64 with storage and no negative/conjugate view bit. For each tensor,
// writes its data pointer, element count and flags (bit 0: f64, else f32; bit 1: requires
// grad; bit 2: undefined, skipped). `mode`: bit 0, undefined tensors are skipped (else they do
// not qualify); bit 1, the memory is only read: `requires_grad` is not asked (bit 1 of the
// flags stays 0). Returns false as soon
// as one tensor does not qualify (the outputs are then partial). One call for a whole list:
// asking tch tensor by tensor costs several calls each.
bool sg_host_layout(at::Tensor* const* ts, size_t n, uint8_t mode, void** ptrs, int64_t* numels,
                    uint8_t* flags) noexcept {
  const bool skip_undefined = (mode & 1) != 0, read_only = (mode & 2) != 0;
  const auto f32 = caffe2::TypeMeta::Make<float>(), f64 = caffe2::TypeMeta::Make<double>();
  try {
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& t = *ts[i];
      if (!t.defined()) {
        if (!skip_undefined) return false;
        ptrs[i] = nullptr;
        numels[i] = 0;
        flags[i] = 4;
        continue;
      }
      const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
      if (impl->device_type() != c10::kCPU || impl->layout() != c10::kStrided) return false;
      const auto dtype = impl->dtype();
      if (dtype != f32 && dtype != f64) return false;
      if (!impl->has_storage() || impl->is_neg() || impl->is_conj() || !impl->is_contiguous()) {
        return false;
      }
      // A read takes the data as it is; a write takes it for writing (a copy-on-write storage
      // is materialized first).
      ptrs[i] = read_only ? const_cast<void*>(t.const_data_ptr()) : t.data_ptr();
      numels[i] = impl->numel();
      const bool grad = !read_only && impl->requires_grad();
      flags[i] = static_cast<uint8_t>((dtype == f64 ? 1 : 0) | (grad ? 2 : 0));
    }
    return true;
  } catch (...) {
    return false;
  }
}

// The defined grads of the `n` tensors of `ts`, in order, in `out` (room for `n`): the
// addresses of the `at::Tensor`s their autograd metadata holds, no new handles (the caller
// must not delete them); `*count` receives how many. One call for a list.
char* sg_grad_refs(at::Tensor* const* ts, size_t n, at::Tensor** out, size_t* count) {
  size_t k = 0;
  char* e = guarded([&] {
    for (size_t i = 0; i < n; ++i) {
      // The TensorImpl's own: `Tensor::grad()` asks `is_leaf()` first, only to warn about the
      // grad of a non-leaf tensor (which is undefined: skipped here).
      const at::Tensor& g = ts[i]->unsafeGetTensorImpl()->grad();
      if (g.defined()) out[k++] = const_cast<at::Tensor*>(&g);
    }
  });
  *count = e == nullptr ? k : 0;
  return e;
}

// The version counters of the `n` tensors of `ts` (what in-place writes bump) in `out`: -1
// for an undefined tensor or one without a counter (an inference tensor).
void sg_versions(at::Tensor* const* ts, size_t n, int64_t* out) noexcept {
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = *ts[i];
    if (!t.defined()) {
      out[i] = -1;
      continue;
    }
    const auto& counter = t.unsafeGetTensorImpl()->version_counter();
    out[i] = counter.enabled() ? static_cast<int64_t>(counter.current_version()) : -1;
  }
}

// Deletes the `n` handles of `ts` (what tch's `Drop` does for one, in one call for a list).
void sg_release(at::Tensor** ts, size_t n) noexcept {
  for (size_t i = 0; i < n; ++i) delete ts[i];
}

// A new handle on the data of `t` without its autograd history, as `t.detach()` but without
// dispatching an operator: `variable_data()` (the same storage and metadata, no autograd meta,
// a version counter of its own). For a value stepguard keeps only to read it (a loss).
char* sg_detached(const at::Tensor* t, at::Tensor** out) {
  return guarded([&] { *out = new at::Tensor(t->variable_data()); });
}

// Per-tensor norms of `ts` (one _foreach_norm per (device, dtype) group, f16/bf16 accumulated
// and returned in f32), as one f64 vector on the first tensor's device, in the order of `ts`.
char* sg_foreach_norms(at::Tensor** ts, size_t n, double ord, at::Tensor** out) {
  return guarded([&] {
    TORCH_CHECK(n > 0, "stepguard: _foreach_norm of no tensors");
    auto device = ts[0]->device();
    std::vector<at::Tensor> parts;
    std::vector<int64_t> order;
    for (auto& g : groups_of(ts, n, order)) {
      auto st = g[0].scalar_type();
      std::optional<at::ScalarType> dtype = std::nullopt;
      if (st == at::kHalf || st == at::kBFloat16) dtype = at::kFloat;
      auto norms = at::_foreach_norm(g, ord, dtype);
      parts.push_back(at::stack(norms).to(device, at::kDouble));
    }
    if (parts.size() == 1) {
      *out = new at::Tensor(parts[0]);
      return;
    }
    // Back to the order of `ts`: result[order[k]] = cat[k].
    auto cat = at::cat(parts);
    auto index = at::tensor(order, at::TensorOptions().dtype(at::kLong)).to(device);
    *out = new at::Tensor(at::zeros_like(cat).index_copy_(0, index, cat));
  });
}

// Multiplies every tensor of `ts` by the 0-dim tensor `coef`, in place (one _foreach_mul_ per
// device).
char* sg_foreach_mul_(at::Tensor** ts, size_t n, const at::Tensor* coef) {
  return guarded([&] {
    std::vector<std::pair<c10::Device, std::vector<at::Tensor>>> by_device;
    for (size_t i = 0; i < n; ++i) {
      auto d = ts[i]->device();
      auto it = by_device.begin();
      for (; it != by_device.end(); ++it) {
        if (it->first == d) break;
      }
      if (it == by_device.end()) {
        by_device.push_back({d, {}});
        it = by_device.end() - 1;
      }
      it->second.push_back(*ts[i]);
    }
    for (auto& g : by_device) {
      auto c = coef->device() == g.first ? *coef : coef->to(g.first);
      at::_foreach_mul_(g.second, c);
    }
  });
}

// One step of Adam (adamw = false) or AdamW over tensors on one device and of one dtype, as
// torch.optim does it with fused=True: the kernel sees the step counters plus one and, with
// `found_inf`, the counters become that minus found_inf, so a skipped step leaves them (and, in
// the kernel, params and moments) untouched without a host read. The counters are written only
// after the kernel succeeded: a step it refuses changes nothing. Every list holds `n` tensors;
// `max_exp_avg_sqs` holds `n_max`: n with amsgrad, else 0 or n.
char* sg_fused_adam_(at::Tensor** params, at::Tensor** grads, at::Tensor** exp_avgs,
                     at::Tensor** exp_avg_sqs, at::Tensor** max_exp_avg_sqs, size_t n_max,
                     at::Tensor** steps, size_t n, double lr, double beta1, double beta2,
                     double weight_decay, double eps, bool amsgrad, bool adamw,
                     const at::Tensor* grad_scale, const at::Tensor* found_inf) {
  return guarded([&] {
    auto p = list(params, n);
    auto g = list(grads, n);
    auto m = list(exp_avgs, n);
    auto v = list(exp_avg_sqs, n);
    auto mx = list(max_exp_avg_sqs, n_max);
    auto st = list(steps, n);
    check_params(p);
    check_like(p, g, "grads");
    check_like(p, m, "exp_avgs");
    check_like(p, v, "exp_avg_sqs");
    check_like(p, mx, "max_exp_avg_sqs");
    TORCH_CHECK(!amsgrad || mx.size() == n, "stepguard: amsgrad without max_exp_avg_sqs");
    check_steps(p, st);
    auto next = at::_foreach_add(st, 1);
    if (adamw) {
      at::_fused_adamw_(p, g, m, v, mx, next, lr, beta1, beta2, weight_decay, eps, amsgrad,
                        false, opt(grad_scale), opt(found_inf));
    } else {
      at::_fused_adam_(p, g, m, v, mx, next, lr, beta1, beta2, weight_decay, eps, amsgrad, false,
                       opt(grad_scale), opt(found_inf));
    }
    if (found_inf != nullptr) {
      at::_foreach_sub_(next, std::vector<at::Tensor>(n, *found_inf));
    }
    at::_foreach_copy_(st, next);
  });
}

// One step of SGD over tensors on one device and of one dtype (`momentum_buffers`: n_buf = 0
// without momentum, else n), as torch.optim's fused SGD.
char* sg_fused_sgd_(at::Tensor** params, at::Tensor** grads, at::Tensor** momentum_buffers,
                    size_t n_buf, size_t n, double weight_decay, double momentum, double lr,
                    double dampening, bool nesterov, bool is_first_step,
                    const at::Tensor* grad_scale, const at::Tensor* found_inf) {
  return guarded([&] {
    auto p = list(params, n);
    auto g = list(grads, n);
    auto b = list(momentum_buffers, n_buf);
    check_params(p);
    check_like(p, g, "grads");
    check_like(p, b, "momentum buffers");
    TORCH_CHECK(momentum == 0.0 || b.size() == n, "stepguard: momentum without buffers");
    at::_fused_sgd_(p, g, b, weight_decay, momentum, lr, dampening, nesterov, false,
                    is_first_step, opt(grad_scale), opt(found_inf));
  });
}

// One step of SGD without momentum or weight decay over parameters whose grads are sparse, which
// no fused kernel takes: `param.add_(grad, -lr)` for each, the operation torch.optim.SGD (and
// tch's nn::Sgd) runs for them. With `grad_scale` (a 0-dim tensor on the parameters' device),
// each grad is first divided by it in place, as the fused kernels write their unscaled grads
// back. Each of the n parameters is dense, of its sparse grad's dtype, device and sizes:
// checked for all of them before any changes.
char* sg_sgd_sparse_(at::Tensor** params, at::Tensor** grads, size_t n, double lr,
                     const at::Tensor* grad_scale) {
  return guarded([&] {
    auto p = list(params, n);
    auto g = list(grads, n);
    for (size_t i = 0; i < n; ++i) {
      TORCH_CHECK(p[i].defined() && p[i].layout() == c10::kStrided, "stepguard: parameter ", i,
                  " is not a dense tensor");
      TORCH_CHECK(g[i].defined() && g[i].is_sparse(), "stepguard: grad ", i, " is not sparse");
      TORCH_CHECK(g[i].device() == p[i].device() && g[i].scalar_type() == p[i].scalar_type() &&
                      g[i].sizes() == p[i].sizes(),
                  "stepguard: grad ", i, " is ", g[i].scalar_type(), " ", g[i].sizes(), " on ",
                  g[i].device(), ", its parameter ", p[i].scalar_type(), " ", p[i].sizes(),
                  " on ", p[i].device());
      TORCH_CHECK(grad_scale == nullptr || grad_scale->device() == p[i].device(),
                  "stepguard: grad_scale on ", grad_scale->device(), ", parameter ", i, " on ",
                  p[i].device());
    }
    for (size_t i = 0; i < n; ++i) {
      if (grad_scale != nullptr) g[i].div_(*grad_scale);
      p[i].add_(g[i], -lr);
    }
  });
}

// Dynamic loss scaling, as torch.amp.GradScaler does it. Unscales `grads` in place by the 0-dim
// f32 `inv_scale` (one _amp_foreach_non_finite_check_and_unscale_ per (device, dtype) group, as
// GradScaler groups them) and returns in *found_inf a 0-dim f32 on inv_scale's device: > 0 when a
// grad held NaN/Inf.
char* sg_amp_unscale_(at::Tensor** grads, size_t n, const at::Tensor* inv_scale,
                      at::Tensor** found_inf) {
  return guarded([&] {
    auto home = inv_scale->device();
    auto total = at::zeros({}, inv_scale->options().dtype(at::kFloat));
    std::vector<int64_t> order;
    for (auto& g : groups_of(grads, n, order)) {
      auto d = g[0].device();
      auto inv = d == home ? *inv_scale : inv_scale->to(d, /*non_blocking=*/true);
      auto found = at::zeros({}, inv.options().dtype(at::kFloat));
      at::_amp_foreach_non_finite_check_and_unscale_(g, found, inv);
      total.add_(d == home ? found : found.to(home, /*non_blocking=*/true));
    }
    *found_inf = new at::Tensor(total);
  });
}

// scale and growth_tracker updated in place from found_inf (GradScaler.update), then the scale
// kept at or above min_scale.
char* sg_amp_update_scale_(at::Tensor* scale, at::Tensor* growth_tracker,
                           const at::Tensor* found_inf, double growth_factor,
                           double backoff_factor, int64_t growth_interval, double min_scale) {
  return guarded([&] {
    at::_amp_update_scale_(*scale, *growth_tracker, *found_inf, growth_factor, backoff_factor,
                           growth_interval);
    scale->clamp_min_(min_scale);
  });
}

// Turns autocast on or off for `device_type` (0: CPU, 1: CUDA) with the dtype `bf16` ? bfloat16
// : float16, as torch.autocast's __enter__; the previous state goes to *was_enabled /
// *was_bf16. Exit with sg_autocast_exit.
char* sg_autocast_enter(int device_type, bool bf16, bool* was_enabled, bool* was_bf16) {
  return guarded([&] {
    auto dt = device_type == 1 ? at::kCUDA : at::kCPU;
    *was_enabled = at::autocast::is_autocast_enabled(dt);
    *was_bf16 = at::autocast::get_autocast_dtype(dt) == at::kBFloat16;
    at::autocast::set_autocast_enabled(dt, true);
    at::autocast::set_autocast_dtype(dt, bf16 ? at::kBFloat16 : at::kHalf);
    at::autocast::increment_nesting();
  });
}

char* sg_autocast_exit(int device_type, bool was_enabled, bool was_bf16) {
  return guarded([&] {
    auto dt = device_type == 1 ? at::kCUDA : at::kCPU;
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(dt, was_enabled);
    at::autocast::set_autocast_dtype(dt, was_bf16 ? at::kBFloat16 : at::kHalf);
  });
}

// Starts copying `src` (on a device) to pinned host memory without blocking, and records an
// event on the device's current stream after the copy: the host reads the copy after
// sg_event_synchronize, which waits for that copy only, not for work queued later.
char* sg_copy_to_host_async(const at::Tensor* src, at::Tensor** dst, void** event) {
  return guarded([&] {
    auto host = at::empty(src->sizes(), src->options().device(c10::kCPU).pinned_memory(true));
    host.copy_(*src, /*non_blocking=*/true);
    auto type = src->device().type();
    auto ev = std::make_unique<c10::Event>(type);
    ev->record(c10::impl::getDeviceGuardImpl(type)->getStream(src->device()));
    *dst = new at::Tensor(host);
    *event = ev.release();
  });
}

char* sg_event_synchronize(void* event) {
  return guarded([&] { static_cast<c10::Event*>(event)->synchronize(); });
}

void sg_event_free(void* event) { delete static_cast<c10::Event*>(event); }

// A new, empty Generators (for sg_generators_save to fill, again and again).
char* sg_generators_new(void** out) {
  return guarded([&] { *out = new Generators(); });
}

// Copies the default generators' states into `saved` (the CUDA devices' only where CUDA is
// available): no device work, no allocation for the CPU's, and no copy of it either when
// `saved` (reused from an earlier call) still holds the live state, as it does after a call
// that drew no random numbers.
char* sg_generators_save(void* saved) {
  return guarded([&] {
    auto* s = static_cast<Generators*>(saved);
    {
      auto* cpu = default_cpu_generator();
      std::lock_guard<std::mutex> lock(cpu->mutex_);
      const auto& live = live_state(cpu);
      if (!s->has_cpu || !same_state(s->cpu, live)) {
        s->cpu = live;
        s->has_cpu = true;
      }
      s->cpu_float_normal = cpu->next_float_normal_sample();
      s->cpu_double_normal = cpu->next_double_normal_sample();
    }
    s->cuda.clear();
    if (has_cuda()) {
      const auto n = at::detail::getCUDAHooks().deviceCount();
      for (c10::DeviceIndex i = 0; i < n; ++i) {
        auto g = at::globalContext().defaultGenerator(c10::Device(c10::kCUDA, i));
        std::lock_guard<std::mutex> lock(g.mutex());
        s->cuda.emplace_back(i, g.clone());
      }
    }
  });
}

// Writes saved states back into the default generators.
char* sg_generators_restore(const void* saved) {
  return guarded([&] {
    const auto* s = static_cast<const Generators*>(saved);
    {
      // The CPU's default generator (a CPUGeneratorImpl), its handle not copied.
      auto* cpu = default_cpu_generator();
      std::lock_guard<std::mutex> lock(cpu->mutex_);
      TORCH_CHECK(s->has_cpu, "stepguard: no generator state was saved");
      at::mt19937 engine;
      engine.set_data(s->cpu);
      cpu->set_engine(engine);
      cpu->set_next_float_normal_sample(s->cpu_float_normal);
      cpu->set_next_double_normal_sample(s->cpu_double_normal);
    }
    for (const auto& [i, saved_gen] : s->cuda) {
      auto live = at::globalContext().defaultGenerator(c10::Device(c10::kCUDA, i));
      auto state = saved_gen.get_state();
      std::lock_guard<std::mutex> lock(live.mutex());
      live.set_state(state);
    }
  });
}

void sg_generators_free(void* saved) { delete static_cast<Generators*>(saved); }

// The number of CUDA devices (0 without CUDA).
int64_t sg_cuda_devices() noexcept {
  try {
    return has_cuda() ? static_cast<int64_t>(at::detail::getCUDAHooks().deviceCount()) : 0;
  } catch (...) {
    return 0;
  }
}

// The default generator of `device`: -1 the CPU's, else that CUDA device's.
static at::Generator default_generator(int64_t device) {
  if (device < 0) return at::detail::getDefaultCPUGenerator();
  return at::globalContext().defaultGenerator(
      c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(device)));
}

// The state of a default generator (`device` -1: the CPU's, else that CUDA device's) as a new
// uint8 CPU tensor, what `torch.get_rng_state()` / `torch.cuda.get_rng_state(i)` return.
char* sg_rng_state(int64_t device, at::Tensor** out) {
  return guarded([&] {
    at::Generator gen = default_generator(device);
    std::lock_guard<std::mutex> lock(gen.mutex());
    *out = new at::Tensor(gen.get_state());
  });
}

// Sets a default generator's state (as `sg_rng_state` returns it); libtorch checks its size.
char* sg_rng_set_state(int64_t device, const at::Tensor* state) {
  return guarded([&] {
    at::Generator gen = default_generator(device);
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(*state);
  });
}

// Turns the recording of ATen operators (RecordFunction callbacks) on this thread on or off;
// returns whether it was on. The guard's own operators are not the step's.
bool sg_record_functions(bool enable) noexcept {
  const bool was = at::isRecordFunctionEnabled();
  at::enableRecordFunction(enable);
  return was;
}

// Starts counting the ATen operators called on this thread (only the outermost ones).
char* sg_count_ops_begin() {
  return guarded([&] {
    if (g_counting) return;
    g_ops = 0;
    g_depth = 0;
    g_handle = at::addThreadLocalCallback(at::RecordFunctionCallback(on_start, on_end)
                                              .scopes({at::RecordScope::FUNCTION}));
    g_counting = true;
  });
}

// Stops counting; the number of operators since sg_count_ops_begin.
char* sg_count_ops_end(long long* ops) {
  return guarded([&] {
    if (g_counting) {
      at::removeCallback(g_handle);
      g_counting = false;
    }
    *ops = g_ops;
  });
}

}  // extern "C"
