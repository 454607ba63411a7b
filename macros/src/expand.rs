//! Generation: the body rewrite and the registration of the guarded function.

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::visit_mut::{self, VisitMut};
use syn::{parse_quote, Expr, ExprBinary, ExprMethodCall, Ident, ItemFn, Type};

use crate::analyze::{
    arg_names, expr_kind, expr_text, is_place, param_sources, root_ident, var_store_args, Found,
    Recognised,
};
use crate::attr::{Args, OnNan};
use crate::spec::Id;

#[derive(Clone)]
struct Rewriter<'a> {
    args: &'a Args,
    on_nan: OnNan,
    /// The `E` of a `Result<_, E>` return type: `Some(None)` when it returns a `Result` whose
    /// error type is not written out (an alias such as `anyhow::Result<T>`).
    result_err: Option<Option<Type>>,
    has_step: bool,
    manual: bool,
    /// The `forward` check: every `let` binding of a tensor is checked.
    forward: bool,
    /// The branch of a build whose checks are stripped (`CHECKS_ENABLED` false): no context,
    /// no checks; clipping and protection stay.
    stripped: bool,
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
            // A skip that ran out of `max_skips` returns the error when `E: From<GuardError>`.
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

    fn eps(&self) -> TokenStream {
        let eps = proc_macro2::Literal::f64_suffixed(self.args.number(Id::Eps));
        quote!(#eps)
    }

    /// `&At { .. }`: what the generated call knows about its place in the source, a constant.
    fn at(&self, span: Span, expr: &str, read_now: bool) -> TokenStream {
        let line = quote_spanned! {span=> ::core::line!() };
        let manual = self.manual;
        quote! {
            &::stepguard::__private::At { line: #line, expr: #expr, read_now: #read_now, manual: #manual }
        }
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
        let at = self.at(m.method.span(), &expr_text(recv), read_now);
        let outcome = self.outcome(quote! {
            (&::stepguard::__private::Probe(#l, &())).__sg_loss_tag().backward(
                &#ctx, #l, #at, #names, |#l| #l.#method())
        });
        // The receiver's temporaries live to the end of the `match`.
        parse_quote! {{
            #[allow(unused_imports)]
            use ::stepguard::__private::ops::*;
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
        let at = self.at(m.method.span(), "", false);
        let p = ident("__sg_p");
        let step = if self.args.deferred() {
            Ident::new("step_deferred", m.method.span())
        } else {
            Ident::new("step", m.method.span())
        };
        let outcome = self.outcome(quote! {
            #t.#step(&#ctx, #o.__sg_by_mut(), #at, #names, |#p| #p.#method())
        });
        parse_quote! {{
            #[allow(unused_imports)]
            use ::stepguard::__private::ops::*;
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
        let clip = clip_of(m);
        let span = m.method.span();
        let at = self.at(span, &expr_text(loss), false);
        let call = if self.args.deferred() {
            quote_spanned! {span=>
                ::stepguard::__private::Optimizer.backward_step_deferred(&#ctx, (#recv).__sg_by_mut(), #l, #clip, #at, #names)
            }
        } else {
            quote_spanned! {span=>
                ::stepguard::__private::Optimizer.backward_step(&#ctx, (#recv).__sg_by_mut(), #l, #clip, #at, #names)
            }
        };
        let check = self.outcome(call);
        // tch's `backward_step` takes `&Tensor`: the same coercion settles the loss's type
        // (`let loss = a + kld;`), and its temporaries live to the end of the `match`.
        parse_quote! {{
            #[allow(unused_imports)]
            use ::stepguard::__private::ops::*;
            match ::stepguard::__private::loss_ref(#loss) {
                #l => { #check }
            }
        }}
    }

    /// `opt.step()` with the checks stripped: clipping, then the step.
    fn rewrite_step_stripped(&self, m: &ExprMethodCall) -> Expr {
        let (bind, o) = self.optimizer_place(&m.receiver);
        let (method, p, site) = (&m.method, ident("__sg_p"), ident("__SG_SITE"));
        parse_quote! {{
            #[allow(unused_imports)]
            use ::stepguard::__private::ops::*;
            #bind
            (&::stepguard::__private::Probe(#o.__sg_by_ref(), &())).__sg_step_tag()
                .step_stripped(&#site, #o.__sg_by_mut(), |#p| #p.#method())
        }}
    }

    /// tch's `backward_step` family with the checks stripped: its clipping is the guard's
    /// (anything but a `GuardedOptimizer` is reported by the guarded branch, once).
    fn rewrite_backward_step_stripped(&self, m: &ExprMethodCall) -> Expr {
        let (bind, o) = self.optimizer_place(&m.receiver);
        let (loss, site) = (&m.args[0], ident("__SG_SITE"));
        let (l, c) = (ident("__sg_l"), ident("__sg_c"));
        let second: Vec<&Expr> = m.args.iter().skip(1).collect();
        let c_bind: Vec<&Ident> = second.iter().map(|_| &c).collect();
        let clip = if second.is_empty() {
            quote!(::stepguard::__private::Clip::None)
        } else if m.method == "backward_step_clip" {
            quote!(::stepguard::__private::Clip::Value(#c))
        } else {
            quote!(::stepguard::__private::Clip::Norm(#c))
        };
        parse_quote! {{
            #[allow(unused_imports)]
            use ::stepguard::__private::ops::*;
            #bind
            match (::stepguard::__private::loss_ref(#loss), #(#second),*) {
                (#l, #(#c_bind),*) => (&::stepguard::__private::Probe(#o.__sg_by_ref(), &()))
                    .__sg_step_tag()
                    .backward_step_stripped(&#site, #o.__sg_by_mut(), #l, #clip),
            }
        }}
    }

    fn rewrite_div(&self, b: &ExprBinary) -> Expr {
        let (x, y) = (ident("__sg_a"), ident("__sg_b"));
        let (lhs, rhs, eps) = (&b.left, &b.right, self.eps());
        parse_quote! {{
            #[allow(unused_imports)]
            use ::stepguard::__private::ops::*;
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
            use ::stepguard::__private::ops::*;
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
            use ::stepguard::__private::ops::*;
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
            use ::stepguard::__private::ops::*;
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

/// The clipping of a `backward_step` call: `Clip::Value(v)` for `backward_step_clip(&l, v)`,
/// `Clip::Norm(m)` for `backward_step_clip_norm(&l, m)`.
fn clip_of(m: &ExprMethodCall) -> TokenStream {
    let p = quote!(::stepguard::__private::Clip);
    match (m.method.to_string().as_str(), m.args.iter().nth(1)) {
        ("backward_step_clip", Some(v)) => quote!(#p::Value(#v)),
        ("backward_step_clip_norm", Some(n)) => quote!(#p::Norm(#n)),
        _ => quote!(#p::None),
    }
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
    let strippable = !args.is_set(Id::LossScale)
        && !args.is_set(Id::Adaptive)
        && !(manual && args.is_set(Id::MaxNorm))
        && found.items == 0;
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
    let guarded = quote! {
        #[allow(unused_variables)]
        let #ctx = ::stepguard::__private::Ctx::begin(&#site, #state, #entry, #protected)#group;
        #(#stmts)*
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
