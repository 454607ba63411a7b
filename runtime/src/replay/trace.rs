//! The observer's record of a step (`csrc/opwatch.cpp`, `serialize`), parsed and checked: one
//! line a record, tab-separated, ids the position among the lines of one kind.
//!
//! ```text
//! V stats producer alias named uninit dtype shape     a tensor an operator read or wrote
//! N name seq                                          an autograd node
//! O end seq node parent top name overload ins outs    an operator, in the order they started
//! E error                                             the first exception in a callback
//! ```
//!
//! `-1` is "none"; lists are comma-separated (empty for none).

use crate::error::TorchError;

/// A tensor an operator read or wrote.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Value {
    /// Its row of statistics (`[min, max, min |x|]`), none for a tensor that is not floating.
    pub stats: Option<usize>,
    /// The operator that wrote it; none when read from outside the watched operators.
    pub producer: Option<usize>,
    /// Read from outside: the last value recorded on the same storage.
    pub alias: Option<usize>,
    /// The named tensor whose storage it shares.
    pub named: Option<usize>,
    /// An output of `empty*`, `new_empty*`, `resize_*`: never checked.
    pub uninit: bool,
    pub dtype: String,
    pub shape: Vec<i64>,
}

/// An autograd node, or the engine's record around one.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Node {
    pub name: String,
    /// The sequence number of the forward operator that made it (-1 when none).
    pub seq: i64,
}

/// An operator, with the ids of the values it read and wrote.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Op {
    /// Its place in the order of completion (none if it never completed).
    pub end: Option<usize>,
    pub seq: i64,
    /// The autograd node it ran in: a backward operator.
    pub node: Option<usize>,
    /// The operator it ran inside.
    pub parent: Option<usize>,
    /// The outermost operator it ran inside (within its node).
    pub top: Option<usize>,
    pub name: String,
    pub overload: String,
    pub ins: Vec<usize>,
    pub outs: Vec<usize>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Trace {
    pub values: Vec<Value>,
    pub nodes: Vec<Node>,
    pub ops: Vec<Op>,
    /// The first exception a callback caught: the record may be incomplete.
    pub error: Option<String>,
}

fn malformed(line: &str) -> TorchError {
    TorchError::new(format!(
        "stepguard: malformed record from the ATen observer: {line:?}"
    ))
}

fn int(field: &str, line: &str) -> Result<i64, TorchError> {
    field.parse().map_err(|_| malformed(line))
}

/// `-1` (or any negative) is none.
fn id(field: &str, line: &str) -> Result<Option<usize>, TorchError> {
    let v = int(field, line)?;
    Ok(usize::try_from(v).ok())
}

fn ids(field: &str, line: &str) -> Result<Vec<usize>, TorchError> {
    if field.is_empty() {
        return Ok(Vec::new());
    }
    field
        .split(',')
        .map(|x| x.parse().map_err(|_| malformed(line)))
        .collect()
}

fn ints(field: &str, line: &str) -> Result<Vec<i64>, TorchError> {
    if field.is_empty() {
        return Ok(Vec::new());
    }
    field.split(',').map(|x| int(x, line)).collect()
}

impl Trace {
    pub(super) fn parse(text: &str) -> Result<Trace, TorchError> {
        let mut t = Trace::default();
        for line in text.lines().filter(|l| !l.is_empty()) {
            let f: Vec<&str> = line.split('\t').collect();
            match (f[0], f.len()) {
                ("V", 8) => t.values.push(Value {
                    stats: id(f[1], line)?,
                    producer: id(f[2], line)?,
                    alias: id(f[3], line)?,
                    named: id(f[4], line)?,
                    uninit: f[5] == "1",
                    dtype: f[6].to_string(),
                    shape: ints(f[7], line)?,
                }),
                ("N", 3) => t.nodes.push(Node {
                    name: f[1].to_string(),
                    seq: int(f[2], line)?,
                }),
                ("O", 10) => t.ops.push(Op {
                    end: id(f[1], line)?,
                    seq: int(f[2], line)?,
                    node: id(f[3], line)?,
                    parent: id(f[4], line)?,
                    top: id(f[5], line)?,
                    name: f[6].to_string(),
                    overload: f[7].to_string(),
                    ins: ids(f[8], line)?,
                    outs: ids(f[9], line)?,
                }),
                ("E", 2) => t.error = Some(f[1].to_string()),
                _ => return Err(malformed(line)),
            }
        }
        Ok(t)
    }

    /// Every id within bounds (`rows` rows of statistics, `named` named tensors), so that the
    /// analysis can index without checks.
    pub(super) fn check(&self, rows: usize, named: usize) -> Result<(), TorchError> {
        let (nv, nn, no) = (self.values.len(), self.nodes.len(), self.ops.len());
        let below = |x: Option<usize>, n: usize| x.is_none_or(|x| x < n);
        let values_ok = self.values.iter().all(|v| {
            below(v.stats, rows)
                && below(v.producer, no)
                && below(v.alias, nv)
                && below(v.named, named)
        });
        let ops_ok = self.ops.iter().all(|o| {
            below(o.node, nn)
                && below(o.parent, no)
                && below(o.top, no)
                && o.ins.iter().chain(&o.outs).all(|&v| v < nv)
        });
        if values_ok && ops_ok {
            Ok(())
        } else {
            Err(TorchError::new(
                "stepguard: the ATen observer's record refers to entries it does not hold",
            ))
        }
    }
}
