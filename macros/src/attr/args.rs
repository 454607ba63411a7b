//! The arguments as parsed: each valid one with its span ([`Args`]), read back with the
//! table's defaults for what was not written.

use proc_macro2::Span;
use syn::Expr;

use crate::spec::{self, Id, Setting};

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
    pub(crate) const NONE: Checks = Checks {
        loss: false,
        grads: false,
        params: false,
        forward: false,
    };

    pub(crate) fn any(self) -> bool {
        self != Checks::NONE
    }
}

/// A value as written, checked against its kind and range.
#[derive(Clone)]
pub(crate) enum Value {
    /// A group written (`loss_scale(..)`, `max_norm = adaptive(..)`).
    On,
    Number(f64),
    /// One of the kind's choices.
    Text(&'static str),
    /// Names of the kind's list.
    List(Vec<&'static str>),
    Expr(Expr),
}

/// One valid argument, with the span of what the user wrote.
#[derive(Clone)]
pub(crate) struct Given {
    pub(crate) id: Id,
    pub(crate) value: Value,
    pub(crate) span: Span,
}

/// The arguments written, each valid; everything else comes from the table's defaults.
#[derive(Clone, Default)]
pub(crate) struct Args {
    given: Vec<Given>,
}

impl Args {
    pub(crate) fn get(&self, id: Id) -> Option<&Given> {
        self.given.iter().find(|g| g.id == id)
    }
    pub(crate) fn is_set(&self, id: Id) -> bool {
        self.get(id).is_some()
    }
    pub(crate) fn span(&self, id: Id) -> Option<Span> {
        self.get(id).map(|g| g.span)
    }
    /// The number written, or the table's default.
    pub(crate) fn number(&self, id: Id) -> f64 {
        match self.get(id).map(|g| &g.value) {
            Some(Value::Number(v)) => *v,
            _ => spec::default_number(id),
        }
    }
    /// The number written, if any.
    pub(crate) fn written_number(&self, id: Id) -> Option<f64> {
        match self.get(id).map(|g| &g.value) {
            Some(Value::Number(v)) => Some(*v),
            _ => None,
        }
    }
    /// The choice written, or the table's default.
    fn text(&self, id: Id) -> &'static str {
        match (self.get(id).map(|g| &g.value), spec::row(id).default) {
            (Some(Value::Text(t)), _) => t,
            (None, spec::Default::Text(t)) => t,
            _ => "",
        }
    }
    /// The names written, or the table's default.
    fn names(&self, id: Id) -> Vec<&'static str> {
        match (self.get(id).map(|g| &g.value), spec::row(id).default) {
            (Some(Value::List(l)), _) => l.clone(),
            (None, spec::Default::Text(t)) => t.split(',').collect(),
            _ => Vec::new(),
        }
    }
    pub(crate) fn expr(&self, id: Id) -> Option<&Expr> {
        match self.get(id).map(|g| &g.value) {
            Some(Value::Expr(e)) => Some(e),
            _ => None,
        }
    }
    /// The value of `id` for the table's rules.
    pub(crate) fn setting(&self, id: Id) -> Setting {
        match self.get(id).map(|g| &g.value) {
            None => Setting::Off,
            Some(Value::Number(v)) => Setting::Number(*v),
            Some(Value::Text(t)) => Setting::Text(t),
            Some(Value::On | Value::List(_) | Value::Expr(_)) => Setting::On,
        }
    }

    pub(crate) fn checks(&self) -> Checks {
        let mut c = Checks::NONE;
        for name in self.names(Id::ChecksList) {
            match name {
                "loss" => c.loss = true,
                "grads" => c.grads = true,
                "params" => c.params = true,
                "forward" => c.forward = true,
                "all" => {
                    c = Checks {
                        loss: true,
                        grads: true,
                        params: true,
                        forward: true,
                    }
                }
                _ => c = Checks::NONE, // "none"; the list holds only the table's names
            }
        }
        c
    }
    /// Whether `/` and log are protected.
    pub(crate) fn protect(&self) -> (bool, bool) {
        let (mut div, mut log) = (false, false);
        for name in self.names(Id::ProtectOps) {
            match name {
                "div" => div = true,
                "log" => log = true,
                "all" => (div, log) = (true, true),
                _ => (div, log) = (false, false), // "none"
            }
        }
        (div, log)
    }
    pub(crate) fn on_nan(&self) -> OnNan {
        match self.text(Id::OnNan) {
            "error" => OnNan::Error,
            "skip" => OnNan::Skip,
            _ => OnNan::Panic,
        }
    }
    /// `checks(diagnose = "off")`: a failed call is not replayed.
    pub(crate) fn diagnose_off(&self) -> bool {
        self.text(Id::Diagnose) == "off"
    }
    pub(crate) fn deferred(&self) -> bool {
        self.text(Id::Sync) == "deferred"
    }
    pub(crate) fn any_check(&self) -> bool {
        self.checks().any()
    }
    pub(super) fn push(&mut self, id: Id, value: Value, span: Span) {
        self.given.push(Given { id, value, span });
    }
}
