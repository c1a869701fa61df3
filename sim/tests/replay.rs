//! Log replay (issue 17) over the committed sample: a log written by Debian's Postfix 3.7
//! (ci/replay-postfix.sh with SAMPLE=..., a scripted mix of honest mail, bounces, backscatter,
//! forged local senders, dictionary attacks, a mistyping client and bursts) replayed through
//! the gatekeeper. The counts must match the script's and stay what they were: the replay is
//! deterministic, so `replay.json` is compared whole with the one committed beside the log.

use std::path::Path;
use std::process::Command;

fn data(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name).display().to_string()
}

#[test]
fn postfix_sample_replays_to_the_committed_counts() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_gatekeeper-sim"))
        .args(["replay", &data("postfix-sample.log"), "--config", &data("replay-gatekeeper.toml"), "--year", "2026"])
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    let got: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("replay/replay.json")).unwrap()).unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data("postfix-sample.replay.json")).unwrap()).unwrap();
    assert_eq!(got, want, "{stdout}");
    // What the script sent (SCALE=10): 60 honest, 30 bounces, 40 backscatter, 30 forged local
    // senders, 30 dictionary attacks, a mistyping client's 2 sessions, a burst of 4 and 300 bulk
    // sessions, and the start-up probe.
    let n = |k: &str| got[k].as_u64().unwrap();
    assert_eq!(n("sessions"), 60 + 30 + 40 + 30 + 30 + 2 + 4 + 300 + 1);
    assert_eq!(n("mta_messages"), 60 + 30 + 30 + 2 + 4 + 300);
    assert_eq!((got["bans_by_reason"]["B1"].as_u64(), got["bans_by_reason"]["B4"].as_u64()), (Some(30), Some(31)));
    assert_eq!(n("rejected"), 30);
    assert_eq!(n("same") + n("delayed"), 60 + 30 + 4 + 300);
    assert_eq!((n("undelivered"), n("let_in"), n("lines_unknown")), (2, 0, 0));
    // The report, the graph and each ban's lines.
    for f in ["report.json", "report.md", "hourly.svg", "bans.txt"] {
        assert!(out.path().join("replay").join(f).is_file(), "{f}");
    }
    let bans = std::fs::read_to_string(out.path().join("replay/bans.txt")).unwrap();
    assert_eq!(bans.lines().count(), 61);
    assert!(bans.lines().all(|l| l.contains("postfix-sample.log:")), "{bans}");
    assert!(stdout.contains("== replay: what differs from what the MTA did"), "{stdout}");
}

#[test]
fn unknown_and_malformed_lines_are_counted_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("mail.log");
    let mut text =
        std::fs::read_to_string(data("postfix-sample.log")).unwrap().lines().take(200).collect::<Vec<_>>().join("\n");
    text.push_str("\n\u{0}garbage\nDec 06 99:99:99 mx postfix/smtpd[1]: connect from x\n{\"json\": true}\n");
    std::fs::write(&log, text).unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_gatekeeper-sim"))
        .args(["replay", log.to_str().unwrap(), "--config", &data("replay-gatekeeper.toml"), "--year", "2026"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("3 unknown and skipped"), "{stdout}");
}
