//! The runner binary: the seed comes first, `--out` writes the three files, `--json` prints
//! the reports, and a failed expectation is exit status 1.

use std::process::Command;

const SCENARIO: &str = r#"
description = "tiny"
seed = 5
duration = "15m"
tick = "250ms"
local_users = 5

[gatekeeper.rules]
verify_senders = true
scan = true
[gatekeeper.gate.kind]
backend = "nft"

[[remote]]
pool = "honest"
domains = 5
behaviour = "normal"

[[remote]]
pool = "spam"
domains = 20
behaviour = "normal"

[[actor]]
kind = "fake_sender"
addresses = 200
senders = "spam"
rate = [["0h", 600]]

[[actor]]
kind = "backscatter"
addresses = 50
rate = [["0h", 600]]

[[actor]]
kind = "forged_local"
addresses = 10
rate = [["0h", 60]]

[[actor]]
kind = "honest"
addresses = 3
senders = "honest"
rate = [["0h", 30]]

[expect]
"backscatter.bans" = "== 0"
"forged_local.banned_in_session_ratio" = "== 1"
"#;

fn sim() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gatekeeper-sim"))
}

#[test]
fn runs_writes_and_exits_by_the_expectations() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tiny.toml");
    std::fs::write(&file, SCENARIO).unwrap();
    let out = dir.path().join("out");
    let o =
        sim().args(["run", file.to_str().unwrap(), "--seed", "9", "--out", out.to_str().unwrap()]).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(stdout.lines().next(), Some("seed 9"), "{stdout}");
    assert!(stdout.contains("== tiny (seed 9) PASS"), "{stdout}");
    for f in ["report.json", "report.md", "hourly.svg"] {
        assert!(out.join("tiny").join(f).is_file(), "{f} missing");
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("tiny/report.json")).unwrap()).unwrap();
    assert_eq!(json["seed"], 9);
    assert_eq!(json["passed"], true);

    // --json: the reports on stdout, the seed on stderr.
    let o = sim().args(["run", file.to_str().unwrap(), "--json"]).output().unwrap();
    assert!(o.status.success());
    let all: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(all[0]["scenario"], "tiny");
    assert!(String::from_utf8_lossy(&o.stderr).starts_with("seed: "));

    // An expectation that cannot hold: exit status 1.
    std::fs::write(&file, SCENARIO.replace("\"backscatter.bans\" = \"== 0\"", "\"backscatter.bans\" = \">= 1\""))
        .unwrap();
    let o = sim().args(["run", file.to_str().unwrap()]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stdout));
    assert!(String::from_utf8_lossy(&o.stdout).contains("FAIL       backscatter.bans >= 1 (actual 0)"));

    // A broken file: exit status 2 and the problem named.
    std::fs::write(&file, "seed = 1\n").unwrap();
    let o = sim().args(["run", file.to_str().unwrap()]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("duration"));
}

#[test]
fn reports_are_byte_identical_across_processes() {
    // Separate processes: different hash seeds, addresses and OS randomness; the report must
    // not notice. Callbacks, DNS and honest queues all run in this scenario.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tiny.toml");
    std::fs::write(&file, SCENARIO).unwrap();
    let run = |seed: &str, out: &str| {
        let out = dir.path().join(out);
        let o = sim()
            .args(["run", file.to_str().unwrap(), "--seed", seed, "--out", out.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
        let read = |f: &str| std::fs::read(out.join("tiny").join(f)).unwrap();
        (read("report.json"), read("report.md"), read("hourly.svg"))
    };
    let a = run("11", "a");
    let b = run("11", "b");
    let c = run("12", "c");
    assert!(a.0 == b.0, "report.json differs between two runs with seed 11");
    assert!(a.1 == b.1, "report.md differs");
    assert!(a.2 == b.2, "hourly.svg differs");
    assert!(a.0 != c.0, "seed 12 gives the same report as seed 11");
}
