//! The training calls rewritten: `x.backward()`, an optimizer's `step()` and tch's
//! `backward_step` family, each with its checked and its stripped (`strip-release`) form.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::{parse_quote, Expr, ExprMethodCall, Ident};

use super::ident;
use super::rewriter::Rewriter;
use crate::analyze::expr_text;

impl Rewriter<'_> {
    pub(super) fn rewrite_backward(&self, m: &ExprMethodCall) -> Expr {
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

    pub(super) fn rewrite_step(&self, m: &ExprMethodCall) -> Expr {
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
    pub(super) fn rewrite_backward_step(&self, m: &ExprMethodCall) -> Expr {
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
    pub(super) fn rewrite_step_stripped(&self, m: &ExprMethodCall) -> Expr {
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
    pub(super) fn rewrite_backward_step_stripped(&self, m: &ExprMethodCall) -> Expr {
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
