//! Lock files: written and stable, diffs name the changed stage, verify,
//! `plan --locked` and `run --frozen`.

mod common;

use common::Project;

const QS: &str = "recipes/synthetic.yaml";
const LOCK: &str = "recipes/synthetic.lock";

#[test]
fn the_lock_is_written_and_stable_across_runs() {
    let project = Project::with_recipe("synthetic.yaml");
    project.ok(&["run", QS]);
    let first = project.read(LOCK);
    assert!(first.contains("stages:\n  seed:\n"), "{first}");
    for stage in ["seed", "scene", "detail", "filter"] {
        assert!(first.contains(&format!("\n  {stage}:\n")), "{stage} missing");
    }
    // Another run, and a run in a fresh cache, write the same bytes.
    project.ok(&["run", QS]);
    assert_eq!(project.read(LOCK), first);
    project.ok(&["run", QS, "--cache", "other-cache"]);
    assert_eq!(project.read(LOCK), first);
    // `--no-lock` leaves it alone.
    std::fs::remove_file(project.path().join(LOCK)).unwrap();
    project.ok(&["run", QS, "--no-lock"]);
    assert!(!project.path().join(LOCK).exists());
}

#[test]
fn a_param_change_is_a_one_stage_diff() {
    let project = Project::with_recipe("synthetic.yaml");
    project.ok(&["run", QS]);
    let before = project.read(LOCK);
    project.edit(QS, "near_duplicate_threshold: 0.9", "near_duplicate_threshold: 0.8");
    project.ok(&["run", QS]);
    let after = project.read(LOCK);
    let changed: Vec<(&str, &str)> =
        before.lines().zip(after.lines()).filter(|(a, b)| a != b).collect();
    assert_eq!(before.lines().count(), after.lines().count());
    // The param, the key, and the outputs of `filter`, and nothing else.
    assert!(changed.iter().any(|(a, b)| a.contains("0.9") && b.contains("0.8")), "{changed:?}");
    let filter_at = after.find("\n  filter:\n").unwrap();
    let first_changed = before.lines().zip(after.lines()).position(|(a, b)| a != b).unwrap();
    let filter_line = after[..filter_at].lines().count();
    assert!(first_changed >= filter_line, "a stage before `filter` changed: {changed:?}");
}

#[test]
fn verify_passes_and_then_names_a_tampered_stage() {
    let project = Project::with_recipe("synthetic.yaml");
    project.ok(&["run", QS]);
    let out = project.ok(&["verify", QS]);
    assert!(out.contains("4 stages verified, 0 not matching"), "{out}");

    // Tamper with the recorded output of `scene`, as a changed stage would.
    let lock = project.read(LOCK);
    let at = lock.find("\n  scene:\n").unwrap();
    let files_at = at + lock[at..].find("templates.jsonl: ").unwrap() + "templates.jsonl: ".len();
    let mut tampered = lock.clone();
    tampered.replace_range(files_at..files_at + 4, "0000");
    let output_at = at + lock[at..].find("output: ").unwrap() + "output: ".len();
    tampered.replace_range(output_at..output_at + 4, "0000");
    project.write(LOCK, &tampered);

    let out = project.run(&["verify", QS]);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("scene   differs  first differing file: templates.jsonl"), "{stdout}");
    assert!(stdout.contains("1 not matching"), "{stdout}");

    // Only the named stage (and what it needs) is rebuilt and compared.
    let out = project.run(&["verify", QS, "seed"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 stage verified, 0 not matching"));
}

#[test]
fn plan_locked_fails_on_a_stale_lock_even_with_an_empty_cache() {
    let project = Project::with_recipe("synthetic.yaml");
    project.ok(&["run", QS]);
    // A teammate's fresh clone: the lock and the recipe, no cache.
    std::fs::remove_dir_all(project.path().join("cache")).unwrap();
    let out = project.ok(&["plan", "--locked", QS]);
    assert!(out.contains("the lock matches the recipe"), "{out}");

    project.edit(QS, "records: 2000", "records: 1500");
    let out = project.run(&["plan", "--locked", QS]);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("param `count` 2000 -> 1500"), "{stdout}");
    assert!(stderr.contains("the lock is stale"), "{stderr}");
}

#[test]
fn frozen_refuses_keys_missing_from_the_lock() {
    let project = Project::with_recipe("synthetic.yaml");
    let out = project.run(&["run", "--frozen", QS]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("there is no lock file"));

    project.ok(&["run", QS]);
    let lock = project.read(LOCK);
    project.ok(&["run", "--frozen", QS]);
    project.edit(QS, "records: 2000", "records: 1500");
    let out = project.run(&["run", "--frozen", QS]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("stage `detail` refused"), "{stderr}");
    assert!(!stderr.contains("stage `scene` refused"), "{stderr}");
    assert_eq!(project.read(LOCK), lock, "--frozen never rewrites the lock");
}

#[test]
fn the_lock_records_model_pins() {
    let project = Project::new();
    project.write("recipes/models/tiny.gguf", "not really a model, but bytes to pin");
    project.write(
        "recipes/m.yaml",
        "name: m\nstages:\n  base:\n    kind: model\n    params:\n      source: path:models/tiny.gguf\n",
    );
    project.ok(&["run", "recipes/m.yaml"]);
    let lock = project.read("recipes/m.lock");
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(b"not really a model, but bytes to pin"))
    };
    assert!(lock.contains(&format!("models:\n  path:models/tiny.gguf: sha256:{sha}\n")), "{lock}");
}

#[test]
fn the_committed_synthetic_lock_reproduces_on_this_machine() {
    // recipes/synthetic.lock was written on a development machine; a
    // rebuild here from scratch must give the same bytes.
    let project = Project::with_recipe("synthetic.yaml");
    let lock = std::fs::read_to_string(common::repo().join(LOCK)).unwrap();
    project.write(LOCK, &lock);
    let out = project.ok(&["plan", "--locked", QS]);
    assert!(out.contains("the lock matches the recipe"), "{out}");
    let out = project.ok(&["verify", QS]);
    assert!(out.contains("4 stages verified, 0 not matching the lock"), "{out}");
}
