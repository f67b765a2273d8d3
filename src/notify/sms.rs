//! SMS through a Twilio-style `Messages` resource: `POST {sms_url}/Accounts/{sid}/Messages.json`
//! with the form fields `To`, `From`, `Body`, HTTP Basic auth `sid:token`, answered `201` with
//! the message's JSON (`sid`, `status`). Every request carries
//! `Idempotency-Key: ichibase-notify-{id}`: a provider that honours it drops the resend of a
//! message that was in flight at a crash.
//!
//! Owns the SMS request; must not touch the outbox table.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

use super::Notify;
use super::outbox::{Claimed, Delivery};
use crate::core::{Error, ErrorCode, Result};

/// An SMS as queued.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sms {
    pub to: String,
    pub body: String,
}

/// Check an SMS before it is queued: an E.164 number and a body of at most 1600 characters
/// (the longest concatenated SMS providers take).
pub fn validate(s: &Sms) -> Result<()> {
    let digits = s.to.strip_prefix('+').unwrap_or("");
    if digits.len() < 6 || digits.len() > 15 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::new(
            ErrorCode::BadArguments,
            format!("notify.sms: to = {:?} is not an E.164 number (+ and 6 to 15 digits)", s.to),
        ));
    }
    let n = s.body.chars().count();
    if n == 0 || n > 1600 {
        return Err(Error::new(
            ErrorCode::BadArguments,
            format!("notify.sms: the body has {n} characters; 1 to 1600 are allowed"),
        ));
    }
    Ok(())
}

pub async fn deliver(n: &Notify, m: &Claimed) -> Delivery {
    let s = &n.settings;
    let sms: Sms = match serde_json::from_str(&m.payload) {
        Ok(x) => x,
        Err(e) => return Delivery::Fail(format!("unreadable message: {e}"), None),
    };
    if s.sms_account_sid.is_empty() {
        return Delivery::Retry("no SMS provider is configured ([notify] sms_account_sid)".into(), None);
    }
    let url = format!(
        "{}/Accounts/{}/Messages.json",
        s.sms_url.trim_end_matches('/'),
        s.sms_account_sid
    );
    let resp = n
        .http
        .post(&url)
        .timeout(Duration::from_secs_f64(s.sms_timeout_secs))
        .basic_auth(&s.sms_account_sid, Some(&s.sms_auth_token))
        .header("Idempotency-Key", format!("ichibase-notify-{}", m.id))
        .form(&[("To", sms.to.as_str()), ("From", s.sms_from.as_str()), ("Body", sms.body.as_str())])
        .send()
        .await;
    let resp = match resp {
        Ok(r) => r,
        Err(e) => return Delivery::Retry(format!("SMS API: {e}"), None),
    };
    let code = resp.status().as_u16();
    let body: Json = resp.json().await.unwrap_or(Json::Null);
    let why = || {
        body.get("message")
            .and_then(|m| m.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| body.to_string().chars().take(300).collect())
    };
    match code {
        200..=299 => Delivery::Sent(json!({"sid": body.get("sid"), "status": body.get("status")})),
        429 | 500..=599 => Delivery::Retry(format!("SMS API answered {code}: {}", why()), None),
        _ => Delivery::Fail(format!("SMS API answered {code}: {}", why()), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_must_be_e164_and_bodies_bounded() {
        let ok = Sms { to: "+15551234567".into(), body: "hi".into() };
        assert!(validate(&ok).is_ok());
        for to in ["5551234567", "+1", "+1555abc4567", "+1234567890123456"] {
            assert!(validate(&Sms { to: to.into(), ..ok.clone() }).is_err(), "{to}");
        }
        assert!(validate(&Sms { body: String::new(), ..ok.clone() }).is_err());
        assert!(validate(&Sms { body: "あ".repeat(1601), ..ok }).is_err());
    }
}
