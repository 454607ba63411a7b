//! The arguments, one row each: the top-level [`ARGS`], the arguments inside each group, and
//! the names that moved into a group ([`MOVED`]).

use crate::{arg, Arg, Default, Group, Id, Kind, Range};

pub const CHECK_NAMES: &[&str] = &["loss", "grads", "params", "forward", "all", "none"];
pub const PROTECT_NAMES: &[&str] = &["div", "log", "all", "none"];
pub const ON_NAN_NAMES: &[&str] = &["panic", "error", "skip"];
pub const SYNC_NAMES: &[&str] = &["every_step", "deferred"];
pub const DIAGNOSE_NAMES: &[&str] = &["replay", "off"];

/// `max_norm = adaptive(sigmas = .., warmup = .., window = ..)` (ZClip's defaults).
pub const ADAPTIVE_ARGS: &[Arg] = &[
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
        Kind::Integer(Range::AtLeast(1)),
        Default::Number(25.0),
        "updates observed before anything is clipped (at least 1: the statistics start empty)",
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
pub const SKIP_ARGS: &[Arg] = &[arg(
    Id::MaxSkips,
    "max",
    Kind::Integer(Range::AtLeast(0)),
    Default::Number(3.0),
    "consecutive skipped calls before escalating",
)];

/// `checks(list = .., diagnose = ..)`.
pub const CHECKS_ARGS: &[Arg] = &[
    arg(
        Id::ChecksList,
        "list",
        Kind::List(CHECK_NAMES),
        Default::Text("loss,grads,params"),
        "the checks that run",
    ),
    arg(
        Id::Diagnose,
        "diagnose",
        Kind::Choice(DIAGNOSE_NAMES),
        Default::Text("replay"),
        "on a failed check, run the call once more under an ATen observer to name the operator where the NaN/Inf was born (`\"replay\"`), or not (`\"off\"`)",
    ),
];

/// `protect(ops = .., eps = ..)`.
pub const PROTECT_ARGS: &[Arg] = &[
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
pub const LOSS_SCALE_ARGS: &[Arg] = &[
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
pub const SPIKE_ARGS: &[Arg] = &[
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
        Kind::Integer(Range::AtLeast(1)),
        Default::Number(20.0),
        "updates observed before any step is judged (at least 1: the statistics start empty)",
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
pub const ARGS: &[Arg] = &[
    Arg {
        group: Some(Group {
            call: Some("adaptive"),
            sets: Id::Adaptive,
            args: ADAPTIVE_ARGS,
        }),
        ..arg(
            Id::MaxNorm,
            "max_norm",
            Kind::Number(Range::NormalPositive),
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
    Arg {
        group: Some(Group {
            call: None,
            sets: Id::Checks,
            args: CHECKS_ARGS,
        }),
        ..arg(
            Id::Checks,
            "checks",
            Kind::List(CHECK_NAMES),
            Default::Text("loss,grads,params"),
            "which checks run; `checks(list = .., diagnose = ..)` also says whether a failed call is replayed to name the operator where its NaN/Inf was born",
        )
    },
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
pub const MOVED: &[(&str, &str)] = &[
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
