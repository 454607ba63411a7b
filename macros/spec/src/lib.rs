//! The arguments of `#[guarded_step(...)]`, written once: name, kind, range, default,
//! dependencies and a doc line each. An internal crate of stepguard: use the `stepguard` crate.
//!
//! Both crates read it: the macro's parser to accept, range-check and default every argument
//! (`stepguard-macros`, `attr`), and `Config::validate` in the runtime to check a hand-built
//! `Config` against the same ranges and rules (`stepguard`, `config`). A proc-macro crate
//! cannot export ordinary items, so the table lives in this crate of its own, which both
//! depend on with the same exact version. It holds plain data and small `const fn`s only, no
//! dependency.
//!
//! - `kinds`: what an argument is (its id, kind, range, default, group);
//! - `table`: the arguments themselves, and the old spellings that moved into a group;
//! - `rules`: the dependencies between arguments, and the lookups both crates use.

mod kinds;
mod rules;
mod table;

pub use kinds::*;
pub use rules::*;
pub use table::*;
