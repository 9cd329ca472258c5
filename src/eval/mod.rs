//! Evaluation of model outputs on the three subtasks of
//! [`crate::adapt::tasks`]: entity extraction, summary and alert.
//!
//! [`metrics`] holds the scores as pure functions of strings: entity
//! precision, recall and F1, key-fact retention (CIRS), context consistency
//! (CCI), and a bootstrap confidence interval over documents.

pub mod metrics;
