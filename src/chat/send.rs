//! Delivery of `chat` outbox rows: the notify sender claims a row and calls [`ChatSender`]
//! (registered as notify's `ExternalChannel`); the answer says sent, retry (network, 429,
//! 5xx) or fail (any other refusal). Claims, back-off, dead-lettering and the in-doubt
//! recovery are the outbox's.
//!
//! Owns the outbound message shape ([`Outgoing`]) and the per-provider dispatch.

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::log_event;
use crate::app::App;
use crate::notify::outbox::{Claimed, Delivery};

/// Buttons per row (Discord's action rows hold five).
pub const ROW: usize = 5;

/// A chat message as queued in the outbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outgoing {
    pub provider: String,
    pub chat_id: String,
    pub text: String,
    #[serde(default)]
    pub buttons: Vec<Button>,
    #[serde(default)]
    pub reply_to: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Button {
    pub text: String,
    pub data: String,
}

pub struct ChatSender;

impl crate::notify::ChannelSender for ChatSender {
    fn deliver<'a>(&'a self, app: &'a App, m: &'a Claimed) -> Pin<Box<dyn Future<Output = Delivery> + Send + 'a>> {
        Box::pin(deliver(app, m))
    }
}

async fn deliver(app: &App, m: &Claimed) -> Delivery {
    let o: Outgoing = match serde_json::from_str(&m.payload) {
        Ok(o) => o,
        Err(e) => return Delivery::Fail(format!("unreadable chat message: {e}"), None),
    };
    if app.get::<super::Chat>().is_none() {
        return Delivery::Retry("the chat module is not running".into(), None);
    }
    let buttons: Vec<(String, String)> = o.buttons.iter().map(|b| (b.text.clone(), b.data.clone())).collect();
    let t = Instant::now();
    let r = match o.provider.as_str() {
        "telegram" => super::telegram::send(app, &super::telegram::send_body(&o.chat_id, &o.text, &buttons, o.reply_to.as_deref())).await,
        "slack" => super::slack::send(app, &super::slack::send_body(&o.chat_id, &o.text, &buttons, o.reply_to.as_deref())).await,
        "discord" => super::discord::send(app, &o.chat_id, &super::discord::send_body(&o.text, &buttons, o.reply_to.as_deref())).await,
        other => Err((false, format!("unknown chat provider {other:?}"))),
    };
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let detail = |peer: Option<&serde_json::Value>| {
        json!({"outbox_id": m.id, "attempt": m.attempts, "chat_id": o.chat_id,
               "text": o.text.chars().take(2000).collect::<String>(), "buttons": o.buttons.len(),
               "reply_to": o.reply_to, "peer": peer})
    };
    match r {
        Ok(peer) => {
            log_event(app, m.owner.as_deref(), m.trace_id.as_deref(), &o.provider, "sent", ms, None, detail(Some(&peer)));
            Delivery::Sent(peer)
        }
        Err((retry, e)) => {
            log_event(app, m.owner.as_deref(), m.trace_id.as_deref(), &o.provider, if retry { "send_retry" } else { "send_failed" }, ms, Some(&e), detail(None));
            if retry { Delivery::Retry(e, None) } else { Delivery::Fail(e, None) }
        }
    }
}
