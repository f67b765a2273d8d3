//! The `ichibase` command line: `serve`, `version`, `admin`, `fn`, `generate`.

use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use ichibase::config::{self, LogFormat, Settings};

#[derive(Parser)]
#[command(name = "ichibase", version = ichibase::VERSION, about = "An engine for Just-In-Time applications: SQLite with ClickHouse-style SQL over HTTP")]
struct Cli {
    /// TOML configuration file [default: ./ichibase.toml when present]
    #[arg(long, global = true, env = "ICHIBASE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (flags override ICHIBASE_* env vars, which override the TOML file).
    Serve {
        #[command(flatten)]
        settings: Settings,
        /// Restore the database from the replica first when the data directory has none
        #[arg(long)]
        restore_if_missing: bool,
    },
    /// Run ichibase as a personal app: the server on this machine with its data in your data
    /// directory (~/.local/share/ichibase, ~/Library/Application Support/ichibase,
    /// %APPDATA%\ichibase; or --data-dir), signed in as the owner in your browser's canvas.
    /// Settings come from flags, ICHIBASE_* variables and <data dir>/ichibase.toml.
    Open {
        #[command(flatten)]
        settings: Settings,
        /// The owner account (an admin, created on the first run)
        #[arg(long, default_value = ichibase::open::DEFAULT_OWNER, value_name = "EMAIL")]
        owner: String,
        /// Print the sign-in link instead of starting a browser
        #[arg(long)]
        no_browser: bool,
    },
    /// Rebuild a database from its replica (replicate_* settings name the replica).
    Restore {
        #[command(flatten)]
        settings: Settings,
        /// Path of the database file to write
        #[arg(long, value_name = "PATH")]
        to: PathBuf,
        /// Restore the state as of this instant (RFC 3339, or seconds since the epoch)
        #[arg(long, conflicts_with_all = ["generation", "txid"])]
        timestamp: Option<String>,
        /// Restore the newest state of this generation (hex id, see `backup status`)
        #[arg(long, conflicts_with = "txid")]
        generation: Option<String>,
        /// Restore up to this transaction id (hex)
        #[arg(long)]
        txid: Option<String>,
        /// Overwrite an existing file at --to
        #[arg(long)]
        force: bool,
    },
    /// Continuous backup (replication).
    Backup {
        #[command(subcommand)]
        command: BackupCommand,
    },
    /// Print the version.
    Version,
    /// Model calls of a running server: replay a logged generation, evaluate prompts.
    Ai {
        #[command(subcommand)]
        command: ichibase::ai::cli::AiCommand,
    },
    /// Administration that works on the data directory directly.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Turn an intent into a verified service: ask the configured model for a bundle, verify it
    /// in a branch, feed failures back, merge the first bundle that passes.
    Generate {
        /// What the app should do (any language)
        intent: String,
        /// Model answers tried before giving up [default: generate_max_rounds]
        #[arg(long)]
        rounds: Option<u32>,
        /// Keep the verified bundle in its branch; approve with POST /generate/{id}/approve
        #[arg(long)]
        no_merge: bool,
        #[command(flatten)]
        settings: Settings,
    },
    /// Roll posterity log rows into Parquet files under <data_dir>/archive (complete days older
    /// than archive_after_days, or everything before --before). Works on the data directory of
    /// a stopped server; a running server archives on its schedule or with POST /admin/archive.
    Archive {
        #[arg(long, env = "ICHIBASE_DATA_DIR", default_value = "./ichibase-data")]
        data_dir: PathBuf,
        /// Archive every row before this date (YYYY-MM-DD, UTC), today's included
        #[arg(long)]
        before: Option<String>,
        /// Complete days older than this many days [default: 7, or the config's archive_after_days]
        #[arg(long, env = "ICHIBASE_ARCHIVE_AFTER_DAYS")]
        older_than_days: Option<u32>,
    },
    /// Conflict-free replicated (CRR) tables of a data directory.
    Crdt {
        #[command(subcommand)]
        command: ichibase::crdt::sync::CrdtCommand,
    },
    /// Keep a data directory and a peer server in sync, both ways (CRR tables).
    Sync(ichibase::crdt::sync::SyncArgs),
    /// Lua functions in the data directory (the running server picks changes up at once).
    Fn {
        #[command(subcommand)]
        command: FnCommand,
    },
}

#[derive(Subcommand)]
enum BackupCommand {
    /// Where replication stands: last shipped transaction, lag, last snapshot, errors; and the
    /// generations in the replica when replicate_url is set.
    Status {
        #[command(flatten)]
        settings: Settings,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum FnCommand {
    /// Deploy FILE as a new version of function NAME (syntax is checked first).
    Deploy {
        name: String,
        file: PathBuf,
        /// Trace every invocation of this version
        #[arg(long)]
        trace: bool,
        #[arg(long, env = "ICHIBASE_DATA_DIR", default_value = "./ichibase-data")]
        data_dir: PathBuf,
    },
    /// List deployed functions.
    List {
        #[arg(long, env = "ICHIBASE_DATA_DIR", default_value = "./ichibase-data")]
        data_dir: PathBuf,
    },
    /// Make an earlier version live again (default: the one before the live one).
    Rollback {
        name: String,
        #[arg(long)]
        version: Option<i64>,
        #[arg(long, env = "ICHIBASE_DATA_DIR", default_value = "./ichibase-data")]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create a user (by default an admin) in the data directory.
    CreateUser {
        #[arg(long, env = "ICHIBASE_DATA_DIR", default_value = "./ichibase-data")]
        data_dir: PathBuf,
        #[arg(long)]
        email: String,
        /// Password (or set ICHIBASE_NEW_PASSWORD to keep it out of the shell history)
        #[arg(long, env = "ICHIBASE_NEW_PASSWORD", hide_env_values = true)]
        password: String,
        #[arg(long, default_value = "admin")]
        role: String,
    },
    /// Create an API key and print it (shown once; stored hashed).
    CreateKey {
        #[arg(long, env = "ICHIBASE_DATA_DIR", default_value = "./ichibase-data")]
        data_dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "admin")]
        role: String,
    },
    /// Add a new JWT signing key (earlier keys keep verifying). Restart a running server, or
    /// use POST /admin/jwt/rotate instead.
    RotateJwtKey {
        #[arg(long, env = "ICHIBASE_DATA_DIR", default_value = "./ichibase-data")]
        data_dir: PathBuf,
    },
}

/// Whether a start failed because the listen address is taken.
fn is_addr_in_use(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse)
    })
}

fn init_logging(filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: a log file or a pipe gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn open_auth(
    data_dir: PathBuf,
) -> anyhow::Result<(ichibase::storage::Storage, ichibase::auth::Auth)> {
    let cfg = Settings {
        data_dir: Some(data_dir),
        ..Default::default()
    }
    .resolve()?;
    std::fs::create_dir_all(&cfg.data_dir)?;
    let opts = ichibase::storage::StorageOptions::from_config(&cfg);
    let storage =
        tokio::task::spawn_blocking(move || ichibase::storage::Storage::open(&opts)).await??;
    let auth = ichibase::auth::Auth::open(
        storage.clone(),
        &cfg.data_dir,
        ichibase::server::auth_options(&cfg)?,
    )
    .await?;
    Ok((storage, auth))
}

/// A data directory a command reads or changes must exist: a typo must not create an empty one.
fn existing_data_dir(data_dir: &std::path::Path) -> anyhow::Result<()> {
    if !data_dir.join("ichibase.db").exists() {
        anyhow::bail!(
            "{} is not an ichibase data directory (no ichibase.db there): check --data-dir / ICHIBASE_DATA_DIR; `ichibase serve` creates one",
            data_dir.display()
        );
    }
    Ok(())
}

/// Open the data directory's database; `create`: the command makes data by design (deploying a
/// function into a new app), else the directory must exist already.
async fn open_storage(data_dir: PathBuf, create: bool) -> anyhow::Result<ichibase::storage::Storage> {
    if !create {
        existing_data_dir(&data_dir)?;
    }
    let cfg = Settings {
        data_dir: Some(data_dir),
        ..Default::default()
    }
    .resolve()?;
    std::fs::create_dir_all(&cfg.data_dir)?;
    let opts = ichibase::storage::StorageOptions::from_config(&cfg);
    Ok(tokio::task::spawn_blocking(move || ichibase::storage::Storage::open(&opts)).await??)
}

async fn functions(cmd: FnCommand) -> anyhow::Result<()> {
    use ichibase::core::RequestContext;
    use ichibase::lua::store;
    use ichibase::storage::ExecControl;
    let sys = RequestContext::system;
    let ctl = || ExecControl::new(std::time::Instant::now(), 0.0);
    match cmd {
        FnCommand::Deploy {
            name,
            file,
            trace,
            data_dir,
        } => {
            store::check_name(&name)?;
            let source = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
            if let Err((e, line)) = ichibase::lua::deploy_check(&name, &source) {
                anyhow::bail!(
                    "{}:{}: {}",
                    file.display(),
                    line.map(|l| l.to_string()).unwrap_or_else(|| "?".into()),
                    e.message
                );
            }
            let storage = open_storage(data_dir, true).await?;
            let n = name.clone();
            let v = storage
                .write(&sys(), ctl(), move |c| {
                    store::deploy(c, &n, &source, trace, Some("cli"))
                })
                .await?;
            println!("deployed {name} version {v}");
            storage.close().await?;
        }
        FnCommand::List { data_dir } => {
            let storage = open_storage(data_dir, false).await?;
            for f in storage.read(&sys(), ctl(), |c| store::list(c)).await? {
                println!(
                    "{}\tversion {}\t({} versions){}",
                    f.name,
                    f.version,
                    f.versions,
                    if f.trace { "\ttraced" } else { "" }
                );
            }
            storage.close().await?;
        }
        FnCommand::Rollback {
            name,
            version,
            data_dir,
        } => {
            let storage = open_storage(data_dir, false).await?;
            let n = name.clone();
            let v = storage
                .write(&sys(), ctl(), move |c| store::rollback(c, &n, version))
                .await?;
            println!("{name} is at version {v}");
            storage.close().await?;
        }
    }
    Ok(())
}

async fn admin(cmd: AdminCommand) -> anyhow::Result<()> {
    match cmd {
        AdminCommand::CreateUser {
            data_dir,
            email,
            password,
            role,
        } => {
            let (storage, auth) = open_auth(data_dir).await?;
            let u = auth.create_user(&email, &password, &role).await?;
            println!("created user {} ({}) with role {}", u.email, u.id, u.role);
            storage.close().await?;
        }
        AdminCommand::CreateKey {
            data_dir,
            name,
            role,
        } => {
            let (storage, auth) = open_auth(data_dir).await?;
            let (info, key) = auth.create_api_key(&name, &role, None).await?;
            println!("{key}");
            eprintln!(
                "created API key {} ({}) with role {}; it is shown only now",
                info.name, info.id, info.role
            );
            storage.close().await?;
        }
        AdminCommand::RotateJwtKey { data_dir } => {
            let mut ring = ichibase::auth::jwt::KeyRing::open(&data_dir.join("jwt-keys.json"))?;
            let kid = ring.rotate()?;
            println!(
                "new signing key {kid}; verifying keys: {}",
                ring.kids().join(", ")
            );
        }
    }
    Ok(())
}

async fn generate(
    cfg: ichibase::config::Config,
    intent: String,
    rounds: Option<u32>,
    no_merge: bool,
) -> anyhow::Result<()> {
    use ichibase::generate::{Generator, Request};
    let llm =
        ichibase::llm::LlmClient::from_settings(&cfg.llm).map_err(|e| anyhow::anyhow!("{e}"))?;
    std::fs::create_dir_all(&cfg.data_dir)?;
    let opts = ichibase::storage::StorageOptions::from_config(&cfg);
    let o2 = opts.clone();
    let live = tokio::task::spawn_blocking(move || ichibase::storage::Storage::open(&o2)).await??;
    let branch_settings: ichibase::branch::BranchSettings = cfg.section("branches")?;
    branch_settings.validate()?;
    let branches = std::sync::Arc::new(ichibase::branch::Branches::new(
        &cfg.data_dir,
        &opts,
        &branch_settings,
    ));
    eprintln!("ichibase: asking {} at {}", llm.model(), llm.endpoint());
    let g = Generator {
        // The CLI works beside a possibly running server, which holds the posterity database.
        log: ichibase::posterity::Sink::disabled(),
        live: live.clone(),
        branches: branches.clone(),
        lua: ichibase::server::lua_options(&cfg),
        settings: cfg.generate.clone(),
        llm,
    };
    let res = g
        .run(
            Request {
                intent,
                max_rounds: rounds,
                require_approval: no_merge.then_some(true),
                by: None,
            },
            &|r| {
                eprintln!(
                    "round {}: {}{} ({} ms, {} + {} tokens)",
                    r.round,
                    r.outcome,
                    r.error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default(),
                    r.elapsed_ms,
                    r.input_tokens,
                    r.output_tokens
                );
                for c in r.checks.iter().filter(|c| !c.ok) {
                    eprintln!(
                        "  check '{}': {}",
                        c.name,
                        c.error.as_deref().unwrap_or("failed")
                    );
                }
            },
        )
        .await;
    branches.close_all().await;
    live.close().await?;
    let g = res.map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("{}", serde_json::to_string_pretty(&g)?);
    eprintln!(
        "ichibase: generation {} {} after {} round(s); details: GET /generate/{}",
        g.id,
        g.status,
        g.rounds.len(),
        g.id
    );
    if g.status == "merged" || g.status == "awaiting_approval" {
        Ok(())
    } else {
        anyhow::bail!("generation {} ended {}", g.id, g.status)
    }
}

fn parse_hex(s: &str) -> anyhow::Result<u64> {
    u64::from_str_radix(s.trim_start_matches("0x"), 16)
        .map_err(|_| anyhow::anyhow!("{s:?} is not a hexadecimal id"))
}

fn parse_time(s: &str) -> anyhow::Result<i64> {
    if let Ok(secs) = s.parse::<f64>() {
        return Ok((secs * 1000.0) as i64);
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|e| anyhow::anyhow!("--timestamp {s:?}: {e} (use RFC 3339 or epoch seconds)"))
}

fn replica_target(cfg: &ichibase::config::Config) -> anyhow::Result<ichibase::replication::Target> {
    let r = cfg.replication.as_ref().ok_or_else(|| {
        anyhow::anyhow!("no replica configured: set --replicate-url or ICHIBASE_REPLICATE_URL")
    })?;
    ichibase::replication::Target::open(&ichibase::replication::target_options(r))
}

async fn restore_cmd(
    cfg: ichibase::config::Config,
    to: PathBuf,
    opts: ichibase::replication::restore::RestoreOptions,
) -> anyhow::Result<()> {
    let target = replica_target(&cfg)?;
    let started = std::time::Instant::now();
    let r = ichibase::replication::restore::restore(&target, &to, &opts).await?;
    println!(
        "restored {} up to transaction {:016x} (captured {}) from {} files, {} bytes, in {:.1} s; integrity_check: {}",
        r.path.display(),
        r.txid,
        r.timestamp,
        r.files,
        r.bytes,
        started.elapsed().as_secs_f64(),
        r.integrity
    );
    Ok(())
}

async fn backup(cmd: BackupCommand, config_file: Option<PathBuf>) -> anyhow::Result<()> {
    match cmd {
        BackupCommand::Status { settings, json } => {
            let cfg = load_replica_config(settings, config_file.as_deref())?;
            let path = cfg.data_dir.join("replication").join("status.json");
            let status: Option<serde_json::Value> = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let age = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .map(|d| d.as_secs_f64());
            let mut gens = Vec::new();
            if cfg.replication.is_some() {
                let target = replica_target(&cfg)?;
                let files = ichibase::replication::restore::list_files(&target).await?;
                gens = ichibase::replication::restore::generations(&files)
                    .into_iter()
                    .map(|g| format!("{g:016x}"))
                    .collect();
            }
            let out = serde_json::json!({
                "status": status,
                "status_age_seconds": age,
                "generations": gens,
            });
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                match &status {
                    None => println!(
                        "no replication status in {} (replication never ran here)",
                        path.display()
                    ),
                    Some(s) => {
                        println!("target:          {}", s["target"].as_str().unwrap_or(""));
                        println!(
                            "captured txid:   {:016x}",
                            s["captured_txid"].as_u64().unwrap_or(0)
                        );
                        println!(
                            "shipped txid:    {:016x}",
                            s["shipped_txid"].as_u64().unwrap_or(0)
                        );
                        println!(
                            "lag:             {:.1} s, {} bytes ({} files pending)",
                            s["lag_seconds"].as_f64().unwrap_or(0.0),
                            s["lag_bytes"],
                            s["pending_files"]
                        );
                        println!(
                            "last shipped at: {}",
                            s["last_shipped_at"].as_str().unwrap_or("never")
                        );
                        println!(
                            "last snapshot:   {:016x} at {}",
                            s["last_snapshot_txid"].as_u64().unwrap_or(0),
                            s["last_snapshot_at"].as_str().unwrap_or("never")
                        );
                        println!(
                            "errors:          {} ({} in a row); last: {}",
                            s["errors_total"],
                            s["consecutive_errors"],
                            s["last_error"].as_str().unwrap_or("none")
                        );
                        if let Some(a) = age {
                            println!(
                                "status written {a:.1} s ago{}",
                                if a > 10.0 {
                                    " (is the server running?)"
                                } else {
                                    ""
                                }
                            );
                        }
                    }
                }
                if !gens.is_empty() {
                    println!("generations:     {}", gens.join(", "));
                }
            }
        }
    }
    Ok(())
}

/// `restore` and `backup status`: the settings as `serve` reads them (flags > env >
/// ichibase.toml); when those name no replica, the target the server on the data directory
/// recorded (`<data_dir>/replication/replica.json`: url, endpoint, region), so its flags need
/// not be repeated. Credentials and the encryption key still come from flags, env or the file.
fn load_replica_config(settings: Settings, file: Option<&std::path::Path>) -> anyhow::Result<config::Config> {
    let cfg = config::load(settings.clone(), file)?;
    if cfg.replication.is_some() {
        return Ok(cfg);
    }
    match ichibase::replication::recorded_target(&cfg.data_dir) {
        Some(t) => config::load(
            settings.or(Settings {
                replicate_url: Some(t.url),
                replicate_endpoint: t.endpoint,
                replicate_region: t.region,
                ..Default::default()
            }),
            file,
        ),
        None => Ok(cfg),
    }
}

/// The settings each subcommand that takes them lists in its `--help` (TOML keys or prefixes);
/// the others stay accepted but hidden. `serve` lists them all.
const REPLICA: &[&str] = &[
    "data_dir",
    "replicate_url",
    "replicate_endpoint",
    "replicate_region",
    "replicate_access_key_id",
    "replicate_secret_access_key",
    "replicate_timeout_secs",
    "replicate_encryption_key",
];
const OWN_SETTINGS: &[(&[&str], &[&str])] = &[
    (&["restore"], REPLICA),
    (&["backup", "status"], REPLICA),
    (&["generate"], &["data_dir", "llm_", "generate_", "property_runs"]),
];

/// The CLI with each subcommand's `--help` showing only its own settings.
fn cli_command() -> clap::Command {
    fn hide_others(mut c: clap::Command, path: &[&str], keep: &[&str]) -> clap::Command {
        match path {
            [] => {
                for (name, _) in config::SETTINGS {
                    if !keep.iter().any(|k| name.starts_with(k)) {
                        c = c.mut_arg(*name, |a| a.hide(true));
                    }
                }
                c
            }
            [first, rest @ ..] => c.mut_subcommand(*first, |sc| hide_others(sc, rest, keep)),
        }
    }
    let mut cmd = Cli::command();
    for (path, keep) in OWN_SETTINGS {
        cmd = hide_others(cmd, path, keep);
    }
    cmd
}

fn main() -> anyhow::Result<()> {
    ichibase::sql::system::mark_start();
    let cli = Cli::from_arg_matches(&cli_command().get_matches()).unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::Version => {
            println!(
                "ichibase {} (SQLite {})",
                ichibase::VERSION,
                rusqlite::version()
            );
            Ok(())
        }
        Command::Archive {
            data_dir,
            before,
            older_than_days,
        } => {
            init_logging("warn", LogFormat::Text);
            existing_data_dir(&data_dir)?;
            let cfg = Settings {
                data_dir: Some(data_dir),
                archive_after_days: older_than_days,
                ..Default::default()
            }
            .resolve()?;
            let p = ichibase::posterity::Posterity::open(
                ichibase::posterity::PosterityOptions::from_config(&cfg)?,
            )?;
            let files = p.archive(before.as_deref());
            p.close();
            let files = files?;
            for f in &files {
                println!("{}\t{} rows\t{} bytes", f.path.display(), f.rows, f.bytes);
            }
            println!("archived {} files", files.len());
            Ok(())
        }
        Command::Fn { command } => {
            init_logging("warn", LogFormat::Text);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(functions(command))
        }
        Command::Ai { command } => ichibase::ai::cli::run(command),
        Command::Crdt { command } => {
            init_logging("warn", LogFormat::Text);
            ichibase::crdt::sync::crdt_cli(command)
        }
        Command::Sync(args) => {
            init_logging("warn", LogFormat::Text);
            ichibase::crdt::sync::sync_cli(args)
        }
        Command::Admin { command } => {
            init_logging("warn", LogFormat::Text);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(admin(command))
        }
        Command::Generate {
            intent,
            rounds,
            no_merge,
            settings,
        } => {
            let cfg = config::load(settings, cli.config.as_deref())?;
            init_logging("warn", LogFormat::Text);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_stack_size(8 * 1024 * 1024)
                .build()?;
            rt.block_on(generate(cfg, intent, rounds, no_merge))
        }
        Command::Serve {
            settings,
            restore_if_missing,
        } => {
            let cfg = config::load(settings, cli.config.as_deref())?;
            init_logging(&cfg.log_level, cfg.log_format);
            // Lua and its callbacks recurse on blocking threads: give them room (debug builds need it).
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_stack_size(8 * 1024 * 1024)
                .build()?;
            rt.block_on(async {
                if restore_if_missing && !cfg.db_path().exists() {
                    let target = replica_target(&cfg)?;
                    if ichibase::replication::restore::list_files(&target)
                        .await?
                        .is_empty()
                    {
                        println!(
                            "ichibase: no replica at {} yet; starting with a new database",
                            target.url()
                        );
                    } else {
                        let opts = ichibase::replication::restore::RestoreOptions {
                            progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
                            ..Default::default()
                        };
                        restore_cmd(cfg.clone(), cfg.db_path(), opts).await?;
                    }
                }
                ichibase::server::run(cfg).await
            })
        }
        Command::Open {
            mut settings,
            owner,
            no_browser,
        } => {
            if settings.data_dir.is_none() {
                settings.data_dir = Some(ichibase::open::default_data_dir()?);
            }
            // A personal app's terminal shows warnings, not the request log.
            if settings.log_level.is_none() {
                settings.log_level = Some("warn".into());
            }
            let data_dir = settings.data_dir.clone().unwrap_or_default();
            let file = cli.config.clone().or_else(|| {
                let f = data_dir.join("ichibase.toml");
                f.exists().then_some(f)
            });
            let mut cfg = config::load(settings, file.as_deref())?;
            init_logging(&cfg.log_level, cfg.log_format);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_stack_size(8 * 1024 * 1024)
                .build()?;
            rt.block_on(async move {
                let running = match ichibase::server::start(cfg.clone()).await {
                    Ok(r) => r,
                    // The port is taken (another program, or another ichibase): any free port.
                    Err(e) if is_addr_in_use(&e) => {
                        eprintln!("ichibase: {} is in use; taking a free port instead", cfg.listen);
                        cfg.listen.set_port(0);
                        ichibase::server::start(cfg.clone()).await?
                    }
                    Err(e) => return Err(e),
                };
                if ichibase::open::ensure_owner(&running.app, &owner).await? {
                    println!("ichibase: created the owner account {owner} (admin)");
                }
                let link = ichibase::open::mint_link(&running.app, &owner).await?;
                let scheme = if cfg.tls_cert.is_some() { "https" } else { "http" };
                let url = format!("{scheme}://{}{link}", running.addr);
                println!("ichibase open: data in {}", cfg.data_dir.display());
                println!("ichibase listening on {scheme}://{}", running.addr);
                println!(
                    "ichibase open: sign-in link (one use, {} minutes): {url}",
                    ichibase::open::LINK_TTL_SECS / 60
                );
                if !no_browser {
                    if let Err(e) = ichibase::open::open_browser(&url) {
                        eprintln!("ichibase: {e}");
                    }
                }
                ichibase::server::serve_until_signal(running).await
            })
        }
        Command::Restore {
            settings,
            to,
            timestamp,
            generation,
            txid,
            force,
        } => {
            let cfg = load_replica_config(settings, cli.config.as_deref())?;
            init_logging("warn", LogFormat::Text);
            let opts = ichibase::replication::restore::RestoreOptions {
                timestamp_ms: timestamp.as_deref().map(parse_time).transpose()?,
                txid: txid.as_deref().map(parse_hex).transpose()?,
                generation: generation.as_deref().map(parse_hex).transpose()?,
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
                force,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(restore_cmd(cfg, to, opts))
        }
        Command::Backup { command } => {
            init_logging("warn", LogFormat::Text);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(backup(command, cli.config.clone()))
        }
    }
}
