//! Byte-pair encoding (Sennrich et al. 2016): the model (`model.rs`) and its trainer (`train.rs`).

pub(crate) mod model;
pub(crate) mod train;

pub use model::Bpe;
