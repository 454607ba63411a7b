//! Helpers shared by the workspace tests, examples and benches.
