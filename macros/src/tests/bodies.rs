//! Valid step bodies assembled from pieces (loops, closures, `?`, early returns, nested
//! blocks): the expansion parses, keeps the user's function, and rewrites every guarded or
//! protected form exactly once.

use proc_macro2::TokenStream;
use proptest::prelude::*;
use quote::quote;

use crate::guarded_step_impl;

/// What the rewrite must do to a piece of a step body: the forms it guards or protects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Forms {
    /// `/`, `/=`, `.div(x)` (not literal / literal).
    divs: usize,
    /// `.log()`, `.log2()`, `.log10()`.
    logs: usize,
    /// `.backward()`.
    backwards: usize,
    /// `.step()` (an optimizer's or not: the probe decides).
    steps: usize,
    /// `.backward_step(..)` and its clipping variants.
    backward_steps: usize,
    /// `let name = ...;` bindings (what the `forward` check follows).
    lets: usize,
    /// Nested `fn` items (left alone).
    items: usize,
}

impl std::ops::Add for Forms {
    type Output = Forms;
    fn add(self, o: Forms) -> Forms {
        Forms {
            divs: self.divs + o.divs,
            logs: self.logs + o.logs,
            backwards: self.backwards + o.backwards,
            steps: self.steps + o.steps,
            backward_steps: self.backward_steps + o.backward_steps,
            lets: self.lets + o.lets,
            items: self.items + o.items,
        }
    }
}

/// Source text and what it contains.
#[derive(Clone, Debug)]
struct Piece {
    code: String,
    forms: Forms,
}

impl Piece {
    fn concat(pieces: Vec<Piece>) -> Piece {
        Piece {
            code: pieces
                .iter()
                .map(|p| p.code.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
            forms: pieces.iter().fold(Forms::default(), |a, p| a + p.forms),
        }
    }
}

/// `(divs, logs, backwards, steps, backward_steps, lets)`.
fn forms(c: [usize; 6]) -> Forms {
    Forms {
        divs: c[0],
        logs: c[1],
        backwards: c[2],
        steps: c[3],
        backward_steps: c[4],
        lets: c[5],
        items: 0,
    }
}

/// Statements people write in a training step.
fn leaves() -> Vec<Piece> {
    let nested = Piece {
        code: "fn helper(t: &Tensor) -> Tensor { t.log() / 2.0 }".into(),
        forms: Forms {
            items: 1,
            ..Forms::default()
        },
    };
    [
        ("let q = x / y;", [1, 0, 0, 0, 0, 1]),
        (
            "let p = net.forward(x).softmax(-1, Kind::Float).log();",
            [0, 1, 0, 0, 0, 1],
        ),
        ("let r = (x / 2.0).log2().div(y);", [2, 1, 0, 0, 0, 1]),
        ("let mut m = x.copy();\nm /= y;", [1, 0, 0, 0, 0, 1]),
        ("let half = 7 / 2;", [0, 0, 0, 0, 0, 1]),
        ("let s = 1.0 / y.sum(Kind::Float);", [1, 0, 0, 0, 0, 1]),
        (
            "let loss = net.forward(x).cross_entropy_for_logits(y);",
            [0, 0, 0, 0, 0, 1],
        ),
        ("let n: f64 = 3.0;", [0, 0, 0, 0, 0, 1]),
        ("loss.backward();", [0, 0, 1, 0, 0, 0]),
        ("opt.zero_grad();", [0, 0, 0, 0, 0, 0]),
        ("opt.step();", [0, 0, 0, 1, 0, 0]),
        ("sched.step();", [0, 0, 0, 1, 0, 0]),
        ("self.opt.step();", [0, 0, 0, 1, 0, 0]),
        ("opt.backward_step(&l);", [0, 0, 0, 0, 1, 0]),
        ("opt.backward_step_clip(&loss, 0.5);", [0, 0, 0, 0, 1, 0]),
        (
            "opt.backward_step_clip_norm(&(l / 2.0), 1.0);",
            [1, 0, 0, 0, 1, 0],
        ),
        ("let v = x.f_abs()?;", [0, 0, 0, 0, 0, 1]),
        ("if flag { return Ok(()); }", [0, 0, 0, 0, 0, 0]),
        (
            "let f = |t: &Tensor| t / 2.0;\nlet _ = f(x);",
            [1, 0, 0, 0, 0, 1],
        ),
        ("let (a, b) = (x.log10(), y);", [0, 1, 0, 0, 0, 0]),
        ("let _ = x.div(&y.log());", [1, 1, 0, 0, 0, 0]),
        (
            "let Some(z) = maybe else { return Ok(()); };",
            [0, 0, 0, 0, 0, 0],
        ),
        (
            "tch::no_grad(|| { let mut w = vs.root(); w /= 2.0; });",
            [1, 0, 0, 0, 0, 1],
        ),
    ]
    .into_iter()
    .map(|(code, c)| Piece {
        code: code.into(),
        forms: forms(c),
    })
    .chain([nested])
    .collect()
}

/// Blocks around statements: loops, nested blocks, closures, branches (`b` is the second
/// branch of `if` and `match`, unused by the others).
fn wrap(kind: usize, a: Piece, b: Piece) -> Piece {
    let (x, y) = (&a.code, &b.code);
    let (code, lets, both) = match kind {
        0 => (format!("for _ in 0..2 {{\n{x}\n}}"), 0, false),
        1 => (format!("{{\n{x}\n}}"), 0, false),
        2 => (format!("loop {{\n{x}\nbreak;\n}}"), 0, false),
        3 => (format!("while flag {{\n{x}\nbreak;\n}}"), 0, false),
        4 => (
            format!("let g = |t: &Tensor| {{\n{x}\nt.shallow_clone()\n}};\nlet _ = g(x);"),
            1,
            false,
        ),
        5 => (
            format!("let mut h = move || -> Result<(), E> {{\n{x}\nOk(())\n}};\nh()?;"),
            1,
            false,
        ),
        6 => (format!("let v = {{\n{x}\nx.shallow_clone()\n}};"), 1, false),
        7 => (format!("if flag {{\n{x}\n}} else {{\n{y}\n}}"), 0, true),
        _ => (
            format!("match flag {{\ntrue => {{\n{x}\n}}\nfalse => {{\n{y}\n}}\n}}"),
            0,
            true,
        ),
    };
    let mut forms = a.forms
        + Forms {
            lets,
            ..Forms::default()
        };
    if both {
        forms = forms + b.forms;
    }
    Piece { code, forms }
}

/// A step body: statements, loops and blocks nested up to three deep.
fn body() -> impl Strategy<Value = Piece> {
    let leaf = prop::sample::select(leaves());
    let stmt = leaf.prop_recursive(3, 24, 3, |inner| {
        let block = prop::collection::vec(inner, 1..4).prop_map(Piece::concat);
        (0..9usize, block.clone(), block).prop_map(|(k, a, b)| wrap(k, a, b))
    });
    prop::collection::vec(stmt, 1..6).prop_map(Piece::concat)
}

/// Signatures of steps: free functions, generic ones, methods; the return type is a `Result`
/// so that every `on_nan` is valid.
const SIGNATURES: &[&str] = &[
    "fn NAME(opt: &mut nn::Optimizer, vs: &nn::VarStore, net: &Net, x: &Tensor, y: &Tensor, flag: bool) -> Result<(), TrainError>",
    "pub fn NAME<M: Module>(opt: &mut nn::Optimizer, net: &M, x: &Tensor, y: impl Borrow<Tensor>, flag: bool) -> anyhow::Result<()> where M: Send",
    "#[inline]\npub(crate) fn NAME(&mut self, x: &Tensor, y: &Tensor, flag: bool) -> Result<(), E>",
];

/// `(attribute, protects div, protects log, forward check, guards something)`.
const ATTRS: &[(&str, bool, bool, bool, bool)] = &[
    ("", true, true, false, true),
    ("max_norm = 1", true, true, false, true),
    ("on_nan = skip(max = 3)", true, true, false, true),
    (
        "on_nan = \"error\", checks = \"all\"",
        true,
        true,
        true,
        true,
    ),
    ("protect = \"none\"", false, false, false, true),
    (
        "protect = \"log\", checks = \"loss,forward\"",
        false,
        true,
        true,
        true,
    ),
    (
        "protect = \"div\", norm_type = \"inf\", max_norm = 2.5",
        true,
        false,
        false,
        true,
    ),
    ("params = vs, on_nan = \"skip\"", true, true, false, true),
    ("checks = \"none\"", true, true, false, false),
    (
        "checks = \"none\", max_norm = 1, protect(eps = 1e-6)",
        true,
        true,
        false,
        true,
    ),
];

/// What the expansion of one function contains, counted on its syntax tree.
#[derive(Debug, Default)]
pub(super) struct Seen {
    pub(super) sites: usize,
    pub(super) contexts: usize,
    div_tags: usize,
    log_tags: usize,
    step_tags: usize,
    guarded_backwards: usize,
    pub(super) guarded_backward_steps: usize,
    binds: usize,
    plain_divs: usize,
    plain_logs: usize,
    unguarded: Vec<String>,
    nested: Vec<String>,
    /// The most arguments of a call the expansion makes (receiver included).
    pub(super) max_args: usize,
    /// The branch taken when checks are stripped (`CHECKS_ENABLED` false), if there is one.
    stripped: Option<Box<Seen>>,
}

fn is_ident(e: &syn::Expr, name: &str) -> bool {
    let e = match e {
        syn::Expr::Unary(u) if matches!(u.op, syn::UnOp::Deref(_)) => &*u.expr,
        e => e,
    };
    matches!(e, syn::Expr::Path(p) if p.path.is_ident(name))
}

fn method_named(e: &syn::Expr, name: &str) -> bool {
    matches!(e, syn::Expr::MethodCall(m) if m.method == name)
}

impl<'a> syn::visit::Visit<'a> for Seen {
    fn visit_item(&mut self, i: &'a syn::Item) {
        match i {
            syn::Item::Static(s) if s.ident == "__SG_SITE" => self.sites += 1,
            // The rewrite's own `use ::stepguard::__private::{..}` (traits for the probes).
            syn::Item::Use(u) if quote!(#u).to_string().contains("__private") => {}
            other => self.nested.push(quote!(#other).to_string()),
        }
    }

    fn visit_expr_if(&mut self, i: &'a syn::ExprIf) {
        let cond = &i.cond;
        let on_const = quote!(#cond).to_string().contains("CHECKS_ENABLED");
        match &i.else_branch {
            Some((_, e)) if on_const => {
                self.visit_block(&i.then_branch);
                let mut s = Seen::default();
                syn::visit::Visit::visit_expr(&mut s, e);
                self.max_args = self.max_args.max(s.max_args);
                self.stripped = Some(Box::new(s));
            }
            _ => syn::visit::visit_expr_if(self, i),
        }
    }

    fn visit_expr_call(&mut self, c: &'a syn::ExprCall) {
        if quote!(#c).to_string().contains("__private") {
            self.max_args = self.max_args.max(c.args.len());
        }
        if let syn::Expr::Path(p) = &*c.func {
            let segs: Vec<String> = p
                .path
                .segments
                .iter()
                .map(|s| s.ident.to_string())
                .collect();
            if segs.ends_with(&["Ctx".into(), "begin".into()]) {
                self.contexts += 1;
            }
        }
        syn::visit::visit_expr_call(self, c);
    }

    fn visit_expr_binary(&mut self, b: &'a syn::ExprBinary) {
        if matches!(b.op, syn::BinOp::Div(_) | syn::BinOp::DivAssign(_)) {
            let lit = |e: &syn::Expr| matches!(e, syn::Expr::Lit(_));
            let closure = is_ident(&b.left, "__sg_a") && is_ident(&b.right, "__sg_b");
            if !(closure || lit(&b.left) && lit(&b.right)) {
                self.plain_divs += 1;
            }
        }
        syn::visit::visit_expr_binary(self, b);
    }

    fn visit_expr_method_call(&mut self, m: &'a syn::ExprMethodCall) {
        let name = m.method.to_string();
        let n = m.args.len();
        let recv = &*m.receiver;
        if name.starts_with("__sg") || quote!(#recv).to_string().contains("__sg") {
            self.max_args = self.max_args.max(n + 1);
        }
        match (name.as_str(), n) {
            ("__sg_div_tag", 0) => self.div_tags += 1,
            ("__sg_log_tag", 0) => self.log_tags += 1,
            ("__sg_step_tag", 0) => self.step_tags += 1,
            ("backward", 5) if method_named(recv, "__sg_loss_tag") => self.guarded_backwards += 1,
            ("bind", 5) if method_named(recv, "__sg_loss_tag") => self.binds += 1,
            ("backward_step", 6) if matches!(recv, syn::Expr::Path(p) if p.path.segments.last().unwrap().ident == "Optimizer") => {
                self.guarded_backward_steps += 1
            }
            ("step", 0) if !is_ident(recv, "__sg_p") => self.unguarded.push(name),
            ("backward", 0) if !is_ident(recv, "__sg_l") => self.unguarded.push(name),
            ("backward_step" | "backward_step_clip" | "backward_step_clip_norm", _) => {
                self.unguarded.push(name)
            }
            ("div", 1) if !is_ident(recv, "__sg_a") => self.plain_divs += 1,
            ("log" | "log2" | "log10", 0) if !is_ident(recv, "__sg_a") => self.plain_logs += 1,
            _ => {}
        }
        syn::visit::visit_expr_method_call(self, m);
    }
}

pub(super) fn seen(f: &syn::ItemFn) -> Seen {
    let mut s = Seen::default();
    syn::visit::Visit::visit_block(&mut s, &f.block);
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// On a valid step the expansion is the user's function (name, signature, attributes),
    /// with one registration and one context, and every guarded or protected form rewritten,
    /// wherever it sits: loops, closures, nested blocks, branches, after `?` or an early return.
    #[test]
    fn rewrites_every_form_of_a_valid_step(
        attr in prop::sample::select(ATTRS),
        sig in prop::sample::select(SIGNATURES),
        name in prop::sample::select(vec!["step", "train_step", "update", "fit_epoch", "d_step"]),
        body in body(),
    ) {
        let (attr_text, div, log, forward, guards) = attr;
        let source = format!("{} {{\n{}\nOk(())\n}}", sig.replace("NAME", name), body.code);
        let item: syn::ItemFn = syn::parse_str(&source).expect("the generated step parses");
        let attr_tokens: TokenStream = attr_text.parse().unwrap();
        let out = guarded_step_impl(attr_tokens, quote!(#item));
        let file: syn::File = syn::parse2(out.clone()).map_err(|e| {
            TestCaseError::fail(format!("expansion does not parse: {e}\n{out}"))
        })?;
        let f = &body.forms;
        let nothing_to_guard = guards && f.backwards + f.steps + f.backward_steps == 0;
        if nothing_to_guard {
            // The one error: the function itself comes back untouched, then the error.
            prop_assert_eq!(file.items.len(), 2);
            prop_assert_eq!(&file.items[0], &syn::Item::Fn(item.clone()));
            prop_assert!(matches!(&file.items[1], syn::Item::Macro(m) if m.mac.path.segments.last().unwrap().ident == "compile_error"));
            return Ok(());
        }
        prop_assert_eq!(file.items.len(), 1, "no error expected: {}", out);
        let syn::Item::Fn(g) = &file.items[0] else {
            return Err(TestCaseError::fail("not a function"));
        };
        prop_assert_eq!(&g.sig, &item.sig);
        prop_assert_eq!(&g.sig.ident.to_string(), name);
        prop_assert_eq!(&g.attrs, &item.attrs);
        prop_assert_eq!(&g.vis, &item.vis);

        let s = seen(g);
        prop_assert_eq!((s.sites, s.contexts), (1, 1), "one site, one context");
        prop_assert!(s.unguarded.is_empty(), "left unguarded: {:?}", s.unguarded);
        prop_assert!(s.max_args <= 6, "a generated call takes {} arguments", s.max_args);
        // Without nested items the body comes twice: the copy for stripped checks has no
        // context, no loss check and no forward check, and the same protection.
        prop_assert_eq!(s.stripped.is_some(), f.items == 0);
        if let Some(st) = &s.stripped {
            prop_assert_eq!((st.contexts, st.guarded_backwards, st.binds), (0, 0, 0));
            prop_assert_eq!((st.div_tags, st.log_tags), (s.div_tags, s.log_tags));
        }
        prop_assert_eq!(s.step_tags, f.steps);
        prop_assert_eq!(s.guarded_backwards, f.backwards);
        prop_assert_eq!(s.guarded_backward_steps, f.backward_steps);
        prop_assert_eq!(s.div_tags, if div { f.divs } else { 0 });
        prop_assert_eq!(s.plain_divs, if div { 0 } else { f.divs });
        prop_assert_eq!(s.log_tags, if log { f.logs } else { 0 });
        prop_assert_eq!(s.plain_logs, if log { 0 } else { f.logs });
        prop_assert_eq!(s.binds, if forward { f.lets } else { 0 });
        // Nested items come back as written.
        prop_assert_eq!(s.nested.len(), f.items);
        let helper = leaves().last().unwrap().code.parse::<TokenStream>().unwrap().to_string();
        for n in &s.nested {
            prop_assert_eq!(n, &helper);
        }
    }
}
