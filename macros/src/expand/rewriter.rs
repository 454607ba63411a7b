//! The walk over the body: which expression becomes which guarded form, the `forward`
//! check of `let` bindings, and what the rewrites share (how a failure leaves the function,
//! the call site's constants, the `match` on an outcome).

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::visit_mut::{self, VisitMut};
use syn::{parse_quote, Expr, Type};

use super::ident;
use crate::analyze::{expr_kind, is_place, Recognised};
use crate::attr::{Args, OnNan};
use crate::spec::Id;

/// The rewrite of one body: the guarded branch, or the stripped one of a `strip-release` build.
#[derive(Clone)]
pub(super) struct Rewriter<'a> {
    pub(super) args: &'a Args,
    pub(super) on_nan: OnNan,
    /// The `E` of a `Result<_, E>` return type: `Some(None)` when it returns a `Result` whose
    /// error type is not written out (an alias such as `anyhow::Result<T>`).
    pub(super) result_err: Option<Option<Type>>,
    pub(super) has_step: bool,
    pub(super) manual: bool,
    /// The `forward` check: every `let` binding of a tensor is checked.
    pub(super) forward: bool,
    /// The branch of a build whose checks are stripped (`CHECKS_ENABLED` false): no context,
    /// no checks; clipping and protection stay.
    pub(super) stripped: bool,
    pub(super) names: TokenStream,
    pub(super) closure_depth: usize,
    /// The return type's span, where a missing `From<GuardError>` is reported.
    pub(super) output_span: Span,
}

impl Rewriter<'_> {
    pub(super) fn fail(&self) -> TokenStream {
        let e = ident("__sg_e");
        match (Some(self.on_nan), &self.result_err) {
            // Spanned at the error type: a missing `From<GuardError>` is reported there.
            (Some(OnNan::Error), Some(Some(err_ty))) if self.closure_depth == 0 => {
                quote_spanned! {err_ty.span()=>
                    return ::core::result::Result::Err(::stepguard::__private::into_error::<#err_ty>(#e))
                }
            }
            (Some(OnNan::Error), _) if self.closure_depth == 0 => {
                quote_spanned! {self.output_span=>
                    return ::core::result::Result::Err(::core::convert::From::from(#e))
                }
            }
            // A skip that ran out of `skip(max = ..)` returns the error when `E: From<GuardError>`.
            (Some(OnNan::Skip), Some(Some(err_ty))) if self.closure_depth == 0 => quote! {
                return ::core::result::Result::Err({
                    #[allow(unused_imports)]
                    use ::stepguard::__private::ops::*;
                    (&::stepguard::__private::Escalate::<#err_ty>::new()).__sg_escalate(#e)
                })
            },
            (Some(OnNan::Skip), Some(None)) if self.closure_depth == 0 => {
                quote_spanned! {self.output_span=>
                    return ::core::result::Result::Err(::core::convert::From::from(#e))
                }
            }
            _ => quote! { ::stepguard::__private::fail(#e) },
        }
    }

    pub(super) fn eps(&self) -> TokenStream {
        let eps = proc_macro2::Literal::f64_suffixed(self.args.number(Id::Eps));
        quote!(#eps)
    }

    /// `&At { .. }`: what the generated call knows about its place in the source, a constant.
    pub(super) fn at(&self, span: Span, expr: &str, read_now: bool) -> TokenStream {
        let line = quote_spanned! {span=> ::core::line!() };
        let manual = self.manual;
        quote! {
            &::stepguard::__private::At { line: #line, expr: #expr, read_now: #read_now, manual: #manual }
        }
    }

    /// `match` on an `Outcome`: the value, or the failure leaves the function.
    pub(super) fn outcome(&self, scrutinee: TokenStream) -> TokenStream {
        let (e, r) = (ident("__sg_e"), ident("__sg_r"));
        let fail = self.fail();
        quote! {
            match #scrutinee {
                ::stepguard::__private::Outcome::Value(#r) => #r,
                ::stepguard::__private::Outcome::Fail(#e) => #fail,
            }
        }
    }

    pub(super) fn optimizer_place(&self, recv: &Expr) -> (TokenStream, TokenStream) {
        if is_place(recv) {
            (TokenStream::new(), quote!((#recv)))
        } else {
            let o = ident("__sg_o");
            (quote! { let #o = &mut (#recv); }, quote!((*#o)))
        }
    }
}

impl Rewriter<'_> {
    /// `__sg.bind(&x, "x", line, kind)` after `let x = ...;`, for tensors only (by type).
    fn binding_check(&self, local: &syn::Local) -> Option<syn::Stmt> {
        let mut pat = &local.pat;
        if let syn::Pat::Type(t) = pat {
            pat = &t.pat;
        }
        let syn::Pat::Ident(pi) = pat else {
            return None;
        };
        if pi.by_ref.is_some() || pi.subpat.is_some() {
            return None;
        }
        let init = local.init.as_ref()?;
        if init.diverge.is_some() {
            return None; // let-else
        }
        let name = pi.ident.to_string();
        let kind = expr_kind(&init.expr);
        let id = &pi.ident;
        let ctx = ident("__sg");
        let x = ident("__sg_x");
        let line = quote_spanned! {pi.ident.span()=> ::core::line!() };
        Some(parse_quote! {{
            #[allow(unused_imports)]
            use ::stepguard::__private::ops::*;
            let #x = #id.__sg_by_ref();
            (&::stepguard::__private::Probe(#x, &())).__sg_loss_tag().bind(&#ctx, #x, #name, #line, #kind);
        }})
    }
}

impl VisitMut for Rewriter<'_> {
    fn visit_block_mut(&mut self, block: &mut syn::Block) {
        let forward = self.forward;
        let mut out = Vec::with_capacity(block.stmts.len());
        for mut stmt in std::mem::take(&mut block.stmts) {
            let check = match &stmt {
                syn::Stmt::Local(l) if forward => self.binding_check(l),
                _ => None,
            };
            self.visit_stmt_mut(&mut stmt);
            out.push(stmt);
            out.extend(check);
        }
        block.stmts = out;
    }

    fn visit_item_mut(&mut self, _: &mut syn::Item) {
        // Nested items (fn, impl, mod) are not part of this step.
    }

    fn visit_expr_closure_mut(&mut self, c: &mut syn::ExprClosure) {
        self.closure_depth += 1;
        visit_mut::visit_expr_closure_mut(self, c);
        self.closure_depth -= 1;
    }

    fn visit_expr_async_mut(&mut self, a: &mut syn::ExprAsync) {
        self.closure_depth += 1;
        visit_mut::visit_expr_async_mut(self, a);
        self.closure_depth -= 1;
    }

    fn visit_expr_mut(&mut self, e: &mut Expr) {
        visit_mut::visit_expr_mut(self, e);
        let (div, log) = self.args.protect();
        let clips = self.args.is_set(Id::MaxNorm);
        let new = match (Recognised::of(e), &*e) {
            (Some(Recognised::Backward), _) if self.stripped => None,
            (Some(Recognised::Step), Expr::MethodCall(m)) if self.stripped => {
                clips.then(|| self.rewrite_step_stripped(m))
            }
            (Some(Recognised::BackwardStep), Expr::MethodCall(m)) if self.stripped => {
                Some(self.rewrite_backward_step_stripped(m))
            }
            (Some(Recognised::Backward), Expr::MethodCall(m)) => Some(self.rewrite_backward(m)),
            (Some(Recognised::Step), Expr::MethodCall(m)) => Some(self.rewrite_step(m)),
            (Some(Recognised::BackwardStep), Expr::MethodCall(m)) => {
                Some(self.rewrite_backward_step(m))
            }
            (Some(Recognised::DivMethod), Expr::MethodCall(m)) if div => {
                Some(self.rewrite_div_method(m))
            }
            (Some(Recognised::Log), Expr::MethodCall(m)) if log => Some(self.rewrite_log(m)),
            (Some(Recognised::Div), Expr::Binary(b)) if div => Some(self.rewrite_div(b)),
            (Some(Recognised::DivAssign), Expr::Binary(b)) if div => {
                Some(self.rewrite_div_assign(b))
            }
            _ => None,
        };
        if let Some(new) = new {
            *e = new;
        }
    }
}
