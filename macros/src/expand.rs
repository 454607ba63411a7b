//! Generation: the body rewrite and the registration of the guarded function.

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::visit_mut::{self, VisitMut};
use syn::{parse_quote, BinOp, Expr, ExprBinary, ExprMethodCall, Ident, ItemFn, Type};

use crate::analyze::{
    arg_names, expr_kind, expr_text, is_literal, is_place, param_sources, root_ident,
    var_store_args, Found,
};
use crate::attr::{Args, OnNan};

struct Rewriter<'a> {
    args: &'a Args,
    /// The `E` of a `Result<_, E>` return type: `Some(None)` when it returns a `Result` whose
    /// error type is not written out (an alias such as `anyhow::Result<T>`).
    result_err: Option<Option<Type>>,
    has_step: bool,
    manual: bool,
    names: TokenStream,
    closure_depth: usize,
    /// The return type's span, where a missing `From<GuardError>` is reported.
    output_span: Span,
}

fn ident(name: &str) -> Ident {
    Ident::new(name, Span::mixed_site())
}

impl Rewriter<'_> {
    fn fail(&self) -> TokenStream {
        let e = ident("__sg_e");
        match (Some(self.args.on_nan), &self.result_err) {
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
            // A skip that ran out of `max_skips` returns the error when `E: From<GuardError>`.
            (Some(OnNan::Skip), Some(Some(err_ty))) if self.closure_depth == 0 => quote! {
                return ::core::result::Result::Err({
                    #[allow(unused_imports)]
                    use ::stepguard::__private::{EscalateFrom as _, EscalatePanic as _};
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

    fn verdict(
        &self,
        proceed: TokenStream,
        skip: TokenStream,
        scrutinee: TokenStream,
    ) -> TokenStream {
        let e = ident("__sg_e");
        let fail = self.fail();
        quote! {
            match #scrutinee {
                ::stepguard::__private::Verdict::Proceed => { #proceed }
                ::stepguard::__private::Verdict::Skip => { #skip }
                ::stepguard::__private::Verdict::Fail(#e) => #fail,
            }
        }
    }

    fn eps(&self) -> TokenStream {
        let eps = proc_macro2::Literal::f64_suffixed(self.args.eps);
        quote!(#eps)
    }

    /// `match` on an `Outcome`: the value, or the failure leaves the function.
    fn outcome(&self, scrutinee: TokenStream) -> TokenStream {
        let (e, r) = (ident("__sg_e"), ident("__sg_r"));
        let fail = self.fail();
        quote! {
            match #scrutinee {
                ::stepguard::__private::Outcome::Value(#r) => #r,
                ::stepguard::__private::Outcome::Fail(#e) => #fail,
            }
        }
    }

    fn rewrite_backward(&self, m: &ExprMethodCall) -> Expr {
        let ctx = ident("__sg");
        let l = ident("__sg_l");
        let recv = &m.receiver;
        let method = &m.method;
        let names = &self.names;
        let read_now = !self.has_step && !self.manual;
        let manual = self.manual;
        let line = quote_spanned! {m.method.span()=> ::core::line!() };
        let expr = expr_text(recv);
        let outcome = self.outcome(quote! {
            (&::stepguard::__private::Probe(#l, &())).__sg_loss_tag().backward(
                &#ctx, #l, #read_now, #manual, #line, #expr, #names, |#l| #l.#method())
        });
        // The receiver's temporaries live to the end of the `match`.
        parse_quote! {{
            #[allow(unused_imports)]
            use ::stepguard::__private::{ByRef as _, LossTensor as _, LossPlain as _};
            match (#recv).__sg_by_ref() {
                #l => #outcome,
            }
        }}
    }

    fn optimizer_place(&self, recv: &Expr) -> (TokenStream, TokenStream) {
        if is_place(recv) {
            (TokenStream::new(), quote!((#recv)))
        } else {
            let o = ident("__sg_o");
            (quote! { let #o = &mut (#recv); }, quote!((*#o)))
        }
    }

    fn rewrite_step(&self, m: &ExprMethodCall) -> Expr {
        let ctx = ident("__sg");
        let t = ident("__sg_t");
        let (bind, o) = self.optimizer_place(&m.receiver);
        let method = &m.method;
        let names = &self.names;
        let line = quote_spanned! {m.method.span()=> ::core::line!() };
        let p = ident("__sg_p");
        let step = if self.args.deferred {
            Ident::new("step_deferred", m.method.span())
        } else {
            Ident::new("step", m.method.span())
        };
        let outcome = self.outcome(quote! {
            #t.#step(&#ctx, #o.__sg_by_mut(), #line, #names, |#p| #p.#method())
        });
        parse_quote! {{
            #[allow(unused_imports)]
            use ::stepguard::__private::{ByMut as _, ByRef as _, StepOptimizer as _, StepPlain as _};
            #bind
            let #t = (&::stepguard::__private::Probe(#o.__sg_by_ref(), &())).__sg_step_tag();
            #outcome
        }}
    }

    /// `backward_step(&loss)`, `backward_step_clip(&loss, v)`, `backward_step_clip_norm(&loss, m)`.
    fn rewrite_backward_step(&self, m: &ExprMethodCall) -> Expr {
        let ctx = ident("__sg");
        let l = ident("__sg_l");
        let names = &self.names;
        let (recv, loss) = (&m.receiver, &m.args[0]);
        let none = quote!(::core::option::Option::None);
        let second = m
            .args
            .iter()
            .nth(1)
            .map(|a| quote!(::core::option::Option::Some(#a)));
        let (clip_value, max_norm) = match (m.method.to_string().as_str(), second) {
            ("backward_step_clip", Some(a)) => (a, none),
            ("backward_step_clip_norm", Some(a)) => (none.clone(), a),
            _ => (none.clone(), none),
        };
        let span = m.method.span();
        let line = quote_spanned! {span=> ::core::line!() };
        let expr = expr_text(loss);
        let call = if self.args.deferred {
            quote_spanned! {span=>
                ::stepguard::__private::Optimizer.backward_step_deferred(&#ctx, (#recv).__sg_by_mut(), #l, #clip_value, #max_norm, #line, #expr, #names)
            }
        } else {
            quote_spanned! {span=>
                ::stepguard::__private::Optimizer.backward_step(&#ctx, (#recv).__sg_by_mut(), #l, #clip_value, #max_norm, #line, #expr, #names)
            }
        };
        let check = self.verdict(quote! {}, quote! {}, call);
        // tch's `backward_step` takes `&Tensor`: the same coercion settles the loss's type
        // (`let loss = a + kld;`), and its temporaries live to the end of the `match`.
        parse_quote! {{
            #[allow(unused_imports)]
            use ::stepguard::__private::{ByMut as _, ByRef as _};
            match ::stepguard::__private::loss_ref(#loss) {
                #l => { #check }
            }
        }}
    }

    fn rewrite_div(&self, b: &ExprBinary) -> Expr {
        let (x, y) = (ident("__sg_a"), ident("__sg_b"));
        let (lhs, rhs, eps) = (&b.left, &b.right, self.eps());
        parse_quote! {{
            #[allow(unused_imports)]
            use ::stepguard::__private::{ByRef as _, DivTensor as _, DivNumber as _, DivPlain as _};
            match (#lhs, #rhs) {
                (#x, #y) => {
                    (&::stepguard::__private::Probe(#x.__sg_by_ref(), #y.__sg_by_ref())).__sg_div_tag().div(#x, #y, #eps, |#x, #y| #x / #y)
                }
            }
        }}
    }

    fn rewrite_div_assign(&self, b: &ExprBinary) -> Expr {
        let (x, y) = (ident("__sg_a"), ident("__sg_b"));
        let (lhs, rhs, eps) = (&b.left, &b.right, self.eps());
        parse_quote! {{
            #[allow(unused_imports)]
            use ::stepguard::__private::{ByRef as _, DivTensor as _, DivPlain as _};
            match (&mut (#lhs), #rhs) {
                (#x, #y) => {
                    (&::stepguard::__private::Probe((*#x).__sg_by_ref(), #y.__sg_by_ref())).__sg_div_tag().div_assign(#x, #y, #eps, |#x, #y| *#x /= #y)
                }
            }
        }}
    }

    fn rewrite_div_method(&self, m: &ExprMethodCall) -> Expr {
        let (x, y) = (ident("__sg_a"), ident("__sg_b"));
        let (recv, arg, method, eps) = (&m.receiver, &m.args[0], &m.method, self.eps());
        parse_quote! {{
            #[allow(unused_imports)]
            use ::stepguard::__private::{ByRef as _, DivTensor as _, DivNumber as _, DivPlain as _};
            match ((#recv).__sg_by_ref(), #arg) {
                (#x, #y) => {
                    (&::stepguard::__private::Probe(#x, #y.__sg_by_ref())).__sg_div_tag().div_method(#x, #y, #eps, |#x, #y| #x.#method(#y))
                }
            }
        }}
    }

    fn rewrite_log(&self, m: &ExprMethodCall) -> Expr {
        let x = ident("__sg_a");
        let (recv, method, eps) = (&m.receiver, &m.method, self.eps());
        parse_quote! {{
            #[allow(unused_imports)]
            use ::stepguard::__private::{ByRef as _, LogTensor as _, LogPlain as _};
            match (#recv).__sg_by_ref() {
                #x => {
                    (&::stepguard::__private::Probe(#x, &())).__sg_log_tag().#method(#x, #eps, |#x| #x.#method())
                }
            }
        }}
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
            use ::stepguard::__private::{ByRef as _, LossTensor as _, LossPlain as _};
            let #x = #id.__sg_by_ref();
            (&::stepguard::__private::Probe(#x, &())).__sg_loss_tag().bind(&#ctx, #x, #name, #line, #kind);
        }})
    }
}

impl VisitMut for Rewriter<'_> {
    fn visit_block_mut(&mut self, block: &mut syn::Block) {
        let forward = self.args.checks.forward;
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
        let (div, log) = (self.args.protect_div, self.args.protect_log);
        let new = match e {
            Expr::MethodCall(m) => match (m.method.to_string().as_str(), m.args.len()) {
                ("backward", 0) => Some(self.rewrite_backward(m)),
                ("step", 0) => Some(self.rewrite_step(m)),
                ("backward_step", 1)
                | ("backward_step_clip", 2)
                | ("backward_step_clip_norm", 2) => Some(self.rewrite_backward_step(m)),
                ("div", 1) if div => Some(self.rewrite_div_method(m)),
                ("log" | "log2" | "log10", 0) if log => Some(self.rewrite_log(m)),
                _ => None,
            },
            Expr::Binary(b) if div && !(is_literal(&b.left) && is_literal(&b.right)) => {
                match b.op {
                    BinOp::Div(_) => Some(self.rewrite_div(b)),
                    BinOp::DivAssign(_) => Some(self.rewrite_div_assign(b)),
                    _ => None,
                }
            }
            _ => None,
        };
        if let Some(new) = new {
            *e = new;
        }
    }
}

/// The guarded function: registration, the per-call context, the rewritten body.
pub(crate) fn expand(args: &Args, mut item: ItemFn, found: &Found) -> TokenStream {
    let var_stores = var_store_args(&item);
    let mut sources: Vec<TokenStream> = var_stores.iter().map(|i| quote!(&(#i))).collect();
    // Sources that exist when the call starts (arguments, `self`): their buffers are saved.
    let mut entry = sources.clone();
    let args_names = arg_names(&item);
    for p in args.params.iter().flat_map(param_sources) {
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
    let mut r = Rewriter {
        args,
        result_err: crate::valid::result_error_type(&item.sig.output),
        has_step: found.steps > 0,
        manual: found.steps == 0 && args.params.is_some(),
        names,
        closure_depth: 0,
        output_span: crate::analyze::output_span(&item),
    };
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
    let state = match &args.state {
        Some(s) => {
            quote!(::core::option::Option::Some(::core::borrow::Borrow::<::stepguard::__private::GuardState>::borrow(&(#s))))
        }
        None => quote!(::core::option::Option::None),
    };
    let protected = crate::config::protected_tokens(args, found);
    let group = args.group.as_ref().map(|g| {
        quote!(.with_group(::core::borrow::Borrow::<::stepguard::dist::ProcessGroup>::borrow(&(#g))))
    });
    let body = quote! {{
        #site_def
        ::stepguard::__private::inventory::submit! { ::stepguard::__private::Registration(&#site) }
        #[allow(unused_variables)]
        let #ctx = ::stepguard::__private::Ctx::begin(&#site, #state, #entry, #protected)#group;
        #(#stmts)*
    }};
    item.block = Box::new(syn::parse2(body).expect("generated block parses"));
    item.into_token_stream()
}
