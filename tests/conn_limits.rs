//! Connection exhaustion through the real binary (security issue 12, item 7): idle sockets that
//! never send, slowloris headers, idle keep-alive connections and floods over the connection
//! cap must neither exhaust the server's file descriptors nor keep legitimate clients out.
//!
//! Every server here runs with a small `[http]` configuration (cap 64, header-read timeout 2 s,
//! idle timeout 5 s) and is spawned with a soft fd limit of 1,024 (the hard limit untouched),
//! as on a stock Linux box. During each attack a signed-in user keeps opening fresh
//! connections for `/ping` and a small query; every one must answer, p99 under 1 s.
//!
//! Timing assertions are one-sided with wide margins: the machine running them is busy.

// Each test holds SERIAL (a std mutex) for its whole run, awaits included: tests run one at a
// time, each on its own runtime, so nothing else waits on that lock from the same thread.
#![allow(clippy::await_holding_lock)]

mod common;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CAP: usize = 64;
const HEADER_SECS: u64 = 2;
const IDLE_SECS: u64 = 5;

/// One test at a time: each opens a thousand sockets and lowers this process's soft fd limit
/// while it spawns its server.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn nofile() -> (u64, u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }, 0);
    #[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux, not everywhere
    (r.rlim_cur as u64, r.rlim_max as u64)
}

fn set_soft_nofile(soft: u64) {
    let (_, hard) = nofile();
    let r = libc::rlimit {
        rlim_cur: soft.min(hard) as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    };
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) }, 0);
}

/// The small-limits server, spawned with a soft fd limit of 1,024 (as a stock box has).
fn start_limited() -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cap = CAP.to_string();
    let header = HEADER_SECS.to_string();
    let idle = IDLE_SECS.to_string();
    let env: Vec<(&str, &str)> = if std::env::var_os("CONN_LIMITS_BASELINE").is_some() {
        // Only to show these tests fail against a server without the `[http]` settings.
        vec![]
    } else {
        vec![
            ("ICHIBASE_HTTP__MAX_CONNECTIONS", cap.as_str()),
            ("ICHIBASE_HTTP__HEADER_READ_TIMEOUT_SECS", header.as_str()),
            ("ICHIBASE_HTTP__IDLE_TIMEOUT_SECS", idle.as_str()),
        ]
    };
    let (soft, _) = nofile();
    set_soft_nofile(1024);
    let s = Server::start_in(dir.path(), &["--signup-open", "true"], &env);
    set_soft_nofile(soft.max(8192));
    (s, dir)
}

fn host_port(url: &str) -> String {
    url.trim_start_matches("http://").trim_end_matches('/').to_string()
}

/// Sockets of the server process (its open TCP connections and listener).
fn server_sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .map(|l| l.to_string_lossy().starts_with("socket:"))
                        .unwrap_or(false)
                })
                .count()
        })
        .unwrap_or(0)
}

/// A signed-in user (role `user`) whose client opens a fresh connection for every request, so
/// each one goes through the listener during the attack.
async fn legit_user(base: &str) -> reqwest::Client {
    static N: AtomicUsize = AtomicUsize::new(0);
    let email = format!("legit{}@example.com", N.fetch_add(1, Ordering::Relaxed));
    let j = common::signup_and_signin(base, &email, "a long legit passphrase 42").await;
    let token = j["access_token"].as_str().unwrap().to_string();
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(h)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap()
}

/// `n` rounds of `/ping` then `SELECT 1` as the user, each on a new connection; returns the
/// latency of every request. Panics on any failure.
async fn measure(c: &reqwest::Client, base: &str, n: usize) -> Vec<Duration> {
    let mut lat = Vec::with_capacity(2 * n);
    for i in 0..n {
        let t = Instant::now();
        let r = c.get(format!("{base}/ping")).send().await;
        let r = r.unwrap_or_else(|e| panic!("/ping #{i} failed during the attack: {e:?}"));
        assert_eq!(r.status().as_u16(), 200, "/ping #{i}");
        let _ = r.text().await;
        lat.push(t.elapsed());
        let t = Instant::now();
        let r = c.post(format!("{base}/")).body("SELECT 1").send().await;
        let r = r.unwrap_or_else(|e| panic!("query #{i} failed during the attack: {e:?}"));
        let status = r.status().as_u16();
        let body = r.text().await.unwrap_or_default();
        assert_eq!(status, 200, "query #{i}: {body}");
        assert_eq!(body.trim(), "1");
        lat.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    lat
}

fn assert_p99(mut lat: Vec<Duration>, what: &str) {
    lat.sort();
    let p = |q: f64| lat[((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1];
    eprintln!(
        "{what}: {} requests, p50 {:?}, p99 {:?}, max {:?}",
        lat.len(),
        p(0.5),
        p(0.99),
        lat[lat.len() - 1]
    );
    assert!(
        p(0.99) < Duration::from_secs(1),
        "{what}: p99 {:?} is over 1 s",
        p(0.99)
    );
}

/// Whether the server closed `s`: a read answers EOF or a reset within `within` (any bytes it
/// sends first, such as a response, are skipped).
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// Attackers connect from 127.0.0.2–127.0.0.9 (every 127/8 address is local on Linux); the
/// signed-in user from 127.0.0.1, as a real client would from its own address.
async fn attacker_connect(addr: &str) -> std::io::Result<TcpStream> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let ip = std::net::Ipv4Addr::new(127, 0, 0, 2 + (NEXT.fetch_add(1, Ordering::Relaxed) % 8) as u8);
    connect_from(ip, addr).await
}

async fn connect_from(ip: std::net::Ipv4Addr, addr: &str) -> std::io::Result<TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(std::net::SocketAddr::from((ip, 0)))?;
    sock.connect(addr.parse().unwrap()).await
}

/// Open `n` attacker connections (in parallel, a connect timeout each); the ones that connected.
async fn open_many(addr: &str, n: usize) -> Vec<TcpStream> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let a = addr.to_string();
        tasks.spawn(async move {
            tokio::time::timeout(Duration::from_secs(5), attacker_connect(&a))
                .await
                .ok()
                .and_then(|r| r.ok())
        });
    }
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(Some(s)) = r {
            out.push(s);
        }
    }
    out
}

/// A flood that keeps `n` attacker connections open: each task connects, runs `behave` on the
/// socket until the server closes it (or it fails), and connects again. Counts connections made.
struct Flood {
    stop: Arc<AtomicBool>,
    made: Arc<AtomicUsize>,
    tasks: tokio::task::JoinSet<()>,
}

#[derive(Clone, Copy)]
enum Attack {
    /// Connect and never send a byte.
    Silent,
    /// Send a request line, then one header byte a second, never finishing the head.
    Slowloris,
    /// Send one complete keep-alive request, read the answer, then stay idle.
    KeepAliveIdle,
}

async fn behave(s: &mut TcpStream, attack: Attack, stop: &AtomicBool) {
    let mut buf = [0u8; 4096];
    match attack {
        Attack::Silent => {}
        Attack::Slowloris => {
            if s.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.is_err() {
                return;
            }
            while !stop.load(Ordering::Relaxed) {
                if s.write_all(b"a").await.is_err() {
                    return;
                }
                match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return,
                    _ => {}
                }
            }
            return;
        }
        Attack::KeepAliveIdle => {
            if s.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n").await.is_err() {
                return;
            }
        }
    }
    while !stop.load(Ordering::Relaxed) {
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            _ => {}
        }
    }
}

impl Flood {
    fn start(addr: &str, n: usize, attack: Attack) -> Flood {
        Flood::start_from(addr, n, attack, None)
    }

    /// The same flood from one address (`None`: spread over the attackers' addresses).
    fn start_from(addr: &str, n: usize, attack: Attack, from: Option<std::net::Ipv4Addr>) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let made = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            let (a, stop, made) = (addr.to_string(), Arc::clone(&stop), Arc::clone(&made));
            tasks.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let c = match from {
                        Some(ip) => tokio::time::timeout(Duration::from_secs(5), connect_from(ip, &a)).await,
                        None => tokio::time::timeout(Duration::from_secs(5), attacker_connect(&a)).await,
                    };
                    let Ok(Ok(mut s)) = c else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    made.fetch_add(1, Ordering::Relaxed);
                    behave(&mut s, attack, &stop).await;
                    drop(s);
                    // Back as soon as closed (a quarter second later): a persistent attacker
                    // holding its sockets, not a request-rate flood (rate limits are elsewhere).
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            });
        }
        Flood { stop, made, tasks }
    }

    async fn stop(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        while self.tasks.join_next().await.is_some() {}
        self.made.load(Ordering::Relaxed)
    }
}

/// While `flood` runs, the server's sockets stay near the cap and the user is served.
async fn survive(s: &Server, flood: Flood, what: &str) {
    let c = legit_user(&s.url).await;
    // Let the attack build up (connects, heads) before measuring.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = s.pid();
    let peak = Arc::new(AtomicUsize::new(0));
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (peak, watching) = (Arc::clone(&peak), Arc::clone(&watching));
        tokio::spawn(async move {
            while watching.load(Ordering::Relaxed) {
                peak.fetch_max(server_sockets(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let lat = measure(&c, &s.url, 60).await;
    watching.store(false, Ordering::Relaxed);
    let _ = watcher.await;
    let made = flood.stop().await;
    let peak = peak.load(Ordering::Relaxed);
    eprintln!("{what}: {made} attacker connections made, server sockets peaked at {peak}");
    // The cap, the listener, a few in-flight legit connections and sockets being closed.
    assert!(
        peak <= CAP + 24,
        "{what}: the server held {peak} sockets, over the cap of {CAP}"
    );
    assert_p99(lat, what);
}

/// The soft fd limit is raised to the hard limit at start (the server was spawned with 1,024).
fn assert_fd_limit_raised(s: &Server) {
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", s.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_string();
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(nums[0], nums[1], "soft fd limit not raised to the hard limit: {line}");
}

/// 1,100 sockets that never send a byte, against a server spawned with 1,024 fds: each is closed
/// after the header-read timeout, and `/ping` and queries keep answering throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_sockets_never_sending() {
    let _g = serial();
    let (s, _dir) = start_limited();
    let addr = host_port(&s.url);
    let c = legit_user(&s.url).await;
    let idle = open_many(&addr, 1100).await;
    eprintln!("{} idle sockets connected", idle.len());
    // The burst itself may overflow the kernel's accept queue (a dropped SYN costs a client a
    // one-second retransmission whatever the server does): measure once it is absorbed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let lat = measure(&c, &s.url, 40).await;
    assert_p99(lat, "1,100 idle sockets");
    assert_fd_limit_raised(&s);
    // The server holds none of them for long (header-read timeout, eviction, or the kernel
    // keeps them until they send): its sockets fall back to the listener and a few, while the
    // attacker still holds every one.
    let deadline = Instant::now() + Duration::from_secs(HEADER_SECS + 20);
    let mut held = server_sockets(s.pid());
    while held > 8 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        held = server_sockets(s.pid());
    }
    assert!(held <= 8, "the server still holds {held} sockets for {} idle clients", idle.len());
    drop(idle);
    // A flood of silent connections that reconnect as soon as they are closed.
    let flood = Flood::start(&addr, 600, Attack::Silent);
    survive(&s, flood, "silent flood").await;
}

/// Slowloris: heads that never finish (a byte a second) are closed after the header-read
/// timeout even though bytes keep arriving; the user is served during a 300-socket slowloris.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slowloris_heads_time_out() {
    let _g = serial();
    let (s, _dir) = start_limited();
    let addr = host_port(&s.url);
    // A few under the cap: each must be closed by the header-read timeout, not by eviction.
    let mut socks = open_many(&addr, 8).await;
    assert_eq!(socks.len(), 8);
    for sock in socks.iter_mut() {
        sock.write_all(b"POST / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    }
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for mut sock in socks {
        tasks.spawn(async move {
            // A header byte a second for up to 30 s; true when the server hung up first.
            for _ in 0..30 {
                if sock.write_all(b"X").await.is_err() {
                    return true;
                }
                if closed_within(&mut sock, Duration::from_secs(1)).await {
                    return true;
                }
            }
            false
        });
    }
    while let Some(r) = tasks.join_next().await {
        assert!(r.unwrap(), "a slowloris head was still open after 30 s");
    }
    eprintln!("slowloris heads closed after {:?}", t.elapsed());
    let flood = Flood::start(&addr, 300, Attack::Slowloris);
    survive(&s, flood, "slowloris flood").await;
}

/// Keep-alive connections that answered one request and went idle are closed after the idle
/// timeout — not at the (shorter) header-read timeout — while a connection in use stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keep_alive_idle_connections_close() {
    let _g = serial();
    let (s, _dir) = start_limited();
    let addr = host_port(&s.url);
    let mut socks = open_many(&addr, 16).await;
    assert_eq!(socks.len(), 16);
    let mut buf = vec![0u8; 4096];
    for sock in socks.iter_mut() {
        sock.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(15), sock.read(&mut buf))
            .await
            .expect("no answer to /ping")
            .unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    }
    let answered = Instant::now();
    // A connection in use (a request a second) outlives the idle timeout.
    let mut busy = TcpStream::connect(&addr).await.unwrap();
    let busy_task = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        for i in 0..(IDLE_SECS * 2) {
            busy.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
            let n = tokio::time::timeout(Duration::from_secs(15), busy.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("request {i} on a busy keep-alive connection: no answer"))
                .unwrap();
            assert!(n > 0, "busy keep-alive connection closed at request {i}");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    // Still open past the header-read timeout: idle keep-alive has its own, longer limit.
    tokio::time::sleep(Duration::from_secs(HEADER_SECS + 1).saturating_sub(answered.elapsed())).await;
    for (i, sock) in socks.iter_mut().enumerate() {
        assert!(
            !closed_within(sock, Duration::from_millis(10)).await,
            "idle keep-alive connection {i} closed before the idle timeout ({:?})",
            answered.elapsed()
        );
    }
    for (i, sock) in socks.iter_mut().enumerate() {
        assert!(
            closed_within(sock, Duration::from_secs(IDLE_SECS + 20)).await,
            "idle keep-alive connection {i} still open {:?} after its answer",
            answered.elapsed()
        );
    }
    busy_task.await.unwrap();
    let flood = Flood::start(&addr, 600, Attack::KeepAliveIdle);
    survive(&s, flood, "keep-alive idle flood").await;
}

/// Far over the cap with every kind of attacker at once: the server never holds much more than
/// the cap, the user is served, and SIGTERM still stops the server cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_cap_mixed_flood() {
    let _g = serial();
    let (mut s, _dir) = start_limited();
    let addr = host_port(&s.url);
    let floods = [
        Flood::start(&addr, 400, Attack::Silent),
        Flood::start(&addr, 300, Attack::KeepAliveIdle),
        Flood::start(&addr, 300, Attack::Slowloris),
    ];
    let c = legit_user(&s.url).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = s.pid();
    let mut peak = 0;
    let mut lat = Vec::new();
    for _ in 0..4 {
        peak = peak.max(server_sockets(pid));
        lat.extend(measure(&c, &s.url, 15).await);
    }
    peak = peak.max(server_sockets(pid));
    let mut made = 0;
    for f in floods {
        made += f.stop().await;
    }
    eprintln!("mixed flood: {made} attacker connections made, server sockets peaked at {peak}");
    assert!(peak <= CAP + 24, "the server held {peak} sockets, over the cap of {CAP}");
    assert_p99(lat, "mixed flood");
    let st = s.terminate();
    assert!(st.success(), "server exit after SIGTERM: {st:?}");
}

/// HTTP/2 with prior knowledge is still served by the connection front (as axum::serve did):
/// the server answers the client preface with a SETTINGS frame. (A guard, not an attack.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_still_served() {
    let _g = serial();
    let (s, _dir) = start_limited();
    let mut sock = TcpStream::connect(host_port(&s.url)).await.unwrap();
    sock.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut head = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(15), sock.read_exact(&mut head))
        .await
        .expect("no HTTP/2 frame from the server")
        .unwrap();
    assert_eq!(head[3], 0x04, "first frame is not SETTINGS: {head:?}");
}

/// The attack from the user's own address (one NAT, one host): fairness by address cannot tell
/// them apart, yet a client that sends its request at once still gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_address_flood() {
    let _g = serial();
    let (s, _dir) = start_limited();
    let addr = host_port(&s.url);
    let me = Some(std::net::Ipv4Addr::LOCALHOST);
    let floods = [
        Flood::start_from(&addr, 200, Attack::Silent, me),
        Flood::start_from(&addr, 200, Attack::Slowloris, me),
        Flood::start_from(&addr, 200, Attack::KeepAliveIdle, me),
    ];
    let c = legit_user(&s.url).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lat = measure(&c, &s.url, 60).await;
    let peak = server_sockets(s.pid());
    for f in floods {
        f.stop().await;
    }
    assert!(peak <= CAP + 24, "the server held {peak} sockets, over the cap of {CAP}");
    assert_p99(lat, "same-address flood");
}
