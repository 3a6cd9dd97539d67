//! Unigram language-model tokenization (Kudo 2018): the model (`model.rs`) and its
//! EM trainer (`train.rs`).

pub(crate) mod model;
pub(crate) mod train;

pub use model::Unigram;
