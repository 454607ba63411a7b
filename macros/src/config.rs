//! The configuration as generated code: the `Config` constant of the function's `Site`, and
//! what the diagnosis says about protection.

use proc_macro2::TokenStream;
use quote::quote;

use crate::analyze::Found;
use crate::attr::{Args, OnNan};

/// The `::stepguard::__private::Config` literal of `args`.
pub(crate) fn config_tokens(args: &Args) -> TokenStream {
    let p = quote!(::stepguard::__private);
    let crate::attr::Checks {
        loss,
        grads,
        params,
        forward,
    } = args.checks;
    let max_norm = match args.max_norm {
        Some(m) => {
            let m = proc_macro2::Literal::f64_suffixed(m);
            quote!(::core::option::Option::Some(#m))
        }
        None => quote!(::core::option::Option::None),
    };
    let n = args.norm_type;
    let norm_type = if n == 1.0 {
        quote!(#p::NormType::L1)
    } else if n == 2.0 {
        quote!(#p::NormType::L2)
    } else if n.is_infinite() {
        quote!(#p::NormType::Inf)
    } else {
        let n = proc_macro2::Literal::f64_suffixed(n);
        quote!(#p::NormType::P(#n))
    };
    let eps = proc_macro2::Literal::f64_suffixed(args.eps);
    let (div, log) = (args.protect_div, args.protect_log);
    let on_nan = match args.on_nan {
        OnNan::Panic => quote!(#p::OnNan::Panic),
        OnNan::Error => quote!(#p::OnNan::Error),
        OnNan::Skip => quote!(#p::OnNan::Skip),
    };
    let max_skips = args.max_skips;
    let sync = if args.deferred {
        quote!(#p::Sync::Deferred)
    } else {
        quote!(#p::Sync::EveryStep)
    };
    let loss_scale = match args.loss_scale {
        Some(_) => {
            let s = args.scale;
            let f = proc_macro2::Literal::f64_suffixed;
            let (init, growth, backoff, min) = (
                f(s.init_scale),
                f(s.growth_factor),
                f(s.backoff_factor),
                f(s.min_scale),
            );
            let interval = s.growth_interval;
            quote!(::core::option::Option::Some(#p::LossScale::new(
                #init, #growth, #backoff, #interval, #min
            )))
        }
        None => quote!(::core::option::Option::None),
    };
    let spike = match args.spike {
        Some((sigmas, _)) => {
            let sigmas = proc_macro2::Literal::f64_suffixed(sigmas);
            let (warmup, window) = (args.spike_warmup, args.spike_window);
            quote!(::core::option::Option::Some(#p::Spike::new(#sigmas, #warmup, #window)))
        }
        None => quote!(::core::option::Option::None),
    };
    let adaptive = match args.adaptive {
        Some(_) => {
            let sigmas = args.clip_sigmas.map_or(2.5, |(s, _)| s);
            let sigmas = proc_macro2::Literal::f64_suffixed(sigmas);
            quote!(::core::option::Option::Some(#p::AdaptiveClip::new(
                #sigmas,
                #p::AdaptiveClip::DEFAULT.warmup,
                #p::AdaptiveClip::DEFAULT.window
            )))
        }
        None => quote!(::core::option::Option::None),
    };
    let rollback = match args.rollback {
        Some((n, _)) => quote!(::core::option::Option::Some(#n)),
        None => quote!(::core::option::Option::None),
    };
    quote! {
        #p::Config::__from_attribute(
            #p::Checks::new(#loss, #grads, #params, #forward),
            #max_norm,
            #norm_type,
            #eps,
            #div,
            #log,
            #on_nan,
            #max_skips,
            #sync,
            #loss_scale,
            #spike,
            #rollback,
            #adaptive,
        )
    }
}

/// Whether the body's `/` and log are protected: `None` when it has neither.
pub(crate) fn protected_tokens(args: &Args, found: &Found) -> TokenStream {
    let mut on = Vec::new();
    if found.divs > 0 {
        on.push(args.protect_div);
    }
    if found.logs > 0 {
        on.push(args.protect_log);
    }
    if on.is_empty() {
        quote!(::core::option::Option::None)
    } else {
        let all = on.iter().all(|b| *b);
        quote!(::core::option::Option::Some(#all))
    }
}
