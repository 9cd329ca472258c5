//! Progress reporting. Library code never prints: stages report through a
//! [`Reporter`], and the command line decides how (or whether) to draw it.

use std::sync::Arc;

/// Receives progress from running stages.
pub trait Reporter: Send + Sync {
    /// Starts a progress counter for one loop of a stage.
    fn progress(&self, stage: &str, total: Option<u64>, unit: &'static str) -> Progress;

    /// Something a stage wants the user to read, such as a hash to pin.
    fn notice(&self, _stage: &str, _message: &str) {}
}

/// What a [`Progress`] handle forwards to; implemented by the CLI's bars.
pub trait ProgressSink: Send + Sync {
    fn inc(&self, n: u64);
    fn set_message(&self, message: String);
    fn finish(&self);
}

/// A counter handed to a stage; cheap to call in a hot loop.
pub struct Progress {
    sink: Option<Arc<dyn ProgressSink>>,
}

impl Progress {
    /// A handle that reports nowhere.
    pub fn hidden() -> Self {
        Self { sink: None }
    }

    pub fn new(sink: Arc<dyn ProgressSink>) -> Self {
        Self { sink: Some(sink) }
    }

    pub fn inc(&self, n: u64) {
        if let Some(sink) = &self.sink {
            sink.inc(n);
        }
    }

    pub fn set_message(&self, message: impl Into<String>) {
        if let Some(sink) = &self.sink {
            sink.set_message(message.into());
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(sink) = &self.sink {
            sink.finish();
        }
    }
}

/// A reporter that draws nothing: for tests, `--quiet` and non-terminals.
pub struct NullReporter;

impl Reporter for NullReporter {
    fn progress(&self, _stage: &str, _total: Option<u64>, _unit: &'static str) -> Progress {
        Progress::hidden()
    }
}
