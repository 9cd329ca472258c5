//! watchfire: a declarative, content-hashed recipe runner for adapting open
//! LLMs to public-safety text.

pub mod corpus;
pub mod progress;
pub mod schema;
pub mod stage;
pub mod stages;
pub mod synth;
pub mod recipe;
pub mod cache;
pub mod executor;
pub mod scheduler;
pub mod plan;
pub mod graph;
