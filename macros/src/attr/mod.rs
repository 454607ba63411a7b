//! Parsing of `#[guarded_step(...)]` arguments, driven by the argument table (`crate::spec`):
//! `name = value`, `name(k = v, ..)` and `name = call(k = v, ..)`. Every problem becomes a
//! spanned `syn::Error`; they are all collected so the user sees them together.
//!
//! - `parse`: the token stream read argument by argument ([`parse_args`]);
//! - `value`: one value checked against its row of the table, and the groups;
//! - `literal`: literals of each kind, and "did you mean" suggestions;
//! - `args`: what was parsed ([`Args`]), read back with the table's defaults.

mod args;
mod literal;
mod parse;
mod value;

pub(crate) use args::{Args, OnNan};
pub(crate) use parse::parse_args;

/// Collects errors, combining them into one.
#[derive(Default)]
pub(crate) struct Errors(Option<syn::Error>);

impl Errors {
    pub(crate) fn push(&mut self, e: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(e),
            None => self.0 = Some(e),
        }
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_none()
    }
    pub(crate) fn into_result(self) -> Result<(), syn::Error> {
        self.0.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests;
