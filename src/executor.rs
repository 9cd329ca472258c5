//! Executors run one stage job. The scheduler decides what runs and when;
//! an executor decides where. [`LocalExecutor`] runs the stage in the
//! calling thread; a cluster executor (Slurm) would ship the same [`Job`] to
//! another machine and wait for its outputs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::progress::Reporter;
use crate::schema::EntitySchema;
use crate::stage::{StageContext, StageError, StageKind};

/// Everything a stage run needs, as plain data.
pub struct Job<'a> {
    pub stage_id: &'a str,
    pub kind: &'static dyn StageKind,
    pub params: &'a serde_json::Value,
    pub key: String,
    pub seed: u64,
    pub schema: &'a EntitySchema,
    pub inputs: BTreeMap<String, PathBuf>,
    pub out_dir: PathBuf,
    /// See [`crate::cache::Store::checkpoints`].
    pub checkpoints: PathBuf,
}

pub trait Executor: Send + Sync {
    fn execute(&self, job: &Job<'_>, reporter: &dyn Reporter) -> Result<(), StageError>;
}

/// Runs stages in this process.
pub struct LocalExecutor;

impl Executor for LocalExecutor {
    fn execute(&self, job: &Job<'_>, reporter: &dyn Reporter) -> Result<(), StageError> {
        let ctx = StageContext {
            stage_id: job.stage_id,
            key: &job.key,
            seed: job.seed,
            schema: job.schema,
            inputs: &job.inputs,
            out_dir: &job.out_dir,
            checkpoints: &job.checkpoints,
            reporter,
        };
        let _span =
            tracing::info_span!("stage", id = job.stage_id, kind = job.kind.kind()).entered();
        job.kind.run(job.params, &ctx)
    }
}
