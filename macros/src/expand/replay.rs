//! Whether the body can run twice: a failed call is replayed under the runtime's ATen observer
//! (`::stepguard::__private::replay`), which runs the body's closure once more. It can when the
//! function is not `async`, every argument is a reference (`&self`, `&mut self`, `&T`,
//! `&mut T`) or a primitive `Copy` value, and what it returns is neither `impl Trait` nor a
//! borrow of a `&mut` argument (a `FnMut` closure cannot let one escape).

use proc_macro2::{TokenStream, TokenTree};
use quote::{quote, ToTokens};
use syn::visit::{self, Visit};
use syn::{parse_quote, FnArg, Pat, ReturnType, Signature, Type};

use crate::attr::Args;

/// How the guarded body runs.
pub(super) enum Plan {
    /// As a closure that can run twice: `rebind` starts each run (fresh copies of the
    /// arguments the body may change or move: `let mut n = n;`, `let opt = &mut *opt;`),
    /// `output` is the closure's return type (`-> T`, or nothing for `()`).
    Closure {
        rebind: TokenStream,
        output: TokenStream,
    },
    /// Once, as written: why there is no replay.
    Off(String),
}

/// Whether `sig`'s body can run twice. `used`: the tokens of the closure's contents, for the
/// arguments it mentions. A `mut` argument copied at the start of each run gets
/// `#[allow(unused_mut)]` (the copy is what changes).
pub(super) fn plan(args: &Args, sig: &mut Signature, used: &TokenStream) -> Plan {
    match why_not(args, sig) {
        Some(why) => Plan::Off(why),
        None => {
            let rebind = rebind(sig, used);
            // The function's return type: `?`, `return` and the tail coerce to it as in the
            // function (inferred, an early `return Box::new(x)` would fix it to `Box<X>`).
            let output = match &sig.output {
                ReturnType::Default => TokenStream::new(),
                ReturnType::Type(arrow, ty) => quote!(#arrow #ty),
            };
            Plan::Closure { rebind, output }
        }
    }
}

/// Why the body cannot run twice, if it cannot.
fn why_not(args: &Args, sig: &Signature) -> Option<String> {
    if args.diagnose_off() {
        return Some("`checks(diagnose = \"off\")`".into());
    }
    if sig.asyncness.is_some() {
        return Some("`async fn`".into());
    }
    for input in &sig.inputs {
        let (name, ty, bound_by_ref) = match input {
            FnArg::Receiver(r) => ("self".to_string(), &*r.ty, false),
            // Not bound: nothing the body could use twice.
            FnArg::Typed(t) if matches!(&*t.pat, Pat::Wild(_)) => continue,
            FnArg::Typed(t) => {
                let by_ref = matches!(&*t.pat, Pat::Ident(i) if i.by_ref.is_some());
                (pattern_text(&t.pat), &*t.ty, by_ref)
            }
        };
        let fine = is_reference(ty) || (is_primitive(ty) && !bound_by_ref);
        if !fine {
            return Some(format!("the argument `{name}` is taken by value"));
        }
    }
    let ReturnType::Type(_, out) = &sig.output else {
        return None;
    };
    let mut found = Lifetimes::default();
    found.visit_type(out);
    if found.impl_trait {
        return Some("it returns `impl Trait`".into());
    }
    if borrows_a_mut_argument(sig, &found) {
        return Some("it returns a borrow of a `&mut` argument".into());
    }
    None
}

/// A pattern as written (`x`, `(a, b)`), for messages.
fn pattern_text(p: &Pat) -> String {
    match p {
        Pat::Ident(i) => i.ident.to_string(),
        other => other.to_token_stream().to_string(),
    }
}

fn peel(mut ty: &Type) -> &Type {
    loop {
        match ty {
            Type::Group(g) => ty = &g.elem,
            Type::Paren(p) => ty = &p.elem,
            other => return other,
        }
    }
}

fn is_reference(ty: &Type) -> bool {
    matches!(peel(ty), Type::Reference(_))
}

fn is_mut_reference(ty: &Type) -> bool {
    matches!(peel(ty), Type::Reference(r) if r.mutability.is_some())
}

/// A primitive `Copy` type: the integers, the floats, `bool`, `char` (also as
/// `core::primitive::f64`).
fn is_primitive(ty: &Type) -> bool {
    const PRIMITIVES: &[&str] = &[
        "i8", "i16", "i32", "i64", "i128", "isize", "u8", "u16", "u32", "u64", "u128", "usize",
        "f32", "f64", "bool", "char",
    ];
    let Type::Path(p) = peel(ty) else {
        return false;
    };
    if p.qself.is_some() {
        return false;
    }
    let segs: Vec<String> = p
        .path
        .segments
        .iter()
        .map(|s| s.ident.to_string())
        .collect();
    let plain = p.path.segments.iter().all(|s| s.arguments.is_none());
    let prefix_ok = match segs.as_slice() {
        [_] => p.path.leading_colon.is_none(),
        [krate, module, _] => (krate == "core" || krate == "std") && module == "primitive",
        _ => false,
    };
    plain
        && prefix_ok
        && segs
            .last()
            .is_some_and(|s| PRIMITIVES.contains(&s.as_str()))
}

/// The lifetimes of a type's references (`&'a T`, `Ref<'_, T>`, `&T`), and whether it holds
/// `impl Trait`; function types (`fn(&T)`, `dyn Fn(&T)`) have lifetimes of their own and are
/// not looked into.
#[derive(Default)]
struct Lifetimes {
    /// Named lifetimes, `'static` left out.
    named: Vec<String>,
    /// An elided lifetime (`&T`, `'_`).
    elided: bool,
    /// Only references `&mut` (for the arguments).
    mut_only: bool,
    impl_trait: bool,
}

impl Lifetimes {
    fn note(&mut self, lt: Option<&syn::Lifetime>) {
        match lt.map(|l| l.ident.to_string()) {
            None => self.elided = true,
            Some(n) if n == "_" => self.elided = true,
            Some(n) if n == "static" => {}
            Some(n) => self.named.push(n),
        }
    }
}

impl<'ast> Visit<'ast> for Lifetimes {
    fn visit_type_reference(&mut self, r: &'ast syn::TypeReference) {
        if !self.mut_only || r.mutability.is_some() {
            self.note(r.lifetime.as_ref());
        }
        self.visit_type(&r.elem);
    }
    fn visit_lifetime(&mut self, l: &'ast syn::Lifetime) {
        if !self.mut_only {
            self.note(Some(l));
        }
    }
    fn visit_type_impl_trait(&mut self, i: &'ast syn::TypeImplTrait) {
        self.impl_trait = true;
        visit::visit_type_impl_trait(self, i);
    }
    fn visit_type_bare_fn(&mut self, _: &'ast syn::TypeBareFn) {}
    fn visit_parenthesized_generic_arguments(
        &mut self,
        _: &'ast syn::ParenthesizedGenericArguments,
    ) {
    }
}

/// Whether the return type (its lifetimes `out`) may borrow from a `&mut` argument: a named
/// lifetime of one, or an elided lifetime that elision gives one (`&mut self`'s; without a
/// receiver, any `&mut` argument's, conservatively).
fn borrows_a_mut_argument(sig: &Signature, out: &Lifetimes) -> bool {
    let mut muts = Lifetimes {
        mut_only: true,
        ..Lifetimes::default()
    };
    let mut receiver = None;
    for input in &sig.inputs {
        match input {
            FnArg::Receiver(r) => {
                receiver = Some(is_mut_reference(&r.ty));
                muts.visit_type(&r.ty);
            }
            FnArg::Typed(t) => muts.visit_type(&t.ty),
        }
    }
    let elided_mut = match receiver {
        Some(self_mut) => self_mut,
        None => muts.elided || !muts.named.is_empty(),
    };
    (out.elided && elided_mut) || out.named.iter().any(|n| muts.named.contains(n))
}

/// `let mut n = n;` for a `mut` argument, `let opt = &mut *opt;` for a `&mut` one (so that a
/// run may move it), for the arguments the closure mentions.
fn rebind(sig: &mut Signature, used: &TokenStream) -> TokenStream {
    let mut names = Vec::new();
    idents(used, &mut names);
    let mut out = TokenStream::new();
    for input in sig.inputs.iter_mut() {
        let FnArg::Typed(t) = input else { continue };
        let Pat::Ident(p) = &*t.pat else { continue };
        if p.by_ref.is_some() || p.subpat.is_some() || !names.contains(&p.ident.to_string()) {
            continue;
        }
        let (id, mutable) = (&p.ident, p.mutability);
        let value = if is_mut_reference(&t.ty) {
            quote!(&mut *#id)
        } else if mutable.is_some() {
            quote!(#id)
        } else {
            continue;
        };
        out.extend(quote!(let #mutable #id = #value;));
        if mutable.is_some() {
            t.attrs.push(parse_quote!(#[allow(unused_mut)]));
        }
    }
    out
}

fn idents(tokens: &TokenStream, out: &mut Vec<String>) {
    for t in tokens.clone() {
        match t {
            TokenTree::Ident(i) => out.push(i.to_string()),
            TokenTree::Group(g) => idents(&g.stream(), out),
            TokenTree::Punct(_) | TokenTree::Literal(_) => {}
        }
    }
}

/// The arguments that are tensors by reference (`x: &Tensor`, `y: &mut tch::Tensor`), by name:
/// a replay's observer names them when one already held the NaN/Inf.
pub(super) fn tensor_arguments(sig: &Signature) -> Vec<(String, syn::Ident)> {
    sig.inputs
        .iter()
        .filter_map(|input| {
            let FnArg::Typed(t) = input else {
                return None;
            };
            let Pat::Ident(p) = &*t.pat else {
                return None;
            };
            let Type::Reference(r) = peel(&t.ty) else {
                return None;
            };
            let Type::Path(path) = peel(&r.elem) else {
                return None;
            };
            let last = path.path.segments.last()?;
            (last.ident == "Tensor" && last.arguments.is_none())
                .then(|| (p.ident.to_string(), p.ident.clone()))
        })
        .collect()
}
