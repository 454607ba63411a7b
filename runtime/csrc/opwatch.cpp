// stepguard's ATen observer: records the operators of a replayed step, with the finiteness of
// what each read and wrote, so that the Rust side (runtime/src/replay/) can name the operator
// where the first NaN/Inf was born.
//
// Built by runtime/build.rs as its own unit, with the flags of shim.cpp and -DNDEBUG (without
// it at::RecordFunction has a debug-only member, a layout different from the release libtorch's,
// and every operator asserts in inputs()). See shared/design/replay.md for the facts this relies
// on.
//
// - One *global* RecordFunction callback (scopes FUNCTION and BACKWARD_FUNCTION, inputs and
//   outputs), registered by sg_watch_arm and removed by sg_watch_disarm / sg_watch_finish:
//   nothing is registered otherwise. Global, because CUDA's backward runs on the autograd
//   engine's device threads, which a thread-local callback does not see.
// - Which operators are recorded: those of the thread that armed ("home"), and on any thread
//   those run inside an autograd node whose forward ran on home (the node's forwardThreadId),
//   including the engine's accumulation of that node's outputs (inside the engine's
//   "autograd::engine::evaluate_function: <node>" record). Every other thread's operators are
//   turned away at once, without the lock.
// - Per operator: name, overload, sequence number, the enclosing autograd node and the
//   enclosing operators (per-thread stacks of open records), and for each tensor it read and
//   wrote a "value": dtype, shape, storage, who produced it. Values are known by TensorImpl and
//   version (a weak reference keeps the address from being reused until the watch ends, without
//   keeping the memory), so a value an operator wrote is the one the next operator reads, with
//   no second check.
// - Finiteness: no host read per operator. For each new floating or complex value, a row
//   [min, max, min |x|] is computed on the tensor's own device (NaN propagates into min and max,
//   Inf shows in them); the rows are concatenated and handed back once, at the end, for one read.
// - The work done inside a callback runs under DisableRecordFunctionGuard and NoGradGuard: it
//   records nothing and builds no graph. Inputs are only valid in the start callback: they are
//   resolved (and an in-place operator's input checked) there.
// - Left out: the outputs of aten::empty*/new_empty*/resize_* (uninitialised memory) and the
//   arguments an operator overwrites (out=, copy_/fill_/zero_/random fills' self).
//
// Every function catches C++ exceptions; nothing throws across `extern "C"`. A function
// returning `char*` returns null on success and never null on failure (a malloc'd text, or the
// static kNoMemory); sg_watch_free frees it (and the trace text).

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/core/function_schema.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/amin.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/tensor.h>
#include <ATen/record_function.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

char kNoMemory[] = "stepguard's ATen observer failed and could not allocate the error's text";

char* copy_text(const std::string& s) noexcept {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out != nullptr) std::memcpy(out, s.c_str(), s.size() + 1);
  return out;
}

template <typename F>
char* guarded(F&& f) noexcept {
  const char* what = "unknown C++ exception in stepguard's ATen observer";
  std::string text;
  try {
    f();
    return nullptr;
  } catch (const std::exception& e) {
    try {
      text = e.what();
      what = text.c_str();
    } catch (...) {
    }
  } catch (...) {
  }
  char* out = nullptr;
  try {
    out = copy_text(what);
  } catch (...) {
  }
  return out != nullptr ? out : kNoMemory;
}

// A tensor an operator read or wrote.
struct Value {
  int64_t stats = -1;     // its row of stats; -1: none (not floating, empty, not strided)
  int64_t producer = -1;  // the operator that wrote it; -1: read from outside the watched ops
  int64_t alias = -1;     // read from outside: the last value recorded on the same storage
  int64_t named = -1;     // index of the named tensor (armed with) sharing its storage
  bool uninit = false;    // an output of empty*/new_empty*/resize_*: garbage, never checked
  c10::ScalarType dtype = c10::ScalarType::Undefined;
  std::vector<int64_t> shape;
};

// An autograd node (BACKWARD_FUNCTION record), or the engine's record around one.
struct Node {
  std::string name;
  int64_t seq = -1;  // the sequence number of the forward operator that made it
};

struct Op {
  std::string name, overload;
  int64_t seq = -1;
  int64_t node = -1;    // the enclosing node (a backward operator), -1 in the forward
  int64_t parent = -1;  // the enclosing operator
  int64_t top = -1;     // the outermost enclosing operator (within the node, if any)
  int64_t end = -1;     // order of completion
  std::vector<int64_t> ins, outs;
};

// How an operator uses its arguments, from its schema: 0 read, 1 written in place (its old
// value is read: checked at start), 2 overwritten (out=, or the self of an operator that
// replaces every element). `aten`: the record is an operator with a schema.
struct Roles {
  bool aten = false;
  std::vector<int8_t> of;
};

struct Known {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> keep;
  int64_t version;
  int64_t value;
};

struct State {
  std::mutex mu;
  std::atomic<bool> armed{false};
  std::atomic<uint64_t> gen{0};  // bumped at arm and at disarm
  std::atomic<uint64_t> home{0};  // RecordFunction's id of the arming thread
  at::CallbackHandle handle = 0;
  std::unordered_map<const void*, int64_t> named;  // storage -> named index
  std::vector<Value> values;
  std::vector<Node> nodes;
  std::vector<Op> ops;
  std::vector<at::Tensor> stats;
  std::unordered_map<const c10::TensorImpl*, Known> known;
  std::unordered_map<const void*, int64_t> last_on_storage;
  int64_t ended = 0;
  std::string error;  // the first exception inside a callback
  std::unordered_map<std::string, Roles> roles;  // kept across watches

  void clear() {
    named.clear();
    values.clear();
    nodes.clear();
    ops.clear();
    stats.clear();
    known.clear();
    last_on_storage.clear();
    ended = 0;
    error.clear();
  }
};

// Never destroyed: an end callback may still run while the process exits.
State& state() {
  static State* s = new State();
  return *s;
}

enum class Kind : uint8_t { Op, Node, Eval };

// A record open on this thread.
struct Frame {
  Kind kind;
  bool ours;      // a record of the watched step
  int64_t index;  // Op: the op; Node and Eval: the node (-1 until known)
};

struct Local {
  uint64_t gen = 0;
  std::vector<Frame> stack;
};

thread_local Local t_local;

Local& local(uint64_t gen) {
  if (t_local.gen != gen) {
    t_local.gen = gen;
    t_local.stack.clear();
  }
  return t_local;
}

struct Ctx : at::ObserverContext {
  uint64_t gen = 0;
  Kind kind = Kind::Op;
  int64_t index = -1;
  bool uninit = false;
  // The tensors the operator only reads, with their values: an output that is one of them, or
  // holds exactly its elements, is no new data.
  std::vector<std::pair<at::Tensor, int64_t>> reads;
};

constexpr const char kEval[] = "autograd::engine::evaluate_function: ";

bool starts_with(const char* s, const char* prefix) {
  return std::strncmp(s, prefix, std::strlen(prefix)) == 0;
}

// The roles of `fn`'s arguments (cached by name: operator_schema() copies the schema).
const Roles& roles_of(State& s, const at::RecordFunction& fn) {
  std::string key = std::string(fn.name()) + "." + fn.overload_name();
  auto it = s.roles.find(key);
  if (it != s.roles.end()) return it->second;
  static const char* const kOverwriteSelf[] = {
      "aten::copy_",   "aten::fill_",       "aten::zero_",      "aten::normal_",
      "aten::uniform_", "aten::bernoulli_", "aten::random_",    "aten::exponential_",
      "aten::geometric_", "aten::cauchy_",  "aten::log_normal_", "aten::set_",
      "aten::resize_", "aten::resize_as_"};
  bool overwrite = false;
  for (const char* n : kOverwriteSelf) overwrite = overwrite || std::strcmp(fn.name(), n) == 0;
  Roles r;
  if (auto schema = fn.operator_schema()) {
    r.aten = true;
    const auto& args = schema->arguments();
    for (size_t i = 0; i < args.size(); ++i) {
      const auto* alias = args[i].alias_info();
      bool write = alias != nullptr && alias->isWrite();
      r.of.push_back(args[i].is_out() || (write && overwrite && i == 0) ? 2 : write ? 1 : 0);
    }
  }
  return s.roles.emplace(std::move(key), std::move(r)).first->second;
}

void collect(const c10::IValue& v, std::vector<at::Tensor>& out) {
  if (v.isTensor()) {
    out.push_back(v.toTensor());
  } else if (v.isTensorList()) {
    for (const at::Tensor& t : v.toTensorVector()) out.push_back(t);
  } else if (v.isList()) {
    for (const auto& e : v.toListRef()) collect(e, out);
  } else if (v.isTuple()) {
    for (const auto& e : v.toTupleRef().elements()) collect(e, out);
  }
}

const void* storage_of(const at::Tensor& t) {
  try {
    if (t.layout() == c10::kStrided && t.has_storage()) return t.storage().data();
  } catch (...) {
  }
  return nullptr;
}

// The row [min, max, min |x|] of `t` on its device (complex: of |x|), or -1 when `t` is not a
// non-empty strided floating or complex tensor.
int64_t stats_of(State& s, const at::Tensor& t) {
  try {
    if (t.layout() != c10::kStrided || t.is_nested() || t.is_meta() || t.numel() == 0) {
      return -1;
    }
    auto st = t.scalar_type();
    bool complex = c10::isComplexType(st);
    if (!complex && !c10::isFloatingType(st)) return -1;
    at::Tensor row;
    if (complex) {
      auto a = at::abs(t);
      auto [lo, hi] = at::aminmax(a);
      row = at::stack({lo, hi, lo});
    } else {
      auto [lo, hi] = at::aminmax(t);
      row = at::stack({lo, hi, at::amin(at::abs(t))});
    }
    s.stats.push_back(std::move(row));
    return static_cast<int64_t>(s.stats.size()) - 1;
  } catch (...) {
    return -1;
  }
}

bool versioned(const at::Tensor& t) {
  return !t.is_inference();
}

void remember(State& s, const at::Tensor& t, int64_t value) {
  if (!versioned(t)) return;
  Known k{c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(t.getIntrusivePtr()),
          t._version(), value};
  auto [it, fresh] = s.known.emplace(t.unsafeGetTensorImpl(), k);
  if (!fresh) it->second = std::move(k);
}

// The value `t` holds if an operator already recorded it (same TensorImpl, same version).
int64_t lookup(State& s, const at::Tensor& t) {
  if (!versioned(t)) return -1;
  auto it = s.known.find(t.unsafeGetTensorImpl());
  if (it == s.known.end() || it->second.version != t._version()) return -1;
  return it->second.value;
}

constexpr int64_t kCompute = -2;

// Records `t` as a new value. `stats`: its row, or kCompute to compute one (none for uninit).
int64_t new_value(State& s, const at::Tensor& t, int64_t producer, bool uninit,
                  int64_t stats = kCompute) {
  Value v;
  v.producer = producer;
  v.uninit = uninit;
  v.dtype = t.scalar_type();
  if (!t.is_nested()) v.shape = t.sizes().vec();
  const void* storage = storage_of(t);
  if (storage != nullptr) {
    auto named = s.named.find(storage);
    if (named != s.named.end()) v.named = named->second;
    auto last = s.last_on_storage.find(storage);
    if (producer < 0 && last != s.last_on_storage.end()) v.alias = last->second;
  }
  if (!uninit) v.stats = stats == kCompute ? stats_of(s, t) : stats;
  int64_t id = static_cast<int64_t>(s.values.size());
  s.values.push_back(std::move(v));
  if (storage != nullptr) s.last_on_storage[storage] = id;
  remember(s, t, id);
  return id;
}

// Whether `out` holds exactly the elements of `in` (a transpose, view, permute, detach of it):
// the same storage, offset and number of elements, both without holes or overlaps.
bool same_elements(const at::Tensor& in, const at::Tensor& out) {
  if (in.layout() != c10::kStrided || out.layout() != c10::kStrided) return false;
  if (in.is_nested() || out.is_nested()) return false;
  if (in.scalar_type() != out.scalar_type() || in.numel() != out.numel()) return false;
  if (in.is_conj() != out.is_conj() || in.is_neg() != out.is_neg()) return false;
  const void* storage = storage_of(in);
  return storage != nullptr && storage == storage_of(out) &&
         in.storage_offset() == out.storage_offset() && in.is_non_overlapping_and_dense() &&
         out.is_non_overlapping_and_dense();
}

// The innermost Node or Eval frame, or null.
Frame* backward_frame(Local& l) {
  for (auto it = l.stack.rbegin(); it != l.stack.rend(); ++it) {
    if (it->kind != Kind::Op) return &*it;
  }
  return nullptr;
}

std::unique_ptr<at::ObserverContext> start_node(State& s, Local& l, const at::RecordFunction& fn,
                                                uint64_t gen, bool home) {
  auto ctx = std::make_unique<Ctx>();
  ctx->gen = gen;
  ctx->kind = Kind::Node;
  bool ours = home || fn.forwardThreadId() == s.home.load(std::memory_order_relaxed);
  if (ours) {
    std::lock_guard<std::mutex> lock(s.mu);
    if (!s.armed.load() || s.gen.load() != gen) return nullptr;
    ctx->index = static_cast<int64_t>(s.nodes.size());
    s.nodes.push_back(Node{fn.name(), fn.seqNr()});
  }
  // The engine's record around this node: its accumulation into the next nodes' inputs belongs
  // to this node too.
  if (!l.stack.empty() && l.stack.back().kind == Kind::Eval && ours) {
    l.stack.back().ours = true;
    l.stack.back().index = ctx->index;
  }
  l.stack.push_back(Frame{Kind::Node, ours, ctx->index});
  return ctx;
}

std::unique_ptr<at::ObserverContext> start_op(State& s, Local& l, const at::RecordFunction& fn,
                                              uint64_t gen, bool home) {
  Frame* bw = backward_frame(l);
  if (bw != nullptr ? !bw->ours : !home) return nullptr;
  auto ctx = std::make_unique<Ctx>();
  ctx->gen = gen;
  const char* name = fn.name();
  ctx->uninit = starts_with(name, "aten::empty") || starts_with(name, "aten::new_empty") ||
                starts_with(name, "aten::resize");
  at::DisableRecordFunctionGuard no_record;
  at::NoGradGuard no_grad;
  std::lock_guard<std::mutex> lock(s.mu);
  if (!s.armed.load() || s.gen.load() != gen) return nullptr;
  const Roles& roles = roles_of(s, fn);
  if (!roles.aten) return nullptr;  // a scope, not an ATen operator
  Op op;
  op.name = name;
  op.overload = fn.overload_name();
  op.seq = fn.seqNr();
  op.node = bw != nullptr ? bw->index : -1;
  if (!l.stack.empty() && l.stack.back().kind == Kind::Op) op.parent = l.stack.back().index;
  for (auto it = l.stack.rbegin(); it != l.stack.rend() && it->kind == Kind::Op; ++it) {
    op.top = it->index;
  }
  if (!ctx->uninit) {
    auto inputs = fn.inputs();
    std::vector<at::Tensor> ts;
    for (size_t i = 0; i < inputs.size(); ++i) {
      if (i < roles.of.size() && roles.of[i] == 2) continue;
      ts.clear();
      collect(inputs[i], ts);
      for (const auto& t : ts) {
        if (!t.defined()) continue;
        int64_t v = lookup(s, t);
        if (v < 0) v = new_value(s, t, -1, false);
        op.ins.push_back(v);
        if (i >= roles.of.size() || roles.of[i] == 0) ctx->reads.emplace_back(t, v);
      }
    }
  }
  ctx->index = static_cast<int64_t>(s.ops.size());
  s.ops.push_back(std::move(op));
  l.stack.push_back(Frame{Kind::Op, true, ctx->index});
  return ctx;
}

std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction& fn) {
  State& s = state();
  if (!s.armed.load(std::memory_order_acquire)) return nullptr;
  uint64_t gen = s.gen.load(std::memory_order_acquire);
  Local& l = local(gen);
  bool home = fn.threadId() == s.home.load(std::memory_order_relaxed);
  try {
    if (fn.scope() == at::RecordScope::BACKWARD_FUNCTION) return start_node(s, l, fn, gen, home);
    if (starts_with(fn.name(), kEval)) {
      // Whose it is is known when the node inside starts (home's are ours at once).
      auto ctx = std::make_unique<Ctx>();
      ctx->gen = gen;
      ctx->kind = Kind::Eval;
      int64_t index = -1;
      if (home) {
        std::lock_guard<std::mutex> lock(s.mu);
        if (!s.armed.load() || s.gen.load() != gen) return nullptr;
        index = static_cast<int64_t>(s.nodes.size());
        s.nodes.push_back(Node{fn.name() + std::strlen(kEval), -1});
      }
      l.stack.push_back(Frame{Kind::Eval, home, index});
      return ctx;
    }
    return start_op(s, l, fn, gen, home);
  } catch (const std::exception& e) {
    std::lock_guard<std::mutex> lock(s.mu);
    if (s.error.empty()) s.error = std::string(fn.name()) + ": " + e.what();
  } catch (...) {
  }
  return nullptr;
}

void on_end(const at::RecordFunction& fn, at::ObserverContext* raw) {
  if (raw == nullptr) return;
  auto* ctx = static_cast<Ctx*>(raw);
  State& s = state();
  if (t_local.gen == ctx->gen && !t_local.stack.empty()) t_local.stack.pop_back();
  if (ctx->kind != Kind::Op || !s.armed.load(std::memory_order_acquire)) return;
  try {
    at::DisableRecordFunctionGuard no_record;
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> outs;
    for (const auto& v : fn.outputs()) collect(v, outs);
    std::lock_guard<std::mutex> lock(s.mu);
    if (!s.armed.load() || s.gen.load() != ctx->gen) return;
    Op& op = s.ops[static_cast<size_t>(ctx->index)];
    op.end = s.ended++;
    for (const auto& t : outs) {
      if (!t.defined()) continue;
      // Every output is new data, with its own statistics computed now (an operator's kernel
      // may write into its output after an operator inside it recorded it, without a version
      // bump), except an input returned as it is, and a view holding exactly the elements of an
      // input (its statistics are the input's).
      int64_t v = -1;
      for (size_t k = 0; v < 0 && !ctx->uninit && k < ctx->reads.size(); ++k) {
        const auto& [in, value] = ctx->reads[k];
        if (in.unsafeGetTensorImpl() == t.unsafeGetTensorImpl() && lookup(s, t) == value) {
          v = value;
        } else if (same_elements(in, t)) {
          v = new_value(s, t, ctx->index, false, s.values[static_cast<size_t>(value)].stats);
        }
      }
      op.outs.push_back(v >= 0 ? v : new_value(s, t, ctx->index, ctx->uninit));
    }
  } catch (const std::exception& e) {
    std::lock_guard<std::mutex> lock(s.mu);
    if (s.error.empty()) s.error = std::string(fn.name()) + ": " + e.what();
  } catch (...) {
  }
}

void disarm_locked(State& s) {
  if (s.handle != 0) {
    at::removeCallback(s.handle);
    s.handle = 0;
  }
  s.armed.store(false, std::memory_order_release);
  s.gen.fetch_add(1, std::memory_order_acq_rel);
}

std::string clean(const std::string& name) {
  std::string out = name;
  for (char& c : out) {
    if (c == '\t' || c == '\n' || c == '\r') c = ' ';
  }
  return out;
}

void list(std::ostringstream& o, const std::vector<int64_t>& xs) {
  for (size_t i = 0; i < xs.size(); ++i) o << (i ? "," : "") << xs[i];
}

// The trace as text, one record a line, fields separated by tabs (ids are positions among the
// lines of one kind):
//   V stats producer alias named uninit dtype shape
//   N name seq
//   O end seq node parent top name overload ins outs
//   E error
std::string serialize(const State& s) {
  std::ostringstream o;
  for (const auto& v : s.values) {
    o << "V\t" << v.stats << '\t' << v.producer << '\t' << v.alias << '\t' << v.named << '\t'
      << (v.uninit ? 1 : 0) << '\t' << c10::toString(v.dtype) << '\t';
    list(o, v.shape);
    o << '\n';
  }
  for (const auto& n : s.nodes) o << "N\t" << clean(n.name) << '\t' << n.seq << '\n';
  for (const auto& op : s.ops) {
    o << "O\t" << op.end << '\t' << op.seq << '\t' << op.node << '\t' << op.parent << '\t'
      << op.top << '\t' << clean(op.name) << '\t' << clean(op.overload) << '\t';
    list(o, op.ins);
    o << '\t';
    list(o, op.outs);
    o << '\n';
  }
  if (!s.error.empty()) o << "E\t" << clean(s.error) << '\n';
  return o.str();
}

// Every row of stats, in order, as one flat f64 tensor on the device of the first: one group
// per (device, dtype), stacked and converted on its device, then gathered.
at::Tensor gather_stats(const std::vector<at::Tensor>& rows) {
  at::NoGradGuard no_grad;
  at::DisableRecordFunctionGuard no_record;
  auto home = rows[0].device();
  std::vector<std::pair<std::pair<c10::Device, c10::ScalarType>, std::vector<int64_t>>> groups;
  for (size_t i = 0; i < rows.size(); ++i) {
    auto key = std::make_pair(rows[i].device(), rows[i].scalar_type());
    auto it = groups.begin();
    while (it != groups.end() && it->first != key) ++it;
    if (it == groups.end()) {
      groups.push_back({key, {}});
      it = groups.end() - 1;
    }
    it->second.push_back(static_cast<int64_t>(i));
  }
  std::vector<at::Tensor> parts;
  std::vector<int64_t> order;
  for (const auto& g : groups) {
    std::vector<at::Tensor> members;
    members.reserve(g.second.size());
    for (int64_t i : g.second) members.push_back(rows[static_cast<size_t>(i)]);
    parts.push_back(at::stack(members).to(home, at::kDouble));
    order.insert(order.end(), g.second.begin(), g.second.end());
  }
  if (parts.size() == 1) return parts[0].reshape({-1});
  auto cat = at::cat(parts);
  auto index = at::tensor(order, at::TensorOptions().dtype(at::kLong)).to(home);
  auto out = at::empty_like(cat);
  out.index_copy_(0, index, cat);
  return out.reshape({-1});
}

}  // namespace

extern "C" {

void sg_watch_free(char* text) {
  if (text != kNoMemory) std::free(text);
}

// Arms the observer: registers the global callback, with the `n` tensors of `named` known by
// their storage (index i in the trace's `named`). Fails if a watch is already armed.
char* sg_watch_arm(at::Tensor* const* named, size_t n) {
  return guarded([&] {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    TORCH_CHECK(s.handle == 0,
                "stepguard: a Watch is already armed in this process (one at a time)");
    s.clear();
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& t = *named[i];
      if (!t.defined()) continue;
      const void* storage = storage_of(t);
      if (storage != nullptr) s.named.emplace(storage, static_cast<int64_t>(i));
    }
    s.home.store(at::RecordFunction::currentThreadId(), std::memory_order_relaxed);
    s.gen.fetch_add(1, std::memory_order_acq_rel);
    s.handle = at::addGlobalCallback(
        at::RecordFunctionCallback(on_start, on_end)
            .needsInputs(true)
            .needsOutputs(true)
            .scopes({at::RecordScope::FUNCTION, at::RecordScope::BACKWARD_FUNCTION}));
    s.armed.store(true, std::memory_order_release);
  });
}

// Removes the callback (if registered) and forgets what was recorded.
void sg_watch_disarm() noexcept {
  try {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    disarm_locked(s);
    s.clear();
  } catch (...) {
  }
}

// Whether the observer's callback is registered.
bool sg_watch_armed() noexcept {
  try {
    return state().armed.load(std::memory_order_acquire);
  } catch (...) {
    return true;
  }
}

// Whether libtorch has any global callback registered (tests).
bool sg_watch_global_callbacks() noexcept {
  try {
    return at::hasGlobalCallbacks();
  } catch (...) {
    return true;
  }
}

// Disarms, then hands back the trace (text for sg_watch_free) and the stats (a new flat f64
// tensor of 3 per row, on the first row's device, not read yet; null when there is none), and
// forgets them. The callback is removed even when the rest fails.
char* sg_watch_finish(char** trace, at::Tensor** stats) {
  *trace = nullptr;
  *stats = nullptr;
  return guarded([&] {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    disarm_locked(s);
    struct Clear {
      State& s;
      ~Clear() { s.clear(); }
    } clear{s};
    at::Tensor rows;
    if (!s.stats.empty()) rows = gather_stats(s.stats);
    char* text = copy_text(serialize(s));
    TORCH_CHECK(text != nullptr, "stepguard: no memory for the observer's trace");
    *trace = text;
    if (rows.defined()) *stats = new at::Tensor(std::move(rows));
  });
}

}  // extern "C"
