//! Parsing of `#[guarded_step(...)]` arguments. Every problem becomes a spanned `syn::Error`;
//! they are all collected so the user sees them together.

use proc_macro2::{Span, TokenStream};
use syn::parse::{Parse, ParseStream, Parser};
use syn::punctuated::Punctuated;
use syn::{Expr, Ident, Token};

use crate::literal::{integer, list, norm_type, positive_number, string, unknown};

mod training;

pub(crate) use training::ScaleArgs;

/// The names `#[guarded_step]` accepts.
pub(crate) const ARG_NAMES: &[&str] = &[
    "max_norm",
    "norm_type",
    "checks",
    "eps",
    "protect",
    "on_nan",
    "max_skips",
    "params",
    "state",
    "sync",
    "loss_scale",
    "init_scale",
    "growth_factor",
    "backoff_factor",
    "growth_interval",
    "min_scale",
    "clip_sigmas",
    "spike",
    "spike_warmup",
    "spike_window",
    "rollback",
    "group",
];
/// The arguments that only make sense with `loss_scale = "dynamic"`.
pub(crate) const SCALE_ARGS: &[&str] = &[
    "init_scale",
    "growth_factor",
    "backoff_factor",
    "growth_interval",
    "min_scale",
];
const CHECK_NAMES: &[&str] = &["loss", "grads", "params", "forward", "all", "none"];
const PROTECT_NAMES: &[&str] = &["div", "log", "all", "none"];
const ON_NAN_NAMES: &[&str] = &["panic", "error", "skip"];
const SYNC_NAMES: &[&str] = &["every_step", "deferred"];

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
    pub(crate) const DEFAULT: Checks = Checks {
        loss: true,
        grads: true,
        params: true,
        forward: false,
    };
    const NONE: Checks = Checks {
        loss: false,
        grads: false,
        params: false,
        forward: false,
    };
    const ALL: Checks = Checks {
        loss: true,
        grads: true,
        params: true,
        forward: true,
    };

    pub(crate) fn any(self) -> bool {
        self != Checks::NONE
    }
}

/// The validated configuration, with the spans of what the user wrote.
#[derive(Clone)]
pub(crate) struct Args {
    pub(crate) max_norm: Option<f64>,
    pub(crate) norm_type: f64,
    pub(crate) checks: Checks,
    pub(crate) checks_span: Option<Span>,
    pub(crate) eps: f64,
    pub(crate) protect_div: bool,
    pub(crate) protect_log: bool,
    pub(crate) on_nan: OnNan,
    pub(crate) on_nan_span: Option<Span>,
    pub(crate) max_skips: u32,
    pub(crate) params: Option<Expr>,
    /// `state = <expr>`: the caller's `GuardState`.
    pub(crate) state: Option<Expr>,
    /// `group = <expr>`: the `ProcessGroup` whose ranks take the same decisions.
    pub(crate) group: Option<Expr>,
    /// `sync = "deferred"`.
    pub(crate) deferred: bool,
    /// `loss_scale = "dynamic"`, with its span.
    pub(crate) loss_scale: Option<Span>,
    pub(crate) scale: ScaleArgs,
    /// The scaling arguments written, with their spans (valid only with `loss_scale`).
    pub(crate) scale_spans: Vec<(&'static str, Span)>,
    /// `loss_scale` was written (valid or not).
    pub(crate) loss_scale_written: bool,
    /// `spike = sigmas`, with its span.
    pub(crate) spike: Option<(f64, Span)>,
    /// `spike_warmup` and `spike_window`, with the spans of those written.
    pub(crate) spike_warmup: u32,
    pub(crate) spike_window: u32,
    pub(crate) spike_spans: Vec<(&'static str, Span)>,
    /// `rollback = N`, with its span.
    pub(crate) rollback: Option<(u32, Span)>,
    /// `max_norm = "adaptive"`, with its span, and `clip_sigmas`.
    pub(crate) adaptive: Option<Span>,
    pub(crate) clip_sigmas: Option<(f64, Span)>,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            max_norm: None,
            norm_type: 2.0,
            checks: Checks::DEFAULT,
            checks_span: None,
            eps: 1e-8,
            protect_div: true,
            protect_log: true,
            on_nan: OnNan::Panic,
            on_nan_span: None,
            max_skips: 3,
            params: None,
            state: None,
            group: None,
            deferred: false,
            loss_scale: None,
            scale: ScaleArgs::default(),
            scale_spans: Vec::new(),
            loss_scale_written: false,
            spike: None,
            spike_warmup: 20,
            spike_window: 100,
            spike_spans: Vec::new(),
            rollback: None,
            adaptive: None,
            clip_sigmas: None,
        }
    }
}

impl Args {
    pub(crate) fn any_check(&self) -> bool {
        self.checks.any()
    }
}

struct RawArg {
    key: Ident,
    value: Expr,
}

impl Parse for RawArg {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let key: Ident = input.call(syn::ext::IdentExt::parse_any)?;
        let _: Token![=] = input
            .parse()
            .map_err(|e| syn::Error::new(e.span(), format!("expected `{key} = <value>`")))?;
        let value: Expr = input.parse()?;
        Ok(RawArg { key, value })
    }
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

/// Parses and validates the attribute's arguments. On errors, returns the defaults with every
/// argument that was valid, plus the errors.
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
    for RawArg { key, value } in raw {
        let name = key.to_string();
        if !ARG_NAMES.contains(&name.as_str()) {
            errors.push(syn::Error::new(
                key.span(),
                unknown("argument", &name, ARG_NAMES),
            ));
            continue;
        }
        if seen.contains(&name) {
            errors.push(syn::Error::new(
                key.span(),
                format!("duplicate argument `{name}`"),
            ));
            continue;
        }
        seen.push(name.clone());
        args.loss_scale_written |= name == "loss_scale";
        let r = match name.as_str() {
            "max_norm" => training::max_norm_arg(&value, &mut args),
            "clip_sigmas" | "init_scale" | "growth_factor" | "backoff_factor"
            | "growth_interval" | "min_scale" | "spike" | "spike_warmup" | "spike_window"
            | "rollback" => training::numeric_arg(&name, &value, &mut args),
            "eps" => positive_number(&value, "eps").map(|v| args.eps = v),
            "norm_type" => norm_type(&value).map(|v| args.norm_type = v),
            "max_skips" => integer(&value, "max_skips").map(|v| args.max_skips = v),
            "checks" => string(&value, "checks").and_then(|s| {
                let mut c = Checks::NONE;
                for (item, _) in list(&s, CHECK_NAMES, "check")? {
                    match item.as_str() {
                        "loss" => c.loss = true,
                        "grads" => c.grads = true,
                        "params" => c.params = true,
                        "forward" => c.forward = true,
                        "all" => c = Checks::ALL,
                        _ => c = Checks::NONE,
                    }
                }
                args.checks = c;
                args.checks_span = Some(s.span());
                Ok(())
            }),
            "protect" => string(&value, "protect").and_then(|s| {
                let (mut div, mut log) = (false, false);
                for (item, _) in list(&s, PROTECT_NAMES, "protected operation")? {
                    match item.as_str() {
                        "div" => div = true,
                        "log" => log = true,
                        "all" => (div, log) = (true, true),
                        _ => (div, log) = (false, false),
                    }
                }
                (args.protect_div, args.protect_log) = (div, log);
                Ok(())
            }),
            "on_nan" => string(&value, "on_nan").and_then(|s| {
                args.on_nan = match s.value().trim() {
                    "panic" => OnNan::Panic,
                    "error" => OnNan::Error,
                    "skip" => OnNan::Skip,
                    other => {
                        return Err(syn::Error::new(
                            s.span(),
                            unknown("on_nan policy", other, ON_NAN_NAMES),
                        ))
                    }
                };
                args.on_nan_span = Some(s.span());
                Ok(())
            }),
            "state" => {
                args.state = Some(value);
                Ok(())
            }
            "group" => {
                args.group = Some(value);
                Ok(())
            }
            "sync" => string(&value, "sync").and_then(|s| {
                args.deferred = match s.value().trim() {
                    "every_step" => false,
                    "deferred" => true,
                    other => {
                        return Err(syn::Error::new(
                            s.span(),
                            unknown("sync mode", other, SYNC_NAMES),
                        ))
                    }
                };
                Ok(())
            }),
            "loss_scale" => string(&value, "loss_scale").and_then(|s| match s.value().trim() {
                "dynamic" => {
                    args.loss_scale = Some(s.span());
                    Ok(())
                }
                other => Err(syn::Error::new(
                    s.span(),
                    unknown("loss_scale", other, &["dynamic"]),
                )),
            }),
            _ => {
                args.params = Some(value);
                Ok(())
            }
        };
        if let Err(e) = r {
            errors.push(e);
        }
    }
    (args, errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::literal::suggest;

    #[test]
    fn suggests_typos_and_swaps() {
        assert_eq!(suggest("max_nrom", ARG_NAMES), Some("max_norm"));
        assert_eq!(suggest("dvi", PROTECT_NAMES), Some("div"));
        assert_eq!(suggest("skpi", ON_NAN_NAMES), Some("skip"));
        assert_eq!(suggest("grad", CHECK_NAMES), Some("grads"));
        assert_eq!(suggest("banana", ARG_NAMES), None);
    }
}
