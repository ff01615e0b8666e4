//! The shared scenarios of `../shared/spec/scenarios`, replayed through
//! `ferryctl simulate`'s library entry point, must reproduce their
//! `.expected.json` exactly: cost, the non-placement decisions with their times,
//! and the elastic resources' ready / released times and billed seconds.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

fn repo_scenarios() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios")
}

/// Every `*.toml` scenario with an `.expected.json` beside it.
fn scenarios() -> Vec<(PathBuf, PathBuf)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo_scenarios()).expect("read tests/scenarios") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let stem = path
                .file_stem()
                .expect("stem")
                .to_string_lossy()
                .into_owned();
            let expected = path.with_file_name(format!("{stem}.expected.json"));
            assert!(
                expected.exists(),
                "{} has no expected output",
                path.display()
            );
            out.push((path, expected));
        }
    }
    out.sort();
    out
}

/// The parts of the output the expected files pin: cost, non-placement
/// decisions and elastic, compared field for field.
fn extract(output: &Value) -> Value {
    let decisions: Vec<Value> = output["decisions"]
        .as_array()
        .expect("decisions array")
        .iter()
        .filter(|d| d["action"] != "placed")
        .cloned()
        .collect();
    json!({
        "cost": output["cost"],
        "decisions": decisions,
        "elastic": output["elastic"],
    })
}

#[test]
fn shared_scenarios_reproduce_their_expected_output() {
    let all = scenarios();
    assert!(all.len() >= 3, "expected the three shared scenarios");
    for (toml, expected) in all {
        let out = ferry_broker::simulate::run_cli(&toml, true)
            .unwrap_or_else(|e| panic!("simulate {}: {e}", toml.display()));
        let out: Value = serde_json::from_str(&out).expect("output is JSON");
        let want: Value =
            serde_json::from_str(&std::fs::read_to_string(&expected).expect("read expected"))
                .expect("expected is JSON");
        assert_eq!(
            extract(&out),
            want,
            "{}: output differs from {}",
            toml.display(),
            expected.display()
        );
    }
}

/// The repo's copies must equal the shared spec's scenarios when the shared
/// directory is there (it sits beside the workspace on the project machines).
#[test]
fn repo_copies_equal_the_shared_scenarios() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/spec/scenarios");
    if !shared.is_dir() {
        println!(
            "note: {} does not exist; comparing the repo copies is skipped",
            shared.display()
        );
        return;
    }
    let mut names: Vec<String> = std::fs::read_dir(&shared)
        .expect("read shared scenarios")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    assert!(!names.is_empty());
    for name in names {
        let want = std::fs::read(shared.join(&name)).expect("read shared file");
        let have = std::fs::read(repo_scenarios().join(&name))
            .unwrap_or_else(|e| panic!("tests/scenarios/{name} is missing: {e}"));
        assert!(
            have == want,
            "tests/scenarios/{name} differs from {}",
            shared.join(&name).display()
        );
    }
}
