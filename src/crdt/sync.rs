//! Keeping a local database and a peer server in sync both ways (`ichibase sync`, `[crdt]
//! peers`), and the `ichibase crdt` commands on a data directory.
//!
//! The loop pulls the peer's changes (`GET /sync/changes?since=`) and merges them with the
//! cursor recorded in the same transaction, then pushes local changes (`POST /sync/changes`)
//! and records how far it got; cursors live in `_ichibase_crdt_peers`, keyed by the peer's
//! URL, so a killed loop resumes where it stopped (a push repeated after a crash merges as
//! "unchanged"). Owns no HTTP routes.

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use serde_json::json;

use super::engine::{self, MergeLimits, RowChange};
use crate::core::{Error, ErrorCode, RequestContext, Result};
use crate::storage::{ExecControl, Storage};

/// One peer to keep in sync with.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The peer's base URL (`http://host:port`).
    pub url: String,
    /// Its API key (admin: the peer sees every change).
    pub key: String,
    /// Only these tables (empty: every CRR table).
    pub tables: Vec<String>,
    /// Pause when a round moved nothing.
    pub interval: Duration,
}

fn peer_err(msg: impl Into<String>) -> Error {
    Error::new(ErrorCode::CrdtPeerFailed, msg)
}

fn ctl() -> std::sync::Arc<ExecControl> {
    ExecControl::new(std::time::Instant::now(), 120.0)
}

/// What one round moved.
#[derive(Debug, Default, Clone, Copy)]
pub struct Round {
    pub pulled: usize,
    pub pushed: usize,
    pub applied: usize,
}

async fn cursors(storage: &Storage, url: &str) -> Result<(i64, i64)> {
    let u = url.to_string();
    storage
        .write(&RequestContext::system(), ctl(), move |c| {
            engine::ensure_schema(c)?;
            c.execute("INSERT OR IGNORE INTO _ichibase_crdt_peers (peer) VALUES (?1)", [&u])?;
            Ok(c.query_row(
                "SELECT pulled, pushed FROM _ichibase_crdt_peers WHERE peer = ?1",
                [&u],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?)
        })
        .await
}

/// One pull-then-push exchange with the peer, each side until nothing more waits.
pub async fn round(storage: &Storage, http: &reqwest::Client, peer: &Peer, limits: MergeLimits) -> Result<Round> {
    let base = peer.url.trim_end_matches('/').to_string();
    let mut out = Round::default();
    let (mut pulled, mut pushed) = cursors(storage, &peer.url).await?;
    // Pull.
    loop {
        let mut req = http
            .get(format!("{base}/sync/changes"))
            .bearer_auth(&peer.key)
            .query(&[("since", pulled.to_string())]);
        if !peer.tables.is_empty() {
            req = req.query(&[("tables", peer.tables.join(","))]);
        }
        let resp = req.send().await.map_err(|e| peer_err(format!("GET {base}/sync/changes: {e}")))?;
        let status = resp.status();
        let body: serde_json::Value = resp
            .json()
            .await
            .map_err(|e| peer_err(format!("GET {base}/sync/changes: {status}: {e}")))?;
        if !status.is_success() {
            return Err(peer_err(format!("GET {base}/sync/changes: {status}: {body}")));
        }
        let changes: Vec<RowChange> = serde_json::from_value(body["changes"].clone())
            .map_err(|e| peer_err(format!("the peer's changes: {e}")))?;
        let cursor = body["cursor"].as_i64().unwrap_or(pulled);
        let more = body["more"].as_bool().unwrap_or(false);
        let n = changes.len();
        let url = peer.url.clone();
        let results = storage
            .write(&RequestContext::system(), ctl(), move |c| {
                engine::apply(c, &changes, &engine::Direct, &limits, |c| {
                    c.execute(
                        "UPDATE _ichibase_crdt_peers SET pulled = ?2, updated_at = datetime('now') WHERE peer = ?1",
                        rusqlite::params![url, cursor],
                    )?;
                    Ok(())
                })
            })
            .await?;
        for r in results.iter().filter(|r| r.error.is_some()) {
            tracing::warn!(table = %r.table, pk = ?r.pk, error = ?r.error, "crdt sync: a pulled change was refused here");
        }
        out.pulled += n;
        out.applied += results.iter().filter(|r| r.outcome == Some(engine::Outcome::Applied)).count();
        if cursor == pulled && !more {
            break;
        }
        pulled = cursor;
        if !more {
            break;
        }
    }
    // Push.
    loop {
        let tables = (!peer.tables.is_empty()).then(|| peer.tables.clone());
        let since = pushed;
        let (changes, cursor, more) = storage
            .read(&RequestContext::system(), ctl(), move |c| {
                let (cands, cursor, more) = engine::changes(c, since, 1000, tables.as_deref())?;
                Ok((cands.into_iter().map(|c| c.change).collect::<Vec<_>>(), cursor, more))
            })
            .await?;
        if cursor == pushed {
            break;
        }
        if !changes.is_empty() {
            let resp = http
                .post(format!("{base}/sync/changes"))
                .bearer_auth(&peer.key)
                .json(&json!({"changes": changes}))
                .send()
                .await
                .map_err(|e| peer_err(format!("POST {base}/sync/changes: {e}")))?;
            let status = resp.status();
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            if !status.is_success() {
                return Err(peer_err(format!("POST {base}/sync/changes: {status}: {body}")));
            }
            if body["refused"].as_u64().unwrap_or(0) > 0 {
                tracing::warn!(refused = %body["refused"], "crdt sync: the peer refused some changes (see its results)");
            }
            out.pushed += changes.len();
        }
        let url = peer.url.clone();
        storage
            .write(&RequestContext::system(), ctl(), move |c| {
                c.execute(
                    "UPDATE _ichibase_crdt_peers SET pushed = ?2, updated_at = datetime('now') WHERE peer = ?1",
                    rusqlite::params![url, cursor],
                )?;
                Ok(())
            })
            .await?;
        pushed = cursor;
        if !more {
            break;
        }
    }
    Ok(out)
}

/// Keep `storage` and the peer in sync until `stop` fires (forever without one): rounds back
/// to back while changes flow, `interval` apart when idle, backing off on errors.
pub async fn run(storage: Storage, peer: Peer, limits: MergeLimits, mut stop: Option<tokio::sync::oneshot::Receiver<()>>) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("http client");
    let mut backoff = Duration::from_millis(250);
    loop {
        let wait = match round(&storage, &http, &peer, limits).await {
            Ok(r) => {
                backoff = Duration::from_millis(250);
                if r.pulled + r.pushed > 0 {
                    tracing::debug!(pulled = r.pulled, pushed = r.pushed, applied = r.applied, peer = %peer.url, "crdt sync round");
                    Duration::ZERO
                } else {
                    peer.interval
                }
            }
            Err(e) if e.code == ErrorCode::ShuttingDown => return,
            Err(e) => {
                tracing::warn!(peer = %peer.url, error = %e, "crdt sync: round failed; retrying");
                backoff = (backoff * 2).min(Duration::from_secs(10));
                backoff
            }
        };
        let sleep = tokio::time::sleep(wait);
        match stop.as_mut() {
            Some(rx) => tokio::select! {
                _ = sleep => {}
                _ = rx => return,
            },
            None => sleep.await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The command line.

/// `ichibase crdt ...`: CRR tables of a data directory.
#[derive(Debug, Subcommand)]
pub enum CrdtCommand {
    /// Make TABLE a conflict-free replicated table (it needs a PRIMARY KEY).
    Enable {
        table: String,
        #[arg(long, env = "ICHIBASE_DATA_DIR", default_value = "./ichibase-data")]
        data_dir: PathBuf,
    },
    /// Stop replicating TABLE (the table and its rows stay).
    Disable {
        table: String,
        #[arg(long, env = "ICHIBASE_DATA_DIR", default_value = "./ichibase-data")]
        data_dir: PathBuf,
    },
    /// List CRR tables, this database's site id and version.
    List {
        #[arg(long, env = "ICHIBASE_DATA_DIR", default_value = "./ichibase-data")]
        data_dir: PathBuf,
    },
}

/// `ichibase sync`: keep a data directory and a peer server in sync, both ways.
#[derive(Debug, clap::Args)]
pub struct SyncArgs {
    /// The peer's base URL, e.g. https://cloud.example.com
    #[arg(long)]
    pub peer: String,
    /// The peer's API key (admin)
    #[arg(long, env = "ICHIBASE_SYNC_KEY")]
    pub key: String,
    /// Only these CRR tables (comma-separated; default: all)
    #[arg(long, value_delimiter = ',')]
    pub tables: Vec<String>,
    /// Pause between rounds when nothing changed (ms)
    #[arg(long, default_value_t = 500)]
    pub interval_ms: u64,
    /// Run rounds until one moves nothing, then exit
    #[arg(long)]
    pub once: bool,
    #[arg(long, env = "ICHIBASE_DATA_DIR", default_value = "./ichibase-data")]
    pub data_dir: PathBuf,
}

async fn open(data_dir: PathBuf) -> anyhow::Result<Storage> {
    if !data_dir.join("ichibase.db").exists() {
        anyhow::bail!(
            "{} is not an ichibase data directory (no ichibase.db there): check --data-dir / ICHIBASE_DATA_DIR",
            data_dir.display()
        );
    }
    let cfg = crate::config::Settings { data_dir: Some(data_dir), ..Default::default() }.resolve()?;
    let opts = crate::storage::StorageOptions::from_config(&cfg);
    let s = tokio::task::spawn_blocking(move || Storage::open(&opts)).await??;
    s.write(&RequestContext::system(), ctl(), |c| engine::ensure_schema(c)).await?;
    Ok(s)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// Run `ichibase crdt ...`.
pub fn crdt_cli(cmd: CrdtCommand) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        match cmd {
            CrdtCommand::Enable { table, data_dir } => {
                let s = open(data_dir).await?;
                let t = s.write(&RequestContext::system(), ctl(), move |c| engine::enable(c, &table)).await?;
                println!("{} is a CRR table (key: {}; columns: {})", t.name, t.pk.join(", "), t.columns.join(", "));
                s.close().await?;
            }
            CrdtCommand::Disable { table, data_dir } => {
                let s = open(data_dir).await?;
                let t = table.clone();
                s.write(&RequestContext::system(), ctl(), move |c| engine::disable(c, &t)).await?;
                println!("{table} is no longer replicated");
                s.close().await?;
            }
            CrdtCommand::List { data_dir } => {
                let s = open(data_dir).await?;
                let (tables, site, version) = s
                    .read(&RequestContext::system(), ctl(), |c| {
                        Ok((engine::list(c)?, engine::site_id(c)?, engine::db_version(c)?))
                    })
                    .await?;
                println!("site {site}, version {version}");
                for t in tables {
                    println!("{}\tkey: {}\tcolumns: {}", t.name, t.pk.join(", "), t.columns.join(", "));
                }
                s.close().await?;
            }
        }
        Ok(())
    })
}

/// Run `ichibase sync`.
pub fn sync_cli(a: SyncArgs) -> anyhow::Result<()> {
    url::Url::parse(&a.peer).map_err(|e| anyhow::anyhow!("--peer {}: {e}", a.peer))?;
    runtime()?.block_on(async {
        let storage = open(a.data_dir).await?;
        let peer = Peer { url: a.peer, key: a.key, tables: a.tables, interval: Duration::from_millis(a.interval_ms) };
        let limits = MergeLimits::default();
        if a.once {
            let http = reqwest::Client::new();
            let mut total = Round::default();
            loop {
                let r = round(&storage, &http, &peer, limits).await?;
                total.pulled += r.pulled;
                total.pushed += r.pushed;
                total.applied += r.applied;
                if r.applied == 0 && r.pushed == 0 {
                    break;
                }
            }
            println!("pulled {} changes ({} applied), pushed {}", total.pulled, total.applied, total.pushed);
        } else {
            println!("ichibase sync: keeping {} in sync with {}", storage.path().display(), peer.url);
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                let _ = tx.send(());
            });
            run(storage.clone(), peer, limits, Some(rx)).await;
        }
        storage.close().await?;
        Ok(())
    })
}
