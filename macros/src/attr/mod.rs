//! Parsing of `#[guarded_step(...)]` arguments, driven by the argument table (`crate::spec`):
//! `name = value`, `name(k = v, ..)` and `name = call(k = v, ..)`. Every problem becomes a
//! spanned `syn::Error`; they are all collected so the user sees them together.

use proc_macro2::{Span, TokenStream};
use syn::parse::{Parse, ParseStream, Parser};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, Ident, Token};

use crate::spec::{self, Arg, Group, Id, Kind, Setting};

pub(crate) mod literal;

use literal::{integer, list, norm_type, number, string, unknown};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum OnNan {
    Panic,
    Error,
    Skip,
}

/// Which checks run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Checks {
    pub(crate) loss: bool,
    pub(crate) grads: bool,
    pub(crate) params: bool,
    pub(crate) forward: bool,
}

impl Checks {
    pub(crate) const NONE: Checks = Checks {
        loss: false,
        grads: false,
        params: false,
        forward: false,
    };

    pub(crate) fn any(self) -> bool {
        self != Checks::NONE
    }
}

/// A value as written, checked against its kind and range.
#[derive(Clone)]
pub(crate) enum Value {
    /// A group written (`loss_scale(..)`, `max_norm = adaptive(..)`).
    On,
    Number(f64),
    /// One of the kind's choices.
    Text(&'static str),
    /// Names of the kind's list.
    List(Vec<&'static str>),
    Expr(Expr),
}

/// One valid argument, with the span of what the user wrote.
#[derive(Clone)]
pub(crate) struct Given {
    pub(crate) id: Id,
    pub(crate) value: Value,
    pub(crate) span: Span,
}

/// The arguments written, each valid; everything else comes from the table's defaults.
#[derive(Clone, Default)]
pub(crate) struct Args {
    given: Vec<Given>,
}

impl Args {
    pub(crate) fn get(&self, id: Id) -> Option<&Given> {
        self.given.iter().find(|g| g.id == id)
    }
    pub(crate) fn is_set(&self, id: Id) -> bool {
        self.get(id).is_some()
    }
    pub(crate) fn span(&self, id: Id) -> Option<Span> {
        self.get(id).map(|g| g.span)
    }
    /// The number written, or the table's default.
    pub(crate) fn number(&self, id: Id) -> f64 {
        match self.get(id).map(|g| &g.value) {
            Some(Value::Number(v)) => *v,
            _ => spec::default_number(id),
        }
    }
    /// The number written, if any.
    pub(crate) fn written_number(&self, id: Id) -> Option<f64> {
        match self.get(id).map(|g| &g.value) {
            Some(Value::Number(v)) => Some(*v),
            _ => None,
        }
    }
    /// The choice written, or the table's default.
    fn text(&self, id: Id) -> &'static str {
        match (self.get(id).map(|g| &g.value), spec::row(id).default) {
            (Some(Value::Text(t)), _) => t,
            (None, spec::Default::Text(t)) => t,
            _ => "",
        }
    }
    /// The names written, or the table's default.
    fn names(&self, id: Id) -> Vec<&'static str> {
        match (self.get(id).map(|g| &g.value), spec::row(id).default) {
            (Some(Value::List(l)), _) => l.clone(),
            (None, spec::Default::Text(t)) => t.split(',').collect(),
            _ => Vec::new(),
        }
    }
    pub(crate) fn expr(&self, id: Id) -> Option<&Expr> {
        match self.get(id).map(|g| &g.value) {
            Some(Value::Expr(e)) => Some(e),
            _ => None,
        }
    }
    /// The value of `id` for the table's rules.
    pub(crate) fn setting(&self, id: Id) -> Setting {
        match self.get(id).map(|g| &g.value) {
            None => Setting::Off,
            Some(Value::Number(v)) => Setting::Number(*v),
            Some(Value::Text(t)) => Setting::Text(t),
            Some(Value::On | Value::List(_) | Value::Expr(_)) => Setting::On,
        }
    }

    pub(crate) fn checks(&self) -> Checks {
        let mut c = Checks::NONE;
        for name in self.names(Id::Checks) {
            match name {
                "loss" => c.loss = true,
                "grads" => c.grads = true,
                "params" => c.params = true,
                "forward" => c.forward = true,
                "all" => {
                    c = Checks {
                        loss: true,
                        grads: true,
                        params: true,
                        forward: true,
                    }
                }
                _ => c = Checks::NONE, // "none"; the list holds only the table's names
            }
        }
        c
    }
    /// Whether `/` and log are protected.
    pub(crate) fn protect(&self) -> (bool, bool) {
        let (mut div, mut log) = (false, false);
        for name in self.names(Id::ProtectOps) {
            match name {
                "div" => div = true,
                "log" => log = true,
                "all" => (div, log) = (true, true),
                _ => (div, log) = (false, false), // "none"
            }
        }
        (div, log)
    }
    pub(crate) fn on_nan(&self) -> OnNan {
        match self.text(Id::OnNan) {
            "error" => OnNan::Error,
            "skip" => OnNan::Skip,
            _ => OnNan::Panic,
        }
    }
    pub(crate) fn deferred(&self) -> bool {
        self.text(Id::Sync) == "deferred"
    }
    pub(crate) fn any_check(&self) -> bool {
        self.checks().any()
    }
    fn push(&mut self, id: Id, value: Value, span: Span) {
        self.given.push(Given { id, value, span });
    }
}

/// `name = value` or `name(k = v, ..)`.
struct RawArg {
    key: Ident,
    form: Form,
}

enum Form {
    Value(Expr),
    Group(Vec<(Ident, Expr)>, Span),
}

impl Parse for RawArg {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let key: Ident = input.call(syn::ext::IdentExt::parse_any)?;
        if input.peek(syn::token::Paren) {
            let inner;
            let paren = syn::parenthesized!(inner in input);
            let items = Punctuated::<Expr, Token![,]>::parse_terminated(&inner)?;
            let items = items.iter().map(assignment).collect::<syn::Result<_>>()?;
            return Ok(RawArg {
                key,
                form: Form::Group(items, paren.span.join()),
            });
        }
        let _: Token![=] = input.parse().map_err(|e| {
            syn::Error::new(
                e.span(),
                format!("expected `{key} = <value>` or `{key}(..)`"),
            )
        })?;
        let value: Expr = input.parse()?;
        Ok(RawArg {
            key,
            form: Form::Value(value),
        })
    }
}

/// `k = v` inside a group.
fn assignment(e: &Expr) -> syn::Result<(Ident, Expr)> {
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

/// Collects errors, combining them into one.
#[derive(Default)]
pub(crate) struct Errors(Option<syn::Error>);

impl Errors {
    pub(crate) fn push(&mut self, e: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(e),
            None => self.0 = Some(e),
        }
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_none()
    }
    pub(crate) fn into_result(self) -> Result<(), syn::Error> {
        self.0.map_or(Ok(()), Err)
    }
}

fn names(args: &[Arg]) -> Vec<&'static str> {
    args.iter().map(|a| a.name).collect()
}

/// How an argument is named in messages: `max_norm`, `loss_scale(init)`.
pub(crate) fn display(group: Option<&str>, name: &str) -> String {
    match group {
        Some(g) => format!("{g}({name})"),
        None => name.to_string(),
    }
}

/// Parses `value` as the kind of `arg`, range-checked.
fn value_of(arg: &Arg, group: Option<&str>, value: &Expr) -> syn::Result<Value> {
    let name = display(group, arg.name);
    let range_error = |v: f64, want: &str| {
        syn::Error::new_spanned(value, format!("`{name}` must be {want}, got {v}"))
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
                None => Err(syn::Error::new(
                    s.span(),
                    unknown(&format!("{name} value"), got.trim(), choices),
                )),
            }
        }
        Kind::List(known) => {
            let s = string(value, arg)?;
            let what = if arg.id == Id::Checks {
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
fn call_form(top: &Arg, group: &Group, value: &Expr) -> Option<syn::Result<Vec<(Ident, Expr)>>> {
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
fn wrong_call(top: &Arg, group: &Group, value: &Expr) -> Option<syn::Error> {
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
fn parse_group(
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

/// The message for an argument given twice.
fn duplicate(top: &Arg) -> String {
    match (top.group, top.kind) {
        (Some(Group { call: None, .. }), _) => format!(
            "`{0}` is given twice: write either the short form `{0} = ..` or `{0}(..)`, which \
             also turns it on",
            top.name
        ),
        _ => format!("duplicate argument `{}`", top.name),
    }
}

/// Parses and validates the attribute's arguments. On errors, returns every argument that
/// was valid, plus the errors.
pub(crate) fn parse_args(tokens: TokenStream) -> (Args, Errors) {
    let mut errors = Errors::default();
    let mut args = Args::default();
    let raw = match Punctuated::<RawArg, Token![,]>::parse_terminated.parse2(tokens) {
        Ok(raw) => raw,
        Err(e) => {
            errors.push(e);
            return (args, errors);
        }
    };
    let mut seen: Vec<String> = Vec::new();
    for RawArg { key, form } in raw {
        let name = key.to_string();
        let Some(top) = spec::ARGS.iter().find(|a| a.name == name) else {
            let msg = match spec::MOVED.iter().find(|(old, _)| *old == name) {
                Some((_, new)) => format!("`{name}` is written inside its group now: `{new}`"),
                None => unknown("argument", &name, &names(spec::ARGS)),
            };
            errors.push(syn::Error::new(key.span(), msg));
            continue;
        };
        if seen.contains(&name) {
            errors.push(syn::Error::new(key.span(), duplicate(top)));
            continue;
        }
        seen.push(name);
        match (form, &top.group) {
            (Form::Group(items, span), Some(g)) if g.call.is_none() => {
                parse_group(top, g, items, span, &mut args, &mut errors)
            }
            (Form::Group(_, span), group) => {
                let msg = match group.and_then(|g| g.call) {
                    Some(call) => format!("write `{} = {call}(..)`", top.name),
                    None => format!("`{0}` takes a value: `{0} = ..`", top.name),
                };
                errors.push(syn::Error::new(span, msg));
            }
            (Form::Value(value), group) => {
                if let Some(g) = group {
                    if let Some(items) = call_form(top, g, &value) {
                        match items {
                            Ok(items) => {
                                parse_group(top, g, items, value.span(), &mut args, &mut errors)
                            }
                            Err(e) => errors.push(e),
                        }
                        continue;
                    }
                }
                if let Some(e) = group.and_then(|g| wrong_call(top, &g, &value)) {
                    errors.push(e);
                    continue;
                }
                match value_of(top, None, &value) {
                    Ok(v) => short_form(top, v, value.span(), &mut args),
                    Err(e) => errors.push(e),
                }
            }
        }
    }
    (args, errors)
}

/// `name = value`: for a group without a call (`spike = 6`, `protect = "div"`), the group is
/// turned on and the value is its first argument's.
fn short_form(top: &Arg, v: Value, span: Span, args: &mut Args) {
    match top.group {
        Some(Group {
            call: None,
            sets,
            args: inner,
        }) => match (inner.first(), &v) {
            (Some(first), Value::Number(_) | Value::List(_)) => {
                args.push(sets, Value::On, span);
                args.push(first.id, v, span);
            }
            _ => args.push(sets, v, span),
        },
        _ => args.push(top.id, v, span),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use literal::suggest;
    use quote::quote;

    #[test]
    fn suggests_typos_and_swaps() {
        let top = names(spec::ARGS);
        assert_eq!(suggest("max_nrom", &top), Some("max_norm"));
        assert_eq!(suggest("dvi", spec::PROTECT_NAMES), Some("div"));
        assert_eq!(suggest("skpi", spec::ON_NAN_NAMES), Some("skip"));
        assert_eq!(suggest("grad", spec::CHECK_NAMES), Some("grads"));
        assert_eq!(suggest("banana", &top), None);
    }

    #[test]
    fn short_and_long_forms_mean_the_same() {
        let (short, e1) = parse_args(quote!(spike = 6, loss_scale = "dynamic"));
        let (long, e2) = parse_args(quote!(spike(sigmas = 6), loss_scale()));
        assert!(e1.is_empty() && e2.is_empty());
        for id in [Id::Spike, Id::LossScale] {
            assert_eq!(short.is_set(id), long.is_set(id));
        }
        assert_eq!(short.number(Id::SpikeSigmas), long.number(Id::SpikeSigmas));
        assert_eq!(long.number(Id::SpikeWindow), 100.0);
        assert_eq!(long.number(Id::ScaleInit), 65536.0);
    }

    #[test]
    fn skip_with_its_count_is_grouped_under_on_nan() {
        let (short, e1) = parse_args(quote!(on_nan = "skip"));
        let (long, e2) = parse_args(quote!(on_nan = skip(max = 5)));
        assert!(e1.is_empty() && e2.is_empty());
        assert_eq!((short.on_nan(), long.on_nan()), (OnNan::Skip, OnNan::Skip));
        assert_eq!(long.setting(Id::OnNan), Setting::Text("skip"));
        assert_eq!(
            (short.number(Id::MaxSkips), long.number(Id::MaxSkips)),
            (3.0, 5.0)
        );
        assert!(!short.is_set(Id::MaxSkips));
        let message = |tokens| {
            let (_, e) = parse_args(tokens);
            e.into_result().unwrap_err().to_string()
        };
        assert_eq!(
            message(quote!(on_nan = "skip", max_skips = 5)),
            "`max_skips` is written inside its group now: `on_nan = skip(max = ..)`"
        );
        assert_eq!(
            message(quote!(on_nan(max = 2))),
            "write `on_nan = skip(..)`"
        );
        assert!(message(quote!(on_nan = skp(max = 2))).contains("did you mean `skip`?"));
        assert!(message(quote!(on_nan = "error", max = 2)).starts_with("unknown argument `max`"));
        assert!(message(quote!(on_nan = skip)).contains("expects a string literal"));
    }

    #[test]
    fn the_table_has_at_most_twelve_top_level_arguments() {
        assert!(spec::ARGS.len() <= 12, "{}", spec::ARGS.len());
    }
}
