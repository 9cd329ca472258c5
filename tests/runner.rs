//! The scheduler and store through the library: panicking stages, keys
//! shared inside one run, variant selection, read-only plans.

mod common;

use common::Project;
use watchfire::cache::{LocalStore, Store};
use watchfire::executor::{Executor, Job, LocalExecutor};
use watchfire::progress::{NullReporter, Reporter};
use watchfire::recipe::{LoadOptions, RecipeErrorKind, load};
use watchfire::scheduler::{RunObserver, RunOptions, Status, run};
use watchfire::stage::StageError;

/// Panics in every `scene` stage; runs the rest.
struct PanicsInScene;

impl Executor for PanicsInScene {
    fn execute(&self, job: &Job<'_>, reporter: &dyn Reporter) -> Result<(), StageError> {
        if job.kind.kind() == "scene" {
            panic!("boom in {}", job.stage_id);
        }
        LocalExecutor.execute(job, reporter)
    }
}

#[derive(Default)]
struct Notices(std::sync::Mutex<Vec<String>>);

impl RunObserver for Notices {
    fn notice(&self, message: &str) {
        self.0.lock().unwrap().push(message.to_string());
    }
}

const TWO_BRANCHES: &str = "name: two\nstages:\n  a:\n    kind: seed\n    inputs: {data: data/seed.jsonl}\n  \
     b:\n    kind: seed\n    inputs: {data: data/seed.jsonl}\n  a_scene:\n    kind: scene\n    inputs: {seed: a}\n";

fn options() -> RunOptions<'static> {
    RunOptions { jobs: 2, gpus: 0, policy: None }
}

#[test]
fn a_panicking_stage_fails_and_the_run_goes_on() {
    let project = Project::new();
    project.write("recipes/two.yaml", TWO_BRANCHES);
    let recipe = load(&project.path().join("recipes/two.yaml"), &LoadOptions::default()).unwrap();
    let store = LocalStore::open(&project.path().join("cache")).unwrap();
    let report =
        run(&recipe, &store, &PanicsInScene, &NullReporter, &Notices::default(), &options())
            .unwrap();
    let status =
        |name: &str| report.outcomes.iter().find(|o| o.name == name).unwrap().status.clone();
    match status("a_scene") {
        Status::Failed(message) => {
            assert!(message.contains("panicked: boom in a_scene"), "{message}")
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    assert!(matches!(status("a"), Status::Ran | Status::Cached));
    assert!(report.failed());
}

#[test]
fn twin_stages_in_one_run_build_their_key_once() {
    let project = Project::new();
    project.write("recipes/two.yaml", TWO_BRANCHES);
    let recipe = load(&project.path().join("recipes/two.yaml"), &LoadOptions::default()).unwrap();
    let store = LocalStore::open(&project.path().join("cache")).unwrap();
    let notices = Notices::default();
    let report = run(&recipe, &store, &LocalExecutor, &NullReporter, &notices, &options()).unwrap();
    let statuses: Vec<Status> = report
        .outcomes
        .iter()
        .filter(|o| o.name == "a" || o.name == "b")
        .map(|o| o.status.clone())
        .collect();
    assert!(statuses.contains(&Status::Ran) && statuses.contains(&Status::Cached), "{statuses:?}");
    assert!(notices.0.lock().unwrap().is_empty(), "no 'another process' notice");
    assert_eq!(store.keys().unwrap().len(), 2, "a (= b) and a_scene");
}

const VARIANTS: &str = "name: v\nparams: {n: 10}\nstages:\n  seed:\n    kind: seed\n    \
     inputs: {data: data/seed.jsonl}\n  scene:\n    kind: scene\n    inputs: {seed: seed}\n  \
     detail:\n    kind: detail\n    params:\n      count: ${params.n}\n    inputs: {templates: scene, seed: seed.records}\n\
     variants:\n  small:\n    params: {n: 5}\n";

#[test]
fn instance_names_do_not_depend_on_the_variants_selected() {
    let project = Project::new();
    project.write("recipes/v.yaml", VARIANTS);
    let path = project.path().join("recipes/v.yaml");
    let names = |variants: &[&str]| {
        let options = LoadOptions {
            variants: variants.iter().map(|v| v.to_string()).collect(),
            ..LoadOptions::default()
        };
        let recipe = load(&path, &options).unwrap();
        recipe.instances.iter().map(|i| i.name.clone()).collect::<Vec<_>>()
    };
    assert_eq!(names(&[]), ["seed", "scene", "detail", "detail@small"]);
    assert_eq!(names(&["small"]), ["seed", "scene", "detail@small"]);
    assert_eq!(names(&["default"]), ["seed", "scene", "detail"]);

    let options = LoadOptions { variants: vec!["smal".into()], ..LoadOptions::default() };
    let err = watchfire::recipe::parse(&std::fs::read_to_string(&path).unwrap(), "v.yaml")
        .and_then(|parsed| watchfire::recipe::resolve(parsed, &path, &options))
        .err()
        .unwrap();
    assert_eq!(err.kind, RecipeErrorKind::UnknownVariant);
    assert_eq!(err.help_text(), Some("did you mean `small`?"));
}

#[test]
fn a_link_out_of_the_project_inside_a_folder_input_is_refused() {
    let project = Project::new();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.jsonl"), "{}\n").unwrap();
    std::fs::create_dir_all(project.path().join("recipes/linked")).unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("secret.jsonl"),
        project.path().join("recipes/linked/a.jsonl"),
    )
    .unwrap();
    project.write(
        "recipes/l.yaml",
        "name: l\nstages:\n  seed:\n    kind: seed\n    inputs: {data: linked/}\n",
    );
    let path = project.path().join("recipes/l.yaml");
    let err = watchfire::recipe::parse(&std::fs::read_to_string(&path).unwrap(), "l.yaml")
        .and_then(|parsed| watchfire::recipe::resolve(parsed, &path, &LoadOptions::default()))
        .err()
        .unwrap();
    assert_eq!(err.kind, RecipeErrorKind::PathEscapes);
    assert_eq!(err.spanned_text().as_deref(), Some("linked/"));
}

#[test]
fn plan_leaves_a_corrupt_artifact_for_run_to_report() {
    let project = Project::with_recipe("synthetic.yaml");
    let qs = "recipes/synthetic.yaml";
    project.ok(&["run", qs]);
    let scene = project.artifact(qs, "scene");
    std::fs::write(scene.join("templates.jsonl"), "tampered\n").unwrap();
    let plan = project.ok(&["plan", qs]);
    assert!(plan.contains("artifact corrupt (`templates.jsonl` changed)"), "{plan}");
    assert!(scene.exists(), "plan must not delete anything");
    // An unreadable manifest is corruption too, not a crash.
    std::fs::write(scene.parent().unwrap().join("manifest.json"), "{garbage").unwrap();
    let verify = project.run(&["cache", "verify"]);
    assert!(String::from_utf8_lossy(&verify.stdout).contains("(unreadable): `manifest.json`"));
    let out = project.run(&["run", qs]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("artifact of `scene` was corrupt"));
}
