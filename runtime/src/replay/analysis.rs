//! From the record of a step and the statistics of its tensors to a [`Finding`]: a pure
//! function, on the host, after the one read.
//!
//! - A **candidate** is an operator that wrote a NaN/Inf while every tensor it read was finite.
//! - **Taint**: every non-finite value carries the earliest candidate in its ancestry (through
//!   operators that read a non-finite value and wrote one), and the earliest non-finite input
//!   from outside the watched operators. An operator that only passes on what an operator
//!   inside it wrote (`aten::linear` around `aten::addmm`) is no candidate: it carries the
//!   inner one's taint. Nor is a backward operator that makes a NaN/Inf from finite inputs in
//!   the backward of a forward operator that had already written one (the `div` of
//!   `LogBackward0` after `log(0)`): the forward operator's taint is what it carries.
//! - The **origin** is the candidate carried by the *last* non-finite value recorded: the end
//!   products the failed check read (the loss, the grads). A `masked_fill(-inf)` or a
//!   `full(-inf)` absorbed by a softmax (finite output) taints nothing after it, so a real
//!   `log(0)` later is what is named. Without a candidate, the non-finite input from outside
//!   is named: an argument, a parameter, or a tensor not produced during the step.

use std::collections::HashMap;

use super::trace::Trace;
use super::Role;
use crate::birth::{Finding, Hint, InputInfo, InputOrigin, NonFinite, OpOrigin, Phase, Source};

/// The earliest candidate (an op, compared by completion) and the earliest input from outside
/// (a value) a non-finite value descends from.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Taint {
    op: Option<usize>,
    outside: Option<usize>,
}

struct Analysis<'a> {
    trace: &'a Trace,
    stats: &'a [f64],
    named: &'a [(String, Role)],
    /// Forward operators by sequence number, in the order they started.
    by_seq: HashMap<i64, Vec<usize>>,
    taint: Vec<Option<Taint>>,
}

/// The finding for the step recorded in `trace`, with `stats` (3 per row: min, max, min |x|)
/// and the named tensors the watch was armed with; none when every value was finite.
pub(super) fn analyse(trace: &Trace, stats: &[f64], named: &[(String, Role)]) -> Option<Finding> {
    let mut by_seq: HashMap<i64, Vec<usize>> = HashMap::new();
    for (i, op) in trace.ops.iter().enumerate() {
        if op.node.is_none() && op.seq >= 0 {
            by_seq.entry(op.seq).or_default().push(i);
        }
    }
    let mut a = Analysis {
        trace,
        stats,
        named,
        by_seq,
        taint: vec![None; trace.values.len()],
    };
    let last = a.propagate()?;
    let t = a.taint[last]?;
    match (t.op, t.outside) {
        (Some(op), _) => Some(Finding::Operator(a.op_origin(op))),
        (None, Some(v)) => Some(Finding::Input(a.input_origin(v))),
        (None, None) => None,
    }
}

/// `aten::_log_softmax_` -> `logsoftmax`; `LogSoftmaxBackward0` -> `logsoftmax`.
fn op_key(name: &str) -> String {
    name.trim_start_matches("aten::")
        .replace('_', "")
        .to_lowercase()
}

fn node_key(name: &str) -> String {
    let name = name.trim_end_matches(|c: char| c.is_ascii_digit());
    name.trim_end_matches("Backward")
        .replace('_', "")
        .to_lowercase()
}

impl Analysis<'_> {
    fn row(&self, v: usize) -> Option<[f64; 3]> {
        let i = self.trace.values[v].stats?;
        let r = &self.stats[3 * i..3 * i + 3];
        Some([r[0], r[1], r[2]])
    }

    fn finite(&self, v: usize) -> bool {
        self.row(v)
            .is_none_or(|r| r[0].is_finite() && r[1].is_finite())
    }

    fn held(&self, v: usize) -> NonFinite {
        match self.row(v) {
            Some(r) if r[0].is_nan() || r[1].is_nan() => NonFinite::Nan,
            _ => NonFinite::Inf,
        }
    }

    fn end(&self, op: usize) -> usize {
        self.trace.ops[op].end.unwrap_or(usize::MAX)
    }

    fn merge(&self, a: Taint, b: Taint) -> Taint {
        let op = match (a.op, b.op) {
            (Some(x), Some(y)) => Some(if self.end(y) < self.end(x) { y } else { x }),
            (x, y) => x.or(y),
        };
        let outside = match (a.outside, b.outside) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        };
        Taint { op, outside }
    }

    /// The taint of a non-finite value an operator read: what its producer gave it, or, for a
    /// value from outside, that of the value last written on its storage, or itself.
    fn input_taint(&mut self, v: usize) -> Taint {
        if let Some(t) = self.taint[v] {
            return t;
        }
        let val = &self.trace.values[v];
        // An alias is an earlier value (the observer records it before this one).
        let t = match val.alias.filter(|&a| a < v && !self.finite(a)) {
            Some(a) if val.producer.is_none() => self.input_taint(a),
            _ => Taint {
                op: None,
                outside: Some(v),
            },
        };
        self.taint[v] = Some(t);
        t
    }

    /// The forward operator an autograd node differentiates: by sequence number, the one whose
    /// name matches the node's (`aten::sqrt`, `SqrtBackward0`), else the last one started.
    fn forward_of(&self, node: usize) -> Option<usize> {
        let n = &self.trace.nodes[node];
        let ops = self.by_seq.get(&n.seq)?;
        let key = node_key(&n.name);
        ops.iter()
            .copied()
            .find(|&o| op_key(&self.trace.ops[o].name) == key)
            .or_else(|| ops.last().copied())
    }

    /// Runs through the operators in the order they completed, tainting every new non-finite
    /// value; returns the last one.
    fn propagate(&mut self) -> Option<usize> {
        let trace = self.trace;
        let mut order: Vec<usize> = (0..trace.ops.len())
            .filter(|&o| trace.ops[o].end.is_some())
            .collect();
        order.sort_by_key(|&o| trace.ops[o].end);
        // Per operator, the last non-finite value an operator inside it wrote.
        let mut inner: Vec<Option<usize>> = vec![None; trace.ops.len()];
        let mut last = None;
        for o in order {
            let op = &trace.ops[o];
            let mut fresh: Vec<usize> = op
                .outs
                .iter()
                .copied()
                .filter(|&v| {
                    let val = &trace.values[v];
                    val.producer == Some(o) && !val.uninit && !self.finite(v)
                })
                .collect();
            fresh.dedup();
            if fresh.is_empty() {
                continue;
            }
            let mut from_inputs = Taint::default();
            let mut all_finite = true;
            for &v in &op.ins {
                if !self.finite(v) {
                    all_finite = false;
                    let t = self.input_taint(v);
                    from_inputs = self.merge(from_inputs, t);
                }
            }
            let t = if !all_finite {
                from_inputs
            } else if let Some(t) = inner[o].and_then(|v| self.taint[v]) {
                t
            } else if let Some(t) = op.node.and_then(|n| self.forward_taint(n)) {
                t
            } else {
                Taint {
                    op: Some(o),
                    outside: None,
                }
            };
            for &v in &fresh {
                self.taint[v] = Some(t);
                last = Some(v);
            }
            let mut p = op.parent;
            while let Some(q) = p {
                inner[q] = last;
                p = trace.ops[q].parent;
            }
        }
        last
    }

    /// The taint of what the forward operator of `node` wrote, if it wrote a NaN/Inf.
    fn forward_taint(&self, node: usize) -> Option<Taint> {
        let f = self.forward_of(node)?;
        let taints: Vec<Taint> = self.trace.ops[f]
            .outs
            .iter()
            .filter_map(|&v| self.taint[v])
            .collect();
        taints.into_iter().reduce(|a, b| self.merge(a, b))
    }

    fn info(&self, v: usize) -> InputInfo {
        let val = &self.trace.values[v];
        let named = val.named.map(|i| &self.named[i]);
        let row = self.row(v);
        InputInfo {
            dtype: val.dtype.clone(),
            shape: val.shape.clone(),
            parameter: named
                .filter(|n| n.1 == Role::Parameter)
                .map(|n| n.0.clone()),
            argument: named.filter(|n| n.1 == Role::Argument).map(|n| n.0.clone()),
            finite: self.finite(v),
            zeros: row.is_some_and(|r| r[2] == 0.0),
            range: row.map(|r| (r[0], r[1])),
        }
    }

    fn phase(&self, op: usize) -> Phase {
        match self.trace.ops[op].node {
            None => Phase::Forward,
            Some(n) => {
                let f = self.forward_of(n);
                Phase::Backward {
                    node: self.trace.nodes[n].name.clone(),
                    of: f.map(|f| self.trace.ops[f].name.clone()),
                    of_inputs: f
                        .map(|f| {
                            self.trace.ops[f]
                                .ins
                                .iter()
                                .map(|&v| self.info(v))
                                .collect()
                        })
                        .unwrap_or_default(),
                }
            }
        }
    }

    /// The named parameter among the inputs of `op` that names its layer: the largest (a
    /// layer's weight rather than its bias), the first of equals.
    fn parameter_of(&self, op: usize) -> Option<String> {
        let mut best: Option<(i64, String)> = None;
        for &v in &self.trace.ops[op].ins {
            let info = self.info(v);
            if let Some(name) = info.parameter {
                let n: i64 = info.shape.iter().product();
                if best.as_ref().is_none_or(|(m, _)| n > *m) {
                    best = Some((n, name));
                }
            }
        }
        best.map(|(_, name)| name)
    }

    fn op_origin(&self, o: usize) -> OpOrigin {
        let op = &self.trace.ops[o];
        let forward = op.node.and_then(|n| self.forward_of(n));
        let inputs: Vec<InputInfo> = op.ins.iter().map(|&v| self.info(v)).collect();
        let hint = hint(&op.name, &inputs);
        // The input the hint is about, when it is a parameter; else the layer's.
        let hinted = match hint {
            Some(Hint::Large { input, .. } | Hint::Zeros { input } | Hint::Negatives { input }) => {
                inputs.get(input).and_then(|i| i.parameter.clone())
            }
            Some(Hint::ZeroDivisor) => inputs.get(1).and_then(|i| i.parameter.clone()),
            _ => None,
        };
        let parameter = hinted
            .or_else(|| self.parameter_of(o))
            .or_else(|| forward.and_then(|f| self.parameter_of(f)));
        let after_parameter = match parameter {
            Some(_) => None,
            None => {
                // The last operator before it that read a parameter, seen from the outermost
                // operator around that one (`aten::linear(x, weight, bias)` names the weight
                // where the `aten::expand` of its bias came last).
                let anchor = forward.unwrap_or(o);
                (0..anchor).rev().find_map(|p| {
                    let found = self.parameter_of(p)?;
                    let top = self.trace.ops[p].top.filter(|&t| t < anchor);
                    Some(top.and_then(|t| self.parameter_of(t)).unwrap_or(found))
                })
            }
        };
        let produced = op
            .outs
            .iter()
            .find(|&&v| !self.finite(v))
            .map_or(NonFinite::Inf, |&v| self.held(v));
        OpOrigin {
            op: op.name.clone(),
            overload: op.overload.clone(),
            phase: self.phase(o),
            hint,
            inputs,
            produced,
            parameter,
            after_parameter,
            within: op.top.map(|t| self.trace.ops[t].name.clone()),
        }
    }

    fn input_origin(&self, v: usize) -> InputOrigin {
        let input = self.info(v);
        let source = match (&input.parameter, &input.argument) {
            (Some(p), _) => Source::Parameter(p.clone()),
            (None, Some(a)) => Source::Argument(a.clone()),
            (None, None) => Source::Unproduced,
        };
        let reader = (0..self.trace.ops.len()).find(|&o| self.trace.ops[o].ins.contains(&v));
        InputOrigin {
            source,
            held: self.held(v),
            input,
            read_by: reader.map_or_else(String::new, |o| self.trace.ops[o].name.clone()),
            phase: reader.map_or(Phase::Forward, |o| self.phase(o)),
        }
    }
}

/// What was wrong with the inputs of `op`, where the statistics tell: zeros in a divisor or a
/// logarithm's input, negative values under a logarithm or a square root, the largest input
/// of an exponential, else a huge |x| (an overflow).
fn hint(op: &str, inputs: &[InputInfo]) -> Option<Hint> {
    let base = op.trim_start_matches("aten::").trim_end_matches('_');
    let zeros = |i: usize| inputs.get(i).is_some_and(|x| x.zeros);
    let negatives = |i: usize| inputs.get(i).is_some_and(InputInfo::negatives);
    let found = match base {
        "div" | "true_divide" | "floor_divide" | "remainder" | "fmod" if zeros(1) => {
            Some(Hint::ZeroDivisor)
        }
        "log" | "log2" | "log10" | "reciprocal" | "rsqrt" | "pow" | "float_power" if zeros(0) => {
            Some(Hint::Zeros { input: 0 })
        }
        "log" | "log2" | "log10" | "sqrt" | "rsqrt" | "pow" | "float_power" if negatives(0) => {
            Some(Hint::Negatives { input: 0 })
        }
        "xlogy" if zeros(1) => Some(Hint::Zeros { input: 1 }),
        "exp" | "exp2" | "expm1" | "sinh" | "cosh" => inputs
            .first()
            .and_then(|x| x.range)
            .map(|(_, hi)| Hint::Exponent { value: hi }),
        _ => None,
    };
    found.or_else(|| {
        // An overflow: the input with the largest |x|, when that is large.
        inputs
            .iter()
            .enumerate()
            .filter_map(|(i, x)| x.max_abs().map(|m| (i, m)))
            .filter(|&(_, m)| m >= 1e4)
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(input, value)| Hint::Large { input, value })
    })
}
