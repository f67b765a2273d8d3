//! The connection front: accepts TCP connections and serves the router on each with hyper
//! (HTTP/1.1 with upgrades for WebSockets, HTTP/2 with prior knowledge), under the `[http]`
//! connection limits:
//!
//! - at most `cap` connections are open at once (a semaphore whose permit lives inside the
//!   socket, so an upgraded WebSocket keeps counting until it closes); the cap stays below the
//!   file-descriptor limit, whose soft value [`raise_fd_limit`] lifts to the hard one at start;
//! - a connection arriving at the cap makes room by closing an older connection that has no
//!   request in flight (idle keep-alive, unfinished head, never sent a byte), chosen by
//!   [`Front::make_room`]: first from the client address holding the most connections, so one
//!   address cannot crowd others out; a newcomer that has sent nothing yet only displaces a
//!   connection that had its chance; if no connection can give way the newcomer waits up to
//!   `cap_wait` for a slot (or is refused at once when it has sent nothing), then is answered
//!   503 and closed;
//! - a request head must be complete within `header_read_timeout` of the connection's opening
//!   or of the first byte after an idle period (slowloris, sockets that never send);
//! - a keep-alive connection with no request in flight is closed after `idle_timeout`;
//! - the listener has a deep accept queue and, on Linux, TCP_DEFER_ACCEPT; accepted sockets
//!   have TCP_NODELAY;
//! - graceful shutdown: stop accepting, close idle connections, let requests in flight finish;
//! - HTTPS ([`serve_tls`], `--tls-cert`/`--tls-key`): the TLS handshake runs in the
//!   connection's task and must finish within `header_read_timeout`.
//!
//! A connection with a request in flight is never closed by these limits: slow readers of a
//! streamed answer are `sql::spool`'s concern. Over HTTP/2 any frame (a PING too) after an idle
//! period starts the header-read clock, so an idle HTTP/2 connection that pings is closed after
//! the header-read timeout rather than the idle one.
//!
//! This module owns the listener, the per-connection tasks and the process's RLIMIT_NOFILE; it
//! must not touch request handling (the router), response streaming or WebSocket traffic after
//! the upgrade (`realtime`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;

/// The connection limits in force (from `[http]`, see `apis::limits::HttpSettings`).
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// Open connections at most (after lowering to the fd limit).
    pub cap: usize,
    /// `max_connections` as configured.
    pub configured: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub cap_wait: Duration,
    /// Length of the kernel's queue of connections waiting to be accepted.
    pub backlog: u32,
}

/// The process's open-file limit before and after [`raise_fd_limit`].
#[derive(Debug, Clone, Copy)]
pub struct FdLimit {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Raise the soft RLIMIT_NOFILE to the hard limit (or the most the system grants below it).
#[cfg(unix)]
pub fn raise_fd_limit() -> std::io::Result<FdLimit> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = r.rlim_cur;
    let hard = r.rlim_max;
    // An unlimited hard limit is not a valid soft value on Linux (capped by fs.nr_open) nor
    // on macOS (OPEN_MAX): try the hard limit, then smaller round values.
    let mut soft = before;
    for want in [hard, 1 << 20, 1 << 16, 10240] {
        if want <= before || want > hard {
            continue;
        }
        let n = libc::rlimit {
            rlim_cur: want,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &n) } == 0 {
            soft = want;
            break;
        }
    }
    // rlim_t is u64 on Linux and macOS, not necessarily elsewhere.
    #[allow(clippy::unnecessary_cast)]
    let as_u64 = |v: libc::rlim_t| if v == libc::RLIM_INFINITY { u64::MAX } else { v as u64 };
    Ok(FdLimit {
        soft_before: as_u64(before),
        soft: as_u64(soft),
        hard: as_u64(hard),
    })
}

#[cfg(not(unix))]
pub fn raise_fd_limit() -> std::io::Result<FdLimit> {
    Ok(FdLimit {
        soft_before: u64::MAX,
        soft: u64::MAX,
        hard: u64::MAX,
    })
}

/// Serve `app` on `listener` under `limits` until `shutdown` completes; then stop accepting,
/// close idle connections and return once every connection with a request in flight finished.
pub async fn serve<F>(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    shutdown: F,
) -> std::io::Result<()>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    serve_tls(listener, app, limits, None, shutdown).await
}

/// [`serve`], over TLS when `tls` is given (HTTPS: see `auth::tls`).
pub async fn serve_tls<F>(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: F,
) -> std::io::Result<()>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let front = Arc::new(Front {
        limits,
        slots: Arc::new(Semaphore::new(0)),
        conns: Mutex::new(Registry::default()),
        next_id: AtomicU64::new(0),
    });
    front.slots.add_permits(front.limits.cap);
    tune_listener(&listener, &front.limits);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, done_rx) = watch::channel(());
    let svc = TowerToHyperService::new(app);
    tokio::pin!(shutdown);
    let mut refused = Refusals::default();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    accept_error(&front, e).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let permit = match Arc::clone(&front.slots).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // At the cap: make room by closing an older connection without a request in
                // flight, if the newcomer deserves it, then wait for that slot.
                let bytes = has_bytes(&stream);
                let room = front.make_room(peer.ip(), bytes);
                if room.is_none() && front.slots.available_permits() == 0 && !bytes {
                    refused.refuse(stream, front.limits.cap, "nothing sent yet");
                    continue;
                }
                let wait = tokio::time::timeout(
                    front.limits.cap_wait,
                    Arc::clone(&front.slots).acquire_owned(),
                );
                tokio::select! {
                    r = wait => match r {
                        Ok(Ok(p)) => p,
                        _ => {
                            refused.refuse(stream, front.limits.cap, "every connection busy");
                            continue;
                        }
                    },
                    _ = &mut shutdown => break,
                }
            }
        };
        front.spawn_connection(stream, peer, permit, svc.clone(), tls.clone(), stop_rx.clone(), done_rx.clone());
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(done_rx);
    tracing::debug!(
        connections = front.conns.lock().map(|c| c.conns.len()).unwrap_or(0),
        "not accepting; waiting for connections to finish"
    );
    done_tx.closed().await;
    Ok(())
}

/// State shared by the accept loop and the connection tasks.
struct Front {
    limits: ConnLimits,
    slots: Arc<Semaphore>,
    /// Connections being served over HTTP (not upgraded ones): candidates for eviction.
    conns: Mutex<Registry>,
    next_id: AtomicU64,
}

impl Front {
    /// The age below which a connection is closed to make room only for a newcomer whose
    /// request is already waiting: a quarter of the header-read timeout, at most 250 ms.
    fn young(&self) -> Duration {
        (self.limits.header_read_timeout / 4).min(Duration::from_millis(250))
    }

    /// Close a connection with no request in flight to make room for a newcomer from `ip`
    /// (`bytes`: its request is already waiting). Candidates are ranked by how many
    /// connections their client address holds (most first), then by how long their current
    /// state (new, reading a head, idle) lasted (oldest first); the first that qualifies goes:
    ///
    /// 1. any candidate whose address holds more than one connection more than the
    ///    newcomer's: a lighter client displaces a heavier one;
    /// 2. else one at least [`Front::young`] old (it had its chance to send a request);
    /// 3. else, when the newcomer's request is waiting, any.
    ///
    /// Connections not yet read from are never candidates. Returns the victim's address.
    fn make_room(&self, ip: IpAddr, bytes: bool) -> Option<IpAddr> {
        let now = Instant::now();
        let young = self.young();
        let reg = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let mine = reg.per_ip.get(&ip).copied().unwrap_or(0);
        let mut best: [Option<(usize, Instant, &Arc<Conn>)>; 3] = [None, None, None];
        for c in reg.conns.values() {
            if !c.polled.load(Ordering::Relaxed) || c.evicted.load(Ordering::Relaxed) {
                continue;
            }
            let Some(since) = c.idle_since() else { continue };
            let n = reg.per_ip.get(&c.ip).copied().unwrap_or(0);
            let better = |b: &Option<(usize, Instant, &Arc<Conn>)>| match b {
                None => true,
                Some((bn, bt, _)) => n > *bn || (n == *bn && since < *bt),
            };
            if n > mine + 1 && better(&best[0]) {
                best[0] = Some((n, since, c));
            }
            if now.saturating_duration_since(since) >= young && better(&best[1]) {
                best[1] = Some((n, since, c));
            }
            if bytes && better(&best[2]) {
                best[2] = Some((n, since, c));
            }
        }
        let victim = best.into_iter().flatten().next().map(|(_, _, c)| Arc::clone(c))?;
        drop(reg);
        victim.evicted.store(true, Ordering::Relaxed);
        victim.wake.notify_one();
        Some(victim.ip)
    }

    fn spawn_connection(
        self: &Arc<Self>,
        stream: TcpStream,
        peer: std::net::SocketAddr,
        permit: OwnedSemaphorePermit,
        svc: TowerToHyperService<Router>,
        tls: Option<tokio_rustls::TlsAcceptor>,
        mut stop: watch::Receiver<bool>,
        done: watch::Receiver<()>,
    ) {
        // Small frames (a WebSocket event, a short JSON answer) go out at once instead of
        // waiting for the peer's delayed ACK (Nagle); responses are written in whole buffers.
        let _ = stream.set_nodelay(true);
        let ip = peer.ip();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn::new(ip));
        {
            let mut reg = self.conns.lock().unwrap_or_else(|e| e.into_inner());
            reg.conns.insert(id, Arc::clone(&conn));
            *reg.per_ip.entry(ip).or_default() += 1;
        }
        let front = Arc::clone(self);
        tokio::spawn(async move {
            let _done = done;
            let _registered = Registered { front: &front, id };
            let tracked = Tracked {
                inner: stream,
                conn: Arc::clone(&conn),
                _slot: permit,
            };
            let io = match tls {
                None => Io::Plain(tracked),
                Some(acceptor) => {
                    // The handshake counts as reading the first request head.
                    let hs = tokio::time::timeout(
                        front.limits.header_read_timeout,
                        acceptor.accept(tracked),
                    );
                    match hs.await {
                        Ok(Ok(s)) => Io::Tls(Box::new(s)),
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!("TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            let io = TokioIo::new(io);
            let service = {
                let conn = Arc::clone(&conn);
                hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let in_flight = InFlight::begin(&conn);
                    // Handlers learn the client's address as axum's `ConnectInfo` (per-IP caps,
                    // the sign-in back-off).
                    let mut req = req.map(Body::new);
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                    let fut = hyper::service::Service::call(&svc, req);
                    async move {
                        let resp = fut.await?;
                        Ok::<_, std::convert::Infallible>(resp.map(|body| GuardedBody {
                            inner: body,
                            _in_flight: in_flight,
                        }))
                    }
                })
            };
            let mut builder = Builder::new(TokioExecutor::new());
            // The CONNECT protocol, for WebSockets over HTTP/2 (as axum::serve does).
            builder.http2().enable_connect_protocol();
            let served = builder.serve_connection_with_upgrades(io, service);
            tokio::pin!(served);
            let limits = &front.limits;
            let mut stopping = false;
            loop {
                let deadline = conn.deadline(limits);
                let sleep = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = served.as_mut() => {
                        if let Err(e) = r {
                            tracing::trace!(error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = sleep => {
                        if conn.deadline(limits).is_some_and(|d| d <= Instant::now()) {
                            tracing::debug!("closing a connection: header-read or idle timeout");
                            break;
                        }
                    }
                    _ = conn.wake.notified() => {
                        if conn.evicted.load(Ordering::Relaxed) {
                            if conn.idle_since().is_some() {
                                tracing::debug!("closing the oldest idle connection to make room");
                                break;
                            }
                            // A request arrived meanwhile: it is served, and eligible again later.
                            conn.evicted.store(false, Ordering::Relaxed);
                        }
                    }
                    _ = stop.wait_for(|s| *s), if !stopping => {
                        stopping = true;
                        served.as_mut().graceful_shutdown();
                        if conn.idle_since().is_some() {
                            break;
                        }
                    }
                }
            }
        });
    }
}

/// Removes a connection from the eviction candidates when its task ends.
struct Registered<'a> {
    front: &'a Front,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut reg = self.front.conns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = reg.conns.remove(&self.id)
            && let Some(n) = reg.per_ip.get_mut(&c.ip)
        {
            *n -= 1;
            if *n == 0 {
                reg.per_ip.remove(&c.ip);
            }
        }
    }
}

/// The connections being served over HTTP, and how many each client address holds.
#[derive(Default)]
struct Registry {
    conns: HashMap<u64, Arc<Conn>>,
    per_ip: HashMap<IpAddr, usize>,
}

/// What the limits need to know about one connection.
struct Conn {
    ip: IpAddr,
    state: Mutex<ConnState>,
    /// Wakes the connection's task: its state changed or it was chosen for eviction.
    wake: Notify,
    evicted: AtomicBool,
    /// The connection was read from at least once: a connection is never closed to make
    /// room before it had the chance to read the request that may already be waiting.
    polled: AtomicBool,
}

struct ConnState {
    /// Requests received and not yet answered to the last byte.
    in_flight: usize,
    /// With nothing in flight: a head is being read (or the connection is new) since `since`,
    /// else the connection has been idle since `since`.
    reading_head: bool,
    since: Instant,
}

impl Conn {
    fn new(ip: IpAddr) -> Conn {
        Conn {
            ip,
            state: Mutex::new(ConnState {
                in_flight: 0,
                reading_head: true,
                since: Instant::now(),
            }),
            wake: Notify::new(),
            evicted: AtomicBool::new(false),
            polled: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When the connection is due to close, or None while a request is in flight.
    fn deadline(&self, l: &ConnLimits) -> Option<Instant> {
        let s = self.lock();
        if s.in_flight > 0 {
            return None;
        }
        let limit = if s.reading_head {
            l.header_read_timeout
        } else {
            l.idle_timeout
        };
        Some(s.since + limit)
    }

    /// Since when nothing has been in flight (None while a request is).
    fn idle_since(&self) -> Option<Instant> {
        let s = self.lock();
        (s.in_flight == 0).then_some(s.since)
    }

    /// Bytes arrived: after an idle period they start the next head's clock.
    fn on_bytes(&self) {
        let mut s = self.lock();
        if s.in_flight == 0 && !s.reading_head {
            s.reading_head = true;
            s.since = Instant::now();
            drop(s);
            self.wake.notify_one();
        }
    }
}

/// A request in flight on a connection, from its head until its answer's body is dropped.
struct InFlight(Arc<Conn>);

impl InFlight {
    fn begin(conn: &Arc<Conn>) -> InFlight {
        conn.lock().in_flight += 1;
        InFlight(Arc::clone(conn))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.in_flight -= 1;
        if s.in_flight == 0 {
            s.reading_head = false;
            s.since = Instant::now();
            drop(s);
            self.0.wake.notify_one();
        }
    }
}

/// A response body that keeps its request counted as in flight until it is dropped.
struct GuardedBody {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The accepted socket: reports arriving bytes to its [`Conn`] and holds the connection's slot
/// under the cap until it is closed (also after an upgrade to WebSocket).
struct Tracked {
    inner: TcpStream,
    conn: Arc<Conn>,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.conn.polled.store(true, Ordering::Relaxed);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.conn.on_bytes();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A connection's byte stream: the socket itself, or TLS over it.
enum Io {
    Plain(Tracked),
    Tls(Box<tokio_rustls::server::TlsStream<Tracked>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Connections refused at the cap: answered 503 and closed, with a warning at most every 10 s.
#[derive(Default)]
struct Refusals {
    count: u64,
    last_warn: Option<Instant>,
}

impl Refusals {
    fn refuse(&mut self, stream: TcpStream, cap: usize, why: &'static str) {
        const BODY: &str = "Too many connections; retry shortly.\n";
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
             retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{BODY}",
            BODY.len()
        );
        // Best effort and never blocking: the socket is new, its send buffer empty.
        let _ = stream.try_write(answer.as_bytes());
        drop(stream);
        self.count += 1;
        if self.last_warn.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            tracing::warn!(
                cap,
                refused = self.count,
                last_reason = why,
                "connection cap reached: refusing new connections (503)"
            );
            self.last_warn = Some(Instant::now());
            self.count = 0;
        }
    }
}

/// Tune the listening socket: a deeper accept queue (`listen_backlog`; the standard library
/// asks for 128, which a burst of connections overflows, dropping SYNs and costing clients a
/// one-second retransmission), and on Linux TCP_DEFER_ACCEPT, so the kernel holds a new
/// connection until its first bytes arrive (up to the header-read timeout): sockets that never
/// send cost no descriptor, and a connection accepted at the cap has usually sent its request.
#[cfg(unix)]
fn tune_listener(listener: &TcpListener, limits: &ConnLimits) {
    use std::os::fd::AsRawFd;
    let fd = listener.as_raw_fd();
    let backlog = limits.backlog.min(i32::MAX as u32) as libc::c_int;
    // SAFETY: listen on our own listening socket only changes its queue length.
    if unsafe { libc::listen(fd, backlog) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), backlog, "could not set the listen backlog");
    }
    #[cfg(target_os = "linux")]
    {
        let secs = limits.header_read_timeout.as_secs_f64().ceil().clamp(1.0, 3600.0) as libc::c_int;
        // SAFETY: setsockopt reads one c_int from a live stack variable.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                (&secs as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "TCP_DEFER_ACCEPT not set on the listener");
        }
    }
}

#[cfg(not(unix))]
fn tune_listener(_: &TcpListener, _: &ConnLimits) {}

/// Whether the client already sent bytes (a request waits in the socket), without reading them.
#[cfg(unix)]
fn has_bytes(s: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut b = [0u8; 1];
    // SAFETY: recv writes at most one byte into `b`; MSG_PEEK leaves it in the socket and
    // MSG_DONTWAIT never blocks.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n > 0
}

#[cfg(not(unix))]
fn has_bytes(_: &TcpStream) -> bool {
    true
}

/// An error from `accept`: a failed handshake is skipped; running out of descriptors closes the
/// oldest idle connection and pauses briefly (as axum::serve does, without the full second).
async fn accept_error(front: &Front, e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::warn!(error = %e, "accept failed");
    front.make_room(IpAddr::from([0, 0, 0, 0]), false);
    tokio::time::sleep(Duration::from_millis(50)).await;
}
