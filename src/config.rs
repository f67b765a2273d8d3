//! Configuration: CLI flags > `ICHIBASE_*` environment variables > `ichibase.toml` > defaults.
//!
//! clap resolves the first two layers (every flag declares its env var); this module reads the
//! TOML file and fills what is still unset, then applies the defaults. It owns the [`Config`]
//! struct that the rest of the engine reads; it must not open files other than the TOML file.
//!
//! Each flat setting is declared once, in the `settings!` table below (flag, env var, TOML key,
//! default, help text, check, and the [`Config`] field it fills). A component's own settings go
//! in its own section instead (see [`SECTIONS`]).

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
    /// HTTPS: the PEM certificate chain and private key (both or neither; `auth::tls`).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
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
    /// Where the inbound-email SMTP listener binds (`--smtp-listen`); `None`: `[email_in] listen`.
    pub smtp_listen: Option<SocketAddr>,
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

/// Every section name: the core's [`SECTIONS`] and those registered modules declare
/// ([`crate::modules::Module::section`]).
pub fn all_sections() -> Vec<&'static str> {
    SECTIONS.iter().copied().chain(crate::modules::sections()).collect()
}

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
    /// DuckDB's WAL size (MB) past which the log is checkpointed into its table.
    pub checkpoint_mb: u64,
    /// Complete days older than this go to the Parquet archive.
    pub archive_after_days: u32,
    /// Seconds between scheduled archive runs (0: only on demand).
    pub archive_interval_secs: f64,
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

/// Limits of the Lua sandbox.
#[derive(Debug, Clone)]
pub struct LuaSettings {
    pub instruction_limit: u64,
    pub cpu_limit_secs: f64,
    pub memory_limit: usize,
    pub timeout_secs: f64,
    pub max_trace_steps: usize,
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

impl Config {
    /// A module's settings section: the `[name]` table of the config file with its environment
    /// overrides, over the struct's defaults. Unknown keys and wrong types are errors naming the
    /// section.
    pub fn section<T: serde::de::DeserializeOwned + Default>(&self, name: &str) -> anyhow::Result<T> {
        debug_assert!(all_sections().contains(&name), "section {name} is not registered");
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

/// Declares every flat setting once. An entry reads
///
/// ```text
/// /// Help text (also the flag's --help line; "[default: X]" is appended from the default)
/// name: Type ["ICHIBASE_ENV", extra clap args] => config_field = default, shown "text",
///     map fn(Option<Type>) -> Result<..>, valid fn(&value) -> Result<()>;
/// ```
///
/// `name` is the TOML key and, with `-` for `_`, the flag. Without `= default` the resolved
/// value stays an `Option`. `shown` replaces the default in the help text, `map` converts the
/// optional value before the default applies, `valid` checks the resolved value. Entries sit in
/// the [`Config`] struct they fill: a `{ ... }` block of top-level fields, then a `group: Type`
/// struct; the last group is optional and exists when its `when` setting is set.
///
/// From this the macro generates the [`Settings`] layer (clap flags + env, serde TOML keys),
/// [`Settings::or`], the defaults ([`Config::default`] and each group's `Default`), the
/// resolution with validation, and [`SETTINGS`] (names and env vars, for checks).
macro_rules! settings {
    (
        $(
            { $( $(#[doc = $rdoc:literal])* $rname:ident : $rty:ty [$renv:literal $(, $($rarg:tt)*)?]
                 => $rfield:ident $(= $rdef:expr)? $(, shown $rshown:literal)? $(, map $rmap:expr)? $(, valid $rvalid:expr)? ; )* }
            $group:ident : $gty:ident {
                $( $(#[doc = $gdoc:literal])* $gname:ident : $gtyp:ty [$genv:literal $(, $($garg:tt)*)?]
                   => $gfield:ident $(= $gdef:expr)? $(, shown $gshown:literal)? $(, map $gmap:expr)? $(, valid $gvalid:expr)? ; )*
            }
        )*
        $ogroup:ident : Option<$oty:ident> when $okey:ident {
            $( $(#[doc = $odoc:literal])* $oname:ident : $otyp:ty [$oenv:literal $(, $($oarg:tt)*)?]
               => $ofield:ident $(= $odef:expr)? $(, shown $oshown:literal)? $(, map $omap:expr)? $(, valid $ovalid:expr)? ; )*
        }
    ) => {
        /// Every setting, optional: one layer of configuration (flags+env from clap, or the TOML
        /// file). Generated from the `settings!` table.
        #[derive(Debug, Clone, Default, Deserialize, clap::Args)]
        #[serde(deny_unknown_fields)]
        pub struct Settings {
            $(
                $( $(#[doc = $rdoc])*
                   #[arg(long, env = $renv, help = help_text(&[$($rdoc),*], shown!($rty: $(default $rdef)? $(; shown $rshown)?)) $(, $($rarg)*)?)]
                   pub $rname: Option<$rty>, )*
                $( $(#[doc = $gdoc])*
                   #[arg(long, env = $genv, help = help_text(&[$($gdoc),*], shown!($gtyp: $(default $gdef)? $(; shown $gshown)?)) $(, $($garg)*)?)]
                   pub $gname: Option<$gtyp>, )*
            )*
            $( $(#[doc = $odoc])*
               #[arg(long, env = $oenv, help = help_text(&[$($odoc),*], shown!($otyp: $(default $odef)? $(; shown $oshown)?)) $(, $($oarg)*)?)]
               pub $oname: Option<$otyp>, )*
        }

        /// Every setting's TOML key and environment variable, in declaration (and `--help`) order.
        pub const SETTINGS: &[(&str, &str)] = &[
            $( $( (stringify!($rname), $renv), )* $( (stringify!($gname), $genv), )* )*
            $( (stringify!($oname), $oenv), )*
        ];

        impl Settings {
            /// Fill every unset field of `self` from `lower`.
            pub fn or(self, lower: Settings) -> Settings {
                Settings {
                    $( $( $rname: self.$rname.or(lower.$rname), )* $( $gname: self.$gname.or(lower.$gname), )* )*
                    $( $oname: self.$oname.or(lower.$oname), )*
                }
            }

            /// Apply the defaults and each setting's own check.
            fn resolve_each(self) -> anyhow::Result<Config> {
                let s = self;
                let $ogroup = if s.$okey.is_some() {
                    Some($oty {
                        $( $ofield: resolve!(s.$oname $(, map $omap)? $(, default $odef)? $(, valid $ovalid)?), )*
                    })
                } else {
                    None
                };
                Ok(Config {
                    $(
                        $( $rfield: resolve!(s.$rname $(, map $rmap)? $(, default $rdef)? $(, valid $rvalid)?), )*
                        $group: $gty {
                            $( $gfield: resolve!(s.$gname $(, map $gmap)? $(, default $gdef)? $(, valid $gvalid)?), )*
                        },
                    )*
                    $ogroup,
                    sections: Default::default(),
                })
            }
        }

        impl Default for Config {
            fn default() -> Self {
                Config {
                    $( $( $rfield: default!($($rdef)?), )* $group: $gty::default(), )*
                    $ogroup: None,
                    sections: Default::default(),
                }
            }
        }

        $(
            impl Default for $gty {
                fn default() -> Self {
                    $gty { $( $gfield: default!($($gdef)?), )* }
                }
            }
        )*
    };
}

/// One setting's resolved value: the layered `Option`, mapped, defaulted, checked.
macro_rules! resolve {
    ($v:expr $(, map $map:expr)? $(, default $def:expr)? $(, valid $valid:expr)?) => {{
        let v = $v;
        $( let v = ($map)(v)?; )?
        $( let v = v.unwrap_or_else(|| $def); )?
        $( ($valid)(&v)?; )?
        v
    }};
}

/// A setting's default: its declared value, or `None` for settings without one.
macro_rules! default {
    ($def:expr) => {
        $def
    };
    () => {
        None
    };
}

/// The default as the help text shows it.
macro_rules! shown {
    ($t:ty : $(default $def:expr)? ; shown $shown:literal) => {
        Some(String::from($shown))
    };
    ($t:ty : default $def:expr) => {
        Some(ShowDefault::show(&{
            let d: $t = $def;
            d
        }))
    };
    ($t:ty :) => {
        None
    };
}

const LLM_POSITIVE: &str =
    "llm_timeout_secs, llm_max_tokens, generate_max_rounds and property_runs must be positive";
const POSTERITY_POSITIVE: &str = "posterity_flush_secs, posterity_queue, posterity_batch_rows and posterity_checkpoint_mb must be positive, archive_interval_secs non-negative";
const REPLICATE_POSITIVE: &str = "replicate_sync_interval_secs, replicate_snapshot_interval_secs, replicate_retention_secs, replicate_timeout_secs, replicate_compaction_interval_secs and replicate_checkpoint_pages must be positive";
const WS_POSITIVE: &str = "ws_queue, ws_heartbeat_secs and cdc_retention must be positive";
const LUA_LIMITS: &str = "lua_memory_limit must be at least 1 MiB, lua_timeout_secs and lua_cpu_limit_secs positive numbers";
const TTL_POSITIVE: &str = "access_token_ttl_secs and session_ttl_secs must be positive";
const SIZES_POSITIVE: &str = "max_body_size and max_query_size must be positive";

settings! {
    {
        /// Address to listen on
        listen: SocketAddr ["ICHIBASE_LISTEN", value_name = "ADDR:PORT"] => listen = "127.0.0.1:8080".parse().unwrap();
        /// Data directory, created on first start
        data_dir: PathBuf ["ICHIBASE_DATA_DIR", value_name = "DIR"] => data_dir = PathBuf::from("./ichibase-data");
        /// SQLite synchronous mode
        synchronous: Synchronous ["ICHIBASE_SYNCHRONOUS", value_enum] => synchronous = Synchronous::Normal;
        /// SQLite busy timeout in milliseconds
        busy_timeout_ms: u64 ["ICHIBASE_BUSY_TIMEOUT_MS"] => busy_timeout_ms = 5_000;
        /// Number of pooled read-only connections
        readers: usize ["ICHIBASE_READERS"] => readers = default_readers(), shown "2 x cores, at least 4",
            valid positive("readers must be at least 1");
        /// Serve HTTPS with this PEM certificate chain (leaf first; with --tls-key)
        tls_cert: PathBuf ["ICHIBASE_TLS_CERT", value_name = "FILE"] => tls_cert;
        /// The PEM private key of --tls-cert
        tls_key: PathBuf ["ICHIBASE_TLS_KEY", value_name = "FILE"] => tls_key;
    }
    limits: Limits {
        /// Largest request body in bytes
        max_body_size: usize ["ICHIBASE_MAX_BODY_SIZE"] => max_body_size = 64 * 1024 * 1024, valid positive(SIZES_POSITIVE);
        /// Largest SQL text in bytes
        max_query_size: usize ["ICHIBASE_MAX_QUERY_SIZE"] => max_query_size = 1024 * 1024, valid positive(SIZES_POSITIVE);
        /// Most rows in one result, 0 = unlimited
        max_result_rows: u64 ["ICHIBASE_MAX_RESULT_ROWS"] => max_result_rows = 10_000_000;
        /// Most bytes in one result, 0 = unlimited
        max_result_bytes: u64 ["ICHIBASE_MAX_RESULT_BYTES"] => max_result_bytes = 4 * 1024 * 1024 * 1024;
        /// Longest a query may run in seconds, 0 = unlimited
        max_execution_time: f64 ["ICHIBASE_MAX_EXECUTION_TIME"] => max_execution_time = 30.0,
            valid non_negative("max_execution_time must be a non-negative number of seconds");
    }
    {
        /// Bytes of output buffered before a response starts streaming
        http_buffer_size: usize ["ICHIBASE_HTTP_BUFFER_SIZE"] => http_buffer_size = 1024 * 1024;
        /// Quote 64-bit integers in JSON output, as ClickHouse does
        json_quote_64bit_integers: bool ["ICHIBASE_JSON_QUOTE_64BIT_INTEGERS"] => json_quote_64bit_integers = true;
        /// Seconds shutdown waits for in-flight requests
        shutdown_grace_secs: f64 ["ICHIBASE_SHUTDOWN_GRACE_SECS"] => shutdown_grace_secs = 30.0,
            valid non_negative("shutdown_grace_secs must be a non-negative number of seconds");
        /// Log format
        log_format: LogFormat ["ICHIBASE_LOG_FORMAT", value_enum] => log_format = LogFormat::Text;
        /// Log filter, e.g. `info` or `ichibase=debug`
        log_level: String ["ICHIBASE_LOG", value_name = "FILTER"] => log_level = "info".into();
        /// Address the SMTP listener for inbound email binds, e.g. 0.0.0.0:25 (also `[email_in] listen`)
        smtp_listen: SocketAddr ["ICHIBASE_SMTP_LISTEN", value_name = "ADDR:PORT"] => smtp_listen, shown "off";
    }
    auth: AuthSettings {
        /// Let anyone sign up with POST /auth/signup
        signup_open: bool ["ICHIBASE_SIGNUP_OPEN"] => signup_open = false;
        /// Lifetime of access tokens (JWT) in seconds
        access_token_ttl_secs: u64 ["ICHIBASE_ACCESS_TOKEN_TTL_SECS"] => access_token_ttl_secs = 15 * 60, valid positive(TTL_POSITIVE);
        /// Lifetime of sessions / refresh tokens in seconds
        session_ttl_secs: u64 ["ICHIBASE_SESSION_TTL_SECS"] => session_ttl_secs = 30 * 24 * 3600, valid positive(TTL_POSITIVE);
        /// Mark the session cookie Secure (serve behind HTTPS)
        cookie_secure: bool ["ICHIBASE_COOKIE_SECURE"] => cookie_secure = false;
        /// An API key with the admin role, created at start if missing ('ik_' + random characters, at least ~100 bits: no repeats or runs)
        admin_key: String ["ICHIBASE_ADMIN_KEY", hide_env_values = true] => admin_key, valid admin_key_ok;
        /// Email of an admin user created at start if missing (with --admin-password)
        admin_email: String ["ICHIBASE_ADMIN_EMAIL"] => admin_email;
        /// Password of that admin user
        admin_password: String ["ICHIBASE_ADMIN_PASSWORD", hide_env_values = true] => admin_password;
    }
    {}
    lua: LuaSettings {
        /// Lua: VM instructions one invocation may run; 0 = no instruction budget (a budget is deterministic but counting costs about 2x CPU)
        lua_instruction_limit: u64 ["ICHIBASE_LUA_INSTRUCTION_LIMIT"] => instruction_limit = 0;
        /// Lua: seconds of CPU time one invocation may use
        lua_cpu_limit_secs: f64 ["ICHIBASE_LUA_CPU_LIMIT_SECS"] => cpu_limit_secs = 5.0, valid positive(LUA_LIMITS);
        /// Lua: bytes of memory one invocation may hold
        lua_memory_limit: usize ["ICHIBASE_LUA_MEMORY_LIMIT"] => memory_limit = 64 * 1024 * 1024, valid at_least(1024 * 1024, LUA_LIMITS);
        /// Lua: seconds one invocation may run
        lua_timeout_secs: f64 ["ICHIBASE_LUA_TIMEOUT_SECS"] => timeout_secs = 10.0, valid positive(LUA_LIMITS);
        /// Lua: most steps recorded in one trace
        lua_max_trace_steps: usize ["ICHIBASE_LUA_MAX_TRACE_STEPS"] => max_trace_steps = 100_000;
    }
    {}
    ws: WsSettings {
        /// WebSocket: frames queued per connection before a slow client is cut off
        ws_queue: usize ["ICHIBASE_WS_QUEUE"] => queue = 1024, valid positive(WS_POSITIVE);
        /// WebSocket: seconds between server pings; 2x without a frame closes
        ws_heartbeat_secs: f64 ["ICHIBASE_WS_HEARTBEAT_SECS"] => heartbeat_secs = 30.0, valid positive(WS_POSITIVE);
        /// WebSocket: largest client frame in bytes
        ws_max_message: usize ["ICHIBASE_WS_MAX_MESSAGE"] => max_message = 1024 * 1024;
        /// Change capture: changes kept for reconnecting clients
        cdc_retention: i64 ["ICHIBASE_CDC_RETENTION"] => cdc_retention = 10_000, valid positive(WS_POSITIVE);
    }
    {}
    llm: LlmSettings {
        /// LLM: base URL of the provider, e.g. https://api.openai.com/v1
        llm_url: String ["ICHIBASE_LLM_URL", value_name = "URL"] => url, map non_empty;
        /// LLM: API key (sent as Bearer, or x-api-key for Anthropic)
        llm_key: String ["ICHIBASE_LLM_KEY", hide_env_values = true] => api_key, map non_empty;
        /// LLM: model name, e.g. gpt-4.1 or claude-sonnet-4-5
        llm_model: String ["ICHIBASE_LLM_MODEL"] => model, map non_empty;
        /// LLM: wire protocol
        llm_provider: LlmProvider ["ICHIBASE_LLM_PROVIDER", value_enum] => provider = LlmProvider::Auto;
        /// LLM: seconds one model call may take
        llm_timeout_secs: f64 ["ICHIBASE_LLM_TIMEOUT_SECS"] => timeout_secs = 180.0, valid positive(LLM_POSITIVE);
        /// LLM: retries of a failed call, with back-off
        llm_max_retries: u32 ["ICHIBASE_LLM_MAX_RETRIES"] => max_retries = 3;
        /// LLM: most tokens in one answer
        llm_max_tokens: u32 ["ICHIBASE_LLM_MAX_TOKENS"] => max_tokens = 8192, valid positive(LLM_POSITIVE);
    }
    {}
    generate: GenerateSettings {
        /// Generate: model answers tried before giving up
        generate_max_rounds: u32 ["ICHIBASE_GENERATE_MAX_ROUNDS"] => max_rounds = 4, valid positive(LLM_POSITIVE);
        /// Generate: wait for an admin's approval instead of merging a verified bundle
        generate_require_approval: bool ["ICHIBASE_GENERATE_REQUIRE_APPROVAL"] => require_approval = false;
        /// Generate: keep the branch of the last failed generation for inspection
        generate_keep_failed_branch: bool ["ICHIBASE_GENERATE_KEEP_FAILED_BRANCH"] => keep_failed_branch = false;
        /// Property checks: cases tried unless a check says otherwise
        property_runs: u32 ["ICHIBASE_PROPERTY_RUNS"] => property_runs = 100, valid positive(LLM_POSITIVE);
    }
    {}
    posterity: PosteritySettings {
        /// Posterity: log requests, statements and Lua invocations to DuckDB
        posterity: bool ["ICHIBASE_POSTERITY"] => enabled = true;
        /// Posterity: seconds between commits of the log (a crash loses at most this)
        posterity_flush_secs: f64 ["ICHIBASE_POSTERITY_FLUSH_SECS"] => flush_secs = 1.0, valid positive(POSTERITY_POSITIVE);
        /// Posterity: events queued before new ones are dropped and counted
        posterity_queue: usize ["ICHIBASE_POSTERITY_QUEUE"] => queue = 65_536, valid positive(POSTERITY_POSITIVE);
        /// Posterity: rows that trigger a commit before the interval is over
        posterity_batch_rows: usize ["ICHIBASE_POSTERITY_BATCH_ROWS"] => batch_rows = 50_000, valid positive(POSTERITY_POSITIVE);
        /// Posterity: DuckDB's WAL size in MB past which the log is checkpointed (compressed into its table)
        posterity_checkpoint_mb: u64 ["ICHIBASE_POSTERITY_CHECKPOINT_MB"] => checkpoint_mb = 64, valid positive(POSTERITY_POSITIVE);
        /// Archive: complete days older than this many days go to Parquet
        archive_after_days: u32 ["ICHIBASE_ARCHIVE_AFTER_DAYS"] => archive_after_days = 7;
        /// Archive: seconds between scheduled runs, 0 = only on demand
        archive_interval_secs: f64 ["ICHIBASE_ARCHIVE_INTERVAL_SECS"] => archive_interval_secs = 3600.0,
            valid non_negative(POSTERITY_POSITIVE);
    }
    replication: Option<ReplicationSettings> when replicate_url {
        /// Replicate the database continuously to `s3://BUCKET/PREFIX` or `file:///DIR`
        // Never defaulted: the section exists only when this is set.
        replicate_url: String ["ICHIBASE_REPLICATE_URL", value_name = "URL"] => url = String::new(), shown "off";
        /// S3 endpoint for S3-compatible servers, e.g. http://127.0.0.1:9000
        replicate_endpoint: String ["ICHIBASE_REPLICATE_ENDPOINT", value_name = "URL"] => endpoint, shown "AWS";
        /// S3 region
        replicate_region: String ["ICHIBASE_REPLICATE_REGION"] => region, shown "us-east-1 or AWS_REGION";
        /// S3 access key id
        replicate_access_key_id: String ["ICHIBASE_REPLICATE_ACCESS_KEY_ID", hide_env_values = true] => access_key_id,
            shown "AWS_ACCESS_KEY_ID";
        /// S3 secret access key
        replicate_secret_access_key: String ["ICHIBASE_REPLICATE_SECRET_ACCESS_KEY", hide_env_values = true]
            => secret_access_key, shown "AWS_SECRET_ACCESS_KEY";
        /// Seconds within which a commit is shipped
        replicate_sync_interval_secs: f64 ["ICHIBASE_REPLICATE_SYNC_INTERVAL_SECS"] => sync_interval_secs = 1.0,
            valid positive(REPLICATE_POSITIVE);
        /// Seconds between full snapshots
        replicate_snapshot_interval_secs: f64 ["ICHIBASE_REPLICATE_SNAPSHOT_INTERVAL_SECS"] => snapshot_interval_secs = 86_400.0,
            valid positive(REPLICATE_POSITIVE);
        /// Seconds of history kept in the replica (older snapshots and changes are pruned)
        replicate_retention_secs: f64 ["ICHIBASE_REPLICATE_RETENTION_SECS"] => retention_secs = 259_200.0,
            valid positive(REPLICATE_POSITIVE);
        /// WAL pages after which the replicator checkpoints (once they are captured)
        replicate_checkpoint_pages: u64 ["ICHIBASE_REPLICATE_CHECKPOINT_PAGES"] => checkpoint_pages = 1000,
            valid positive(REPLICATE_POSITIVE);
        /// Seconds between compactions of change files into one level-1 file
        replicate_compaction_interval_secs: f64 ["ICHIBASE_REPLICATE_COMPACTION_INTERVAL_SECS"] => compaction_interval_secs = 300.0,
            valid positive(REPLICATE_POSITIVE);
        /// Timeout of one request to the replica target, seconds
        replicate_timeout_secs: f64 ["ICHIBASE_REPLICATE_TIMEOUT_SECS"] => timeout_secs = 30.0,
            valid positive(REPLICATE_POSITIVE);
        /// Encrypt replica objects with AES-256-GCM under this key (64 hex digits)
        replicate_encryption_key: String ["ICHIBASE_REPLICATE_ENCRYPTION_KEY", hide_env_values = true]
            => encryption_key, shown "off", map |k: Option<String>| k.as_deref().map(parse_key).transpose();
    }
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
        for name in all_sections() {
            match table.remove(name) {
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

    /// Apply defaults and validate.
    pub fn resolve(self) -> anyhow::Result<Config> {
        let cfg = self.resolve_each()?;
        if cfg.auth.admin_email.is_some() != cfg.auth.admin_password.is_some() {
            bail!("admin_email and admin_password go together");
        }
        Ok(cfg)
    }
}

fn default_readers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() * 2)
        .unwrap_or(4)
        .max(4)
}

/// A setting's help line: its doc comment and, when it has one, `[default: ...]`.
fn help_text(doc: &[&str], default: Option<String>) -> String {
    let text = doc.iter().map(|l| l.trim()).collect::<Vec<_>>().join(" ");
    match default {
        Some(d) => format!("{text} [default: {d}]"),
        None => text,
    }
}

/// How a default value reads in `--help`.
trait ShowDefault {
    fn show(&self) -> String;
}

macro_rules! show_display {
    ($($t:ty),*) => { $( impl ShowDefault for $t { fn show(&self) -> String { self.to_string() } } )* };
}
show_display!(u32, u64, usize, i64, f64, bool, String, SocketAddr);

impl ShowDefault for PathBuf {
    fn show(&self) -> String {
        self.display().to_string()
    }
}

macro_rules! show_value_enum {
    ($($t:ty),*) => { $( impl ShowDefault for $t {
        fn show(&self) -> String {
            clap::ValueEnum::to_possible_value(self).map(|v| v.get_name().to_string()).unwrap_or_default()
        }
    } )* };
}
show_value_enum!(Synchronous, LogFormat, LlmProvider);

/// Numbers a setting can require to be positive (floats also finite).
trait Positive {
    fn is_positive(&self) -> bool;
}

macro_rules! positive_int {
    ($($t:ty),*) => { $( impl Positive for $t { fn is_positive(&self) -> bool { *self > 0 } } )* };
}
positive_int!(u32, u64, usize, i64);

impl Positive for f64 {
    fn is_positive(&self) -> bool {
        *self > 0.0 && self.is_finite()
    }
}

fn positive<T: Positive>(msg: &'static str) -> impl Fn(&T) -> anyhow::Result<()> {
    move |v| {
        if v.is_positive() {
            Ok(())
        } else {
            bail!("{msg}")
        }
    }
}

fn non_negative(msg: &'static str) -> impl Fn(&f64) -> anyhow::Result<()> {
    move |v| {
        if *v >= 0.0 && v.is_finite() {
            Ok(())
        } else {
            bail!("{msg}")
        }
    }
}

fn at_least(min: usize, msg: &'static str) -> impl Fn(&usize) -> anyhow::Result<()> {
    move |v| if *v >= min { Ok(()) } else { bail!("{msg}") }
}

/// Empty strings count as unset.
fn non_empty(v: Option<String>) -> anyhow::Result<Option<String>> {
    Ok(v.filter(|s| !s.is_empty()))
}

fn admin_key_ok(key: &Option<String>) -> anyhow::Result<()> {
    if let Some(key) = key {
        if !key.starts_with("ik_") {
            bail!("admin_key (ICHIBASE_ADMIN_KEY) must start with 'ik_'. {KEY_ADVICE}");
        }
        if let Some(why) = key_weakness(key) {
            bail!("admin_key (ICHIBASE_ADMIN_KEY) is too easy to guess: {why}. {KEY_ADVICE}");
        }
    }
    Ok(())
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
        let known = all_sections();
        if !known.contains(&sec.as_str()) {
            bail!("{k}: there is no [{sec}] section (sections: {})", known.join(", "));
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

    #[test]
    fn defaults_are_the_documented_ones() {
        let d = Config::default();
        assert_eq!(d.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(d.data_dir, PathBuf::from("./ichibase-data"));
        assert_eq!(
            (d.synchronous, d.busy_timeout_ms),
            (Synchronous::Normal, 5_000)
        );
        assert!(d.readers >= 4);
        assert_eq!(
            d.limits,
            Limits {
                max_body_size: 64 << 20,
                max_query_size: 1 << 20,
                max_result_rows: 10_000_000,
                max_result_bytes: 4 << 30,
                max_execution_time: 30.0,
            }
        );
        assert_eq!(
            (
                d.http_buffer_size,
                d.json_quote_64bit_integers,
                d.shutdown_grace_secs
            ),
            (1 << 20, true, 30.0)
        );
        assert_eq!(
            (d.log_format, d.log_level.as_str()),
            (LogFormat::Text, "info")
        );
        let a = &d.auth;
        assert_eq!(
            (
                a.signup_open,
                a.access_token_ttl_secs,
                a.session_ttl_secs,
                a.cookie_secure
            ),
            (false, 900, 2_592_000, false)
        );
        assert!(a.admin_key.is_none() && a.admin_email.is_none() && a.admin_password.is_none());
        let l = &d.lua;
        assert_eq!(
            (
                l.instruction_limit,
                l.cpu_limit_secs,
                l.memory_limit,
                l.timeout_secs,
                l.max_trace_steps
            ),
            (0, 5.0, 64 << 20, 10.0, 100_000)
        );
        let w = &d.ws;
        assert_eq!(
            (w.queue, w.heartbeat_secs, w.max_message, w.cdc_retention),
            (1024, 30.0, 1 << 20, 10_000)
        );
        let m = &d.llm;
        assert!(m.url.is_none() && m.api_key.is_none() && m.model.is_none());
        assert_eq!(
            (m.provider, m.timeout_secs, m.max_retries, m.max_tokens),
            (LlmProvider::Auto, 180.0, 3, 8192)
        );
        let g = &d.generate;
        assert_eq!(
            (
                g.max_rounds,
                g.require_approval,
                g.keep_failed_branch,
                g.property_runs
            ),
            (4, false, false, 100)
        );
        let p = &d.posterity;
        assert_eq!(
            (
                p.enabled,
                p.flush_secs,
                p.queue,
                p.batch_rows,
                p.checkpoint_mb,
                p.archive_after_days,
                p.archive_interval_secs
            ),
            (true, 1.0, 65_536, 50_000, 64, 7, 3600.0)
        );
        assert!(d.replication.is_none() && d.sections.is_empty());
        assert_eq!(
            format!("{d:?}"),
            format!("{:?}", Settings::default().resolve().unwrap())
        );
        assert_eq!(
            format!("{:?}", LuaSettings::default()),
            format!("{:?}", d.lua)
        );
        // The replication section exists once its URL is set, with its own defaults.
        let r = Settings {
            replicate_url: Some("file:///tmp/r".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap()
        .replication
        .unwrap();
        assert_eq!(r.url, "file:///tmp/r");
        assert_eq!(
            (
                r.sync_interval_secs,
                r.snapshot_interval_secs,
                r.retention_secs,
                r.checkpoint_pages
            ),
            (1.0, 86_400.0, 259_200.0, 1000)
        );
        assert_eq!((r.compaction_interval_secs, r.timeout_secs), (300.0, 30.0));
        assert!(r.endpoint.is_none() && r.region.is_none() && r.encryption_key.is_none());
    }

    #[test]
    fn every_setting_has_a_flag_env_var_and_help() {
        let cmd = <Settings as clap::Args>::augment_args(clap::Command::new("t"));
        let args: Vec<_> = cmd.get_arguments().collect();
        assert_eq!(args.len(), SETTINGS.len());
        let mut envs = std::collections::HashSet::new();
        for ((name, env), arg) in SETTINGS.iter().zip(&args) {
            assert_eq!(arg.get_long(), Some(name.replace('_', "-").as_str()));
            let expected_env = match *name {
                "log_level" => "ICHIBASE_LOG".to_string(),
                n => format!("ICHIBASE_{}", n.to_ascii_uppercase()),
            };
            assert_eq!(*env, expected_env);
            assert_eq!(arg.get_env().and_then(|e| e.to_str()), Some(*env));
            assert!(envs.insert(*env), "{env} twice");
            assert!(
                !arg.get_help().unwrap().to_string().is_empty(),
                "{name} has no help"
            );
        }
        let help = |name: &str| {
            let i = SETTINGS.iter().position(|(n, _)| *n == name).unwrap();
            args[i].get_help().unwrap().to_string()
        };
        assert_eq!(
            help("max_result_bytes"),
            "Most bytes in one result, 0 = unlimited [default: 4294967296]"
        );
        assert_eq!(
            help("synchronous"),
            "SQLite synchronous mode [default: normal]"
        );
        assert_eq!(
            help("max_execution_time"),
            "Longest a query may run in seconds, 0 = unlimited [default: 30]"
        );
        assert_eq!(
            help("readers"),
            "Number of pooled read-only connections [default: 2 x cores, at least 4]"
        );
        assert_eq!(
            help("llm_url"),
            "LLM: base URL of the provider, e.g. https://api.openai.com/v1"
        );
        assert_eq!(
            help("replicate_encryption_key"),
            "Encrypt replica objects with AES-256-GCM under this key (64 hex digits) [default: off]"
        );
    }

    #[test]
    fn readme_lists_every_setting() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        let section = &readme[readme.find("## Configuration").unwrap()..];
        for (name, env) in SETTINGS {
            let flag = format!("`--{}`", name.replace('_', "-"));
            assert!(
                section.contains(&flag),
                "README's configuration table misses {flag}"
            );
            assert!(
                section.contains(&format!("`{env}`")),
                "README's configuration table misses {env}"
            );
        }
    }

    #[test]
    fn each_check_keeps_its_message() {
        let cases: Vec<(Settings, &str)> = vec![
            (
                Settings {
                    llm_max_tokens: Some(0),
                    ..Default::default()
                },
                LLM_POSITIVE,
            ),
            (
                Settings {
                    property_runs: Some(0),
                    ..Default::default()
                },
                LLM_POSITIVE,
            ),
            (
                Settings {
                    llm_timeout_secs: Some(f64::INFINITY),
                    ..Default::default()
                },
                LLM_POSITIVE,
            ),
            (
                Settings {
                    posterity_queue: Some(0),
                    ..Default::default()
                },
                POSTERITY_POSITIVE,
            ),
            (
                Settings {
                    archive_interval_secs: Some(-1.0),
                    ..Default::default()
                },
                POSTERITY_POSITIVE,
            ),
            (
                Settings {
                    ws_queue: Some(0),
                    ..Default::default()
                },
                WS_POSITIVE,
            ),
            (
                Settings {
                    cdc_retention: Some(0),
                    ..Default::default()
                },
                WS_POSITIVE,
            ),
            (
                Settings {
                    lua_memory_limit: Some(1000),
                    ..Default::default()
                },
                LUA_LIMITS,
            ),
            (
                Settings {
                    lua_timeout_secs: Some(0.0),
                    ..Default::default()
                },
                LUA_LIMITS,
            ),
            (
                Settings {
                    session_ttl_secs: Some(0),
                    ..Default::default()
                },
                TTL_POSITIVE,
            ),
            (
                Settings {
                    max_query_size: Some(0),
                    ..Default::default()
                },
                SIZES_POSITIVE,
            ),
            (
                Settings {
                    readers: Some(0),
                    ..Default::default()
                },
                "readers must be at least 1",
            ),
            (
                Settings {
                    shutdown_grace_secs: Some(-1.0),
                    ..Default::default()
                },
                "shutdown_grace_secs must be",
            ),
            (
                Settings {
                    admin_key: Some("nope".into()),
                    ..Default::default()
                },
                "must start with 'ik_'",
            ),
            (
                Settings {
                    admin_key: Some("ik_short".into()),
                    ..Default::default()
                },
                "too easy to guess",
            ),
            (
                Settings {
                    admin_email: Some("a@b.c".into()),
                    ..Default::default()
                },
                "admin_email and admin_password go together",
            ),
            (
                Settings {
                    replicate_url: Some("file:///r".into()),
                    replicate_checkpoint_pages: Some(0),
                    ..Default::default()
                },
                REPLICATE_POSITIVE,
            ),
            (
                Settings {
                    replicate_url: Some("file:///r".into()),
                    replicate_encryption_key: Some("abc".into()),
                    ..Default::default()
                },
                "replicate_encryption_key must be 64 hex digits",
            ),
        ];
        for (s, msg) in cases {
            let err = format!("{:#}", s.clone().resolve().unwrap_err());
            assert!(err.contains(msg), "{s:?}: {err}");
        }
        // Replication settings are only checked when replication is on, as before.
        let cfg = Settings {
            replicate_sync_interval_secs: Some(-1.0),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert!(cfg.replication.is_none());
        // Empty LLM strings count as unset; a good key is accepted.
        let cfg = Settings {
            llm_url: Some(String::new()),
            llm_model: Some("m".into()),
            replicate_url: Some("file:///r".into()),
            replicate_encryption_key: Some("ab".repeat(32)),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!((cfg.llm.url, cfg.llm.model.as_deref()), (None, Some("m")));
        assert_eq!(cfg.replication.unwrap().encryption_key, Some([0xab; 32]));
    }

    #[test]
    fn toml_keys_are_the_setting_names() {
        for (name, _) in SETTINGS {
            // A known key with a value of the wrong type: a type error, not an unknown field.
            let err = toml::from_str::<Settings>(&format!("{name} = [[]]"))
                .unwrap_err()
                .to_string();
            assert!(!err.contains("unknown field"), "{name}: {err}");
        }
        let err = toml::from_str::<Settings>("nope = [[]]")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown field") && err.contains("nope"),
            "{err}"
        );
        let s: Settings =
            toml::from_str("ws_queue = 5\nllm_provider = \"anthropic\"\nposterity = false\n")
                .unwrap();
        let cfg = s.resolve().unwrap();
        assert_eq!(
            (cfg.ws.queue, cfg.llm.provider, cfg.posterity.enabled),
            (5, LlmProvider::Anthropic, false)
        );
    }
}
