//! Server life cycle: open storage, bind, serve the router (through the connection front,
//! `crate::conns`, under the `[http]` connection limits), and shut down gracefully
//! (stop accepting, let in-flight requests finish within the grace period, then close storage,
//! which drains queued writes and checkpoints the WAL).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::apis;
use crate::auth::{Auth, AuthOptions};
use crate::config::Config;
use crate::storage::{Storage, StorageOptions};

/// A server running in this process (used by `serve`, tests and benchmarks).
pub struct Running {
    pub addr: SocketAddr,
    /// The application handle (services, storage, auth) of this server.
    pub app: crate::app::App,
    pub storage: Storage,
    /// The WAL replicator when replication is configured.
    pub replication: Option<crate::replication::Replicator>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// The data directory's exclusive lock, released with the server.
    _dir_lock: crate::storage::DirLock,
}

impl Running {
    /// Ask the server to stop and wait until storage is closed.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.await?
    }
}

/// Open storage, bind `config.listen` and start serving in the background.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    // Files the server makes (databases and their WAL files, the request log, archives,
    // branches, spill files) are for this user only.
    #[cfg(unix)]
    unsafe {
        libc::umask(0o077);
    }
    // Validate every setting and bind the port before anything is created on disk: a failed
    // start leaves no data directory and spends no one-time admin key.
    let http = Arc::new(apis::limits::HttpLimits::new(config.section("http")?)?);
    let sql_guard = Arc::new(apis::limits::SqlGuard::new(config.section("sql_guard")?, config.readers)?);
    let trace_settings: crate::lua::limits::TraceSettings = config.section("traces")?;
    trace_settings.validate()?;
    let lua_limit_settings: crate::lua::limits::LuaLimitSettings = config.section("lua_limits")?;
    lua_limit_settings.validate(config.lua.memory_limit)?;
    let ws_limits = crate::realtime::limits::WsLimits::new(config.section("ws_limits")?)?;
    let branch_settings: crate::branch::BranchSettings = config.section("branches")?;
    branch_settings.validate()?;
    let posterity_opts = crate::posterity::PosterityOptions::from_config(&config)?;
    let auth_opts = auth_options(&config)?;
    let tls = crate::auth::tls::from_settings(config.tls_cert.as_deref(), config.tls_key.as_deref())?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| {
            let msg = format!("cannot listen on {}: {e}", config.listen);
            anyhow::Error::new(e).context(msg)
        })?;
    let addr = listener.local_addr()?;
    let conn_limits = connection_limits(&http)?;
    // One server per data directory: the lock is taken before SQLite, DuckDB or replication
    // touch anything, and held until the process ends.
    let dir_lock = crate::storage::lock_data_dir(&config.data_dir)?;
    let storage = {
        let opts = StorageOptions::from_config(&config);
        tokio::task::spawn_blocking(move || Storage::open(&opts)).await??
    };
    let replication = match &config.replication {
        Some(_) => Some(crate::replication::Replicator::start(storage.clone(), &config).await?),
        None => None,
    };
    let auth = Arc::new(Auth::open(storage.clone(), &config.data_dir, auth_opts).await?);
    // Credentials changed by the CLI or another process take effect within a second.
    let _auth_watch = auth.watch(Duration::from_secs(1));
    let posterity = {
        let opts = posterity_opts;
        tokio::task::spawn_blocking(move || crate::posterity::Posterity::open(opts)).await??
    };
    let offload = replication.as_ref().map(|r| r.target().clone());
    if let Some(t) = offload.clone() {
        // Archive files this box lacks come back from the replica (a fresh box after a
        // restore); files the replica lacks (archived during an outage) go up.
        let p = posterity.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::replication::offload::sync(&t, &p).await {
                tracing::warn!(error = %format!("{e:#}"), "archive: sync with the replica target failed; retried after the next archive run");
            }
        });
    }
    let archiver = schedule_archive(&posterity, config.posterity.archive_interval_secs, offload);
    let grace = Duration::from_secs_f64(config.shutdown_grace_secs);
    let hub = crate::realtime::Hub::new(config.ws.queue, ws_limits);
    let branches = Arc::new(crate::branch::Branches::new(
        &config.data_dir,
        &StorageOptions::from_config(&config),
        &branch_settings,
    ));
    sql_guard.apply_heap_limit();
    let pruner = schedule_trace_pruning(&storage, &trace_settings);
    let lua_limits = Arc::new(crate::lua::limits::LuaLimits::new(
        trace_settings,
        &lua_limit_settings,
    ));
    // Every registered module's own tables (crate::modules), on the writer.
    storage
        .write(
            &crate::core::RequestContext::system(),
            crate::storage::ExecControl::new(std::time::Instant::now(), 0.0),
            |c| crate::modules::migrate(c).map_err(|e| crate::core::Error::internal(format!("{e:#}"))),
        )
        .await?;
    let mut builder = crate::app::AppBuilder::new(crate::app::Core {
        http,
        sql_guard,
        storage: storage.clone(),
        auth,
        lua: lua_options(&config),
        lua_limits,
        hub: Arc::clone(&hub),
        cdc: crate::realtime::cdc::Cdc::start(
            storage.clone(),
            Arc::clone(&hub),
            config.ws.cdc_retention,
        ),
        branches: Arc::clone(&branches),
        posterity: posterity.clone(),
        config: Arc::new(config),
        replication: replication.clone(),
    })
    ;
    crate::modules::provide(&mut builder)?;
    let state = builder.build();
    crate::modules::start(&state)?;
    // The one-time admin key is created last, when everything else started: a key that is
    // shown is committed and served.
    let first_key = state.auth().first_start_admin_key().await?;
    let handle = state.clone();
    let app = apis::router(state);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (drain_tx, drain_rx) = oneshot::channel::<()>();
    let server = crate::conns::serve_tls(listener, app, conn_limits, tls, async move {
        let _ = stop_rx.await;
        let _ = drain_tx.send(());
    });
    let st = storage.clone();
    let repl = replication.clone();
    let task = tokio::spawn(async move {
        let mut serve = tokio::spawn(server);
        tokio::select! {
            r = &mut serve => r??,
            _ = drain_rx => {
                tracing::info!(grace_secs = grace.as_secs_f64(), "shutting down: waiting for in-flight requests");
                match tokio::time::timeout(grace, &mut serve).await {
                    Ok(r) => r??,
                    Err(_) => {
                        tracing::warn!("grace period over with requests still running; closing storage anyway");
                        serve.abort();
                    }
                }
            }
        }
        branches.close_all().await;
        if let Some(a) = archiver {
            a.abort();
        }
        pruner.abort();
        // Traces the last invocations queued are saved before storage closes (lua::saver).
        let g = grace.max(Duration::from_secs(5));
        if !tokio::task::spawn_blocking(move || crate::lua::saver::flush(g)).await.unwrap_or(false) {
            tracing::warn!("traces still queued at shutdown were not saved in time");
        }
        // The log's last rows (the requests just finished) are committed before exit.
        let p = posterity.clone();
        let _ = tokio::task::spawn_blocking(move || p.close()).await;
        if let Some(r) = &repl {
            r.stop_capturing();
        }
        match tokio::time::timeout(grace.max(Duration::from_secs(5)), st.close()).await {
            Ok(r) => r?,
            Err(_) => anyhow::bail!("storage did not close in time"),
        }
        if let Some(r) = repl {
            r.finish(grace).await;
        }
        tracing::info!("storage closed; bye");
        Ok(())
    });
    if let Some(key) = first_key {
        println!(
            "ichibase: no admin existed, so an admin API key was created. It is shown only now:"
        );
        println!("ichibase:   {key}");
        println!(
            "ichibase: use it as `Authorization: Bearer <key>`; more with `ichibase admin create-key` or POST /admin/keys"
        );
    }
    Ok(Running {
        addr,
        app: handle,
        storage,
        replication,
        stop: Some(stop_tx),
        task,
        _dir_lock: dir_lock,
    })
}

/// Raise the soft fd limit to the hard one and fit the connection cap under it (logged).
fn connection_limits(http: &apis::limits::HttpLimits) -> anyhow::Result<crate::conns::ConnLimits> {
    let fds = crate::conns::raise_fd_limit()
        .map_err(|e| anyhow::anyhow!("cannot read or raise the open-file limit: {e}"))?;
    let limits = http.connections(fds.soft)?;
    tracing::info!(
        fd_soft_before = fds.soft_before,
        fd_limit = fds.soft,
        fd_hard = fds.hard,
        reserved_fds = http.settings.reserved_fds,
        max_connections = limits.configured,
        connection_cap = limits.cap,
        header_read_timeout_secs = limits.header_read_timeout.as_secs_f64(),
        idle_timeout_secs = limits.idle_timeout.as_secs_f64(),
        "connection limits"
    );
    if limits.cap < limits.configured {
        tracing::warn!(
            max_connections = limits.configured,
            connection_cap = limits.cap,
            fd_limit = fds.soft,
            "[http] max_connections lowered to fit under the open-file limit (raise it with ulimit -n)"
        );
    }
    Ok(limits)
}

/// Archive complete days past the retention every `interval_secs` (0: never; first run after
/// one interval).
fn schedule_archive(
    p: &crate::posterity::Posterity,
    interval_secs: f64,
    offload: Option<crate::replication::Target>,
) -> Option<tokio::task::JoinHandle<()>> {
    if interval_secs <= 0.0 {
        return None;
    }
    let p = p.clone();
    let every = Duration::from_secs_f64(interval_secs);
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let p2 = p.clone();
            match tokio::task::spawn_blocking(move || p2.archive(None)).await {
                Ok(Ok(files)) if !files.is_empty() => {
                    tracing::info!(
                        files = files.len(),
                        rows = files.iter().map(|f| f.rows).sum::<u64>(),
                        "archive: days rolled into Parquet"
                    )
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "archive run failed"),
                Err(e) => tracing::warn!(error = %e, "archive task failed"),
            }
            // Ship new files (and any an earlier outage left behind) to the replica target.
            if let Some(t) = &offload {
                if let Err(e) = crate::replication::offload::sync(t, &p).await {
                    tracing::warn!(error = %format!("{e:#}"), "archive: upload to the replica target failed; retried next run");
                }
            }
        }
    }))
}

/// Delete traces past their retention every `[traces] prune_interval_secs`.
fn schedule_trace_pruning(
    storage: &Storage,
    s: &crate::lua::limits::TraceSettings,
) -> tokio::task::JoinHandle<()> {
    let storage = storage.clone();
    let limits = crate::lua::limits::TraceLimits::from(s);
    let every = Duration::from_secs_f64(s.prune_interval_secs);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let r = storage
                .write(
                    &crate::core::RequestContext::system(),
                    crate::storage::ExecControl::new(std::time::Instant::now(), 0.0),
                    move |c| crate::lua::store::prune_traces(c, &limits),
                )
                .await;
            match r {
                Ok(0) => {}
                Ok(n) => tracing::info!(traces = n, "pruned traces past their retention"),
                Err(e) => tracing::warn!(error = %e, "pruning traces failed"),
            }
        }
    })
}

/// The Lua runtime's options: the flat `lua_*` settings, `[lua_limits]` and `[traces]` (invalid
/// sections fall back to their defaults here; `start` refuses them first).
pub fn lua_options(config: &Config) -> crate::lua::LuaOptions {
    let traces: crate::lua::limits::TraceSettings = config.section("traces").unwrap_or_default();
    let limits: crate::lua::limits::LuaLimitSettings =
        config.section("lua_limits").unwrap_or_default();
    let l = &config.lua;
    crate::lua::LuaOptions {
        instruction_limit: l.instruction_limit,
        cpu_limit: Duration::from_secs_f64(l.cpu_limit_secs),
        memory_limit: l.memory_limit,
        timeout: Duration::from_secs_f64(l.timeout_secs),
        max_trace_steps: l.max_trace_steps,
        max_rows: config.limits.max_result_rows,
        max_sql: config.limits.max_query_size,
        property_runs: config.generate.property_runs,
        tx_timeout: Duration::from_secs_f64(limits.tx_timeout_secs),
        traces: (&traces).into(),
        reuse_states: limits.reuse_states,
        inline_budget: Duration::from_micros(limits.inline_budget_us),
    }
}

pub fn auth_options(config: &Config) -> anyhow::Result<AuthOptions> {
    let a = &config.auth;
    Ok(AuthOptions {
        signup_open: a.signup_open,
        access_ttl: Duration::from_secs(a.access_token_ttl_secs),
        session_ttl: Duration::from_secs(a.session_ttl_secs),
        // Behind HTTPS served here the cookies are Secure too.
        cookie_secure: a.cookie_secure || config.tls_cert.is_some(),
        admin_key: a.admin_key.clone(),
        admin_user: a.admin_email.clone().zip(a.admin_password.clone()),
        guard: config.section("auth_guard")?,
    })
}

/// Run until SIGINT or SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let data_dir = config.data_dir.clone();
    let tls_on = config.tls_cert.is_some();
    let running = start(config).await?;
    tracing::info!(addr = %running.addr, data_dir = %data_dir.display(), "listening");
    let scheme = if tls_on { "https" } else { "http" };
    println!("ichibase listening on {scheme}://{}", running.addr);
    serve_until_signal(running).await
}

/// Serve a started server until SIGINT or SIGTERM, then shut it down (`run`, `ichibase open`).
pub async fn serve_until_signal(running: Running) -> anyhow::Result<()> {
    // SIGTERM (docker stop, systemd) is graceful: requests in flight finish within the grace
    // period. Ctrl-C is someone at a terminal: reads stop at once (as if their clients went
    // away), writes finish or roll back. Either way a second signal ends the process at once.
    if shutdown_signal().await {
        crate::storage::begin_shutdown();
    }
    tokio::spawn(async {
        shutdown_signal().await;
        eprintln!("ichibase: second signal; exiting now without waiting for requests");
        std::process::exit(130);
    });
    running.shutdown().await
}

/// Wait for SIGINT (Ctrl-C: `true`) or SIGTERM (`false`).
async fn shutdown_signal() -> bool {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {
            tracing::info!("SIGINT received");
            true
        }
        _ = term => {
            tracing::info!("SIGTERM received");
            false
        }
    }
}
