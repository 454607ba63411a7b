//! The `#[guarded_step]` attribute of [stepguard](https://docs.rs/stepguard). Use it through the
//! `stepguard` crate, which re-exports it: generated code calls `::stepguard::__private`.

#![warn(unreachable_pub, missing_debug_implementations)]

mod analyze;
mod attr;
mod config;
mod expand;
use stepguard_spec as spec;
mod valid;

use proc_macro::TokenStream;
use proc_macro2::TokenStream as TokenStream2;
use quote::ToTokens;

/// Guards a training step: finiteness checks at the right moments, epsilon-protected division
/// and log, global-norm clipping on the device, at most one host sync per optimizer step.
///
/// ```ignore
/// #[stepguard::guarded_step(max_norm = 5, on_nan = "skip")]
/// fn train_step(opt: &mut nn::Optimizer, vs: &nn::VarStore, net: &Net, x: &Tensor, y: &Tensor) -> Tensor {
///     let loss = net.forward(x).cross_entropy_for_logits(y);
///     opt.backward_step(&loss);
///     loss
/// }
/// ```
///
/// # Arguments (all optional)
///
/// | argument | meaning | default |
/// |---|---|---|
/// | `max_norm = 5` | clip the global grad norm (on the device) before each optimizer step | no clipping |
/// | `max_norm = adaptive(sigmas = 2.5, warmup = 25, window = 65)` | clip to `mean + sigmas * std` of the norm's running statistics (ZClip); `max_norm = adaptive` takes the defaults; `sync = "every_step"` only | |
/// | `norm_type = 2` / `1` / `"inf"` / any p > 0 | the norm of `max_norm` | `2` |
/// | `checks = "loss,grads,params"` | which checks run; also `"forward"` (every tensor bound by `let`), `"all"`, `"none"` | `"loss,grads,params"` |
/// | `checks(list = "loss,grads,params", diagnose = "replay")` | the same, and what a failed check does to find where its NaN/Inf was born: `"replay"` runs the call once more with an ATen observer that names the operator (when the body can run twice: every argument a reference or a primitive number, no `impl Trait` returned), `"off"` does not | `diagnose = "replay"` |
/// | `protect = "div,log"` | protected operations; `"none"` turns it off | `"div,log"` |
/// | `protect(ops = "div,log", eps = 1e-8)` | the same, with the epsilon of the protected operations | `eps = 1e-8` |
/// | `on_nan = "panic"` / `"error"` / `"skip"` | what a failed check does | `"panic"` |
/// | `on_nan = skip(max = 3)` | `"skip"`, escalating after `max` consecutive skipped calls (`on_nan = "skip"` takes 3) | `max = 3` |
/// | `rollback = 100` | with `skip` and `sync = "every_step"`: on a failure a skip cannot undo (a spike that persists, parameters made non-finite), restore the parameters, optimizer state and buffers of a good update, from a snapshot taken before the first update and refreshed every this many updates | off |
/// | `params = <expr>` | parameters and names (a `VarStore`, `(a, b)`, `[w, b]`, `vec![..]`, `Vec<Tensor>`) | `VarStore` arguments |
/// | `state = <expr>` | a `stepguard::GuardState` of yours instead of the function's own | per function, per parameters |
/// | `group = <expr>` | a `stepguard::dist::ProcessGroup`: every decision (skip, loss scale, spike statistics, rollback, escalation) the same on every rank, the ranks' verdicts summed before the step's read, riding on `DataParallel::average_gradients`'s last bucket (else one small all-reduce) (under `sync = "deferred"`: what the fused kernel skips on) | each process decides alone |
/// | `sync = "every_step"` / `"deferred"` | read the verdict before each update, or hand it to a fused optimizer (`stepguard::optim`) that skips on the device and read it at the next update | `"every_step"` |
/// | `loss_scale = "dynamic"` | dynamic loss scaling (mixed precision), as PyTorch's GradScaler | off |
/// | `loss_scale(init = 65536, growth = 2, backoff = 0.5, interval = 2000, min = 1)` | the same with its numbers (each optional; `min` at most `init`) | GradScaler's |
/// | `spike = 6` | spike detection: skip a step whose loss (or, without clipping, grad norm) lies this many standard deviations above its running mean | off |
/// | `spike(sigmas = 6, warmup = 20, window = 100)` | the same with its numbers (each optional) | |
///
/// Bad configuration is a compile error on the offending token (all reported together, with a
/// suggestion for typos), and the function is still emitted unchanged.
///
/// # The rewrite
///
/// - `x.backward()`: the loss `x` is checked before backward.
/// - `o.step()` (no arguments): when `o` implements `stepguard::optim::GuardedOptimizer` (tch's
///   `Optimizer` does), clip, check the grads (and the loss, and the previous update's
///   parameters) with one host read, step, then fold the parameters check into the next read.
///   Any other `.step()` (an LR scheduler) and `env.step(action)` are left as they are,
///   except that a `.step()` on a non-optimizer after a `backward()` whose grads no guarded
///   update used fails at run time if it changes the known `VarStore`s' parameters (or, with
///   no `VarStore` known, is refused): it would update parameters unchecked.
/// - `o.backward_step(&l)`, `o.backward_step_clip(&l, v)`, `o.backward_step_clip_norm(&l, m)`:
///   the same checks around tch's zero_grad / backward / step.
/// - `a / b`, `a /= b`, `a.div(b)` with tensor operands (or a number divided by a tensor), and
///   `x.log()`, `x.log2()`, `x.log10()` on tensors: epsilon-protected. Everything else (plain
///   numbers, other types) stays the ordinary operation; the choice is made by type
///   (autoref specialization), so `7 / 2` is still `3`.
/// - Without an optimizer call, `params = ...` guards a manual update: clip and check right
///   after `backward()`, the parameters after the function returns.
///
/// On failure: `panic` panics with the `stepguard::GuardError` text; `error` returns
/// `Err(GuardError.into())` before any further update; `skip` zeroes the grads and skips the
/// optimizer step (parameters stay bitwise as they were), escalating after `max`
/// consecutive skips (`skip(max = ..)`, 3 by default). Parameters that an update has already made non-finite cannot be
/// restored, so that failure is never skipped.
///
/// # Limitations
///
/// Invocations of macros in the body are not seen into; nested `fn` items are left alone;
/// inside a closure, `on_nan = "error"` panics instead (a `return` there would leave the
/// closure, not the step); `async fn` and `const fn` are rejected.
#[proc_macro_attribute]
pub fn guarded_step(args: TokenStream, item: TokenStream) -> TokenStream {
    guarded_step_impl(args.into(), item.into()).into()
}

/// The whole expansion, on `proc_macro2` tokens so tests can drive it. Never panics: every
/// problem becomes a `compile_error!` next to the user's unchanged function.
#[doc(hidden)]
fn guarded_step_impl(args: TokenStream2, item: TokenStream2) -> TokenStream2 {
    let (args, mut errors) = attr::parse_args(args);
    let func: syn::ItemFn = match syn::parse2::<syn::Item>(item.clone()) {
        Ok(syn::Item::Fn(f)) => f,
        Ok(other) => {
            let e = syn::Error::new_spanned(
                item_keyword(&other),
                "#[guarded_step] applies to training-step functions only",
            );
            errors.push(e);
            return with_errors(item, errors);
        }
        Err(e) => {
            errors.push(e);
            return with_errors(item, errors);
        }
    };
    let found = analyze::scan(&func);
    valid::validate(&args, &func, &found, &mut errors);
    if !errors.is_empty() {
        return with_errors(func.into_token_stream(), errors);
    }
    expand::expand(&args, func, &found)
}

/// The user's item, unchanged (so the IDE keeps working), followed by the errors.
fn with_errors(item: TokenStream2, errors: attr::Errors) -> TokenStream2 {
    let mut out = item;
    if let Err(e) = errors.into_result() {
        out.extend(e.to_compile_error());
    }
    out
}

/// The token to point at when the attribute is put on something that is not a function.
fn item_keyword(item: &syn::Item) -> TokenStream2 {
    use syn::Item::*;
    match item {
        Struct(s) => s.struct_token.into_token_stream(),
        Enum(e) => e.enum_token.into_token_stream(),
        Impl(i) => i.impl_token.into_token_stream(),
        Mod(m) => m.mod_token.into_token_stream(),
        Trait(t) => t.trait_token.into_token_stream(),
        Static(s) => s.static_token.into_token_stream(),
        Const(c) => c.const_token.into_token_stream(),
        other => other.into_token_stream(),
    }
}

#[cfg(test)]
mod tests;
