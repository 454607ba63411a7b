//! The arguments of `#[guarded_step(...)]`, written once: name, kind, range, default,
//! dependencies and a doc line each.
//!
//! This folder is compiled into both crates: the macro's parser reads it to accept, range-check
//! and default every argument (`stepguard-macros`, `attr`), and `Config::validate` in the
//! runtime checks a hand-built `Config` against the same ranges and rules (`stepguard`,
//! `config/mod.rs` includes `spec/mod.rs` with `#[path]`). A proc-macro crate cannot export
//! ordinary items and the runtime depends on the macro crate (pinned with `=`), so files
//! included by both are the one home both can read; they hold plain data and small `const fn`s
//! only, no dependency, and name each other through `super::` only (each crate mounts the
//! folder where it likes).
//!
//! - `kinds`: what an argument is (its id, kind, range, default, group);
//! - `table`: the arguments themselves, and the old spellings that moved into a group;
//! - `rules`: the dependencies between arguments, and the lookups both crates use.

#![allow(dead_code)] // each crate reads the part it needs

mod kinds;
mod rules;
mod table;

pub(crate) use kinds::*;
pub(crate) use rules::*;
pub(crate) use table::*;
