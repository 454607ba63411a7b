//! The parser against the table: short and long forms, suggestions, old spellings.

use super::literal::suggest;
use super::value::names;
use super::*;
use crate::spec::{self, Id, Setting};
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

#[test]
fn checks_is_a_group_with_its_list_and_diagnose() {
    let (short, e1) = parse_args(quote!(checks = "loss,grads"));
    let (long, e2) = parse_args(quote!(checks(list = "loss,grads", diagnose = "off")));
    let (only, e3) = parse_args(quote!(checks(diagnose = "replay")));
    let (none, e4) = parse_args(quote!());
    assert!(e1.is_empty() && e2.is_empty() && e3.is_empty() && e4.is_empty());
    assert_eq!(short.checks(), long.checks());
    assert!(!short.checks().params && short.checks().grads);
    assert_eq!(only.checks(), none.checks());
    assert!(none.checks().params && !none.checks().forward);
    assert!(long.diagnose_off());
    assert!(!short.diagnose_off() && !only.diagnose_off() && !none.diagnose_off());
    assert_eq!(long.setting(Id::Diagnose), Setting::Text("off"));
    assert!(!only.is_set(Id::ChecksList) && only.is_set(Id::Checks));
    let message = |tokens| {
        let (_, e) = parse_args(tokens);
        e.into_result().unwrap_err().to_string()
    };
    assert_eq!(
        message(quote!(checks(diagnose = "maybe"))),
        "unknown checks(diagnose) value `maybe` (expected one of: replay, off)"
    );
    assert!(message(quote!(checks(diagnose = "of"))).contains("did you mean `off`?"));
    assert_eq!(
        message(quote!(checks(lst = "loss"))),
        "unknown `checks(..)` argument `lst`; did you mean `list`? (expected one of: list, diagnose)"
    );
    assert!(message(quote!(checks(list = "los"))).starts_with("unknown check `los`"));
    assert!(message(quote!(checks = "loss", checks(diagnose = "off"))).contains("given twice"));
    assert!(message(quote!(checks(diagnose = off))).contains("expects a string literal"));
}
