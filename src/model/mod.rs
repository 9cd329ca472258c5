//! Base models: where their weights come from and how they reach the cache.
//!
//! [`source`] parses a model source string (`path:`, `pip:`, `hf:`), fetches
//! it into a folder and checks it against a pin. The `model` stage kind is a
//! thin wrapper around it, and the CLI can use it to resolve a model given on
//! the command line.

pub mod source;
