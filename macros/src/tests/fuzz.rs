//! The expansion never panics whatever tokens it is given, and keeps the user's function.

use proc_macro2::TokenStream;
use proptest::prelude::*;
use quote::quote;

use super::bodies::seen;
use crate::guarded_step_impl;

/// Tokens a fuzzer would find interesting: the attribute's own vocabulary, Rust keywords,
/// punctuation, literals of every kind, and delimiters.
fn atom() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "max_norm",
            "norm_type",
            "checks",
            "eps",
            "loss_scale",
            "spike",
            "adaptive",
            "sigmas",
            "init",
            "protect",
            "on_nan",
            "max_skips",
            "skip",
            "max",
            "group",
            "params",
            "fn",
            "const",
            "async",
            "struct",
            "impl",
            "self",
            "Self",
            "opt",
            "loss",
            "step",
            "backward",
            "backward_step",
            "div",
            "log",
            "return",
            "where",
            "mut",
            "let",
            "match",
            "move",
            "Result",
            "Tensor",
            "VarStore",
            "_",
        ])
        .prop_map(str::to_string),
        prop::sample::select(vec![
            "=", ",", ".", ";", ":", "::", "->", "=>", "&", "&mut", "/", "/=", "-", "?", "!", "#",
            "<", ">", "|", "'a", "(", ")", "{", "}", "[", "]",
        ])
        .prop_map(str::to_string),
        any::<i64>().prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| format!("{v:?}")),
        "[a-z_]{1,8}",
        "\"[a-z,]{0,12}\"",
    ]
}

fn tokens(max: usize) -> impl Strategy<Value = Option<TokenStream>> {
    prop::collection::vec(atom(), 0..max).prop_map(|v| v.join(" ").parse::<TokenStream>().ok())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn never_panics_on_arbitrary_tokens(attr in tokens(12), item in tokens(40)) {
        if let (Some(attr), Some(item)) = (attr, item) {
            let _ = guarded_step_impl(attr, item);
        }
    }

    #[test]
    fn never_panics_on_arbitrary_bodies(attr in tokens(8), body in tokens(40)) {
        if let (Some(attr), Some(body)) = (attr, body) {
            let item = quote!(fn step(opt: &mut Optimizer, vs: &VarStore) -> Result<(), E> { #body });
            let _ = guarded_step_impl(attr, item);
        }
    }

    #[test]
    fn user_function_survives_bad_attributes(attr in tokens(12)) {
        if let Some(attr) = attr {
            let item: syn::ItemFn = syn::parse_quote!(
                #[inline]
                fn keep_me(opt: &mut Optimizer, l: &Tensor) { opt.backward_step(l); }
            );
            let out = guarded_step_impl(attr, quote!(#item));
            prop_assert!(out.to_string().contains("keep_me"));
            // The name also appears in the generated site's string: look at the items instead.
            // Exactly one function, the user's, then nothing but `compile_error!`s.
            let file: syn::File = syn::parse2(out.clone()).map_err(|e| {
                TestCaseError::fail(format!("output does not parse: {e}\n{out}"))
            })?;
            let (first, rest) = file.items.split_first().expect("an item");
            let syn::Item::Fn(f) = first else {
                return Err(TestCaseError::fail(format!("first item is not the function: {out}")));
            };
            prop_assert_eq!(&f.sig, &item.sig);
            prop_assert_eq!(&f.attrs, &item.attrs);
            for r in rest {
                prop_assert!(
                    matches!(r, syn::Item::Macro(m) if m.mac.path.segments.last().unwrap().ident == "compile_error"),
                    "only errors follow: {}", out
                );
            }
            let s = seen(f);
            if rest.is_empty() {
                // A valid attribute (an empty one, say): the guarded function.
                prop_assert_eq!((s.sites, s.contexts, s.guarded_backward_steps), (1, 1, 1));
            } else {
                // An invalid one: the function exactly as written, so the IDE keeps working.
                prop_assert_eq!(f, &item);
                prop_assert_eq!((s.sites, s.contexts), (0, 0));
            }
        }
    }
}
