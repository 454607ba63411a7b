//! What an argument is: its [`Id`], the [`Kind`] and [`Range`] of its value, its [`Default`],
//! and the [`Group`] of arguments written inside it.

/// Every argument, top-level or inside a group. Code that handles arguments matches on it
/// exhaustively, so a new argument cannot be routed by a catch-all.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Id {
    MaxNorm,
    /// `max_norm = adaptive(..)`.
    Adaptive,
    AdaptiveSigmas,
    AdaptiveWarmup,
    AdaptiveWindow,
    NormType,
    Checks,
    /// `checks(list = ..)`: the checks that run (`checks = ".."` is its short form).
    ChecksList,
    /// `checks(diagnose = ..)`: whether a failed call is replayed under the ATen observer.
    Diagnose,
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
pub enum Range {
    /// Any value of its kind.
    Any,
    /// Finite and > 0.
    Positive,
    /// Finite and at least f32's smallest normal number (`max_norm`: a smaller one is zero or
    /// subnormal in f32 and would zero the gradients).
    NormalPositive,
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
    pub fn holds(self, v: f64) -> bool {
        match self {
            Range::Any => !v.is_nan(),
            Range::Positive => v.is_finite() && v > 0.0,
            Range::NormalPositive => v.is_finite() && v >= f64::from(f32::MIN_POSITIVE),
            Range::AboveOne => v.is_finite() && v > 1.0,
            Range::OpenUnit => v > 0.0 && v < 1.0,
            Range::AtLeast(n) => v >= f64::from(n),
            Range::NormOrder => v > 0.0 && !v.is_nan(),
        }
    }

    /// What a value must be, for messages ("a finite number > 0").
    pub const fn want(self) -> &'static str {
        match self {
            Range::Any => "a number",
            Range::Positive => "a finite number > 0",
            Range::NormalPositive => {
                "a finite number >= 1.1754944e-38 (f32's smallest normal number)"
            }
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
pub enum Kind {
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
    pub const fn range(self) -> Option<Range> {
        match self {
            Kind::Number(r) | Kind::Integer(r) => Some(r),
            Kind::Norm => Some(Range::NormOrder),
            Kind::Choice(_) | Kind::List(_) | Kind::Expr => None,
        }
    }
}

/// An argument's default.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Default {
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
    pub const fn number(self) -> f64 {
        match self {
            Default::Number(v) => v,
            Default::Off | Default::Text(_) | Default::Described(_) => 0.0,
        }
    }
}

/// The arguments written inside an argument: `name(k = v, ..)` (`call: None`) or
/// `name = call(k = v, ..)`.
#[derive(Clone, Copy, Debug)]
pub struct Group {
    /// `Some("adaptive")` for `max_norm = adaptive(..)`; `None` for `loss_scale(..)`. For an
    /// argument whose short form is a choice (`on_nan`), the call is one of the choices
    /// (`on_nan = skip(..)`), and writing it sets that choice.
    pub call: Option<&'static str>,
    /// What the group form turns on (`Id::Adaptive` for `max_norm = adaptive(..)`).
    pub sets: Id,
    /// The arguments inside.
    pub args: &'static [Arg],
}

/// One argument.
#[derive(Clone, Copy, Debug)]
pub struct Arg {
    pub id: Id,
    /// As written (inside a group: the short name, `init`).
    pub name: &'static str,
    /// Its value's kind (of the short form, for a group).
    pub kind: Kind,
    pub default: Default,
    /// Its long form, if it has one.
    pub group: Option<Group>,
    /// One line for the documentation.
    pub doc: &'static str,
}

pub(super) const fn arg(
    id: Id,
    name: &'static str,
    kind: Kind,
    default: Default,
    doc: &'static str,
) -> Arg {
    Arg {
        id,
        name,
        kind,
        default,
        group: None,
        doc,
    }
}
