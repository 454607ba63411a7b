//! Generation: the registration of the guarded function, its per-call context, and the body
//! rewritten.
//!
//! - `rewriter`: the walk over the body ([`rewriter::Rewriter`]) and what every rewrite shares;
//! - `steps`: the training calls (`backward()`, `step()`, tch's `backward_step` family);
//! - `ops`: the epsilon-protected division and log;
//! - `replay`: whether the body can run twice (a failed call replayed), as a closure.

mod ops;
mod replay;
mod rewriter;
mod steps;

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned, ToTokens};
use syn::visit_mut::VisitMut;
use syn::{Expr, Ident, ItemFn};

use crate::analyze::{arg_names, param_sources, root_ident, var_store_args, Found};
use crate::attr::Args;
use crate::spec::Id;
use rewriter::Rewriter;

fn ident(name: &str) -> Ident {
    Ident::new(name, Span::mixed_site())
}

/// The guarded function: registration, the per-call context, the rewritten body.
pub(crate) fn expand(args: &Args, mut item: ItemFn, found: &Found) -> TokenStream {
    let var_stores = var_store_args(&item);
    let mut sources: Vec<TokenStream> = var_stores.iter().map(|i| quote!(&(#i))).collect();
    // Sources that exist when the call starts (arguments, `self`): their buffers are saved.
    let mut entry = sources.clone();
    let args_names = arg_names(&item);
    for p in args.expr(Id::Params).into_iter().flat_map(param_sources) {
        let root = root_ident(&p);
        if matches!(&p, Expr::Path(_)) && var_stores.iter().any(|v| Some(v.to_string()) == root) {
            continue; // the same VarStore argument: once
        }
        let src = quote!(&(#p));
        if root.is_some_and(|r| args_names.contains(&r)) {
            entry.push(src.clone());
        }
        sources.push(src);
    }
    let names = quote! { &[#(#sources as &dyn ::stepguard::__private::ParamSource),*] };
    let entry = quote! { &[#(#entry as &dyn ::stepguard::__private::ParamSource),*] };
    let manual = found.steps == 0 && args.is_set(Id::Params);
    let mut r = Rewriter {
        args,
        result_err: crate::valid::result_error_type(&item.sig.output),
        has_step: found.steps > 0,
        manual,
        forward: args.checks().forward,
        stripped: false,
        on_nan: args.on_nan(),
        names,
        closure_depth: 0,
        output_span: crate::analyze::output_span(&item),
    };
    // A build without checks (`strip-release`) takes a second copy of the body with no
    // context and no checks, chosen by a constant so the optimiser removes the other. Not
    // when the guard does training math of its own (loss scaling, adaptive clipping, a
    // manual update's clipping), nor for a body with nested items (they would be defined
    // twice).
    let own_math = args.is_set(Id::LossScale)
        || args.is_set(Id::Adaptive)
        || (manual && args.is_set(Id::MaxNorm));
    let strippable = !own_math && found.items == 0;
    let mut stripped_block = item.block.clone();
    if strippable {
        let mut s = Rewriter {
            stripped: true,
            forward: false,
            names: TokenStream::new(),
            ..r.clone()
        };
        s.visit_block_mut(&mut stripped_block);
    }
    r.visit_block_mut(&mut item.block);

    let name = item.sig.ident.to_string();
    let span = item.sig.ident.span();
    let site = ident("__SG_SITE");
    let ctx = ident("__sg");
    let config = crate::config::config_tokens(args);
    let stmts = &item.block.stmts;
    let site_def = quote_spanned! {span=>
        static #site: ::stepguard::__private::Site = ::stepguard::__private::Site::new(
            #name, ::core::module_path!(), ::core::file!(), ::core::line!(), #config);
    };
    let state = match args.expr(Id::State) {
        Some(s) => {
            quote!(::core::option::Option::Some(::core::borrow::Borrow::<::stepguard::__private::GuardState>::borrow(&(#s))))
        }
        None => quote!(::core::option::Option::None),
    };
    let protected = crate::config::protected_tokens(args, found);
    let group = args.expr(Id::Group).map(|g| {
        quote!(.with_group(::core::borrow::Borrow::<::stepguard::dist::ProcessGroup>::borrow(&(#g))))
    });
    let begin = quote! {
        ::stepguard::__private::Ctx::begin(&#site, #state, #entry, #protected)#group
    };
    // The guarded body runs as a closure that the runtime may run once more (a failed call
    // replayed under the ATen observer), when it can run twice; else once, as written.
    let contents = quote!(#begin #(#stmts)*);
    let returns_result = crate::valid::result_error_type(&item.sig.output).is_some();
    let guarded = match replay::plan(args, &mut item.sig, &contents) {
        replay::Plan::Closure { rebind, output } => {
            let r = ident("__sg_replay");
            let tensors = replay::tensor_arguments(&item.sig);
            let with_replay = if tensors.is_empty() {
                quote!(.with_replay(#r))
            } else {
                let (names, idents): (Vec<_>, Vec<_>) = tensors.into_iter().unzip();
                quote!(.with_replay_args(#r, &[#((#names, &*#idents)),*]))
            };
            let call = quote! {
                ::stepguard::__private::replay(&#site, move |#r: ::stepguard::__private::Replay| #output {
                    #rebind
                    #[allow(unused_variables)]
                    let #ctx = #begin #with_replay;
                    #(#stmts)*
                })
            };
            if returns_result {
                // The closure repeats the function's return type: clippy's `result_large_err`
                // is the function's business, not the closure's.
                let out = ident("__sg_out");
                quote! {
                    #[allow(clippy::result_large_err)]
                    let #out = #call;
                    #out
                }
            } else {
                call
            }
        }
        replay::Plan::Off(why) => quote! {
            #[allow(unused_variables)]
            let #ctx = #begin.with_replay(::stepguard::__private::Replay::off(#why));
            #(#stmts)*
        },
    };
    let run = if strippable {
        let plain = &stripped_block.stmts;
        quote! {
            if ::stepguard::__private::CHECKS_ENABLED {
                #guarded
            } else {
                #site.count_call();
                #(#plain)*
            }
        }
    } else {
        guarded
    };
    let body = quote! {{
        #site_def
        ::stepguard::__private::inventory::submit! { ::stepguard::__private::Registration(&#site) }
        #run
    }};
    item.block = Box::new(syn::parse2(body).expect("generated block parses"));
    item.into_token_stream()
}
