//! Literal values of `#[guarded_step(...)]` arguments: numbers, integers, strings and lists,
//! each a spanned error when it is of the wrong kind, and "did you mean" suggestions.

use syn::{Expr, ExprLit, ExprUnary, Lit, LitStr, UnOp};

use super::Errors;
use crate::spec::{self, Arg, Kind};

pub(crate) fn unknown(what: &str, got: &str, known: &[&str]) -> String {
    let mut msg = format!("unknown {what} `{got}`");
    if let Some(s) = suggest(got, known) {
        msg += &format!("; did you mean `{s}`?");
    }
    msg + &format!(" (expected one of: {})", known.join(", "))
}

/// The known name closest to `got`, if it is close enough to be a typo.
pub(crate) fn suggest<'a>(got: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (levenshtein(got, k), *k))
        .filter(|(d, k)| *d <= (k.len().max(got.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Edit distance counting a swap of two neighbours as one edit (`skpi` -> `skip`).
pub(crate) fn levenshtein(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

pub(crate) fn list(
    s: &LitStr,
    known: &[&'static str],
    what: &str,
) -> syn::Result<Vec<&'static str>> {
    let v = s.value();
    let mut out = Vec::new();
    let mut errors = Errors::default();
    for item in v.split(',').map(str::trim) {
        match known.iter().find(|k| **k == item) {
            Some(k) => out.push(*k),
            None => errors.push(syn::Error::new(s.span(), unknown(what, item, known))),
        }
    }
    errors.into_result().map(|()| out)
}

pub(crate) fn string(e: &Expr, arg: &Arg) -> syn::Result<LitStr> {
    match e {
        Expr::Lit(ExprLit {
            lit: Lit::Str(s), ..
        }) => Ok(s.clone()),
        other => Err(syn::Error::new_spanned(
            other,
            format!(
                "`{}` expects a string literal, e.g. {}",
                arg.name,
                example(arg)
            ),
        )),
    }
}

/// An example of a string argument, from the table: a list's default, a choice's last name.
pub(crate) fn example(arg: &Arg) -> String {
    let value = match (arg.kind, arg.default) {
        (Kind::List(_), spec::Default::Text(t)) => t,
        (Kind::Choice(c) | Kind::List(c), _) => c.last().copied().unwrap_or(""),
        _ => "",
    };
    format!("`{} = \"{value}\"`", arg.name)
}

/// `name = value` as written: `max_norm = 5`, and inside a group `skip(max = 5)`.
pub(crate) fn written(name: &str, value: &str) -> String {
    match name.strip_suffix(')') {
        Some(group) => format!("{group} = {value})"),
        None => format!("{name} = {value}"),
    }
}

/// A numeric literal, possibly negated; `Err` for anything else.
pub(crate) fn number(e: &Expr, name: &str) -> syn::Result<f64> {
    match e {
        Expr::Lit(ExprLit {
            lit: Lit::Int(i), ..
        }) => i
            .base10_parse::<f64>()
            .or_else(|_| i.base10_parse::<u128>().map(|v| v as f64)),
        Expr::Lit(ExprLit {
            lit: Lit::Float(f), ..
        }) => f.base10_parse::<f64>(),
        Expr::Unary(ExprUnary {
            op: UnOp::Neg(_),
            expr,
            ..
        }) => number(expr, name).map(|v| -v),
        Expr::Group(g) => number(&g.expr, name),
        Expr::Lit(ExprLit {
            lit: Lit::Str(s), ..
        }) if s.value().trim().parse::<f64>().is_ok() => Err(syn::Error::new(
            s.span(),
            format!(
                "`{name}` expects a number literal: write `{}`, without quotes",
                written(name, s.value().trim())
            ),
        )),
        other => Err(syn::Error::new_spanned(
            other,
            format!(
                "`{name}` expects a number literal, e.g. `{}`",
                written(name, "5")
            ),
        )),
    }
}

pub(crate) fn norm_type(e: &Expr) -> syn::Result<f64> {
    if let Expr::Lit(ExprLit {
        lit: Lit::Str(s), ..
    }) = e
    {
        return match s.value().as_str() {
            "inf" | "infinity" => Ok(f64::INFINITY),
            other => Err(syn::Error::new(
                s.span(),
                format!("unknown norm_type `{other}` (expected a number > 0 or \"inf\")"),
            )),
        };
    }
    let v = number(e, "norm_type")?;
    if v > 0.0 {
        Ok(v)
    } else {
        Err(syn::Error::new_spanned(
            e,
            format!("`norm_type` must be > 0 (or \"inf\"), got {v}"),
        ))
    }
}

pub(crate) fn integer(e: &Expr, name: &str) -> syn::Result<u32> {
    match e {
        Expr::Lit(ExprLit {
            lit: Lit::Int(i), ..
        }) => i.base10_parse::<u32>(),
        other => Err(syn::Error::new_spanned(
            other,
            format!(
                "`{name}` expects a non-negative integer, e.g. `{}`",
                written(name, "3")
            ),
        )),
    }
}
