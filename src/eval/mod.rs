//! Evaluation of model outputs on the three subtasks of
//! [`crate::adapt::tasks`]: entity extraction, summary and alert.
//!
//! - [`metrics`]: the scores as pure functions of strings: entity
//!   precision, recall and F1, key-fact retention (CIRS), context
//!   consistency (CCI), and a bootstrap confidence interval over documents.
//! - [`subject`]: the model under evaluation, with its adapter.
//! - [`score`]: one output scored against its example, and outcomes pooled.
//! - [`general`]: retained general ability against the base model.
//! - [`embed`]: key and peripheral span embeddings and their separation.
//! - [`evaluate`]: all of it, for the `eval` stage and `watchfire eval`.
//! - [`projection`]: the 2-D t-SNE map of span embeddings the report draws.
//! - [`report`]: the report's tables, as Markdown and HTML.

pub mod embed;
pub mod evaluate;
pub mod general;
pub mod metrics;
pub mod projection;
pub mod report;
pub mod score;
pub mod subject;
