//! The arguments of `#[guarded_step(...)]`, written once: name, kind, range, default,
//! dependencies and a doc line each.
//!
//! This file is compiled into both crates: the macro's parser reads it to accept, range-check
//! and default every argument (`stepguard-macros`, `attr`), and `Config::validate` in the
//! runtime checks a hand-built `Config` against the same ranges and rules (`stepguard`,
//! `config.rs` includes it with `#[path]`). A proc-macro crate cannot export ordinary items and
//! the runtime depends on the macro crate (pinned with `=`), so one file included by both is
//! the one home both can read; it holds plain data and small `const fn`s only, no dependency.

#![allow(dead_code)] // each crate reads the part it needs

/// Every argument, top-level or inside a group. Code that handles arguments matches on it
/// exhaustively, so a new argument cannot be routed by a catch-all.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Id {
    MaxNorm,
    /// `max_norm = adaptive(..)`.
    Adaptive,
    AdaptiveSigmas,
    AdaptiveWarmup,
    AdaptiveWindow,
    NormType,
    Checks,
    Protect,
    ProtectOps,
    Eps,
    OnNan,
    /// `on_nan = skip(max = ..)`.
    MaxSkips,
    Rollback,
    Params,
    State,
    Group,
    Sync,
    LossScale,
    ScaleInit,
    ScaleGrowth,
    ScaleBackoff,
    ScaleInterval,
    ScaleMin,
    Spike,
    SpikeSigmas,
    SpikeWarmup,
    SpikeWindow,
}

/// The range a number must lie in.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum Range {
    /// Any value of its kind.
    Any,
    /// Finite and > 0.
    Positive,
    /// Finite and > 1.
    AboveOne,
    /// In (0, 1).
    OpenUnit,
    /// An integer at least this.
    AtLeast(u32),
    /// A norm order: > 0, infinity included.
    NormOrder,
}

impl Range {
    /// Whether `v` lies in the range.
    pub(crate) fn holds(self, v: f64) -> bool {
        match self {
            Range::Any => !v.is_nan(),
            Range::Positive => v.is_finite() && v > 0.0,
            Range::AboveOne => v.is_finite() && v > 1.0,
            Range::OpenUnit => v > 0.0 && v < 1.0,
            Range::AtLeast(n) => v >= f64::from(n),
            Range::NormOrder => v > 0.0 && !v.is_nan(),
        }
    }

    /// What a value must be, for messages ("a finite number > 0").
    pub(crate) const fn want(self) -> &'static str {
        match self {
            Range::Any => "a number",
            Range::Positive => "a finite number > 0",
            Range::AboveOne => "a finite number > 1",
            Range::OpenUnit => "a number in (0, 1)",
            Range::AtLeast(0) => "an integer >= 0",
            Range::AtLeast(1) => "an integer >= 1",
            Range::AtLeast(2) => "an integer >= 2",
            Range::AtLeast(_) => "a larger integer",
            Range::NormOrder => "a number > 0 (or \"inf\")",
        }
    }
}

/// What an argument's value is written as.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum Kind {
    /// A number literal (`5`, `2.5`, `1e-6`).
    Number(Range),
    /// A non-negative integer literal.
    Integer(Range),
    /// A number or `"inf"`.
    Norm,
    /// One of these strings.
    Choice(&'static [&'static str]),
    /// A comma-separated string of these names.
    List(&'static [&'static str]),
    /// Any expression, used by the generated code.
    Expr,
}

impl Kind {
    /// The range of a numeric kind.
    pub(crate) const fn range(self) -> Option<Range> {
        match self {
            Kind::Number(r) | Kind::Integer(r) => Some(r),
            Kind::Norm => Some(Range::NormOrder),
            Kind::Choice(_) | Kind::List(_) | Kind::Expr => None,
        }
    }
}

/// An argument's default.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum Default {
    /// Off unless written.
    Off,
    /// This number.
    Number(f64),
    /// This string.
    Text(&'static str),
    /// Described in words (`params`: the `VarStore` arguments).
    Described(&'static str),
}

impl Default {
    /// The number, for a numeric default (0 otherwise).
    pub(crate) const fn number(self) -> f64 {
        match self {
            Default::Number(v) => v,
            Default::Off | Default::Text(_) | Default::Described(_) => 0.0,
        }
    }
}

/// The arguments written inside an argument: `name(k = v, ..)` (`call: None`) or
/// `name = call(k = v, ..)`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Group {
    /// `Some("adaptive")` for `max_norm = adaptive(..)`; `None` for `loss_scale(..)`. For an
    /// argument whose short form is a choice (`on_nan`), the call is one of the choices
    /// (`on_nan = skip(..)`), and writing it sets that choice.
    pub(crate) call: Option<&'static str>,
    /// What the group form turns on (`Id::Adaptive` for `max_norm = adaptive(..)`).
    pub(crate) sets: Id,
    /// The arguments inside.
    pub(crate) args: &'static [Arg],
}

/// One argument.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Arg {
    pub(crate) id: Id,
    /// As written (inside a group: the short name, `init`).
    pub(crate) name: &'static str,
    /// Its value's kind (of the short form, for a group).
    pub(crate) kind: Kind,
    pub(crate) default: Default,
    /// Its long form, if it has one.
    pub(crate) group: Option<Group>,
    /// One line for the documentation.
    pub(crate) doc: &'static str,
}

const fn arg(id: Id, name: &'static str, kind: Kind, default: Default, doc: &'static str) -> Arg {
    Arg {
        id,
        name,
        kind,
        default,
        group: None,
        doc,
    }
}

pub(crate) const CHECK_NAMES: &[&str] = &["loss", "grads", "params", "forward", "all", "none"];
pub(crate) const PROTECT_NAMES: &[&str] = &["div", "log", "all", "none"];
pub(crate) const ON_NAN_NAMES: &[&str] = &["panic", "error", "skip"];
pub(crate) const SYNC_NAMES: &[&str] = &["every_step", "deferred"];

/// `max_norm = adaptive(sigmas = .., warmup = .., window = ..)` (ZClip's defaults).
pub(crate) const ADAPTIVE_ARGS: &[Arg] = &[
    arg(
        Id::AdaptiveSigmas,
        "sigmas",
        Kind::Number(Range::Positive),
        Default::Number(2.5),
        "standard deviations above the running mean of the grad norm where clipping starts",
    ),
    arg(
        Id::AdaptiveWarmup,
        "warmup",
        Kind::Integer(Range::AtLeast(0)),
        Default::Number(25.0),
        "updates observed before anything is clipped",
    ),
    arg(
        Id::AdaptiveWindow,
        "window",
        Kind::Integer(Range::AtLeast(2)),
        Default::Number(65.0),
        "the window of the running statistics",
    ),
];

/// `on_nan = skip(max = ..)`.
pub(crate) const SKIP_ARGS: &[Arg] = &[arg(
    Id::MaxSkips,
    "max",
    Kind::Integer(Range::AtLeast(0)),
    Default::Number(3.0),
    "consecutive skipped calls before escalating",
)];

/// `protect(ops = .., eps = ..)`.
pub(crate) const PROTECT_ARGS: &[Arg] = &[
    arg(
        Id::ProtectOps,
        "ops",
        Kind::List(PROTECT_NAMES),
        Default::Text("div,log"),
        "the protected operations",
    ),
    arg(
        Id::Eps,
        "eps",
        Kind::Number(Range::Positive),
        Default::Number(1e-8),
        "epsilon of the protected operations",
    ),
];

/// `loss_scale(init = .., growth = .., backoff = .., interval = .., min = ..)`
/// (GradScaler's defaults; `min` 1).
pub(crate) const LOSS_SCALE_ARGS: &[Arg] = &[
    arg(
        Id::ScaleInit,
        "init",
        Kind::Number(Range::Positive),
        Default::Number(65536.0),
        "the scale of the first step",
    ),
    arg(
        Id::ScaleGrowth,
        "growth",
        Kind::Number(Range::AboveOne),
        Default::Number(2.0),
        "factor applied after `interval` updates in a row without overflow",
    ),
    arg(
        Id::ScaleBackoff,
        "backoff",
        Kind::Number(Range::OpenUnit),
        Default::Number(0.5),
        "factor applied on an overflow",
    ),
    arg(
        Id::ScaleInterval,
        "interval",
        Kind::Integer(Range::AtLeast(1)),
        Default::Number(2000.0),
        "updates without overflow before the scale grows",
    ),
    arg(
        Id::ScaleMin,
        "min",
        Kind::Number(Range::Positive),
        Default::Number(1.0),
        "the scale never goes below this (at most `init`); an overflow there is a failure",
    ),
];

/// `spike(sigmas = .., warmup = .., window = ..)`.
pub(crate) const SPIKE_ARGS: &[Arg] = &[
    arg(
        Id::SpikeSigmas,
        "sigmas",
        Kind::Number(Range::Positive),
        Default::Number(6.0),
        "a step whose loss or grad norm lies this many standard deviations above the running mean is a spike",
    ),
    arg(
        Id::SpikeWarmup,
        "warmup",
        Kind::Integer(Range::AtLeast(0)),
        Default::Number(20.0),
        "updates observed before any step is judged",
    ),
    arg(
        Id::SpikeWindow,
        "window",
        Kind::Integer(Range::AtLeast(2)),
        Default::Number(100.0),
        "the window of the running statistics",
    ),
];

/// The top-level arguments.
pub(crate) const ARGS: &[Arg] = &[
    Arg {
        group: Some(Group {
            call: Some("adaptive"),
            sets: Id::Adaptive,
            args: ADAPTIVE_ARGS,
        }),
        ..arg(
            Id::MaxNorm,
            "max_norm",
            Kind::Number(Range::Positive),
            Default::Described("no clipping"),
            "clip the global grad norm (on the device) before each optimizer step; `adaptive(..)`: to a threshold that follows its running statistics",
        )
    },
    arg(
        Id::NormType,
        "norm_type",
        Kind::Norm,
        Default::Number(2.0),
        "the norm of `max_norm` (and of the reported grad norm)",
    ),
    arg(
        Id::Checks,
        "checks",
        Kind::List(CHECK_NAMES),
        Default::Text("loss,grads,params"),
        "which checks run",
    ),
    Arg {
        group: Some(Group {
            call: None,
            sets: Id::Protect,
            args: PROTECT_ARGS,
        }),
        ..arg(
            Id::Protect,
            "protect",
            Kind::List(PROTECT_NAMES),
            Default::Text("div,log"),
            "epsilon-protected operations (`\"none\"` turns it off); `protect(ops = .., eps = ..)` sets the epsilon",
        )
    },
    Arg {
        group: Some(Group {
            call: Some("skip"),
            sets: Id::OnNan,
            args: SKIP_ARGS,
        }),
        ..arg(
            Id::OnNan,
            "on_nan",
            Kind::Choice(ON_NAN_NAMES),
            Default::Text("panic"),
            "what a failed check does; `skip(max = ..)`: skip, escalating after this many consecutive skips",
        )
    },
    arg(
        Id::Rollback,
        "rollback",
        Kind::Integer(Range::AtLeast(1)),
        Default::Off,
        "with `on_nan = \"skip\"`: roll back to a snapshot at most this many updates old on a failure a skip cannot undo",
    ),
    arg(
        Id::Params,
        "params",
        Kind::Expr,
        Default::Described("the `VarStore` arguments"),
        "parameters and names (a `VarStore`, `(a, b)`, `[w, b]`, `vec![..]`, `Vec<Tensor>`)",
    ),
    arg(
        Id::State,
        "state",
        Kind::Expr,
        Default::Described("the function's own"),
        "a `stepguard::GuardState` of yours",
    ),
    arg(
        Id::Group,
        "group",
        Kind::Expr,
        Default::Described("each process decides alone"),
        "a `stepguard::dist::ProcessGroup`: every decision the same on every rank",
    ),
    arg(
        Id::Sync,
        "sync",
        Kind::Choice(SYNC_NAMES),
        Default::Text("every_step"),
        "read the verdict before each update, or hand it to a fused optimizer that skips on the device",
    ),
    Arg {
        group: Some(Group {
            call: None,
            sets: Id::LossScale,
            args: LOSS_SCALE_ARGS,
        }),
        ..arg(
            Id::LossScale,
            "loss_scale",
            Kind::Choice(&["dynamic"]),
            Default::Off,
            "dynamic loss scaling (mixed precision), as PyTorch's GradScaler",
        )
    },
    Arg {
        group: Some(Group {
            call: None,
            sets: Id::Spike,
            args: SPIKE_ARGS,
        }),
        ..arg(
            Id::Spike,
            "spike",
            Kind::Number(Range::Positive),
            Default::Off,
            "spike detection on the loss and the grad norm; `spike = 6` is `spike(sigmas = 6)`",
        )
    },
];

/// Names that were arguments of their own and are now written inside a group: what to write.
pub(crate) const MOVED: &[(&str, &str)] = &[
    ("init_scale", "loss_scale(init = ..)"),
    ("growth_factor", "loss_scale(growth = ..)"),
    ("backoff_factor", "loss_scale(backoff = ..)"),
    ("growth_interval", "loss_scale(interval = ..)"),
    ("min_scale", "loss_scale(min = ..)"),
    ("spike_warmup", "spike(sigmas = 6, warmup = ..)"),
    ("spike_window", "spike(sigmas = 6, window = ..)"),
    ("clip_sigmas", "max_norm = adaptive(sigmas = ..)"),
    ("eps", "protect(eps = ..)"),
    ("max_skips", "on_nan = skip(max = ..)"),
];

/// A dependency between arguments.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Needs {
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
pub(crate) struct Rule {
    pub(crate) arg: Id,
    pub(crate) needs: Needs,
    pub(crate) message: &'static str,
}

/// The dependencies between arguments (the group syntax makes the others impossible to
/// break: `loss_scale(init = ..)` turns loss scaling on).
pub(crate) const RULES: &[Rule] = &[
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
        arg: Id::Group,
        needs: Needs::NotValue(Id::Sync, "deferred"),
        message: "`group` needs `sync = \"every_step\"` (the ranks' verdicts are reduced before the step's read)",
    },
    Rule {
        arg: Id::ScaleMin,
        needs: Needs::AtMost(Id::ScaleInit),
        message: "`loss_scale(min = ..)` must not exceed `init`",
    },
];

/// An argument's value as either crate sees it, for [`broken_rules`] and [`out_of_range`].
#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum Setting {
    /// Not set (or off).
    Off,
    /// Set, without a number or a name (`checks`, `params`).
    On,
    Number(f64),
    Text(&'static str),
}

/// Every argument, top-level and inside groups, with the name of its group (`None` at the top).
pub(crate) fn all_args() -> impl Iterator<Item = (Option<&'static str>, &'static Arg)> {
    ARGS.iter().flat_map(|a| {
        std::iter::once((None, a)).chain(
            a.group
                .iter()
                .flat_map(move |g| g.args.iter().map(move |inner| (Some(a.name), inner))),
        )
    })
}

/// The row of `id`.
pub(crate) fn row(id: Id) -> &'static Arg {
    all_args()
        .map(|(_, a)| a)
        .find(|a| a.id == id)
        .unwrap_or(&ARGS[0])
}

/// The default number of `id` (0 when it has none).
pub(crate) fn default_number(id: Id) -> f64 {
    row(id).default.number()
}

/// The arguments whose number lies outside its range: `(group, row, value)`.
pub(crate) fn out_of_range(
    get: impl Fn(Id) -> Setting,
) -> impl Iterator<Item = (Option<&'static str>, &'static Arg, f64)> {
    all_args().filter_map(move |(group, a)| match (get(a.id), a.kind.range()) {
        (Setting::Number(v), Some(r)) if !r.holds(v) => Some((group, a, v)),
        _ => None,
    })
}

/// The rules that the settings break.
pub(crate) fn broken_rules(get: impl Fn(Id) -> Setting) -> impl Iterator<Item = &'static Rule> {
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
