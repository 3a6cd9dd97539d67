//! Integration tests: run the `nlp` binary in temporary folders and check what a
//! user sees (exit codes, one-line errors, results on stdout), one module per
//! subcommand. One test binary, so the crate is linked once.

mod common;

mod basics;
mod eval;
mod generate;
mod hub;
mod lora;
mod train;
