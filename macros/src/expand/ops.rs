//! The epsilon-protected operations: `a / b`, `a /= b`, `a.div(b)` and the logs, dispatched by
//! the operands' types at compile time (a plain number stays a plain number).

use syn::{parse_quote, Expr, ExprBinary, ExprMethodCall};

use super::ident;
use super::rewriter::Rewriter;

impl Rewriter<'_> {
    pub(super) fn rewrite_div(&self, b: &ExprBinary) -> Expr {
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

    pub(super) fn rewrite_div_assign(&self, b: &ExprBinary) -> Expr {
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

    pub(super) fn rewrite_div_method(&self, m: &ExprMethodCall) -> Expr {
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

    pub(super) fn rewrite_log(&self, m: &ExprMethodCall) -> Expr {
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
