//! watchfire: a declarative, content-hashed recipe runner for adapting open
//! LLMs to public-safety text.

pub mod adapt;
pub mod cache;
pub mod corpus;
pub mod eval;
pub mod executor;
pub mod graph;
pub mod lock;
pub mod model;
#[cfg(feature = "mistralrs")]
pub mod peer;
pub mod plan;
pub mod plot;
pub mod progress;
pub mod recipe;
pub mod reference;
pub mod scheduler;
pub mod schema;
pub mod stage;
pub mod stages;
pub mod synth;
