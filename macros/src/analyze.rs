//! A read-only view of the step (in the style of thiserror's `ast.rs`): what its body
//! contains and which of its arguments matter, used by `valid.rs` and `expand/`.

use proc_macro2::Span;
use syn::spanned::Spanned;
use syn::visit::{self, Visit};
use syn::{BinOp, Expr, FnArg, Ident, ItemFn, Pat, Type};

/// What the body contains (outside nested items and macro invocations).
#[derive(Default, Debug)]
pub(crate) struct Found {
    /// `.backward()` calls (and `backward_step*`).
    pub(crate) backward: usize,
    /// `.step()` calls without arguments (and `backward_step*`).
    pub(crate) steps: usize,
    /// `/`, `/=`, `.div(x)`.
    pub(crate) divs: usize,
    /// `.log()`, `.log2()`, `.log10()`.
    pub(crate) logs: usize,
    /// Nested items (fn, impl, struct, ...).
    pub(crate) items: usize,
}

/// A call or operator the rewrite recognises: the one list of them.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Recognised {
    /// `x.backward()`.
    Backward,
    /// `o.step()`, no arguments.
    Step,
    /// `o.backward_step(&l)`, `o.backward_step_clip(&l, v)`, `o.backward_step_clip_norm(&l, m)`.
    BackwardStep,
    /// `a.div(b)`.
    DivMethod,
    /// `x.log()`, `x.log2()`, `x.log10()`.
    Log,
    /// `a / b` (not between two literals).
    Div,
    /// `a /= b`.
    DivAssign,
}

impl Recognised {
    /// What `e` is, if the rewrite handles it.
    pub(crate) fn of(e: &Expr) -> Option<Recognised> {
        match e {
            Expr::MethodCall(m) => match (m.method.to_string().as_str(), m.args.len()) {
                ("backward", 0) => Some(Recognised::Backward),
                ("step", 0) => Some(Recognised::Step),
                ("backward_step", 1)
                | ("backward_step_clip", 2)
                | ("backward_step_clip_norm", 2) => Some(Recognised::BackwardStep),
                ("div", 1) => Some(Recognised::DivMethod),
                ("log" | "log2" | "log10", 0) => Some(Recognised::Log),
                _ => None,
            },
            Expr::Binary(b) if !(is_literal(&b.left) && is_literal(&b.right)) => match b.op {
                BinOp::Div(_) => Some(Recognised::Div),
                BinOp::DivAssign(_) => Some(Recognised::DivAssign),
                _ => None,
            },
            _ => None,
        }
    }
}

impl<'ast> Visit<'ast> for Found {
    fn visit_item(&mut self, _: &'ast syn::Item) {
        // Nested items (fn, impl, mod) are not part of this step.
        self.items += 1;
    }

    fn visit_expr(&mut self, e: &'ast Expr) {
        visit::visit_expr(self, e);
        match Recognised::of(e) {
            Some(Recognised::Backward) => self.backward += 1,
            Some(Recognised::Step) => self.steps += 1,
            Some(Recognised::BackwardStep) => {
                self.steps += 1;
                self.backward += 1;
            }
            Some(Recognised::DivMethod | Recognised::Div | Recognised::DivAssign) => self.divs += 1,
            Some(Recognised::Log) => self.logs += 1,
            None => {}
        }
    }
}

/// Finds what the rewrite would guard, without changing anything.
pub(crate) fn scan(item: &ItemFn) -> Found {
    let mut found = Found::default();
    found.visit_block(&item.block);
    found
}

/// Whether `e` names a place (a variable, a field, `*x`), which can be borrowed again.
pub(crate) fn is_place(e: &Expr) -> bool {
    match e {
        Expr::Path(_) => true,
        Expr::Field(f) => is_place(&f.base),
        Expr::Paren(p) => is_place(&p.expr),
        Expr::Group(g) => is_place(&g.expr),
        Expr::Index(i) => is_place(&i.expr) && matches!(&*i.index, Expr::Lit(_) | Expr::Path(_)),
        Expr::Unary(u) => matches!(u.op, syn::UnOp::Deref(_)) && is_place(&u.expr),
        _ => false,
    }
}

/// Whether `e` is a literal (possibly negated, parenthesised or cast): `7 / 2` stays plain.
pub(crate) fn is_literal(e: &Expr) -> bool {
    match e {
        Expr::Lit(_) => true,
        Expr::Unary(u) => is_literal(&u.expr),
        Expr::Paren(p) => is_literal(&p.expr),
        Expr::Group(g) => is_literal(&g.expr),
        Expr::Cast(c) => is_literal(&c.expr),
        _ => false,
    }
}

/// The variable, field or `self` an expression starts from (`self.vs` -> `self`).
pub(crate) fn root_ident(e: &Expr) -> Option<String> {
    match e {
        Expr::Path(p) => {
            p.path.get_ident().map(Ident::to_string).or_else(|| {
                (p.path.segments.len() == 1).then(|| p.path.segments[0].ident.to_string())
            })
        }
        Expr::Field(f) => root_ident(&f.base),
        Expr::Paren(p) => root_ident(&p.expr),
        Expr::Group(g) => root_ident(&g.expr),
        Expr::Reference(r) => root_ident(&r.expr),
        Expr::Unary(u) if matches!(u.op, syn::UnOp::Deref(_)) => root_ident(&u.expr),
        _ => None,
    }
}

/// The names of the function's arguments (`self` included).
pub(crate) fn arg_names(item: &ItemFn) -> Vec<String> {
    item.sig
        .inputs
        .iter()
        .filter_map(|a| match a {
            FnArg::Receiver(_) => Some("self".to_string()),
            FnArg::Typed(t) => match &*t.pat {
                Pat::Ident(i) => Some(i.ident.to_string()),
                _ => None,
            },
        })
        .collect()
}

/// Arguments of the function whose type is a `VarStore` (by value or reference): names for
/// error messages, and the models whose buffers a skipped step restores.
pub(crate) fn var_store_args(item: &ItemFn) -> Vec<Ident> {
    fn is_var_store(t: &Type) -> bool {
        match t {
            Type::Reference(r) => is_var_store(&r.elem),
            Type::Path(p) => p
                .path
                .segments
                .last()
                .is_some_and(|s| s.ident == "VarStore"),
            Type::Paren(p) => is_var_store(&p.elem),
            Type::Group(g) => is_var_store(&g.elem),
            _ => false,
        }
    }
    item.sig
        .inputs
        .iter()
        .filter_map(|a| match a {
            FnArg::Typed(t) if is_var_store(&t.ty) => match &*t.pat {
                Pat::Ident(i) => Some(i.ident.clone()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// What kind of expression produced a binding, for the `forward` check's message.
pub(crate) fn expr_kind(e: &Expr) -> String {
    match e {
        Expr::Binary(b) => match b.op {
            BinOp::Div(_) => "division",
            BinOp::Mul(_) => "multiplication",
            BinOp::Add(_) | BinOp::Sub(_) => "addition",
            _ => "operator",
        }
        .to_string(),
        Expr::Unary(u) if matches!(u.op, syn::UnOp::Neg(_)) => "negation".into(),
        Expr::MethodCall(m) => {
            let name = m.method.to_string();
            match name.as_str() {
                "log" | "log2" | "log10" | "log1p" => "log".into(),
                "matmul" | "mm" | "bmm" | "linear" => "matmul".into(),
                "forward" | "forward_t" => "module forward".into(),
                "div" | "reciprocal" => "division".into(),
                "exp" | "softmax" | "log_softmax" | "sqrt" | "rsqrt" | "pow"
                | "pow_tensor_scalar" => name,
                _ => format!(".{name}()"),
            }
        }
        Expr::Call(_) => "call".into(),
        Expr::Paren(p) => expr_kind(&p.expr),
        Expr::Group(g) => expr_kind(&g.expr),
        Expr::Reference(r) => expr_kind(&r.expr),
        _ => "expression".into(),
    }
}

/// An expression as the user wrote it, compactly (`net.forward(&x)`), for messages.
pub(crate) fn expr_text(e: &Expr) -> String {
    let mut e = e;
    while let Expr::Reference(r) = e {
        e = &r.expr;
    }
    let s = quote::ToTokens::to_token_stream(e).to_string();
    let mut out = String::with_capacity(s.len());
    for (i, part) in s.split(' ').enumerate() {
        let glue = matches!(part, "." | "(" | ")" | "[" | "]" | "::" | "," | "?")
            || out.ends_with(['.', '(', '[', '&', '!'])
            || out.ends_with("::");
        if i > 0 && !glue {
            out.push(' ');
        }
        out.push_str(part);
        if part == "," {
            out.push(' ');
        }
    }
    out.replace("- >", "->")
}

/// The span of a function's return type (or its name when it returns `()`).
pub(crate) fn output_span(item: &ItemFn) -> Span {
    match &item.sig.output {
        syn::ReturnType::Type(_, t) => t.span(),
        syn::ReturnType::Default => item.sig.ident.span(),
    }
}

/// The elements of `params = ...`: each element of an array, `vec![..]` or tuple is a source
/// of its own (so `params = [w, b]` borrows `w` and `b` instead of moving them).
pub(crate) fn param_sources(e: &Expr) -> Vec<Expr> {
    match e {
        Expr::Array(a) => a.elems.iter().cloned().collect(),
        Expr::Tuple(t) => t.elems.iter().cloned().collect(),
        Expr::Paren(p) => param_sources(&p.expr),
        Expr::Macro(m) if m.mac.path.is_ident("vec") => m
            .mac
            .parse_body_with(syn::punctuated::Punctuated::<Expr, syn::Token![,]>::parse_terminated)
            .map(|p| p.into_iter().collect())
            .unwrap_or_else(|_| vec![e.clone()]),
        _ => vec![e.clone()],
    }
}
