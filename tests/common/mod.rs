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
