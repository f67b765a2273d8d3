//! Configuration: CLI flags > `ICHIBASE_*` environment variables > `ichibase.toml` > defaults.
//!
//! clap resolves the first two layers (every flag declares its env var); this module reads the
//! TOML file and fills what is still unset, then applies the defaults. It owns the [`Config`]
//! struct that the rest of the engine reads; it must not open files other than the TOML file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

/// SQLite `synchronous` setting the writer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// Durable across application crashes; a power loss may drop the last transactions (WAL).
    Normal,
    /// fsync on every commit: durable across power loss.
    Full,
}

impl Synchronous {
    pub fn pragma_value(self) -> &'static str {
        match self {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Fully resolved configuration of a running server.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub synchronous: Synchronous,
    /// How long a connection waits on a lock held by another process before failing.
    pub busy_timeout_ms: u64,
    /// Size of the read-only connection pool.
    pub readers: usize,
    pub limits: Limits,
    /// Output buffered before the response starts: answers that fit get an exact status code
    /// and summary header; larger ones stream.
    pub http_buffer_size: usize,
    /// ClickHouse's `output_format_json_quote_64bit_integers` default.
    pub json_quote_64bit_integers: bool,
    /// How long shutdown waits for in-flight requests before closing the database anyway.
    pub shutdown_grace_secs: f64,
    pub log_format: LogFormat,
    pub log_level: String,
    pub auth: AuthSettings,
    pub lua: LuaSettings,
    pub ws: WsSettings,
    pub llm: LlmSettings,
    pub generate: GenerateSettings,
    pub posterity: PosteritySettings,
    /// Continuous backup to S3 or a directory; `None` when no `replicate_url` is set.
    pub replication: Option<ReplicationSettings>,
    /// Module sections (`[name]` tables of ichibase.toml, with `ICHIBASE_<NAME>__<KEY>`
    /// environment overrides applied); each module reads its own with [`Config::section`].
    pub sections: std::collections::BTreeMap<String, toml::Table>,
}

/// Sections a module owns in ichibase.toml. A module declares its settings once, as a struct
/// with `#[serde(default, deny_unknown_fields)]` and a `Default`, and reads them with
/// [`Config::section`]; adding a section is one line here.
pub const SECTIONS: &[&str] = &["http", "sql_guard", "auth_guard", "ws_limits", "analytics", "traces", "lua_limits"];

/// Which wire protocol the model provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LlmProvider {
    /// Anthropic when the URL names anthropic.com, else OpenAI-compatible.
    Auto,
    /// OpenAI-compatible chat completions (OpenAI, OpenRouter, Ollama, vLLM, llama.cpp).
    Openai,
    /// Anthropic's messages API.
    Anthropic,
}

/// The language-model provider used by `generate`.
#[derive(Debug, Clone)]
pub struct LlmSettings {
    /// Base URL, e.g. `https://api.openai.com/v1` or `https://api.anthropic.com/v1`.
    pub url: Option<String>,
    pub api_key: Option<String>,
    pub model: Option<String>,
    pub provider: LlmProvider,
    /// Seconds one model call may take (the whole HTTP exchange).
    pub timeout_secs: f64,
    /// Retries after a failed call (connection errors, 408, 429, 5xx), with back-off.
    pub max_retries: u32,
    /// Most tokens the model may answer with.
    pub max_tokens: u32,
}

impl Default for LlmSettings {
    fn default() -> Self {
        LlmSettings {
            url: None,
            api_key: None,
            model: None,
            provider: LlmProvider::Auto,
            timeout_secs: 180.0,
            max_retries: 3,
            max_tokens: 8192,
        }
    }
}

/// The intent-to-service loop.
#[derive(Debug, Clone)]
pub struct GenerateSettings {
    /// Model answers tried before giving up.
    pub max_rounds: u32,
    /// Keep a verified bundle in its branch until an admin approves it (no automatic merge).
    pub require_approval: bool,
    /// Keep the branch of the most recent failed generation for inspection (older failed
    /// generations' branches are deleted either way).
    pub keep_failed_branch: bool,
    /// Cases a property check tries unless it says otherwise.
    pub property_runs: u32,
}

impl Default for GenerateSettings {
    fn default() -> Self {
        GenerateSettings {
            max_rounds: 4,
            require_approval: false,
            keep_failed_branch: false,
            property_runs: 100,
        }
    }
}

/// The posterity log (DuckDB) and its archive.
#[derive(Debug, Clone)]
pub struct PosteritySettings {
    /// Record requests, statements and invocations.
    pub enabled: bool,
    /// Seconds between commits of the log; a crash loses at most this much.
    pub flush_secs: f64,
    /// Events queued before new ones are dropped (and counted).
    pub queue: usize,
    /// Rows that trigger a commit before the interval is over.
    pub batch_rows: usize,
    /// Complete days older than this go to the Parquet archive.
    pub archive_after_days: u32,
    /// Seconds between scheduled archive runs (0: only on demand).
    pub archive_interval_secs: f64,
}

impl Default for PosteritySettings {
    fn default() -> Self {
        PosteritySettings {
            enabled: true,
            flush_secs: 1.0,
            queue: 65_536,
            batch_rows: 50_000,
            archive_after_days: 7,
            archive_interval_secs: 3600.0,
        }
    }
}

/// WAL replication settings (see `crate::replication`).
#[derive(Debug, Clone)]
pub struct ReplicationSettings {
    /// `s3://bucket/prefix` or `file:///dir`.
    pub url: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub sync_interval_secs: f64,
    pub snapshot_interval_secs: f64,
    pub retention_secs: f64,
    pub checkpoint_pages: u64,
    /// Seconds between compactions of change files into level 1.
    pub compaction_interval_secs: f64,
    pub timeout_secs: f64,
    /// AES-256-GCM key (64 hex digits in the settings).
    pub encryption_key: Option<[u8; 32]>,
}

/// WebSocket and change-capture settings.
#[derive(Debug, Clone)]
pub struct WsSettings {
    /// Frames queued per connection before a slow client is disconnected.
    pub queue: usize,
    pub heartbeat_secs: f64,
    /// Largest frame a client may send, bytes.
    pub max_message: usize,
    /// Changes kept for clients that reconnect.
    pub cdc_retention: i64,
}

impl Default for WsSettings {
    fn default() -> Self {
        WsSettings {
            queue: 1024,
            heartbeat_secs: 30.0,
            max_message: 1024 * 1024,
            cdc_retention: 10_000,
        }
    }
}

/// Limits of the Lua sandbox.
#[derive(Debug, Clone)]
pub struct LuaSettings {
    pub instruction_limit: u64,
    pub memory_limit: usize,
    pub timeout_secs: f64,
    pub max_trace_steps: usize,
}

impl Default for LuaSettings {
    fn default() -> Self {
        LuaSettings {
            instruction_limit: 200_000_000,
            memory_limit: 64 * 1024 * 1024,
            timeout_secs: 10.0,
            max_trace_steps: 100_000,
        }
    }
}

/// Identity settings.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// Anyone may create an account with `POST /auth/signup`.
    pub signup_open: bool,
    pub access_token_ttl_secs: u64,
    pub session_ttl_secs: u64,
    pub cookie_secure: bool,
    /// An admin API key ensured at start.
    pub admin_key: Option<String>,
    /// An admin user ensured at start.
    pub admin_email: Option<String>,
    pub admin_password: Option<String>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            signup_open: false,
            access_token_ttl_secs: 15 * 60,
            session_ttl_secs: 30 * 24 * 3600,
            cookie_secure: false,
            admin_key: None,
            admin_email: None,
            admin_password: None,
        }
    }
}

/// Server-wide limits; requests may lower them with URL settings, never raise them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Largest accepted request body (query + insert data), bytes.
    pub max_body_size: usize,
    /// Largest SQL text (the part before insert data), bytes.
    pub max_query_size: usize,
    /// Most rows one result may hold (0 = unlimited).
    pub max_result_rows: u64,
    /// Most bytes of formatted output one result may hold (0 = unlimited).
    pub max_result_bytes: u64,
    /// Longest a request may run, seconds (0 = unlimited).
    pub max_execution_time: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_size: 64 * 1024 * 1024,
            max_query_size: 1024 * 1024,
            max_result_rows: 10_000_000,
            max_result_bytes: 4 * 1024 * 1024 * 1024,
            max_execution_time: 30.0,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".parse().unwrap(),
            data_dir: PathBuf::from("./ichibase-data"),
            synchronous: Synchronous::Normal,
            busy_timeout_ms: 5_000,
            readers: std::thread::available_parallelism()
                .map(|n| n.get() * 2)
                .unwrap_or(4)
                .max(4),
            limits: Limits::default(),
            http_buffer_size: 1024 * 1024,
            json_quote_64bit_integers: true,
            shutdown_grace_secs: 30.0,
            log_format: LogFormat::Text,
            log_level: "info".into(),
            auth: AuthSettings::default(),
            lua: LuaSettings::default(),
            ws: WsSettings::default(),
            llm: LlmSettings::default(),
            generate: GenerateSettings::default(),
            posterity: PosteritySettings::default(),
            replication: None,
            sections: Default::default(),
        }
    }
}

impl Config {
    /// A module's settings section: the `[name]` table of the config file with its environment
    /// overrides, over the struct's defaults. Unknown keys and wrong types are errors naming the
    /// section.
    pub fn section<T: serde::de::DeserializeOwned + Default>(&self, name: &str) -> anyhow::Result<T> {
        debug_assert!(SECTIONS.contains(&name), "section {name} is not registered in SECTIONS");
        match self.sections.get(name) {
            None => Ok(T::default()),
            Some(t) => t
                .clone()
                .try_into()
                .with_context(|| format!("in the [{name}] section of the configuration")),
        }
    }

    /// The SQLite database file of the app.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("ichibase.db")
    }
}

/// Every setting, optional: one layer of configuration (flags+env from clap, or the TOML file).
#[derive(Debug, Clone, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address to listen on [default: 127.0.0.1:8080]
    #[arg(long, env = "ICHIBASE_LISTEN", value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// Data directory, created on first start [default: ./ichibase-data]
    #[arg(long, env = "ICHIBASE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// SQLite synchronous mode [default: normal]
    #[arg(long, env = "ICHIBASE_SYNCHRONOUS", value_enum)]
    pub synchronous: Option<Synchronous>,
    /// SQLite busy timeout in milliseconds [default: 5000]
    #[arg(long, env = "ICHIBASE_BUSY_TIMEOUT_MS")]
    pub busy_timeout_ms: Option<u64>,
    /// Number of pooled read-only connections [default: 2 x cores, at least 4]
    #[arg(long, env = "ICHIBASE_READERS")]
    pub readers: Option<usize>,
    /// Largest request body in bytes [default: 67108864]
    #[arg(long, env = "ICHIBASE_MAX_BODY_SIZE")]
    pub max_body_size: Option<usize>,
    /// Largest SQL text in bytes [default: 1048576]
    #[arg(long, env = "ICHIBASE_MAX_QUERY_SIZE")]
    pub max_query_size: Option<usize>,
    /// Most rows in one result, 0 = unlimited [default: 10000000]
    #[arg(long, env = "ICHIBASE_MAX_RESULT_ROWS")]
    pub max_result_rows: Option<u64>,
    /// Most bytes in one result, 0 = unlimited [default: 4294967296]
    #[arg(long, env = "ICHIBASE_MAX_RESULT_BYTES")]
    pub max_result_bytes: Option<u64>,
    /// Longest a query may run in seconds, 0 = unlimited [default: 30]
    #[arg(long, env = "ICHIBASE_MAX_EXECUTION_TIME")]
    pub max_execution_time: Option<f64>,
    /// Bytes of output buffered before a response starts streaming [default: 1048576]
    #[arg(long, env = "ICHIBASE_HTTP_BUFFER_SIZE")]
    pub http_buffer_size: Option<usize>,
    /// Quote 64-bit integers in JSON output, as ClickHouse does [default: true]
    #[arg(long, env = "ICHIBASE_JSON_QUOTE_64BIT_INTEGERS")]
    pub json_quote_64bit_integers: Option<bool>,
    /// Seconds shutdown waits for in-flight requests [default: 30]
    #[arg(long, env = "ICHIBASE_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<f64>,
    /// Log format [default: text]
    #[arg(long, env = "ICHIBASE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. `info` or `ichibase=debug` [default: info]
    #[arg(long, env = "ICHIBASE_LOG", value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Let anyone sign up with POST /auth/signup [default: false]
    #[arg(long, env = "ICHIBASE_SIGNUP_OPEN")]
    pub signup_open: Option<bool>,
    /// Lifetime of access tokens (JWT) in seconds [default: 900]
    #[arg(long, env = "ICHIBASE_ACCESS_TOKEN_TTL_SECS")]
    pub access_token_ttl_secs: Option<u64>,
    /// Lifetime of sessions / refresh tokens in seconds [default: 2592000]
    #[arg(long, env = "ICHIBASE_SESSION_TTL_SECS")]
    pub session_ttl_secs: Option<u64>,
    /// Mark the session cookie Secure (serve behind HTTPS) [default: false]
    #[arg(long, env = "ICHIBASE_COOKIE_SECURE")]
    pub cookie_secure: Option<bool>,
    /// An API key with the admin role, created at start if missing ('ik_' + random characters, at least ~100 bits: no repeats or runs)
    #[arg(long, env = "ICHIBASE_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Email of an admin user created at start if missing (with --admin-password)
    #[arg(long, env = "ICHIBASE_ADMIN_EMAIL")]
    pub admin_email: Option<String>,
    /// Password of that admin user
    #[arg(long, env = "ICHIBASE_ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: Option<String>,
    /// Lua: VM instructions one invocation may run [default: 200000000]
    #[arg(long, env = "ICHIBASE_LUA_INSTRUCTION_LIMIT")]
    pub lua_instruction_limit: Option<u64>,
    /// Lua: bytes of memory one invocation may hold [default: 67108864]
    #[arg(long, env = "ICHIBASE_LUA_MEMORY_LIMIT")]
    pub lua_memory_limit: Option<usize>,
    /// Lua: seconds one invocation may run [default: 10]
    #[arg(long, env = "ICHIBASE_LUA_TIMEOUT_SECS")]
    pub lua_timeout_secs: Option<f64>,
    /// Lua: most steps recorded in one trace [default: 100000]
    #[arg(long, env = "ICHIBASE_LUA_MAX_TRACE_STEPS")]
    pub lua_max_trace_steps: Option<usize>,
    /// WebSocket: frames queued per connection before a slow client is cut off [default: 1024]
    #[arg(long, env = "ICHIBASE_WS_QUEUE")]
    pub ws_queue: Option<usize>,
    /// WebSocket: seconds between server pings; 2x without a frame closes [default: 30]
    #[arg(long, env = "ICHIBASE_WS_HEARTBEAT_SECS")]
    pub ws_heartbeat_secs: Option<f64>,
    /// WebSocket: largest client frame in bytes [default: 1048576]
    #[arg(long, env = "ICHIBASE_WS_MAX_MESSAGE")]
    pub ws_max_message: Option<usize>,
    /// Change capture: changes kept for reconnecting clients [default: 10000]
    #[arg(long, env = "ICHIBASE_CDC_RETENTION")]
    pub cdc_retention: Option<i64>,
    /// LLM: base URL of the provider, e.g. https://api.openai.com/v1
    #[arg(long, env = "ICHIBASE_LLM_URL", value_name = "URL")]
    pub llm_url: Option<String>,
    /// LLM: API key (sent as Bearer, or x-api-key for Anthropic)
    #[arg(long, env = "ICHIBASE_LLM_KEY", hide_env_values = true)]
    pub llm_key: Option<String>,
    /// LLM: model name, e.g. gpt-4.1 or claude-sonnet-4-5
    #[arg(long, env = "ICHIBASE_LLM_MODEL")]
    pub llm_model: Option<String>,
    /// LLM: wire protocol [default: auto]
    #[arg(long, env = "ICHIBASE_LLM_PROVIDER", value_enum)]
    pub llm_provider: Option<LlmProvider>,
    /// LLM: seconds one model call may take [default: 180]
    #[arg(long, env = "ICHIBASE_LLM_TIMEOUT_SECS")]
    pub llm_timeout_secs: Option<f64>,
    /// LLM: retries of a failed call, with back-off [default: 3]
    #[arg(long, env = "ICHIBASE_LLM_MAX_RETRIES")]
    pub llm_max_retries: Option<u32>,
    /// LLM: most tokens in one answer [default: 8192]
    #[arg(long, env = "ICHIBASE_LLM_MAX_TOKENS")]
    pub llm_max_tokens: Option<u32>,
    /// Generate: model answers tried before giving up [default: 4]
    #[arg(long, env = "ICHIBASE_GENERATE_MAX_ROUNDS")]
    pub generate_max_rounds: Option<u32>,
    /// Generate: wait for an admin's approval instead of merging a verified bundle [default: false]
    #[arg(long, env = "ICHIBASE_GENERATE_REQUIRE_APPROVAL")]
    pub generate_require_approval: Option<bool>,
    /// Generate: keep the branch of the last failed generation for inspection [default: false]
    #[arg(long, env = "ICHIBASE_GENERATE_KEEP_FAILED_BRANCH")]
    pub generate_keep_failed_branch: Option<bool>,
    /// Property checks: cases tried unless a check says otherwise [default: 100]
    #[arg(long, env = "ICHIBASE_PROPERTY_RUNS")]
    pub property_runs: Option<u32>,
    /// Posterity: log requests, statements and Lua invocations to DuckDB [default: true]
    #[arg(long, env = "ICHIBASE_POSTERITY")]
    pub posterity: Option<bool>,
    /// Posterity: seconds between commits of the log (a crash loses at most this) [default: 1]
    #[arg(long, env = "ICHIBASE_POSTERITY_FLUSH_SECS")]
    pub posterity_flush_secs: Option<f64>,
    /// Posterity: events queued before new ones are dropped and counted [default: 65536]
    #[arg(long, env = "ICHIBASE_POSTERITY_QUEUE")]
    pub posterity_queue: Option<usize>,
    /// Posterity: rows that trigger a commit before the interval is over [default: 50000]
    #[arg(long, env = "ICHIBASE_POSTERITY_BATCH_ROWS")]
    pub posterity_batch_rows: Option<usize>,
    /// Archive: complete days older than this many days go to Parquet [default: 7]
    #[arg(long, env = "ICHIBASE_ARCHIVE_AFTER_DAYS")]
    pub archive_after_days: Option<u32>,
    /// Archive: seconds between scheduled runs, 0 = only on demand [default: 3600]
    #[arg(long, env = "ICHIBASE_ARCHIVE_INTERVAL_SECS")]
    pub archive_interval_secs: Option<f64>,
    /// Replicate the database continuously to `s3://BUCKET/PREFIX` or `file:///DIR` [default: off]
    #[arg(long, env = "ICHIBASE_REPLICATE_URL", value_name = "URL")]
    pub replicate_url: Option<String>,
    /// S3 endpoint for S3-compatible servers, e.g. http://127.0.0.1:9000 [default: AWS]
    #[arg(long, env = "ICHIBASE_REPLICATE_ENDPOINT", value_name = "URL")]
    pub replicate_endpoint: Option<String>,
    /// S3 region [default: us-east-1 or AWS_REGION]
    #[arg(long, env = "ICHIBASE_REPLICATE_REGION")]
    pub replicate_region: Option<String>,
    /// S3 access key id [default: AWS_ACCESS_KEY_ID]
    #[arg(long, env = "ICHIBASE_REPLICATE_ACCESS_KEY_ID", hide_env_values = true)]
    pub replicate_access_key_id: Option<String>,
    /// S3 secret access key [default: AWS_SECRET_ACCESS_KEY]
    #[arg(
        long,
        env = "ICHIBASE_REPLICATE_SECRET_ACCESS_KEY",
        hide_env_values = true
    )]
    pub replicate_secret_access_key: Option<String>,
    /// Seconds within which a commit is shipped [default: 1]
    #[arg(long, env = "ICHIBASE_REPLICATE_SYNC_INTERVAL_SECS")]
    pub replicate_sync_interval_secs: Option<f64>,
    /// Seconds between full snapshots [default: 86400]
    #[arg(long, env = "ICHIBASE_REPLICATE_SNAPSHOT_INTERVAL_SECS")]
    pub replicate_snapshot_interval_secs: Option<f64>,
    /// Seconds of history kept in the replica (older snapshots and changes are pruned) [default: 259200]
    #[arg(long, env = "ICHIBASE_REPLICATE_RETENTION_SECS")]
    pub replicate_retention_secs: Option<f64>,
    /// WAL pages after which the replicator checkpoints (once they are captured) [default: 1000]
    #[arg(long, env = "ICHIBASE_REPLICATE_CHECKPOINT_PAGES")]
    pub replicate_checkpoint_pages: Option<u64>,
    /// Seconds between compactions of change files into one level-1 file [default: 300]
    #[arg(long, env = "ICHIBASE_REPLICATE_COMPACTION_INTERVAL_SECS")]
    pub replicate_compaction_interval_secs: Option<f64>,
    /// Timeout of one request to the replica target, seconds [default: 30]
    #[arg(long, env = "ICHIBASE_REPLICATE_TIMEOUT_SECS")]
    pub replicate_timeout_secs: Option<f64>,
    /// Encrypt replica objects with AES-256-GCM under this key (64 hex digits) [default: off]
    #[arg(
        long,
        env = "ICHIBASE_REPLICATE_ENCRYPTION_KEY",
        hide_env_values = true
    )]
    pub replicate_encryption_key: Option<String>,
}

impl Settings {
    /// Read one TOML layer.
    pub fn from_toml_file(path: &Path) -> anyhow::Result<Settings> {
        Ok(Self::from_toml_file_with_sections(path)?.0)
    }

    /// Read one TOML layer and its module sections (`[name]` tables named in [`SECTIONS`]).
    pub fn from_toml_file_with_sections(path: &Path) -> anyhow::Result<(Settings, Sections)> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        let mut table: toml::Table = toml::from_str(&text)
            .with_context(|| format!("parsing config file {}", path.display()))?;
        let mut sections = Sections::new();
        for name in SECTIONS {
            match table.remove(*name) {
                Some(toml::Value::Table(t)) => {
                    sections.insert(name.to_string(), t);
                }
                Some(_) => bail!("{}: `{name}` must be a [{name}] table", path.display()),
                None => {}
            }
        }
        let settings = Settings::deserialize(table)
            .with_context(|| format!("parsing config file {}", path.display()))?;
        Ok((settings, sections))
    }

    /// Fill every unset field of `self` from `lower`.
    pub fn or(self, lower: Settings) -> Settings {
        Settings {
            listen: self.listen.or(lower.listen),
            data_dir: self.data_dir.or(lower.data_dir),
            synchronous: self.synchronous.or(lower.synchronous),
            busy_timeout_ms: self.busy_timeout_ms.or(lower.busy_timeout_ms),
            readers: self.readers.or(lower.readers),
            max_body_size: self.max_body_size.or(lower.max_body_size),
            max_query_size: self.max_query_size.or(lower.max_query_size),
            max_result_rows: self.max_result_rows.or(lower.max_result_rows),
            max_result_bytes: self.max_result_bytes.or(lower.max_result_bytes),
            max_execution_time: self.max_execution_time.or(lower.max_execution_time),
            http_buffer_size: self.http_buffer_size.or(lower.http_buffer_size),
            json_quote_64bit_integers: self
                .json_quote_64bit_integers
                .or(lower.json_quote_64bit_integers),
            shutdown_grace_secs: self.shutdown_grace_secs.or(lower.shutdown_grace_secs),
            log_format: self.log_format.or(lower.log_format),
            log_level: self.log_level.or(lower.log_level),
            signup_open: self.signup_open.or(lower.signup_open),
            access_token_ttl_secs: self.access_token_ttl_secs.or(lower.access_token_ttl_secs),
            session_ttl_secs: self.session_ttl_secs.or(lower.session_ttl_secs),
            cookie_secure: self.cookie_secure.or(lower.cookie_secure),
            admin_key: self.admin_key.or(lower.admin_key),
            admin_email: self.admin_email.or(lower.admin_email),
            admin_password: self.admin_password.or(lower.admin_password),
            lua_instruction_limit: self.lua_instruction_limit.or(lower.lua_instruction_limit),
            lua_memory_limit: self.lua_memory_limit.or(lower.lua_memory_limit),
            lua_timeout_secs: self.lua_timeout_secs.or(lower.lua_timeout_secs),
            lua_max_trace_steps: self.lua_max_trace_steps.or(lower.lua_max_trace_steps),
            ws_queue: self.ws_queue.or(lower.ws_queue),
            ws_heartbeat_secs: self.ws_heartbeat_secs.or(lower.ws_heartbeat_secs),
            ws_max_message: self.ws_max_message.or(lower.ws_max_message),
            cdc_retention: self.cdc_retention.or(lower.cdc_retention),
            llm_url: self.llm_url.or(lower.llm_url),
            llm_key: self.llm_key.or(lower.llm_key),
            llm_model: self.llm_model.or(lower.llm_model),
            llm_provider: self.llm_provider.or(lower.llm_provider),
            llm_timeout_secs: self.llm_timeout_secs.or(lower.llm_timeout_secs),
            llm_max_retries: self.llm_max_retries.or(lower.llm_max_retries),
            llm_max_tokens: self.llm_max_tokens.or(lower.llm_max_tokens),
            generate_max_rounds: self.generate_max_rounds.or(lower.generate_max_rounds),
            generate_require_approval: self
                .generate_require_approval
                .or(lower.generate_require_approval),
            generate_keep_failed_branch: self
                .generate_keep_failed_branch
                .or(lower.generate_keep_failed_branch),
            property_runs: self.property_runs.or(lower.property_runs),
            posterity: self.posterity.or(lower.posterity),
            posterity_flush_secs: self.posterity_flush_secs.or(lower.posterity_flush_secs),
            posterity_queue: self.posterity_queue.or(lower.posterity_queue),
            posterity_batch_rows: self.posterity_batch_rows.or(lower.posterity_batch_rows),
            archive_after_days: self.archive_after_days.or(lower.archive_after_days),
            archive_interval_secs: self.archive_interval_secs.or(lower.archive_interval_secs),
            replicate_url: self.replicate_url.or(lower.replicate_url),
            replicate_endpoint: self.replicate_endpoint.or(lower.replicate_endpoint),
            replicate_region: self.replicate_region.or(lower.replicate_region),
            replicate_access_key_id: self
                .replicate_access_key_id
                .or(lower.replicate_access_key_id),
            replicate_secret_access_key: self
                .replicate_secret_access_key
                .or(lower.replicate_secret_access_key),
            replicate_sync_interval_secs: self
                .replicate_sync_interval_secs
                .or(lower.replicate_sync_interval_secs),
            replicate_snapshot_interval_secs: self
                .replicate_snapshot_interval_secs
                .or(lower.replicate_snapshot_interval_secs),
            replicate_retention_secs: self
                .replicate_retention_secs
                .or(lower.replicate_retention_secs),
            replicate_checkpoint_pages: self
                .replicate_checkpoint_pages
                .or(lower.replicate_checkpoint_pages),
            replicate_timeout_secs: self.replicate_timeout_secs.or(lower.replicate_timeout_secs),
            replicate_compaction_interval_secs: self
                .replicate_compaction_interval_secs
                .or(lower.replicate_compaction_interval_secs),
            replicate_encryption_key: self
                .replicate_encryption_key
                .or(lower.replicate_encryption_key),
        }
    }

    /// Apply defaults and validate.
    pub fn resolve(self) -> anyhow::Result<Config> {
        let d = Config::default();
        let cfg = Config {
            listen: self.listen.unwrap_or(d.listen),
            data_dir: self.data_dir.unwrap_or(d.data_dir),
            synchronous: self.synchronous.unwrap_or(d.synchronous),
            busy_timeout_ms: self.busy_timeout_ms.unwrap_or(d.busy_timeout_ms),
            readers: self.readers.unwrap_or(d.readers),
            limits: Limits {
                max_body_size: self.max_body_size.unwrap_or(d.limits.max_body_size),
                max_query_size: self.max_query_size.unwrap_or(d.limits.max_query_size),
                max_result_rows: self.max_result_rows.unwrap_or(d.limits.max_result_rows),
                max_result_bytes: self.max_result_bytes.unwrap_or(d.limits.max_result_bytes),
                max_execution_time: self
                    .max_execution_time
                    .unwrap_or(d.limits.max_execution_time),
            },
            http_buffer_size: self.http_buffer_size.unwrap_or(d.http_buffer_size),
            json_quote_64bit_integers: self
                .json_quote_64bit_integers
                .unwrap_or(d.json_quote_64bit_integers),
            shutdown_grace_secs: self.shutdown_grace_secs.unwrap_or(d.shutdown_grace_secs),
            log_format: self.log_format.unwrap_or(d.log_format),
            log_level: self.log_level.unwrap_or(d.log_level),
            auth: AuthSettings {
                signup_open: self.signup_open.unwrap_or(d.auth.signup_open),
                access_token_ttl_secs: self
                    .access_token_ttl_secs
                    .unwrap_or(d.auth.access_token_ttl_secs),
                session_ttl_secs: self.session_ttl_secs.unwrap_or(d.auth.session_ttl_secs),
                cookie_secure: self.cookie_secure.unwrap_or(d.auth.cookie_secure),
                admin_key: self.admin_key,
                admin_email: self.admin_email,
                admin_password: self.admin_password,
            },
            lua: LuaSettings {
                instruction_limit: self
                    .lua_instruction_limit
                    .unwrap_or(d.lua.instruction_limit),
                memory_limit: self.lua_memory_limit.unwrap_or(d.lua.memory_limit),
                timeout_secs: self.lua_timeout_secs.unwrap_or(d.lua.timeout_secs),
                max_trace_steps: self.lua_max_trace_steps.unwrap_or(d.lua.max_trace_steps),
            },
            ws: WsSettings {
                queue: self.ws_queue.unwrap_or(d.ws.queue),
                heartbeat_secs: self.ws_heartbeat_secs.unwrap_or(d.ws.heartbeat_secs),
                max_message: self.ws_max_message.unwrap_or(d.ws.max_message),
                cdc_retention: self.cdc_retention.unwrap_or(d.ws.cdc_retention),
            },
            llm: LlmSettings {
                url: self.llm_url.filter(|s| !s.is_empty()),
                api_key: self.llm_key.filter(|s| !s.is_empty()),
                model: self.llm_model.filter(|s| !s.is_empty()),
                provider: self.llm_provider.unwrap_or(d.llm.provider),
                timeout_secs: self.llm_timeout_secs.unwrap_or(d.llm.timeout_secs),
                max_retries: self.llm_max_retries.unwrap_or(d.llm.max_retries),
                max_tokens: self.llm_max_tokens.unwrap_or(d.llm.max_tokens),
            },
            generate: GenerateSettings {
                max_rounds: self.generate_max_rounds.unwrap_or(d.generate.max_rounds),
                require_approval: self
                    .generate_require_approval
                    .unwrap_or(d.generate.require_approval),
                keep_failed_branch: self
                    .generate_keep_failed_branch
                    .unwrap_or(d.generate.keep_failed_branch),
                property_runs: self.property_runs.unwrap_or(d.generate.property_runs),
            },
            posterity: PosteritySettings {
                enabled: self.posterity.unwrap_or(d.posterity.enabled),
                flush_secs: self.posterity_flush_secs.unwrap_or(d.posterity.flush_secs),
                queue: self.posterity_queue.unwrap_or(d.posterity.queue),
                batch_rows: self.posterity_batch_rows.unwrap_or(d.posterity.batch_rows),
                archive_after_days: self
                    .archive_after_days
                    .unwrap_or(d.posterity.archive_after_days),
                archive_interval_secs: self
                    .archive_interval_secs
                    .unwrap_or(d.posterity.archive_interval_secs),
            },
            replication: match self.replicate_url {
                None => None,
                Some(url) => Some(ReplicationSettings {
                    url,
                    endpoint: self.replicate_endpoint,
                    region: self.replicate_region,
                    access_key_id: self.replicate_access_key_id,
                    secret_access_key: self.replicate_secret_access_key,
                    sync_interval_secs: self.replicate_sync_interval_secs.unwrap_or(1.0),
                    snapshot_interval_secs: self
                        .replicate_snapshot_interval_secs
                        .unwrap_or(86_400.0),
                    retention_secs: self.replicate_retention_secs.unwrap_or(259_200.0),
                    checkpoint_pages: self.replicate_checkpoint_pages.unwrap_or(1000),
                    timeout_secs: self.replicate_timeout_secs.unwrap_or(30.0),
                    compaction_interval_secs: self
                        .replicate_compaction_interval_secs
                        .unwrap_or(300.0),
                    encryption_key: match self.replicate_encryption_key {
                        None => None,
                        Some(k) => Some(parse_key(&k)?),
                    },
                }),
            },
            sections: Default::default(),
        };
        if !(cfg.llm.timeout_secs > 0.0 && cfg.llm.timeout_secs.is_finite())
            || cfg.llm.max_tokens == 0
            || cfg.generate.max_rounds == 0
            || cfg.generate.property_runs == 0
        {
            bail!(
                "llm_timeout_secs, llm_max_tokens, generate_max_rounds and property_runs must be positive"
            );
        }
        let p = &cfg.posterity;
        if !(p.flush_secs > 0.0 && p.flush_secs.is_finite())
            || p.queue == 0
            || p.batch_rows == 0
            || !(p.archive_interval_secs >= 0.0 && p.archive_interval_secs.is_finite())
        {
            bail!(
                "posterity_flush_secs, posterity_queue and posterity_batch_rows must be positive, archive_interval_secs non-negative"
            );
        }
        if let Some(r) = &cfg.replication {
            let pos = |v: f64| v > 0.0 && v.is_finite();
            if !(pos(r.sync_interval_secs)
                && pos(r.snapshot_interval_secs)
                && pos(r.retention_secs)
                && pos(r.timeout_secs)
                && pos(r.compaction_interval_secs))
                || r.checkpoint_pages == 0
            {
                bail!(
                    "replicate_sync_interval_secs, replicate_snapshot_interval_secs, replicate_retention_secs, replicate_timeout_secs, replicate_compaction_interval_secs and replicate_checkpoint_pages must be positive"
                );
            }
        }
        if cfg.ws.queue == 0
            || !(cfg.ws.heartbeat_secs > 0.0 && cfg.ws.heartbeat_secs.is_finite())
            || cfg.ws.cdc_retention < 1
        {
            bail!("ws_queue, ws_heartbeat_secs and cdc_retention must be positive");
        }
        if cfg.lua.instruction_limit == 0
            || cfg.lua.memory_limit < 1024 * 1024
            || !(cfg.lua.timeout_secs > 0.0 && cfg.lua.timeout_secs.is_finite())
        {
            bail!(
                "lua_instruction_limit must be positive, lua_memory_limit at least 1 MiB, lua_timeout_secs a positive number"
            );
        }
        if let Some(key) = &cfg.auth.admin_key {
            if !key.starts_with("ik_") {
                bail!("admin_key (ICHIBASE_ADMIN_KEY) must start with 'ik_'. {KEY_ADVICE}");
            }
            if let Some(why) = key_weakness(key) {
                bail!("admin_key (ICHIBASE_ADMIN_KEY) is too easy to guess: {why}. {KEY_ADVICE}");
            }
        }
        if cfg.auth.admin_email.is_some() != cfg.auth.admin_password.is_some() {
            bail!("admin_email and admin_password go together");
        }
        if cfg.auth.access_token_ttl_secs == 0 || cfg.auth.session_ttl_secs == 0 {
            bail!("access_token_ttl_secs and session_ttl_secs must be positive");
        }
        if cfg.readers == 0 {
            bail!("readers must be at least 1");
        }
        if !(cfg.limits.max_execution_time >= 0.0 && cfg.limits.max_execution_time.is_finite()) {
            bail!("max_execution_time must be a non-negative number of seconds");
        }
        if !(cfg.shutdown_grace_secs >= 0.0 && cfg.shutdown_grace_secs.is_finite()) {
            bail!("shutdown_grace_secs must be a non-negative number of seconds");
        }
        if cfg.limits.max_body_size == 0 || cfg.limits.max_query_size == 0 {
            bail!("max_body_size and max_query_size must be positive");
        }
        Ok(cfg)
    }
}

/// How to make a good key, for error messages.
pub const KEY_ADVICE: &str = "Use 'ik_' followed by 32 random bytes, e.g. `echo ik_$(openssl rand -hex 32)`, or leave it unset: on a fresh data directory the server creates and prints one";

/// Why a configured API key is too guessable, if it is: at least ~100 bits estimated (length ×
/// the lesser of the bits per character of its alphabet and of its actual letter frequencies),
/// no runs of 4 repeated or consecutive characters. Keys the server makes (`ik_` + 43 random
/// base64url characters) have about 200. Used for `ICHIBASE_ADMIN_KEY` at start.
pub fn key_weakness(key: &str) -> Option<String> {
    let body = key.strip_prefix("ik_").unwrap_or(key);
    let chars: Vec<char> = body.chars().collect();
    if chars.len() < 21 {
        return Some(format!(
            "it is {} characters after 'ik_'; use at least 21 random ones",
            chars.len()
        ));
    }
    for period in 1..=chars.len() / 2 {
        if chars.len() % period == 0 && chars.chunks(period).all(|c| c == &chars[..period]) {
            let unit: String = chars[..period].iter().collect();
            return Some(format!("it repeats '{unit}'"));
        }
    }
    for w in chars.windows(4) {
        let d: Vec<i64> = w.windows(2).map(|p| p[1] as i64 - p[0] as i64).collect();
        if d.iter().all(|&x| x == 0) {
            return Some(format!(
                "it repeats a character ('{}')",
                w.iter().collect::<String>()
            ));
        }
        if d.iter().all(|&x| x == 1) || d.iter().all(|&x| x == -1) {
            return Some(format!(
                "it has a run of consecutive characters ('{}')",
                w.iter().collect::<String>()
            ));
        }
    }
    let mut alphabet = 0u32;
    let has = |f: fn(&char) -> bool| chars.iter().any(f);
    for (present, size) in [
        (has(|c| c.is_ascii_lowercase()), 26),
        (has(|c| c.is_ascii_uppercase()), 26),
        (has(|c| c.is_ascii_digit()), 10),
        (has(|c| !c.is_ascii_alphanumeric()), 16),
    ] {
        if present {
            alphabet += size;
        }
    }
    let mut freq = std::collections::HashMap::new();
    for c in &chars {
        *freq.entry(*c).or_insert(0usize) += 1;
    }
    let n = chars.len() as f64;
    let shannon: f64 = freq
        .values()
        .map(|&k| {
            let p = k as f64 / n;
            -p * p.log2()
        })
        .sum();
    let bits = n * shannon.min(f64::from(alphabet).log2());
    if bits < 100.0 {
        return Some(format!(
            "it has about {bits:.0} bits of entropy; at least 100 are needed"
        ));
    }
    None
}

/// A 32-byte key written as 64 hex digits.
fn parse_key(k: &str) -> anyhow::Result<[u8; 32]> {
    let k = k.trim();
    if k.len() != 64 || !k.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!(
            "replicate_encryption_key must be 64 hex digits (32 bytes), e.g. from `openssl rand -hex 32`"
        );
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&k[2 * i..2 * i + 2], 16)?;
    }
    Ok(out)
}

/// Resolve the layers: `flags_and_env` (from clap) over the TOML file over defaults.
/// An explicit `config_file` must exist; otherwise `./ichibase.toml` is read when present.
pub fn load(flags_and_env: Settings, config_file: Option<&Path>) -> anyhow::Result<Config> {
    let (file_layer, mut sections) = match config_file {
        Some(p) => Settings::from_toml_file_with_sections(p)?,
        None => {
            let p = Path::new("ichibase.toml");
            if p.exists() {
                Settings::from_toml_file_with_sections(p)?
            } else {
                Default::default()
            }
        }
    };
    apply_section_env(&mut sections, std::env::vars())?;
    let mut cfg = flags_and_env.or(file_layer).resolve()?;
    cfg.sections = sections;
    Ok(cfg)
}

/// Module sections by name.
pub type Sections = std::collections::BTreeMap<String, toml::Table>;

/// `ICHIBASE_<SECTION>__<KEY>=value` sets `key` of `[section]`; the value is read as a TOML
/// value (`30`, `true`, `1.5`, `["a"]`) and otherwise taken as a string.
fn apply_section_env(
    sections: &mut Sections,
    vars: impl Iterator<Item = (String, String)>,
) -> anyhow::Result<()> {
    for (k, v) in vars {
        let Some(rest) = k.strip_prefix("ICHIBASE_") else { continue };
        let Some((sec, key)) = rest.split_once("__") else { continue };
        let sec = sec.to_ascii_lowercase();
        if !SECTIONS.contains(&sec.as_str()) {
            bail!("{k}: there is no [{sec}] section (sections: {})", SECTIONS.join(", "));
        }
        let value = toml::from_str::<toml::Table>(&format!("v = {v}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(v));
        sections
            .entry(sec)
            .or_default()
            .insert(key.to_ascii_lowercase(), value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Demo {
        max_connections: u32,
        name: String,
    }

    #[test]
    fn guessable_keys() {
        for k in ["ik_aaaaaaaaaaaaaaaaaaaaa", "ik_test-admin-key-0123456789abcdef", "ik_xyzxyzxyzxyzxyzxyzxyzxyz", "ik_short"] {
            assert!(key_weakness(k).is_some(), "{k}");
        }
        let made = format!("ik_{}", crate::auth::secrets::random_token(32));
        assert_eq!(key_weakness(&made), None, "{made}");
    }

    #[test]
    fn module_sections_from_file_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ichibase.toml");
        std::fs::write(&p, "readers = 3\n[http]\nmax_connections = 5\nname = \"a\"\n").unwrap();
        let (settings, mut sections) = Settings::from_toml_file_with_sections(&p).unwrap();
        assert_eq!(settings.readers, Some(3));
        apply_section_env(
            &mut sections,
            [("ICHIBASE_HTTP__MAX_CONNECTIONS".to_string(), "7".to_string())].into_iter(),
        )
        .unwrap();
        let mut cfg = Config::default();
        cfg.sections = sections;
        let d: Demo = cfg.section("http").unwrap();
        assert_eq!(d, Demo { max_connections: 7, name: "a".into() });
        let d: Demo = cfg.section("traces").unwrap();
        assert_eq!(d, Demo::default());
        assert!(apply_section_env(&mut Sections::new(), [("ICHIBASE_NOPE__X".to_string(), "1".to_string())].into_iter()).is_err());
        std::fs::write(&p, "[http]\nmax_conections = 5\n").unwrap();
        let (_, sections) = Settings::from_toml_file_with_sections(&p).unwrap();
        cfg.sections = sections;
        let err = format!("{:#}", cfg.section::<Demo>("http").unwrap_err());
        assert!(err.contains("[http]") && err.contains("max_conections"), "{err}");
    }

    #[test]
    fn layers_apply_in_order() {
        let file: Settings =
            toml::from_str("listen = \"127.0.0.1:9000\"\nreaders = 3\nmax_result_rows = 5\n")
                .unwrap();
        let flags = Settings {
            readers: Some(7),
            ..Default::default()
        };
        let cfg = flags.or(file).resolve().unwrap();
        assert_eq!(cfg.readers, 7, "flag beats file");
        assert_eq!(cfg.listen.port(), 9000, "file beats default");
        assert_eq!(cfg.limits.max_result_rows, 5);
        assert_eq!(cfg.synchronous, Synchronous::Normal, "default when unset");
    }

    #[test]
    fn unknown_toml_keys_are_rejected() {
        let err = toml::from_str::<Settings>("lisen = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("lisen"), "{err}");
    }

    #[test]
    fn invalid_values_are_rejected() {
        assert!(
            Settings {
                readers: Some(0),
                ..Default::default()
            }
            .resolve()
            .is_err()
        );
        assert!(
            Settings {
                max_execution_time: Some(-1.0),
                ..Default::default()
            }
            .resolve()
            .is_err()
        );
    }
}
