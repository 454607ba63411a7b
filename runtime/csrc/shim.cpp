// stepguard's ATen shim: the multi-tensor operators tch does not bind, and an operator counter.
//
// Built by runtime/build.rs with the flags torch-sys uses (C++17, the same
// _GLIBCXX_USE_CXX11_ABI). Tensors cross as `at::Tensor*` (tch's C_tensor). Every function
// catches C++ exceptions and returns their text (malloc'd, freed by sg_free_error); nothing
// throws across `extern "C"`. Outputs are `new at::Tensor(...)`, owned by the Rust side.

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/index_copy.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/ops/stack.h>
#include <ATen/record_function.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <utility>
#include <vector>

namespace {

char* error_text(const char* what) {
  size_t n = std::strlen(what);
  char* out = static_cast<char*>(std::malloc(n + 1));
  if (out != nullptr) std::memcpy(out, what, n + 1);
  return out;
}

template <typename F>
char* guarded(F&& f) {
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

}  // namespace

extern "C" {

void sg_free_error(char* e) { std::free(e); }

// Per-tensor norms of `ts` (one _foreach_norm per (device, dtype) group, f16/bf16 accumulated
// and returned in f32), as one f64 vector on the first tensor's device, in the order of `ts`.
char* sg_foreach_norms(at::Tensor** ts, size_t n, double ord, at::Tensor** out) {
  return guarded([&] {
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
