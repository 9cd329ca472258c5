//! The real binary on real recipes: output, caching, early cutoff, failures,
//! corruption, crashes and concurrent runs.

mod common;

use std::time::{Duration, Instant};

use common::{Project, filtered};

const QS: &str = "recipes/synthetic.yaml";

#[test]
fn second_run_does_nothing_and_says_so() {
    let project = Project::with_recipe("synthetic.yaml");
    let first = project.ok(&["run", QS]);
    insta::assert_snapshot!("first_run", filtered(&first, &project));
    let second = project.ok(&["run", QS]);
    insta::assert_snapshot!("second_run", filtered(&second, &project));
}

#[test]
fn plan_names_the_field_that_changed() {
    let project = Project::with_recipe("synthetic.yaml");
    insta::assert_snapshot!("plan_first", filtered(&project.ok(&["plan", QS]), &project));
    project.ok(&["run", QS]);
    project.edit(QS, "templates_per_scene: 40", "templates_per_scene: 60");
    let plan = project.ok(&["plan", QS]);
    insta::assert_snapshot!("plan_param_changed", filtered(&plan, &project));
    // `run -n` is the same plan and executes nothing.
    assert_eq!(project.ok(&["run", "-n", QS]), plan);
    assert_eq!(project.ok(&["plan", QS]), plan);
}

#[test]
fn a_changed_file_is_named_and_identical_output_cuts_off_dependents() {
    let project = Project::with_recipe("synthetic.yaml");
    project.ok(&["run", QS]);
    // A blank line at the end changes the file, not the records read from it.
    let seed = project.read("recipes/data/seed.jsonl");
    project.write("recipes/data/seed.jsonl", &format!("{seed}\n"));
    let plan = project.ok(&["plan", QS]);
    assert!(plan.contains("file `recipes/data/seed.jsonl` changed"), "{plan}");
    let run = project.ok(&["run", QS]);
    insta::assert_snapshot!("early_cutoff", filtered(&run, &project));
}

#[test]
fn a_failed_stage_stops_only_its_dependents() {
    let project = Project::with_recipe("synthetic.yaml");
    project.write("recipes/data/bad.jsonl", "{\"text\": \"short\", \"scene\": \"x\", \"entities\": [{\"type\": \"time\", \"start\": 2, \"end\": 99}]}\n");
    project.write(
        "recipes/two.yaml",
        "name: two\nstages:\n  good:\n    kind: seed\n    inputs: {data: data/seed.jsonl}\n  \
         bad:\n    kind: seed\n    inputs: {data: data/bad.jsonl}\n  bad_scene:\n    kind: scene\n    inputs: {seed: bad}\n  \
         good_scene:\n    kind: scene\n    inputs: {seed: good}\n",
    );
    let out = project.run(&["run", "recipes/two.yaml", "-j", "1"]);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    insta::assert_snapshot!("failed_stage_stdout", filtered(&stdout, &project));
    assert!(stderr.contains("stage `bad` failed"), "{stderr}");
    assert!(stderr.contains("bad.jsonl:1"), "the error names the file and line: {stderr}");
    // What succeeded is cached.
    let plan = project.ok(&["plan", "recipes/two.yaml"]);
    assert!(has_row(&plan, "good_scene", "scene", "cached"), "{plan}");
}

#[test]
fn graph_prints_dot_and_mermaid() {
    let project = Project::with_recipe("synthetic.yaml");
    insta::assert_snapshot!("graph_dot", project.ok(&["graph", QS]));
    insta::assert_snapshot!("graph_mermaid", project.ok(&["graph", QS, "--format", "mermaid"]));
}

#[test]
fn very_verbose_prints_the_key_as_json() {
    let project = Project::with_recipe("synthetic.yaml");
    let out = project.run(&["run", QS, "-vv"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("key of `detail` = "), "{stderr}");
    assert!(stderr.contains("\"kind_version\""), "{stderr}");
    assert!(stderr.contains("\"watchfire_version\""), "{stderr}");
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let a = Project::with_recipe("synthetic.yaml");
    let b = Project::with_recipe("synthetic.yaml");
    let c = Project::with_recipe("synthetic.yaml");
    c.edit(QS, "seed: 42", "seed: 43");
    for project in [&a, &b, &c] {
        project.ok(&["run", QS]);
    }
    let corpus =
        |p: &Project| std::fs::read(p.artifact(QS, "filter").join("corpus.jsonl")).unwrap();
    assert_eq!(corpus(&a), corpus(&b));
    assert_ne!(corpus(&a), corpus(&c));
}

#[test]
fn a_tampered_artifact_is_reported_and_rebuilt() {
    let project = Project::with_recipe("synthetic.yaml");
    project.ok(&["run", QS]);
    let templates = project.artifact(QS, "scene").join("templates.jsonl");
    let original = std::fs::read(&templates).unwrap();
    std::fs::write(&templates, b"tampered\n").unwrap();
    let verify = project.run(&["cache", "verify"]);
    assert!(!verify.status.success());
    assert!(String::from_utf8_lossy(&verify.stdout).contains("(scene): `templates.jsonl`"));
    let out = project.run(&["run", QS]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("artifact of `scene` was corrupt"), "{stderr}");
    let rebuilt = std::fs::read(project.artifact(QS, "scene").join("templates.jsonl")).unwrap();
    assert_eq!(rebuilt, original);
}

#[test]
fn cache_ls_show_and_gc() {
    let project = Project::with_recipe("synthetic.yaml");
    project.ok(&["run", QS]);
    project.edit(QS, "records: 2000", "records: 500");
    project.ok(&["run", QS]);
    let ls = project.ok(&["cache", "ls"]);
    assert!(ls.contains("6 artifacts"), "{ls}");
    let show = project.ok(&["show", "detail"]);
    insta::assert_snapshot!("show_detail", filtered(&show, &project));
    let gc = project.ok(&["cache", "gc", QS]);
    assert!(gc.contains("removed 2 artifacts"), "{gc}");
    assert!(project.ok(&["cache", "ls"]).contains("4 artifacts"));
    assert!(project.ok(&["run", QS]).contains("nothing to do"));
}

/// Polls until `done` holds or the deadline passes.
fn wait_for(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn artifact_count(project: &Project) -> usize {
    let dir = project.path().join("cache/store-v1/artifacts");
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn a_killed_run_leaves_no_partial_artifact_and_resumes() {
    let project = Project::with_recipe("synthetic.yaml");
    // Enough records that `detail` and `filter` are still running when killed.
    project.edit(QS, "records: 2000", "records: 100000");
    let mut child = project.command(&["run", QS, "-q"]).spawn().unwrap();
    wait_for("seed and scene", Duration::from_secs(60), || artifact_count(&project) >= 2);
    std::thread::sleep(Duration::from_millis(50));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let done = artifact_count(&project);
    assert!(done < 4, "the run finished before it was killed; make it slower");
    // Every artifact present is complete.
    for entry in std::fs::read_dir(project.path().join("cache/store-v1/artifacts")).unwrap() {
        assert!(entry.unwrap().path().join("manifest.json").exists());
    }
    let plan = project.ok(&["plan", QS]);
    assert!(has_row(&plan, "seed", "seed", "cached"), "{plan}");
    let run = project.ok(&["run", QS]);
    assert!(has_row(&run, "seed", "seed", "cached"), "{run}");
    assert!(has_row(&run, "scene", "scene", "cached"), "{run}");
    assert!(has_row(&run, "detail", "detail", "ran"), "{run}");
    let staging = project.path().join("cache/store-v1/staging");
    assert_eq!(std::fs::read_dir(staging).unwrap().count(), 0, "staging left behind");
}

/// How many stages a run's summary says it ran.
fn ran_count(stdout: &str) -> usize {
    if stdout.contains("nothing to do") {
        return 0;
    }
    let re = regex_lite::Regex::new(r": (\d+) ran,").unwrap();
    let caps = re.captures(stdout).unwrap_or_else(|| panic!("no summary in {stdout}"));
    caps[1].parse().unwrap()
}

fn has_row(table: &str, stage: &str, kind: &str, status: &str) -> bool {
    let re = regex_lite::Regex::new(&format!(r"(?m)^{stage}\s+{kind}\s+{status}\b")).unwrap();
    re.is_match(table)
}

#[test]
fn two_runs_on_one_cache_build_each_key_once() {
    let project = Project::with_recipe("synthetic.yaml");
    project.edit(QS, "records: 2000", "records: 20000");
    let first = project.command(&["run", QS]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let second =
        project.command(&["run", QS]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let first = first.wait_with_output().unwrap();
    let second = second.wait_with_output().unwrap();
    assert!(first.status.success() && second.status.success());
    let (a, b) = (String::from_utf8_lossy(&first.stdout), String::from_utf8_lossy(&second.stdout));
    assert_eq!(ran_count(&a) + ran_count(&b), 4, "each stage is built once:\n{a}\n{b}");
    assert_eq!(artifact_count(&project), 4);
}

#[test]
fn transient_stages_run_every_time_and_are_never_stored() {
    let project = Project::with_recipe("synthetic.yaml");
    project.edit(QS, "    kind: scene\n", "    kind: scene\n    cache: false\n");
    let first = project.ok(&["run", QS]);
    assert!(has_row(&first, "scene", "scene", "ran"), "{first}");
    assert_eq!(artifact_count(&project), 3, "`scene` is not stored");
    let second = project.ok(&["run", QS]);
    assert!(has_row(&second, "scene", "scene", "ran"), "{second}");
    // It made the same bytes, so what reads it is still cached.
    assert!(has_row(&second, "detail", "detail", "cached"), "{second}");
    let staging = project.path().join("cache/store-v1/staging");
    assert_eq!(std::fs::read_dir(staging).unwrap().count(), 0);
}
