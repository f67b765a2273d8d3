//! `ichibase ai replay ID [--model M]` and `ichibase ai eval FILE [--model M]...`: thin
//! clients of a running server's `/ai` routes (the generation log is the server's DuckDB file,
//! locked while it runs), authenticated with an admin key.

use std::path::PathBuf;

use serde_json::Value as Json;

#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// The running server
    #[arg(long, env = "ICHIBASE_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// An admin API key
    #[arg(long, env = "ICHIBASE_ADMIN_KEY", hide_env_values = true)]
    pub key: String,
}

#[derive(clap::Subcommand, Debug)]
pub enum AiCommand {
    /// Send a logged generation's request again, to its model or another; prints both answers.
    Replay {
        /// Generation id (gen-...)
        id: String,
        /// Model name in [ai.models] (default: the one originally asked for)
        #[arg(long)]
        model: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Run an eval file (JSON: {"models": [...], "cases": [{"name", "prompt" | "generation",
    /// "system", "schema", "checks": [{"exact"|"contains"|"json_schema"|"lua": ...}]}]})
    /// and print pass rate, cost and latency per model.
    Eval {
        file: PathBuf,
        /// Models to compare (overrides the file's "models"; repeat the flag)
        #[arg(long = "model")]
        models: Vec<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
}

async fn post(s: &ServerArgs, path: &str, body: &Json) -> anyhow::Result<Json> {
    let r = reqwest::Client::new()
        .post(format!("{}{path}", s.url.trim_end_matches('/')))
        .bearer_auth(&s.key)
        .json(body)
        .send()
        .await?;
    let status = r.status();
    let v: Json = r.json().await?;
    if !status.is_success() {
        anyhow::bail!("{} answered {status}: {}", s.url, v["error"]["message"].as_str().unwrap_or(&v.to_string()));
    }
    Ok(v)
}

/// The eval summary as a text table.
pub fn table(summary: &Json) -> String {
    let mut out = format!("{:<20} {:>6} {:>7} {:>10} {:>12} {:>14}\n", "model", "cases", "passed", "pass rate", "cost ($)", "p50 latency ms");
    for r in summary.as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<20} {:>6} {:>7} {:>9.1}% {:>12.6} {:>14.1}\n",
            r["model"].as_str().unwrap_or(""),
            r["cases"].as_u64().unwrap_or(0),
            r["passed"].as_u64().unwrap_or(0),
            r["pass_rate"].as_f64().unwrap_or(0.0) * 100.0,
            r["cost"].as_f64().unwrap_or(0.0),
            r["p50_latency_ms"].as_f64().unwrap_or(0.0),
        ));
    }
    out
}

pub fn run(cmd: AiCommand) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        match cmd {
            AiCommand::Replay { id, model, server } => {
                let v = post(&server, &format!("/ai/generations/{id}/replay"), &serde_json::json!({"model": model})).await?;
                println!("original  {} (${}): {}", v["original"]["model"].as_str().unwrap_or("?"), v["original"]["cost"], v["original"]["text"].as_str().unwrap_or(""));
                println!("replay    {} (${}, {:.0} ms, {}): {}", v["model"].as_str().unwrap_or("?"), v["cost"], v["latency_ms"].as_f64().unwrap_or(0.0), v["id"].as_str().unwrap_or(""), v["text"].as_str().unwrap_or(""));
                Ok(())
            }
            AiCommand::Eval { file, models, server } => {
                let text = std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
                let mut body: Json = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{} is not JSON: {e}", file.display()))?;
                if !models.is_empty() {
                    body["models"] = serde_json::json!(models);
                }
                let v = post(&server, "/ai/eval", &body).await?;
                for r in v["results"].as_array().into_iter().flatten() {
                    if r["passed"] != true {
                        println!("FAIL {} on {} ({}): {}", r["case"].as_str().unwrap_or(""), r["model"].as_str().unwrap_or(""), r["id"].as_str().unwrap_or(""),
                            r["failures"].as_array().into_iter().flatten().filter_map(Json::as_str).collect::<Vec<_>>().join("; "));
                    }
                }
                print!("{}", table(&v["summary"]));
                Ok(())
            }
        }
    })
}
