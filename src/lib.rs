//! `nlp`: the whole life of a language model from the command line.
//!
//! Everything the binary does is a library call, so tests, benchmarks and other
//! programs use the same code. See DESIGN.md in the shared notes for the module map.

pub mod cli;
pub mod cmd;
pub mod config;
pub mod data;
pub mod decode;
pub mod device;
pub mod eval;
pub mod error;
pub mod fsutil;
pub mod hub;
pub mod lm;
pub mod lora;
pub mod model;
pub mod ngram;
pub mod progress;
pub mod rng;
mod simd;
pub mod tokenize;
pub mod train;

pub use error::{Error, Result};
