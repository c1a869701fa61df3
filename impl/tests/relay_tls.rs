//! `gatekeeper serve` relays to a downstream MTA over STARTTLS when it offers it: a local
//! TLS-speaking MTA (a self-signed certificate made here with rcgen) receives the message on
//! TLS, after a second EHLO, with `[delivery] relay_tls = "verify"` checking its certificate
//! against the configured CA and name; the SMTP client gets its 250 only then.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One line, byte by byte: nothing beyond it is read (the stream may go to TLS next).
async fn line<S: AsyncRead + Unpin>(s: &mut S) -> Option<String> {
    let mut l = Vec::new();
    let mut b = [0u8; 1];
    loop {
        if s.read(&mut b).await.ok()? == 0 {
            return None;
        }
        l.push(b[0]);
        if b[0] == b'\n' {
            return Some(String::from_utf8_lossy(&l).into_owned());
        }
    }
}

/// The MTA's side until QUIT or the end (`false`) or STARTTLS answered 220 (`true`).
async fn dialogue<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    tls: bool,
    log: &mut Vec<String>,
    data: &mut String,
) -> bool {
    while let Some(l) = line(s).await {
        let cmd = l.trim_end().to_string();
        log.push(cmd.clone());
        let reply = if cmd.starts_with("EHLO") {
            if tls { "250-mta.test\r\n250 8BITMIME\r\n" } else { "250-mta.test\r\n250-STARTTLS\r\n250 8BITMIME\r\n" }
        } else if cmd == "STARTTLS" {
            s.write_all(b"220 2.0.0 ready to start TLS\r\n").await.unwrap();
            return true;
        } else if cmd == "DATA" {
            s.write_all(b"354 go on\r\n").await.unwrap();
            s.flush().await.unwrap();
            while let Some(l) = line(s).await {
                if l == ".\r\n" {
                    break;
                }
                data.push_str(&l);
            }
            "250 2.0.0 queued as TLS1\r\n"
        } else if cmd == "QUIT" {
            let _ = s.write_all(b"221 bye\r\n").await;
            let _ = s.flush().await;
            return false;
        } else {
            "250 ok\r\n"
        };
        s.write_all(reply.as_bytes()).await.unwrap();
        s.flush().await.unwrap();
    }
    false
}

#[test]
fn the_relay_is_reached_over_starttls_with_a_verified_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["mta.test".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("mta-cert.pem"), dir.path().join("mta-key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(gatekeeper::edges::tls::server_config(&cert, &key).unwrap());

    // The MTA, on a runtime of its own.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let mta = listener.local_addr().unwrap();
    let (tx, seen) = mpsc::channel();
    rt.spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let (tx, acceptor) = (tx.clone(), acceptor.clone());
            tokio::spawn(async move {
                tcp.write_all(b"220 mta.test ESMTP\r\n").await.unwrap();
                let (mut log, mut data, mut on_tls) = (Vec::new(), String::new(), false);
                if dialogue(&mut tcp, false, &mut log, &mut data).await
                    && let Ok(mut tls) = acceptor.accept(tcp).await
                {
                    on_tls = true;
                    dialogue(&mut tls, true, &mut log, &mut data).await;
                }
                let _ = tx.send((on_tls, log, data));
            });
        }
    });

    let config = dir.path().join("gatekeeper.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nhostname = \"mx.example.test\"\n[domains]\nlocal = [\"example.test\"]\nusers = [\"alice@example.test\"]\n\
             [delivery]\nrelay = \"{mta}\"\nrelay_tls = \"verify\"\nrelay_ca = \"mta-cert.pem\"\nrelay_tls_name = \"mta.test\"\n"
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let smtp: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let log = dir.path().join("gatekeeper.log");
    let _served = Served(
        Command::new(env!("CARGO_BIN_EXE_gatekeeper"))
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--listen", &smtp.to_string(), "--state-dir"])
            .arg(dir.path().join("state"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("serving") {
        assert!(start.elapsed() < Duration::from_secs(20), "{}", std::fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(50));
    }

    let s = TcpStream::connect(smtp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut reply = || {
        let mut all = String::new();
        loop {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            all.push_str(&l);
            if l.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    };
    assert!(reply().starts_with("220"));
    for (cmd, code) in [
        ("EHLO client.test", "250"),
        ("MAIL FROM:<someone@remote.test>", "250"),
        ("RCPT TO:<alice@example.test>", "250"),
        ("DATA", "354"),
    ] {
        write!(w, "{cmd}\r\n").unwrap();
        let got = reply();
        assert!(got.starts_with(code), "{cmd}: {got}");
    }
    write!(w, "Subject: to the relay\r\n\r\nover TLS\r\n.\r\n").unwrap();
    let end = reply();
    assert!(end.starts_with("250"), "{end}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    assert!(end.contains("queued as TLS1"), "the relay's own reply is quoted: {end}");
    write!(w, "QUIT\r\n").unwrap();

    let (on_tls, commands, data) = seen.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(on_tls, "{commands:?}");
    assert_eq!(commands[..3], ["EHLO mx.example.test", "STARTTLS", "EHLO mx.example.test"]);
    assert!(data.contains("Subject: to the relay\r\n") && data.contains("over TLS\r\n"), "{data}");
}
