//! What a replay found: the operator where the NaN/Inf that reached the failed check was born,
//! or the input that already held it.

use std::fmt;

use crate::report::number;

/// Where the NaN/Inf that reached the failed check came from.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Finding {
    /// An operator made it from finite inputs.
    Operator(OpOrigin),
    /// It was already in a tensor the step read: an argument, a parameter, or another input
    /// that no operator of the step produced.
    Input(InputOrigin),
}

/// The operator where the NaN/Inf was born: the first to make it from finite inputs, on the
/// path to what the failed check read.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct OpOrigin {
    /// The ATen operator, as libtorch names it (`aten::log`).
    pub op: String,
    /// Its overload (`Tensor`, `Scalar`), empty for the default one.
    pub overload: String,
    /// In the forward, or in the backward of which operator.
    pub phase: Phase,
    /// Its tensor inputs, in order.
    pub inputs: Vec<InputInfo>,
    /// What it made.
    pub produced: NonFinite,
    /// What was wrong with its inputs, where the statistics collected tell.
    pub hint: Option<Hint>,
    /// A named parameter among its inputs (for a backward operator, among those of the forward
    /// operator it differentiates).
    pub parameter: Option<String>,
    /// Without such an input: the parameter read last before it (before the forward operator,
    /// for a backward one), which names the layer it follows.
    pub after_parameter: Option<String>,
    /// The outermost operator it ran inside (`aten::linear` around `aten::addmm`).
    pub within: Option<String>,
}

/// Where an operator ran.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Phase {
    /// In the forward (anything outside `backward()`).
    Forward,
    /// Inside an autograd node during `backward()`.
    Backward {
        /// The node (`SqrtBackward0`).
        node: String,
        /// The forward operator it differentiates (`aten::sqrt`), when found.
        of: Option<String>,
        /// That operator's tensor inputs.
        of_inputs: Vec<InputInfo>,
    },
}

/// A tensor an operator read, as recorded during the replay.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct InputInfo {
    /// Its dtype (`Float`, `Half`, `Long`).
    pub dtype: String,
    /// Its shape.
    pub shape: Vec<i64>,
    /// The named parameter it is (or is a view of).
    pub parameter: Option<String>,
    /// The named argument of the step it is (or is a view of).
    pub argument: Option<String>,
    /// Whether it was finite (non-floating tensors always are).
    pub finite: bool,
    /// Whether it held zeros.
    pub zeros: bool,
    /// Its smallest and largest values (of |x| for a complex tensor), for a floating tensor.
    pub range: Option<(f64, f64)>,
}

impl InputInfo {
    /// The largest |x| it held, for a floating tensor.
    pub fn max_abs(&self) -> Option<f64> {
        self.range.map(|(lo, hi)| lo.abs().max(hi.abs()))
    }

    /// Whether it held values below zero.
    pub fn negatives(&self) -> bool {
        self.range.is_some_and(|(lo, _)| lo < 0.0)
    }
}

/// What a tensor held that was not finite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NonFinite {
    /// NaN (perhaps Inf too).
    Nan,
    /// ±Inf, no NaN.
    Inf,
}

/// What was wrong with the inputs of the operator that made the NaN/Inf (read from the
/// statistics the replay keeps for every tensor; index into [`OpOrigin::inputs`]).
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Hint {
    /// A division whose divisor (input 1) held zeros.
    ZeroDivisor,
    /// A logarithm, reciprocal or power of an input holding zeros.
    Zeros {
        /// Which input.
        input: usize,
    },
    /// A logarithm, square root or power of an input holding negative values.
    Negatives {
        /// Which input.
        input: usize,
    },
    /// An exponential whose input reached `value`.
    Exponent {
        /// The largest value of its input.
        value: f64,
    },
    /// An input whose largest |x| was `value` (an overflow).
    Large {
        /// Which input.
        input: usize,
        /// Its largest |x|.
        value: f64,
    },
}

/// Where a NaN/Inf already in an input came from.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Source {
    /// A named argument of the step (`x`).
    Argument(String),
    /// A named parameter.
    Parameter(String),
    /// A tensor no operator of the step produced, and not named.
    Unproduced,
}

/// The input that already held the NaN/Inf when the step read it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct InputOrigin {
    /// What it is.
    pub source: Source,
    /// What it held.
    pub held: NonFinite,
    /// Its dtype and shape.
    pub input: InputInfo,
    /// The first operator that read it.
    pub read_by: String,
    /// Where that operator ran.
    pub phase: Phase,
}

impl fmt::Display for NonFinite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NonFinite::Nan => "NaN",
            NonFinite::Inf => "Inf",
        })
    }
}

impl fmt::Display for InputInfo {
    /// `Float[4, 8]`, `Float[16, 32] (fc1.weight)`, `Float[4, 16] (x)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dims: Vec<String> = self.shape.iter().map(i64::to_string).collect();
        write!(f, "{}[{}]", self.dtype, dims.join(", "))?;
        match (&self.parameter, &self.argument) {
            (Some(name), _) | (None, Some(name)) => write!(f, " ({name})"),
            (None, None) => Ok(()),
        }
    }
}

fn list(inputs: &[InputInfo]) -> String {
    let shown: Vec<String> = inputs.iter().map(InputInfo::to_string).collect();
    shown.join(", ")
}

impl fmt::Display for Phase {
    /// `(forward)`, `in the backward of aten::sqrt(Float[4, 8]) (SqrtBackward0)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Forward => f.write_str("(forward)"),
            Phase::Backward {
                node,
                of: Some(op),
                of_inputs,
            } => write!(f, "in the backward of {op}({}) ({node})", list(of_inputs)),
            Phase::Backward { node, of: None, .. } => write!(f, "in the backward ({node})"),
        }
    }
}

impl OpOrigin {
    /// "its input", "its second input", or the input's name.
    fn input_name(&self, input: usize) -> String {
        let info = self.inputs.get(input);
        if let Some(name) = info.and_then(|i| i.parameter.as_ref().or(i.argument.as_ref())) {
            return name.clone();
        }
        let floating = self.inputs.iter().filter(|i| i.range.is_some()).count();
        const ORDINALS: [&str; 5] = ["first", "second", "third", "fourth", "fifth"];
        match ORDINALS.get(input) {
            _ if floating <= 1 => "its input".into(),
            Some(nth) => format!("its {nth} input"),
            None => format!("its input {input}"),
        }
    }

    fn hint_text(&self, hint: Hint) -> String {
        match hint {
            Hint::ZeroDivisor => "its divisor held zeros".into(),
            Hint::Zeros { input } => format!("{} held zeros", self.input_name(input)),
            Hint::Negatives { input } => {
                format!("{} held negative values", self.input_name(input))
            }
            Hint::Exponent { value } => format!("its input reached {}", number(value)),
            Hint::Large { input, value } => {
                format!("{} reached |x| = {}", self.input_name(input), number(value))
            }
        }
    }
}

impl fmt::Display for OpOrigin {
    /// `born in aten::log (forward) of Float[4, 8], made Inf — its input held zeros; after
    /// layer fc2.weight`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "born in {} ", self.op)?;
        match (&self.phase, &self.within) {
            (Phase::Forward, Some(w)) => write!(f, "(forward, inside {w})")?,
            (phase, Some(w)) => write!(f, "{phase}, inside {w},")?,
            (phase, None) => write!(f, "{phase}")?,
        }
        if !self.inputs.is_empty() {
            write!(f, " of {}", list(&self.inputs))?;
        }
        write!(f, ", made {}", self.produced)?;
        let mut rest = Vec::new();
        if let Some(h) = self.hint {
            rest.push(self.hint_text(h));
        }
        if let Some(p) = &self.parameter {
            rest.push(format!("layer: {p}"));
        } else if let Some(p) = &self.after_parameter {
            rest.push(format!("after layer {p}"));
        }
        if !rest.is_empty() {
            write!(f, " — {}", rest.join("; "))?;
        }
        Ok(())
    }
}

impl fmt::Display for InputOrigin {
    /// ``already in the argument `x` (Float[4, 16], NaN), first read by aten::linear (forward)``.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut input = self.input.clone();
        input.parameter = None;
        input.argument = None;
        match &self.source {
            Source::Argument(name) => write!(f, "already in the argument `{name}`")?,
            Source::Parameter(name) => write!(f, "already in the parameter `{name}`")?,
            Source::Unproduced => write!(f, "already in an input not produced during the step")?,
        }
        write!(
            f,
            " ({input}, {}), first read by {} {}",
            self.held, self.read_by, self.phase
        )
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::Operator(o) => o.fmt(f),
            Finding::Input(i) => i.fmt(f),
        }
    }
}
