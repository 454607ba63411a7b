//! The arguments of mixed precision and of the training-health features: `max_norm` (a number
//! or `"adaptive"`, with `clip_sigmas`), the loss scaling numbers, spike detection and
//! rollback, each range-checked with a span on its value.

use syn::Expr;

use super::{Args, SCALE_ARGS};
use crate::literal::{integer, number, positive_number};

/// The numbers of dynamic loss scaling (GradScaler's defaults, `min_scale` 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct ScaleArgs {
    pub(crate) init_scale: f64,
    pub(crate) growth_factor: f64,
    pub(crate) backoff_factor: f64,
    pub(crate) growth_interval: u32,
    pub(crate) min_scale: f64,
}

impl Default for ScaleArgs {
    fn default() -> Self {
        ScaleArgs {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            min_scale: 1.0,
        }
    }
}

/// `max_norm = 5` or `max_norm = "adaptive"`.
pub(super) fn max_norm_arg(value: &Expr, args: &mut Args) -> syn::Result<()> {
    match value {
        Expr::Lit(syn::ExprLit {
            lit: syn::Lit::Str(s),
            ..
        }) if s.value() == "adaptive" => {
            args.adaptive = Some(s.span());
            Ok(())
        }
        Expr::Lit(syn::ExprLit {
            lit: syn::Lit::Str(s),
            ..
        }) => Err(syn::Error::new(
            s.span(),
            match s.value().trim().parse::<f64>() {
                Ok(v) => format!(
                    "`max_norm` expects a number literal: write `max_norm = {v}`, \
                     without quotes (or `max_norm = \"adaptive\"`)"
                ),
                Err(_) => format!(
                    "`max_norm` is a number > 0 or \"adaptive\", got \"{}\"",
                    s.value()
                ),
            },
        )),
        _ => positive_number(value, "max_norm").map(|v| args.max_norm = Some(v)),
    }
}

/// `clip_sigmas`, the loss scaling numbers, spike detection and rollback.
pub(super) fn numeric_arg(name: &str, value: &Expr, args: &mut Args) -> syn::Result<()> {
    match name {
        "clip_sigmas" => {
            let span = syn::spanned::Spanned::span(value);
            args.clip_sigmas = Some((positive_number(value, "clip_sigmas")?, span));
            Ok(())
        }
        "spike" | "spike_warmup" | "spike_window" | "rollback" => spike_arg(name, value, args),
        _ => scale_arg(name, value, args),
    }
}

/// One number of dynamic loss scaling, range-checked.
fn scale_arg(name: &str, value: &Expr, args: &mut Args) -> syn::Result<()> {
    let name = SCALE_ARGS
        .iter()
        .copied()
        .find(|n| *n == name)
        .unwrap_or("init_scale");
    args.scale_spans
        .push((name, syn::spanned::Spanned::span(value)));
    let sc = &mut args.scale;
    let out_of_range = |want: &str, v: f64| {
        syn::Error::new_spanned(value, format!("`{name}` must be {want}, got {v}"))
    };
    match name {
        "growth_interval" => {
            let v = integer(value, name)?;
            if v == 0 {
                return Err(out_of_range("an integer >= 1", 0.0));
            }
            sc.growth_interval = v;
        }
        "growth_factor" => {
            let v = number(value, name)?;
            if !(v.is_finite() && v > 1.0) {
                return Err(out_of_range("a finite number > 1", v));
            }
            sc.growth_factor = v;
        }
        "backoff_factor" => {
            let v = number(value, name)?;
            if !(v > 0.0 && v < 1.0) {
                return Err(out_of_range("a number in (0, 1)", v));
            }
            sc.backoff_factor = v;
        }
        "min_scale" => sc.min_scale = positive_number(value, name)?,
        _ => sc.init_scale = positive_number(value, name)?,
    }
    Ok(())
}

/// Spike detection and rollback numbers, range-checked.
fn spike_arg(name: &str, value: &Expr, args: &mut Args) -> syn::Result<()> {
    let span = syn::spanned::Spanned::span(value);
    match name {
        "spike" => args.spike = Some((positive_number(value, "spike")?, span)),
        "spike_warmup" => {
            args.spike_spans.push(("spike_warmup", span));
            args.spike_warmup = integer(value, "spike_warmup")?;
        }
        "spike_window" => {
            args.spike_spans.push(("spike_window", span));
            let v = integer(value, "spike_window")?;
            if v < 2 {
                return Err(syn::Error::new(
                    span,
                    format!("`spike_window` must be >= 2, got {v}"),
                ));
            }
            args.spike_window = v;
        }
        _ => {
            let v = integer(value, "rollback")?;
            if v == 0 {
                return Err(syn::Error::new(
                    span,
                    "`rollback` must be >= 1 (updates back)",
                ));
            }
            args.rollback = Some((v, span));
        }
    }
    Ok(())
}
