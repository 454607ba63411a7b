//! The configuration as generated code: `Config::DEFAULT` and one public `const` builder per
//! argument written (evaluated at compile time in the function's `static` `Site`), and what
//! the diagnosis says about protection.

use proc_macro2::{Literal, TokenStream};
use quote::quote;

use crate::analyze::Found;
use crate::attr::{Args, OnNan};
use crate::spec::{self, Id};

fn f64_lit(v: f64) -> Literal {
    Literal::f64_suffixed(v)
}

fn u32_lit(v: f64) -> Literal {
    Literal::u32_suffixed(v as u32)
}

/// The builder call of one top-level argument, when it is written.
fn builder(args: &Args, id: Id) -> Option<TokenStream> {
    let p = quote!(::stepguard::__private);
    let num = |id| f64_lit(args.number(id));
    let int = |id| u32_lit(args.number(id));
    Some(match id {
        Id::MaxNorm if args.is_set(Id::Adaptive) => {
            let (s, warmup, window) = (
                num(Id::AdaptiveSigmas),
                int(Id::AdaptiveWarmup),
                int(Id::AdaptiveWindow),
            );
            quote!(.with_adaptive_clip(#p::AdaptiveClip::new(#s, #warmup, #window)))
        }
        Id::MaxNorm => {
            let m = f64_lit(args.written_number(Id::MaxNorm)?);
            quote!(.with_max_norm(#m))
        }
        Id::NormType => {
            let n = args.written_number(Id::NormType)?;
            let t = if n == 1.0 {
                quote!(#p::NormType::L1)
            } else if n == 2.0 {
                quote!(#p::NormType::L2)
            } else if n.is_infinite() {
                quote!(#p::NormType::Inf)
            } else {
                let n = f64_lit(n);
                quote!(#p::NormType::P(#n))
            };
            quote!(.with_norm_type(#t))
        }
        Id::Checks => {
            args.get(Id::Checks)?;
            let mut out = TokenStream::new();
            if args.is_set(Id::ChecksList) {
                let c = args.checks();
                let on = [
                    (c.loss, quote!(.with_loss())),
                    (c.grads, quote!(.with_grads())),
                    (c.params, quote!(.with_params())),
                    (c.forward, quote!(.with_forward())),
                ]
                .into_iter()
                .filter_map(|(on, call)| on.then_some(call));
                out.extend(quote!(.with_checks(#p::Checks::NONE #(#on)*)));
            }
            if args.diagnose_off() {
                out.extend(quote!(.with_diagnose(#p::Diagnose::Off)));
            }
            out
        }
        Id::Protect => {
            args.get(Id::Protect)?;
            let mut out = TokenStream::new();
            if args.is_set(Id::ProtectOps) {
                let (div, log) = args.protect();
                out.extend(quote!(.with_protect_div(#div).with_protect_log(#log)));
            }
            if args.is_set(Id::Eps) {
                let eps = num(Id::Eps);
                out.extend(quote!(.with_eps(#eps)));
            }
            out
        }
        Id::OnNan => {
            args.get(Id::OnNan)?;
            let on_nan = match args.on_nan() {
                OnNan::Panic => quote!(#p::OnNan::Panic),
                OnNan::Error => quote!(#p::OnNan::Error),
                OnNan::Skip => quote!(#p::OnNan::Skip),
            };
            let mut out = quote!(.with_on_nan(#on_nan));
            if args.is_set(Id::MaxSkips) {
                let n = int(Id::MaxSkips);
                out.extend(quote!(.with_max_skips(#n)));
            }
            out
        }
        Id::Rollback => {
            args.get(Id::Rollback)?;
            let n = int(Id::Rollback);
            quote!(.with_rollback(#n))
        }
        Id::Sync => {
            args.get(Id::Sync)?;
            if args.deferred() {
                quote!(.with_sync(#p::SyncMode::Deferred))
            } else {
                quote!(.with_sync(#p::SyncMode::EveryStep))
            }
        }
        Id::LossScale => {
            args.get(Id::LossScale)?;
            let (init, growth, backoff, interval, min) = (
                num(Id::ScaleInit),
                num(Id::ScaleGrowth),
                num(Id::ScaleBackoff),
                int(Id::ScaleInterval),
                num(Id::ScaleMin),
            );
            quote!(.with_loss_scale(#p::LossScale::new(#init, #growth, #backoff, #interval, #min)))
        }
        Id::Spike => {
            args.get(Id::Spike)?;
            let (s, warmup, window) = (
                num(Id::SpikeSigmas),
                int(Id::SpikeWarmup),
                int(Id::SpikeWindow),
            );
            quote!(.with_spike(#p::Spike::new(#s, #warmup, #window)))
        }
        // Used by the expansion itself, not part of the `Config`.
        Id::Params | Id::State | Id::Group => return None,
        // Inside a group: written by the group's builder above.
        Id::Adaptive
        | Id::AdaptiveSigmas
        | Id::AdaptiveWarmup
        | Id::AdaptiveWindow
        | Id::ChecksList
        | Id::Diagnose
        | Id::ProtectOps
        | Id::Eps
        | Id::MaxSkips
        | Id::ScaleInit
        | Id::ScaleGrowth
        | Id::ScaleBackoff
        | Id::ScaleInterval
        | Id::ScaleMin
        | Id::SpikeSigmas
        | Id::SpikeWarmup
        | Id::SpikeWindow => return None,
    })
}

/// The `::stepguard::__private::Config` of `args`: the defaults and a `const` builder per
/// argument written.
pub(crate) fn config_tokens(args: &Args) -> TokenStream {
    let calls = spec::ARGS.iter().filter_map(|a| builder(args, a.id));
    quote!(::stepguard::__private::Config::DEFAULT #(#calls)*)
}

/// Whether the body's `/` and log are protected: `None` when it has neither.
pub(crate) fn protected_tokens(args: &Args, found: &Found) -> TokenStream {
    let (div, log) = args.protect();
    let mut on = Vec::new();
    if found.divs > 0 {
        on.push(div);
    }
    if found.logs > 0 {
        on.push(log);
    }
    if on.is_empty() {
        quote!(::core::option::Option::None)
    } else {
        let all = on.iter().all(|b| *b);
        quote!(::core::option::Option::Some(#all))
    }
}
