//! The dependencies between arguments ([`RULES`]) and the lookups both crates make in the
//! table: every argument, a row, a default, the values out of range, the rules broken.

use crate::{Arg, Id, ARGS};

/// A dependency between arguments.
#[derive(Clone, Copy, Debug)]
pub enum Needs {
    /// The other argument must have this value (`rollback` needs `on_nan = "skip"`).
    Value(Id, &'static str),
    /// The other argument must not have this value.
    NotValue(Id, &'static str),
    /// The other argument must not be set.
    Unset(Id),
    /// The argument's number must not exceed the other's.
    AtMost(Id),
}

/// `arg` (when set) needs `needs`; `message` says what to write.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    pub arg: Id,
    pub needs: Needs,
    pub message: &'static str,
}

/// The dependencies between arguments (the group syntax makes the others impossible to
/// break: `loss_scale(init = ..)` turns loss scaling on).
pub const RULES: &[Rule] = &[
    Rule {
        arg: Id::Adaptive,
        needs: Needs::Unset(Id::MaxNorm),
        message: "`max_norm = adaptive(..)` replaces a constant `max_norm`",
    },
    Rule {
        arg: Id::Adaptive,
        needs: Needs::NotValue(Id::Sync, "deferred"),
        message: "`max_norm = adaptive(..)` needs `sync = \"every_step\"` (its threshold is read with the step)",
    },
    Rule {
        arg: Id::Rollback,
        needs: Needs::Value(Id::OnNan, "skip"),
        message: "`rollback` restores a good state instead of escalating skips: it needs `on_nan = \"skip\"`",
    },
    Rule {
        arg: Id::Rollback,
        needs: Needs::NotValue(Id::Sync, "deferred"),
        message: "`rollback` needs `sync = \"every_step\"` (the snapshot is refreshed before updates the read has passed)",
    },
    Rule {
        arg: Id::ScaleMin,
        needs: Needs::AtMost(Id::ScaleInit),
        message: "`loss_scale(min = ..)` must not exceed `init`",
    },
];

/// An argument's value as either crate sees it, for [`broken_rules`] and [`out_of_range`].
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Setting {
    /// Not set (or off).
    Off,
    /// Set, without a number or a name (`checks`, `params`).
    On,
    Number(f64),
    Text(&'static str),
}

/// Every argument, top-level and inside groups, with the name of its group (`None` at the top).
pub fn all_args() -> impl Iterator<Item = (Option<&'static str>, &'static Arg)> {
    ARGS.iter().flat_map(|a| {
        std::iter::once((None, a)).chain(
            a.group
                .iter()
                .flat_map(move |g| g.args.iter().map(move |inner| (Some(a.name), inner))),
        )
    })
}

/// The row of `id`.
pub fn row(id: Id) -> &'static Arg {
    all_args()
        .map(|(_, a)| a)
        .find(|a| a.id == id)
        .unwrap_or(&ARGS[0])
}

/// The default number of `id` (0 when it has none).
pub fn default_number(id: Id) -> f64 {
    row(id).default.number()
}

/// The arguments whose number lies outside its range: `(group, row, value)`.
pub fn out_of_range(
    get: impl Fn(Id) -> Setting,
) -> impl Iterator<Item = (Option<&'static str>, &'static Arg, f64)> {
    all_args().filter_map(move |(group, a)| match (get(a.id), a.kind.range()) {
        (Setting::Number(v), Some(r)) if !r.holds(v) => Some((group, a, v)),
        _ => None,
    })
}

/// The rules that the settings break.
pub fn broken_rules(get: impl Fn(Id) -> Setting) -> impl Iterator<Item = &'static Rule> {
    RULES.iter().filter(move |r| {
        let this = get(r.arg);
        if this == Setting::Off {
            return false;
        }
        match r.needs {
            Needs::Value(other, v) => get(other) != Setting::Text(v),
            Needs::NotValue(other, v) => get(other) == Setting::Text(v),
            Needs::Unset(other) => get(other) != Setting::Off,
            Needs::AtMost(other) => {
                let limit = match get(other) {
                    Setting::Number(b) => b,
                    Setting::Off | Setting::On | Setting::Text(_) => default_number(other),
                };
                matches!(this, Setting::Number(a) if a > limit)
            }
        }
    })
}
