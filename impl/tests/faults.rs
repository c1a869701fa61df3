//! Faults and privileges, run as the real binary (`gatekeeper serve`): the server starts on a
//! damaged `state.sqlite` (moved aside, a loud log); with `[server] user`, the serving process
//! has dropped to that user and its files are private; `check-config` refuses an unknown user.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_gatekeeper");

/// A running `gatekeeper serve`, killed on drop.
struct Gatekeeper {
    child: Child,
    log: PathBuf,
}

impl Drop for Gatekeeper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gatekeeper {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Writes a configuration under `dir` (state in `dir/state`) with `extra` appended to
/// `[server]`, starts `gatekeeper serve` and waits for its greeting.
fn start(dir: &Path, extra: &str) -> Gatekeeper {
    let port = free_port();
    let config = dir.join("gatekeeper.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nhostname = \"mx.example.test\"\nstate_dir = \"{}\"\n{extra}\n\
             [domains]\nlocal = [\"example.test\"]\nusers = [\"alice@example.test\"]\n",
            dir.join("state").display()
        ),
    )
    .unwrap();
    let log = dir.join("gatekeeper.log");
    let child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("gatekeeper starts");
    let mut gk = Gatekeeper { child, log };
    for _ in 0..300 {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            use std::io::Read;
            let mut greeting = [0u8; 3];
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            if s.read_exact(&mut greeting).is_ok() && &greeting == b"220" {
                return gk;
            }
        }
        if gk.child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("gatekeeper did not come up:\n{}", gk.log());
}

#[test]
fn serve_starts_on_a_damaged_state_database_and_moves_it_aside() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("state.sqlite"), vec![0xa5u8; 16 * 1024]).unwrap();
    let gk = start(dir.path(), "");
    let log = gk.log();
    assert!(log.contains("DATABASE DAMAGED OR UNREADABLE"), "{log}");
    let aside: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("state.sqlite.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(std::fs::read(state.join(&aside[0])).unwrap(), vec![0xa5u8; 16 * 1024], "kept for inspection");
}
