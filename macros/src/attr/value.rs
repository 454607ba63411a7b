//! One argument's value checked against its row of the table: the kind of a literal and its
//! range, a group's call (`max_norm = adaptive(..)`, `on_nan = skip(..)`) and the arguments
//! inside a group.

use proc_macro2::Span;
use syn::spanned::Spanned;
use syn::{Expr, Ident};

use super::args::{Args, Value};
use super::literal::{self, integer, list, norm_type, number, string, unknown};
use super::Errors;
use crate::spec::{Arg, Group, Id, Kind};

pub(super) fn names(args: &[Arg]) -> Vec<&'static str> {
    args.iter().map(|a| a.name).collect()
}

/// `k = v` inside a group.
pub(super) fn assignment(e: &Expr) -> syn::Result<(Ident, Expr)> {
    if let Expr::Assign(a) = e {
        if let Expr::Path(p) = &*a.left {
            if let Some(k) = p.path.get_ident() {
                return Ok((k.clone(), (*a.right).clone()));
            }
        }
    }
    Err(syn::Error::new_spanned(
        e,
        "expected `name = value` inside the parentheses",
    ))
}

/// How an argument is named in messages: `max_norm`, `loss_scale(init)`.
pub(crate) fn display(group: Option<&str>, name: &str) -> String {
    match group {
        Some(g) => format!("{g}({name})"),
        None => name.to_string(),
    }
}

/// Parses `value` as the kind of `arg`, range-checked.
pub(super) fn value_of(arg: &Arg, group: Option<&str>, value: &Expr) -> syn::Result<Value> {
    let name = display(group, arg.name);
    let range_error = |v: f64, want: &str| {
        // `5e-324` as written, not its 324 decimals.
        let got = if v != 0.0 && v.abs() < 1e-6 {
            format!("{v:e}")
        } else {
            format!("{v}")
        };
        syn::Error::new_spanned(value, format!("`{name}` must be {want}, got {got}"))
    };
    match arg.kind {
        Kind::Number(r) => {
            let v = number(value, &name)?;
            if r.holds(v) {
                Ok(Value::Number(v))
            } else {
                Err(range_error(v, r.want()))
            }
        }
        Kind::Integer(r) => {
            let v = f64::from(integer(value, &name)?);
            if r.holds(v) {
                Ok(Value::Number(v))
            } else {
                Err(range_error(v, r.want()))
            }
        }
        Kind::Norm => norm_type(value).map(Value::Number),
        Kind::Choice(choices) => {
            let s = string(value, arg)?;
            let got = s.value();
            match choices.iter().find(|c| **c == got.trim()) {
                Some(c) => Ok(Value::Text(c)),
                None => {
                    let mut msg = unknown(&format!("{name} value"), got.trim(), choices);
                    // A choice with arguments is written as a call: `on_nan = skip(max = 3)`.
                    if let Some(g) = arg.group.filter(|g| g.call.is_some()) {
                        let inner: Vec<String> =
                            g.args.iter().map(|a| format!("{} = ..", a.name)).collect();
                        let call = g.call.unwrap_or_default();
                        msg += &format!(", or `{call}({})`", inner.join(", "));
                    }
                    Err(syn::Error::new(s.span(), msg))
                }
            }
        }
        Kind::List(known) => {
            let s = string(value, arg)?;
            let what = if matches!(arg.id, Id::Checks | Id::ChecksList) {
                "check"
            } else {
                "protected operation"
            };
            list(&s, known, what).map(Value::List)
        }
        Kind::Expr => Ok(Value::Expr(value.clone())),
    }
}

/// The group form written as a value, `adaptive(sigmas = 3)`, `adaptive` or `"adaptive"`:
/// its arguments, `None` when `value` is not the group's call.
/// A choice's call is not taken bare (`on_nan = skip`): its short form is the string.
pub(super) fn call_form(
    top: &Arg,
    group: &Group,
    value: &Expr,
) -> Option<syn::Result<Vec<(Ident, Expr)>>> {
    let call = group.call?;
    let bare = !matches!(top.kind, Kind::Choice(_));
    match value {
        Expr::Call(c) if matches!(&*c.func, Expr::Path(p) if p.path.is_ident(call)) => {
            Some(c.args.iter().map(assignment).collect())
        }
        Expr::Path(p) if bare && p.path.is_ident(call) => Some(Ok(Vec::new())),
        Expr::Lit(syn::ExprLit {
            lit: syn::Lit::Str(s),
            ..
        }) if s.value() == call => Some(Ok(Vec::new())),
        _ => None,
    }
}

/// `max_norm = adaptve(..)` (or `"adaptve"`): a name where the group's call belongs. For a
/// choice (`on_nan`), only a call: a string or a bare name is checked as a choice.
pub(super) fn wrong_call(top: &Arg, group: &Group, value: &Expr) -> Option<syn::Error> {
    let call = group.call?;
    if let Kind::Choice(choices) = top.kind {
        let Expr::Call(c) = value else { return None };
        let Expr::Path(p) = &*c.func else { return None };
        let got = p.path.get_ident()?.to_string();
        let quoted: Vec<String> = choices.iter().map(|c| format!("\"{c}\"")).collect();
        let mut msg = format!(
            "`{}` is one of {} or `{call}(..)`, got `{got}(..)`",
            top.name,
            quoted.join(", ")
        );
        if literal::suggest(&got, &[call]).is_some() {
            msg += &format!("; did you mean `{call}`?");
        }
        return Some(syn::Error::new(p.span(), msg));
    }
    let (got, span) = match value {
        Expr::Call(c) => match &*c.func {
            Expr::Path(p) => (p.path.get_ident()?.to_string(), p.span()),
            _ => return None,
        },
        Expr::Path(p) => (p.path.get_ident()?.to_string(), p.span()),
        Expr::Lit(syn::ExprLit {
            lit: syn::Lit::Str(s),
            ..
        }) if s.value().trim().parse::<f64>().is_err() => (s.value(), s.span()),
        _ => return None,
    };
    let mut msg = format!("`{}` is a number or `{call}(..)`, got `{got}`", top.name);
    if literal::suggest(&got, &[call]).is_some() {
        msg += &format!("; did you mean `{call}`?");
    }
    Some(syn::Error::new(span, msg))
}

/// What writing a group sets: its call for an argument whose short form is a choice
/// (`on_nan = skip(..)` is `on_nan = "skip"`), else "on".
fn group_value(top: &Arg, group: &Group) -> Value {
    match (top.kind, group.call) {
        (Kind::Choice(choices), Some(call)) if group.sets == top.id => choices
            .iter()
            .find(|c| **c == call)
            .map_or(Value::On, |c| Value::Text(c)),
        _ => Value::On,
    }
}

/// The arguments inside a group.
pub(super) fn parse_group(
    top: &Arg,
    group: &Group,
    items: Vec<(Ident, Expr)>,
    span: Span,
    args: &mut Args,
    errors: &mut Errors,
) {
    let shown = group.call.unwrap_or(top.name);
    args.push(group.sets, group_value(top, group), span);
    let mut seen: Vec<String> = Vec::new();
    for (key, value) in items {
        let name = key.to_string();
        let Some(arg) = group.args.iter().find(|a| a.name == name) else {
            errors.push(syn::Error::new(
                key.span(),
                unknown(
                    &format!("`{shown}(..)` argument"),
                    &name,
                    &names(group.args),
                ),
            ));
            continue;
        };
        if seen.contains(&name) {
            errors.push(syn::Error::new(
                key.span(),
                format!("duplicate argument `{name}` in `{shown}(..)`"),
            ));
            continue;
        }
        seen.push(name);
        match value_of(arg, Some(shown), &value) {
            Ok(v) => args.push(arg.id, v, value.span()),
            Err(e) => errors.push(e),
        }
    }
}
