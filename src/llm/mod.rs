//! A provider-neutral language-model client: OpenAI-compatible chat completions (OpenAI,
//! OpenRouter, Ollama, vLLM, llama.cpp servers) and Anthropic's messages API.
//!
//! Owns the HTTP exchange with the provider: request shapes, the time-out of a call, retries with
//! exponential back-off (honouring `Retry-After`) on connection errors, 408, 409, 429 and 5xx, and
//! the token usage each answer reports. Must not know what the text is for: prompts and the
//! parsing of answers belong to `generate`.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value as Json, json};

use crate::config::{LlmProvider, LlmSettings};
use crate::core::{Error, ErrorCode, Result};

/// Who said a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Speaker {
    User,
    Assistant,
}

#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub role: Speaker,
    pub content: String,
}

impl Message {
    pub fn user(text: impl Into<String>) -> Self {
        Message {
            role: Speaker::User,
            content: text.into(),
        }
    }
    pub fn assistant(text: impl Into<String>) -> Self {
        Message {
            role: Speaker::Assistant,
            content: text.into(),
        }
    }
}

/// Tokens one call used, as the provider reported them.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// One answer.
#[derive(Debug, Clone, Serialize)]
pub struct Reply {
    pub text: String,
    pub usage: Usage,
    /// The model that answered (as the provider names it).
    pub model: String,
    /// The answer stopped at the token limit.
    pub truncated: bool,
    /// HTTP attempts it took (1 = no retry).
    pub attempts: u32,
    pub elapsed_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    OpenAi,
    Anthropic,
}

/// A configured provider. Cheap to clone.
#[derive(Clone)]
pub struct LlmClient {
    http: reqwest::Client,
    endpoint: String,
    key: Option<String>,
    model: String,
    wire: Wire,
    max_retries: u32,
    max_tokens: u32,
}

fn unavailable(msg: impl Into<String>) -> Error {
    Error::new(ErrorCode::LlmUnavailable, msg)
}

impl LlmClient {
    /// The client for `s`, or `LLM_NOT_CONFIGURED` naming what is missing.
    pub fn from_settings(s: &LlmSettings) -> Result<LlmClient> {
        let (Some(url), Some(model)) = (&s.url, &s.model) else {
            return Err(Error::new(
                ErrorCode::LlmNotConfigured,
                "No language model is configured: set ICHIBASE_LLM_URL (e.g. https://api.openai.com/v1), ICHIBASE_LLM_KEY and ICHIBASE_LLM_MODEL",
            ));
        };
        let base = url.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::new(
                ErrorCode::BadArguments,
                format!("llm_url must start with http:// or https://, got '{url}'"),
            ));
        }
        let wire = match s.provider {
            LlmProvider::Openai => Wire::OpenAi,
            LlmProvider::Anthropic => Wire::Anthropic,
            LlmProvider::Auto if base.contains("anthropic.com") => Wire::Anthropic,
            LlmProvider::Auto => Wire::OpenAi,
        };
        let endpoint = match wire {
            Wire::OpenAi if base.ends_with("/chat/completions") => base.to_string(),
            Wire::OpenAi => format!("{base}/chat/completions"),
            Wire::Anthropic if base.ends_with("/messages") => base.to_string(),
            Wire::Anthropic => format!("{base}/messages"),
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs_f64(s.timeout_secs))
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("ichibase/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::internal(format!("building the HTTP client: {e}")))?;
        Ok(LlmClient {
            http,
            endpoint,
            key: s.api_key.clone(),
            model: model.clone(),
            wire,
            max_retries: s.max_retries,
            max_tokens: s.max_tokens,
        })
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Ask the model: `system` instructions and the conversation so far.
    pub async fn chat(&self, system: &str, messages: &[Message]) -> Result<Reply> {
        let started = Instant::now();
        let mut completion_tokens_field = false;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let body = self.body(system, messages, completion_tokens_field);
            let mut req = self.http.post(&self.endpoint).json(&body);
            match self.wire {
                Wire::OpenAi => {
                    if let Some(k) = &self.key {
                        req = req.bearer_auth(k);
                    }
                }
                Wire::Anthropic => {
                    req = req.header("anthropic-version", "2023-06-01");
                    if let Some(k) = &self.key {
                        req = req.header("x-api-key", k);
                    }
                }
            }
            let (retryable, err, wait) = match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let retry_after = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<f64>().ok())
                        .map(|s| Duration::from_secs_f64(s.clamp(0.0, 60.0)));
                    let text = resp.text().await.unwrap_or_default();
                    if status.is_success() {
                        let parsed: Json = serde_json::from_str(&text).map_err(|e| {
                            unavailable(format!(
                                "the model provider answered with invalid JSON ({e}): {}",
                                clip(&text, 300)
                            ))
                        })?;
                        let mut reply = self.parse(&parsed)?;
                        reply.attempts = attempt;
                        reply.elapsed_ms = started.elapsed().as_millis() as u64;
                        return Ok(reply);
                    }
                    // Newer OpenAI models refuse `max_tokens` and want `max_completion_tokens`.
                    if status.as_u16() == 400
                        && self.wire == Wire::OpenAi
                        && !completion_tokens_field
                        && text.contains("max_completion_tokens")
                    {
                        completion_tokens_field = true;
                        attempt -= 1;
                        continue;
                    }
                    let code = status.as_u16();
                    let retryable = matches!(code, 408 | 409 | 429) || code >= 500;
                    (
                        retryable,
                        unavailable(format!(
                            "the model provider answered HTTP {code}: {}",
                            clip(&text, 500)
                        )),
                        retry_after,
                    )
                }
                Err(e) => {
                    let what = if e.is_timeout() {
                        "timed out".to_string()
                    } else if e.is_connect() {
                        format!("could not connect ({e})")
                    } else {
                        format!("failed ({e})")
                    };
                    (
                        true,
                        unavailable(format!("the call to {} {what}", self.endpoint)),
                        None,
                    )
                }
            };
            if !retryable || attempt > self.max_retries {
                let mut err = err;
                if attempt > 1 {
                    err.message = format!("{} (after {attempt} attempts)", err.message);
                }
                return Err(err);
            }
            let backoff = Duration::from_millis(500u64.saturating_mul(1 << (attempt - 1).min(6)));
            let r = crate::auth::secrets::random_bytes(2);
            let jitter = Duration::from_millis(u64::from(u16::from_le_bytes([r[0], r[1]])) % 250);
            let wait = wait
                .unwrap_or(backoff + jitter)
                .min(Duration::from_secs(60));
            tracing::warn!(attempt, wait_ms = wait.as_millis() as u64, error = %err.message, "model call failed; retrying");
            tokio::time::sleep(wait).await;
        }
    }

    fn body(&self, system: &str, messages: &[Message], completion_tokens_field: bool) -> Json {
        match self.wire {
            Wire::OpenAi => {
                let mut msgs = vec![json!({"role": "system", "content": system})];
                msgs.extend(
                    messages
                        .iter()
                        .map(|m| json!({"role": m.role, "content": m.content})),
                );
                let tokens_field = if completion_tokens_field {
                    "max_completion_tokens"
                } else {
                    "max_tokens"
                };
                json!({"model": self.model, "messages": msgs, tokens_field: self.max_tokens})
            }
            Wire::Anthropic => json!({
                "model": self.model,
                "max_tokens": self.max_tokens,
                "system": system,
                "messages": messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect::<Vec<_>>(),
            }),
        }
    }

    fn parse(&self, v: &Json) -> Result<Reply> {
        let num = |p: &str| v.pointer(p).and_then(Json::as_u64).unwrap_or(0);
        let model = v
            .get("model")
            .and_then(Json::as_str)
            .unwrap_or(&self.model)
            .to_string();
        match self.wire {
            Wire::OpenAi => {
                let choice = v.pointer("/choices/0").ok_or_else(|| {
                    unavailable(format!(
                        "the model's answer has no choices: {}",
                        clip(&v.to_string(), 300)
                    ))
                })?;
                let text = choice
                    .pointer("/message/content")
                    .and_then(Json::as_str)
                    .unwrap_or("")
                    .to_string();
                Ok(Reply {
                    text,
                    usage: Usage {
                        input_tokens: num("/usage/prompt_tokens"),
                        output_tokens: num("/usage/completion_tokens"),
                    },
                    model,
                    truncated: choice.get("finish_reason").and_then(Json::as_str) == Some("length"),
                    attempts: 0,
                    elapsed_ms: 0,
                })
            }
            Wire::Anthropic => {
                let blocks = v.get("content").and_then(Json::as_array).ok_or_else(|| {
                    unavailable(format!(
                        "the model's answer has no content: {}",
                        clip(&v.to_string(), 300)
                    ))
                })?;
                let text = blocks
                    .iter()
                    .filter(|b| b.get("type").and_then(Json::as_str) == Some("text"))
                    .filter_map(|b| b.get("text").and_then(Json::as_str))
                    .collect::<Vec<_>>()
                    .join("");
                Ok(Reply {
                    text,
                    usage: Usage {
                        input_tokens: num("/usage/input_tokens"),
                        output_tokens: num("/usage/output_tokens"),
                    },
                    model,
                    truncated: v.get("stop_reason").and_then(Json::as_str) == Some("max_tokens"),
                    attempts: 0,
                    elapsed_ms: 0,
                })
            }
        }
    }
}

/// At most `n` characters of `s`, marked when cut.
pub fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(n).collect();
        out.push('…');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str, provider: LlmProvider) -> LlmSettings {
        LlmSettings {
            url: Some(url.into()),
            model: Some("m".into()),
            provider,
            ..Default::default()
        }
    }

    #[test]
    fn endpoints_follow_the_provider() {
        let c =
            LlmClient::from_settings(&settings("https://api.openai.com/v1/", LlmProvider::Auto))
                .unwrap();
        assert_eq!(c.endpoint(), "https://api.openai.com/v1/chat/completions");
        let c =
            LlmClient::from_settings(&settings("https://api.anthropic.com/v1", LlmProvider::Auto))
                .unwrap();
        assert_eq!(c.endpoint(), "https://api.anthropic.com/v1/messages");
        let c = LlmClient::from_settings(&settings(
            "http://127.0.0.1:11434/v1/chat/completions",
            LlmProvider::Openai,
        ))
        .unwrap();
        assert_eq!(c.endpoint(), "http://127.0.0.1:11434/v1/chat/completions");
        let e = LlmClient::from_settings(&LlmSettings::default())
            .err()
            .unwrap();
        assert_eq!(e.code, ErrorCode::LlmNotConfigured);
        assert!(e.message.contains("ICHIBASE_LLM_URL"));
    }
}
