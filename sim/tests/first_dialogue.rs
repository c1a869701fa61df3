//! The real server on one simulated host, a client on another, under simulated time with a
//! fixed seed: `<>` to an unknown user (550, no ban), to alice (250), DATA into the spool.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use gatekeeper::config::Config;
use gatekeeper::edges::MaildirSpool;
use gatekeeper::server::{Limits, Server};
use gatekeeper_sim::net::{SimClock, SimListener};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const EPOCH_SECS: u64 = 1_795_000_000;

#[test]
fn dialogue_under_simulated_time() -> turmoil::Result {
    let epoch = UNIX_EPOCH + Duration::from_secs(EPOCH_SECS);
    let mut sim = turmoil::Builder::new()
        .rng_seed(42)
        .epoch(epoch)
        .tick_duration(Duration::from_millis(10))
        .simulation_duration(Duration::from_secs(120))
        .build();
    let dir = tempfile::tempdir()?;
    let maildir = dir.path().join("maildir");
    let spool_root = maildir.clone();
    let banned = Arc::new(std::sync::Mutex::new(None::<bool>));
    let banned_probe = banned.clone();

    sim.host("mx", move || {
        let spool_root = spool_root.clone();
        let banned = banned_probe.clone();
        async move {
            let settings = Config::parse("").unwrap().validate(None).unwrap();
            let clock = Arc::new(SimClock::new(epoch, Default::default()));
            let spool = MaildirSpool::open(&spool_root, "mx.example.test", clock.clone(), false)?;
            let server = Server::builder(settings.session.clone(), settings.directory.clone(), Arc::new(spool))
                .clock(clock)
                .limits(Limits::default())
                .build();
            let listener = SimListener::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 25)).await?;
            let watcher = server.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(30)).await;
                *banned.lock().unwrap() = Some(watcher.is_banned(turmoil::lookup("client")));
            });
            server.run(listener, std::future::pending()).await?;
            Ok(())
        }
    });

    sim.client("client", async move {
        let stream = turmoil::net::TcpStream::connect(("mx", 25)).await?;
        let (r, mut w) = tokio::io::split(stream);
        let mut r = BufReader::new(r);
        let mut transcript = Vec::new();
        let mut line = String::new();
        r.read_line(&mut line).await?;
        transcript.push(line.clone());
        for cmd in [
            "EHLO client.test",
            "MAIL FROM:<>",
            "RCPT TO:<nobody@example.test>",
            "RCPT TO:<alice@example.test>",
            "DATA",
            "Subject: sim\r\n\r\nhello\r\n.",
            "QUIT",
        ] {
            w.write_all(format!("{cmd}\r\n").as_bytes()).await?;
            loop {
                line.clear();
                r.read_line(&mut line).await?;
                transcript.push(line.clone());
                if line.as_bytes().get(3) != Some(&b'-') {
                    break;
                }
            }
        }
        let codes: Vec<&str> =
            transcript.iter().filter(|l| l.as_bytes().get(3) != Some(&b'-')).map(|l| &l[..3]).collect();
        assert_eq!(codes, ["220", "250", "250", "550", "250", "354", "250", "221"], "{transcript:#?}");
        // Under simulated time the whole dialogue takes a few ticks, not wall-clock time.
        assert!(turmoil::elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_secs(40)).await;
        Ok(())
    });

    sim.run()?;
    assert_eq!(*banned.lock().unwrap(), Some(false), "`<>` to an unknown user is never a ban");
    let spooled: Vec<_> = std::fs::read_dir(maildir.join("new"))?.collect();
    assert_eq!(spooled.len(), 1);
    let message = std::fs::read_to_string(spooled[0].as_ref().unwrap().path())?;
    assert!(message.ends_with("Subject: sim\r\n\r\nhello\r\n"));
    // The Received date is the simulation's epoch plus simulated time, not the real clock.
    assert!(message.contains(&gatekeeper::edges::rfc5322_date(epoch)[..16]), "{message}");
    Ok(())
}
