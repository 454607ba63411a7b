//! The attribute's token stream read as `name = value`, `name(k = v, ..)` and
//! `name = call(k = v, ..)`, each routed by the table to its value's check ([`parse_args`]).

use proc_macro2::{Span, TokenStream};
use syn::parse::{Parse, ParseStream, Parser};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, Ident, Token};

use super::args::{Args, Value};
use super::literal::unknown;
use super::value::{assignment, call_form, names, parse_group, value_of, wrong_call};
use super::Errors;
use crate::spec::{self, Arg, Group};

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
