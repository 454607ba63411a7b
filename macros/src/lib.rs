//! The `#[guarded_step]` attribute of [stepguard](https://docs.rs/stepguard). Use it through the
//! `stepguard` crate, which re-exports it: generated code calls `::stepguard::__private`.

mod attr;
mod expand;
mod valid;

use proc_macro::TokenStream;
use proc_macro2::TokenStream as TokenStream2;
use quote::ToTokens;

/// Guards a training step: see the `stepguard` crate for the arguments and the rewrite.
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
    let found = expand::scan(&func);
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
