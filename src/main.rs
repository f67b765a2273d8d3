//! The `ichibase` command line: `serve`, `version`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
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
    },
    /// Print the version.
    Version,
}

fn init_logging(filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("ichibase {} (SQLite {})", ichibase::VERSION, rusqlite::version());
            Ok(())
        }
        Command::Serve { settings } => {
            let cfg = config::load(settings, cli.config.as_deref())?;
            init_logging(&cfg.log_level, cfg.log_format);
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(ichibase::server::run(cfg))
        }
    }
}
