//! Checks of the annotated item against its configuration.

use syn::{GenericArgument, ItemFn, PathArguments, ReturnType, Type};

use crate::analyze::{output_span, Found};
use crate::attr::{Args, Errors, OnNan};
use crate::spec::{self, Id};

/// For a `Result<T, E>` return type: `Some(Some(E))`; `Some(None)` for a `Result<T>` alias;
/// `None` when it does not return a `Result`.
pub(crate) fn result_error_type(ty: &ReturnType) -> Option<Option<Type>> {
    if !returns_result(ty) {
        return None;
    }
    let ReturnType::Type(_, t) = ty else {
        return None;
    };
    let mut t = &**t;
    while let Type::Group(g) = t {
        t = &g.elem;
    }
    let Type::Path(p) = t else { return None };
    let PathArguments::AngleBracketed(a) = &p.path.segments.last()?.arguments else {
        return None;
    };
    let types: Vec<&Type> = a
        .args
        .iter()
        .filter_map(|g| match g {
            GenericArgument::Type(t) => Some(t),
            _ => None,
        })
        .collect();
    Some((types.len() == 2).then(|| types[1].clone()))
}

/// Whether `ty` is `Result<_, _>` (any path ending in `Result`, e.g. `anyhow::Result<T>`).
fn returns_result(ty: &ReturnType) -> bool {
    let ReturnType::Type(_, t) = ty else {
        return false;
    };
    let mut t = &**t;
    while let Type::Group(g) = t {
        t = &g.elem; // a type passed through a macro_rules `$t:ty`
    }
    let Type::Path(p) = t else { return false };
    p.path.segments.last().is_some_and(|s| {
        s.ident == "Result"
            && matches!(&s.arguments, PathArguments::AngleBracketed(a) if a.args.iter().any(|g| matches!(g, GenericArgument::Type(_))))
    })
}

pub(crate) fn validate(args: &Args, item: &ItemFn, found: &Found, errors: &mut Errors) {
    if let Some(c) = &item.sig.constness {
        errors.push(syn::Error::new(
            c.span,
            "#[guarded_step] cannot guard a `const fn`: tensors are not const",
        ));
    }
    if let Some(a) = &item.sig.asyncness {
        errors.push(syn::Error::new(
            a.span,
            "#[guarded_step] does not support `async fn`: the step's single host read must not span an await point",
        ));
    }
    if args.on_nan() == OnNan::Error && !returns_result(&item.sig.output) {
        let mut e = syn::Error::new(
            output_span(item),
            "`on_nan = \"error\"` needs a function returning `Result<_, E>` with `E: From<stepguard::GuardError>`",
        );
        if let Some(s) = args.span(Id::OnNan) {
            e.combine(syn::Error::new(s, "`on_nan = \"error\"` is set here"));
        }
        errors.push(e);
    }
    for rule in spec::broken_rules(|id| args.setting(id)) {
        let span = args.span(rule.arg).unwrap_or(item.sig.ident.span());
        let mut msg = rule.message.to_string();
        if let spec::Needs::AtMost(other) = rule.needs {
            msg += &format!(" ({} > {})", args.number(rule.arg), args.number(other));
        }
        errors.push(syn::Error::new(span, msg));
    }
    if let Some(span) = args.span(Id::LossScale) {
        if found.backward > 0
            && found.steps == 0
            && !args.is_set(Id::Params)
            && !args.is_set(Id::State)
        {
            errors.push(syn::Error::new(
                span,
                "`loss_scale` scales this function's backward, but no optimizer step here \
                 unscales the grads: do the step in the same function, or share the scaler with \
                 the function that steps (`state = ...` on both)",
            ));
        }
    }
    let guards_something = args.any_check()
        || args.is_set(Id::MaxNorm)
        || args.is_set(Id::Adaptive)
        || args.is_set(Id::LossScale);
    let odd_fn = item.sig.constness.is_some() || item.sig.asyncness.is_some();
    if guards_something && !odd_fn && found.backward == 0 && found.steps == 0 {
        errors.push(syn::Error::new(
            item.sig.ident.span(),
            format!(
                "`{}` has nothing to guard: no `.backward()`, `.step()` or `.backward_step(..)` in its body \
                 (calls inside macros are not seen); use `checks = \"none\"` for protection only",
                item.sig.ident
            ),
        ));
    }
}
