//! Hierarchical synthetic data: scene templates, then detail injection.
//!
//! The seed readers turn real annotated reports into [`crate::corpus::Record`]s;
//! [`scene`] (G_scene) turns them into coarse templates with typed slots per
//! scene category; [`detail`] (G_detail) fills the slots conditioned on
//! attributes; [`checks`] and [`filter`] re-check every generated record and
//! keep a diverse, consistent corpus. [`llm`] is the LLM backend of `scene`
//! and `detail`: prompts, JSON schemas and answer checks. The stage kinds in
//! `crate::stages` are thin wrappers that read and write files around these
//! functions.

pub mod checks;
pub mod delex;
pub mod detail;
pub mod filter;
pub mod histogram;
pub mod llm;
pub mod scene;
pub mod seed;
pub mod slot_class;
pub mod template;

#[cfg(test)]
pub(crate) mod testkit;
