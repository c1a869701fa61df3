//! Two gatekeeper hosts sharing a simulated cluster store (`gatekeeper_sim::store`, the same
//! `ClusterStore` edge the production Redis implements), under simulated time with a fixed
//! seed: a spammer banned on one MX is refused by the other within the sync interval; then a
//! partition between one node and the store while a flood of forged senders is spread over
//! both MX hosts (each node bans alone); after the partition heals every ban converges, both
//! ways, and both nodes hold the same bans with the same expiries.

use std::collections::BTreeMap;
use std::io;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gatekeeper::app::{Edges, assemble};
use gatekeeper::ban::{BanManager, MemoryBackend};
use gatekeeper::config::{Config, Settings};
use gatekeeper::edges::MaildirSpool;
use gatekeeper_sim::dns::FreshResolver;
use gatekeeper_sim::gk::SimConnector;
use gatekeeper_sim::net::{SimClock, SimListener};
use gatekeeper_sim::store::{self, SimStore};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const EPOCH_SECS: u64 = 1_795_000_000;
/// `[cluster] sync_interval` of both nodes.
const SYNC: Duration = Duration::from_millis(500);

fn settings(name: &str, state_dir: &std::path::Path) -> Settings {
    let toml = format!(
        "[server]\nlisten = \"0.0.0.0:25\"\nhostname = \"{name}.example.test\"\nstate_dir = \"{}\"\n\
         [domains]\nlocal = [\"example.test\"]\nusers = [\"alice@example.test\"]\n\
         [bans]\nbackend = \"memory\"\nsync_interval = \"200ms\"\n\
         [cluster]\nredis = \"redis://store:6379\"\nnode = \"{name}\"\ntimeout = \"300ms\"\nsync_interval = \"{}ms\"\n\
         heartbeat_interval = \"1s\"\nreconcile_interval = \"10s\"\n",
        state_dir.display(),
        SYNC.as_millis()
    );
    let mut s = Config::parse(&toml).unwrap().validate(None).unwrap();
    s.proxy_trusted = vec![turmoil::lookup("spam")];
    s
}

/// One gatekeeper host, assembled as `gatekeeper serve` assembles it, on simulated edges and
/// the simulated store; its ban manager is left in `slot` for the checks.
async fn node(
    name: &'static str,
    dir: PathBuf,
    epoch: SystemTime,
    slot: Arc<Mutex<Option<BanManager>>>,
) -> turmoil::Result {
    let settings = settings(name, &dir.join("state"));
    let clock = Arc::new(SimClock::new(epoch, Default::default()));
    let spool = MaildirSpool::open(dir.join("maildir"), name, clock.clone(), false)?;
    let edges = Edges {
        clock,
        state_dir: dir.join("state"),
        offload: false,
        ban_backend: Box::new(MemoryBackend::new()),
        downstream: Arc::new(spool),
        resolver: Box::new(|dns, seed| Ok(Arc::new(FreshResolver::new(dns, seed)))),
        connector: Arc::new(SimConnector),
        ban_sink: None,
        observer: None,
        cluster: Some(Arc::new(SimStore::new("store", Duration::from_millis(300)))),
    };
    let app = assemble(&settings, edges).await.map_err(io::Error::other)?;
    app.start().await.map_err(io::Error::other)?;
    *slot.lock().unwrap() = Some(app.bans.clone());
    let listener = SimListener::bind(settings.listen.unwrap()).await?;
    app.run(listener, std::future::pending()).await?;
    Ok(())
}

/// A client at `client` (through PROXY v1 from the spam host) says `lines` to `mx`; the first
/// line of each reply, the greeting first.
async fn say(mx: &str, client: Ipv4Addr, lines: &[&str]) -> io::Result<Vec<String>> {
    let stream = turmoil::net::TcpStream::connect((mx, 25)).await?;
    let (r, mut w) = tokio::io::split(stream);
    let mut r = BufReader::new(r);
    w.write_all(format!("PROXY TCP4 {client} 192.0.2.25 40000 25\r\n").as_bytes()).await?;
    let mut replies = Vec::new();
    let read = async |r: &mut BufReader<_>| -> io::Result<String> {
        let mut first = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await? == 0 {
                return Ok(first);
            }
            if first.is_empty() {
                first = line.trim_end().to_string();
            }
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(first);
            }
        }
    };
    replies.push(read(&mut r).await?);
    for l in lines {
        if !replies.last().is_some_and(|g| g.starts_with('2') || g.starts_with('5') && replies.len() > 1) {
            break;
        }
        w.write_all(format!("{l}\r\n").as_bytes()).await?;
        replies.push(read(&mut r).await?);
    }
    Ok(replies)
}

/// A forged local sender: 550 and a B1 ban on `mx`.
async fn forge(mx: &str, client: Ipv4Addr) -> io::Result<()> {
    let r = say(mx, client, &["EHLO spam.test", "MAIL FROM:<nobody@example.test>"]).await?;
    assert!(r.get(2).is_some_and(|l| l.starts_with("550 5.7.1")), "{mx} {client}: {r:?}");
    Ok(())
}

async fn refused(mx: &str, client: Ipv4Addr) -> io::Result<bool> {
    Ok(say(mx, client, &[]).await?[0].starts_with("554 "))
}

fn spammer(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, i)
}

#[test]
fn two_gatekeepers_share_bans_through_a_partition() -> turmoil::Result {
    let epoch = UNIX_EPOCH + Duration::from_secs(EPOCH_SECS);
    let mut sim = turmoil::Builder::new()
        .rng_seed(15)
        .epoch(epoch)
        .tick_duration(Duration::from_millis(10))
        .simulation_duration(Duration::from_secs(120))
        .build();
    let dir = tempfile::tempdir()?;
    let slots: Vec<Arc<Mutex<Option<BanManager>>>> = (0..2).map(|_| Arc::default()).collect();
    sim.host("store", store::serve);
    for (i, name) in ["mx1", "mx2"].into_iter().enumerate() {
        let (home, slot) = (dir.path().join(name), slots[i].clone());
        sim.host(name, move || node(name, home.clone(), epoch, slot.clone()));
    }
    let latency = Arc::new(Mutex::new(None::<Duration>));
    let seen = latency.clone();
    sim.client("spam", async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        // A spammer banned on mx1 is refused by mx2 within the sync interval.
        forge("mx1", spammer(1)).await?;
        let start = tokio::time::Instant::now();
        while !refused("mx2", spammer(1)).await? {
            assert!(start.elapsed() <= SYNC, "mx2 still serves {} after {SYNC:?}", spammer(1));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        *seen.lock().unwrap() = Some(start.elapsed());

        // mx2 loses the store; a flood of forged senders spread over both MX hosts.
        turmoil::partition("mx2", "store");
        for i in 10..40u8 {
            forge(if i % 2 == 0 { "mx1" } else { "mx2" }, spammer(i)).await?;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        // Each node banned alone: mx2 cannot know mx1's bans, nor mx1 mx2's.
        assert!(!refused("mx2", spammer(10)).await?, "partitioned, mx2 cannot know mx1's ban");
        assert!(!refused("mx1", spammer(11)).await?, "mx2's ban waits in its outbox");
        assert!(refused("mx2", spammer(11)).await? && refused("mx1", spammer(10)).await?);

        // The partition heals: every ban converges, both ways.
        turmoil::repair("mx2", "store");
        tokio::time::sleep(Duration::from_secs(3)).await;
        for i in (10..40u8).chain([1]) {
            for mx in ["mx1", "mx2"] {
                assert!(refused(mx, spammer(i)).await?, "{mx} does not refuse {}", spammer(i));
            }
        }
        Ok(())
    });
    sim.run()?;
    let took = latency.lock().unwrap().expect("measured");
    eprintln!("ban propagation mx1 -> mx2 in simulated time: {took:?}");
    // Both nodes hold the same bans with the same expiries.
    let bans = |i: usize| -> BTreeMap<String, SystemTime> {
        let m = slots[i].lock().unwrap().clone().expect("the node started");
        m.list_blocking().unwrap().into_iter().map(|b| (b.net.to_string(), b.expires)).collect()
    };
    let (mx1, mx2) = (bans(0), bans(1));
    assert_eq!(mx1.len(), 31, "{mx1:?}");
    assert_eq!(mx1, mx2);
    Ok(())
}
