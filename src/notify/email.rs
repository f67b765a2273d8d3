//! Email over SMTP (lettre): plain text, HTML (given, or rendered from Markdown), attachments,
//! reply-to; plain SMTP for local servers, STARTTLS or TLS for relays (`[notify] smtp_url`).
//!
//! Every message carries `Message-ID: <{outbox id}@{from domain}>`, so a resend after a crash
//! (the one case the outbox may send twice) has the same id as the first copy.
//!
//! Owns building and sending mail; must not touch the outbox table (the sender records outcomes).

use std::time::Duration;

use base64::Engine as _;
use lettre::message::header::ContentType;
use lettre::message::{Attachment, Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::PoolConfig;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::outbox::{Claimed, Delivery};
use super::{Notify, NotifySettings};
use crate::core::{Error, ErrorCode, Result};

/// The configured relay and sender.
pub struct Smtp {
    /// Always `Some` until dropped (see the `Drop` impl).
    transport: Option<AsyncSmtpTransport<Tokio1Executor>>,
    pub from: Mailbox,
}

/// lettre's connection pool spawns a task on the Tokio runtime when it is dropped, and panics
/// without one. The last handle to the app can be dropped where no runtime is current (a
/// pooled Lua state in a blocking thread's thread-local storage, at process exit); a panic in
/// a thread-local destructor aborts the process. Drop the pool inside a throwaway runtime then.
impl Drop for Smtp {
    fn drop(&mut self) {
        let Some(t) = self.transport.take() else { return };
        if tokio::runtime::Handle::try_current().is_ok() {
            drop(t);
        } else if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
            let _guard = rt.enter();
            drop(t);
        } else {
            std::mem::forget(t);
        }
    }
}

impl Smtp {
    /// `None` when no `smtp_url` is set.
    pub fn new(s: &NotifySettings) -> anyhow::Result<Option<Smtp>> {
        if s.smtp_url.is_empty() {
            return Ok(None);
        }
        anyhow::ensure!(!s.from.is_empty(), "[notify] smtp_url is set but from is empty");
        let from: Mailbox = s
            .from
            .parse()
            .map_err(|e| anyhow::anyhow!("[notify] from = {:?}: {e}", s.from))?;
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::from_url(&s.smtp_url)
            .map_err(|e| anyhow::anyhow!("[notify] smtp_url: {e}"))?;
        if !s.smtp_ca_file.is_empty() {
            builder = builder.tls(tls_with_ca(&s.smtp_url, &s.smtp_ca_file)?);
        }
        let transport = builder
            .timeout(Some(Duration::from_secs_f64(s.smtp_timeout_secs)))
            .pool_config(PoolConfig::new().max_size(s.concurrency.max(1)))
            .build();
        Ok(Some(Smtp { transport: Some(transport), from }))
    }
}

/// The TLS mode `url` asks for, trusting the certificates of `ca_file` besides the webpki roots.
fn tls_with_ca(url: &str, ca_file: &str) -> anyhow::Result<Tls> {
    let u = reqwest::Url::parse(url).map_err(|e| anyhow::anyhow!("[notify] smtp_url: {e}"))?;
    let host = u.host_str().unwrap_or_default().trim_matches(['[', ']']).to_string();
    let pem = std::fs::read(ca_file).map_err(|e| anyhow::anyhow!("[notify] smtp_ca_file {ca_file}: {e}"))?;
    let cert = Certificate::from_pem(&pem).map_err(|e| anyhow::anyhow!("[notify] smtp_ca_file {ca_file}: {e}"))?;
    let params = TlsParameters::builder(host)
        .add_root_certificate(cert)
        .build_rustls()
        .map_err(|e| anyhow::anyhow!("[notify] smtp TLS: {e}"))?;
    let mode = u.query_pairs().find(|(k, _)| k == "tls").map(|(_, v)| v.into_owned());
    Ok(match (u.scheme(), mode.as_deref()) {
        ("smtps", _) => Tls::Wrapper(params),
        (_, Some("required")) => Tls::Required(params),
        (_, Some("opportunistic")) => Tls::Opportunistic(params),
        _ => anyhow::bail!("[notify] smtp_ca_file is set but smtp_url asks for no TLS (use smtps:// or ?tls=required)"),
    })
}

/// One attachment as queued (content base64-encoded in the outbox row).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attached {
    pub filename: String,
    pub content_type: String,
    pub data: String,
}

/// An email as queued.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Email {
    pub to: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cc: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bcc: Vec<String>,
    pub subject: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<Attached>,
}

/// Markdown to HTML (CommonMark with tables and strikethrough); raw HTML in the source is
/// escaped, so Markdown from users cannot inject markup.
pub fn markdown_to_html(md: &str) -> String {
    use pulldown_cmark::{Event, Options, Parser, html};
    let opts = Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH;
    let events = Parser::new_ext(md, opts).map(|e| match e {
        Event::Html(h) | Event::InlineHtml(h) => Event::Text(h),
        e => e,
    });
    let mut out = String::with_capacity(md.len() * 2);
    html::push_html(&mut out, events);
    out
}

fn bad(msg: String) -> Error {
    Error::new(ErrorCode::BadArguments, msg)
}

/// Check an email before it is queued: addresses parse, a body exists, limits hold.
pub fn validate(e: &Email, s: &NotifySettings) -> Result<()> {
    if e.to.is_empty() {
        return Err(bad("notify.email: `to` needs at least one address".into()));
    }
    let n = e.to.len() + e.cc.len() + e.bcc.len();
    if n > s.max_recipients {
        return Err(bad(format!(
            "notify.email: {n} recipients, over [notify] max_recipients ({})",
            s.max_recipients
        )));
    }
    for a in e.to.iter().chain(&e.cc).chain(&e.bcc).chain(e.reply_to.iter()) {
        a.parse::<Mailbox>()
            .map_err(|err| bad(format!("notify.email: {a:?} is not an email address ({err})")))?;
    }
    if e.subject.chars().any(|c| c == '\r' || c == '\n') {
        return Err(bad("notify.email: the subject may not contain line breaks".into()));
    }
    if e.text.is_none() && e.html.is_none() {
        return Err(bad("notify.email: give text=, markdown= or html=".into()));
    }
    for a in &e.attachments {
        if a.filename.is_empty() || a.filename.chars().any(|c| c.is_control()) {
            return Err(bad(format!("notify.email: attachment filename {:?} is not valid", a.filename)));
        }
        ContentType::parse(&a.content_type).map_err(|err| {
            bad(format!("notify.email: attachment content_type {:?}: {err}", a.content_type))
        })?;
    }
    Ok(())
}

/// Build the MIME message of outbox message `id`.
pub fn build(e: &Email, from: &Mailbox, id: &str) -> std::result::Result<Message, String> {
    let parse = |a: &String| a.parse::<Mailbox>().map_err(|err| format!("{a:?}: {err}"));
    let mut b = Message::builder()
        .from(from.clone())
        .subject(e.subject.clone())
        .message_id(Some(format!("<{id}@{}>", from.email.domain())));
    for a in &e.to {
        b = b.to(parse(a)?);
    }
    for a in &e.cc {
        b = b.cc(parse(a)?);
    }
    for a in &e.bcc {
        b = b.bcc(parse(a)?);
    }
    if let Some(r) = &e.reply_to {
        b = b.reply_to(parse(r)?);
    }
    let body = match (&e.text, &e.html) {
        (Some(t), Some(h)) => Some(MultiPart::alternative_plain_html(t.clone(), h.clone())),
        _ => None,
    };
    let single = || match (&e.text, &e.html) {
        (_, Some(h)) => SinglePart::html(h.clone()),
        (t, None) => SinglePart::plain(t.clone().unwrap_or_default()),
    };
    let m = if e.attachments.is_empty() {
        match body {
            Some(mp) => b.multipart(mp),
            None => b.singlepart(single()),
        }
    } else {
        let mut mixed = match body {
            Some(mp) => MultiPart::mixed().multipart(mp),
            None => MultiPart::mixed().singlepart(single()),
        };
        for a in &e.attachments {
            let data = base64::engine::general_purpose::STANDARD
                .decode(&a.data)
                .map_err(|err| format!("attachment {}: {err}", a.filename))?;
            let ct = ContentType::parse(&a.content_type).map_err(|err| err.to_string())?;
            mixed = mixed.singlepart(Attachment::new(a.filename.clone()).body(data, ct));
        }
        b.multipart(mixed)
    };
    m.map_err(|err| err.to_string())
}

/// Deliver one claimed email.
pub async fn deliver(n: &Notify, m: &Claimed) -> Delivery {
    let Some(smtp) = &n.smtp else {
        return Delivery::Retry("no SMTP relay is configured ([notify] smtp_url)".into(), None);
    };
    let e: Email = match serde_json::from_str(&m.payload) {
        Ok(e) => e,
        Err(err) => return Delivery::Fail(format!("unreadable message: {err}"), None),
    };
    let msg = match build(&e, &smtp.from, &m.id) {
        Ok(msg) => msg,
        Err(err) => return Delivery::Fail(err, None),
    };
    match smtp.transport.as_ref().expect("the SMTP transport lives until drop").send(msg).await {
        Ok(r) => Delivery::Sent(json!({
            "code": r.code().to_string(),
            "reply": r.message().collect::<Vec<_>>().join(" "),
        })),
        Err(err) if err.is_permanent() => Delivery::Fail(format!("SMTP: {err}"), None),
        Err(err) => Delivery::Retry(format!("SMTP: {err}"), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The last handle can go away where no Tokio runtime is current (a thread-local
    /// destructor at exit); lettre's pool would panic there and abort the process.
    #[test]
    fn the_smtp_pool_drops_without_a_runtime() {
        let s = NotifySettings {
            smtp_url: "smtp://127.0.0.1:1".into(),
            from: "app@example.com".into(),
            ..Default::default()
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let smtp = rt.block_on(async { Smtp::new(&s) }).unwrap().expect("configured");
        drop(rt);
        assert!(tokio::runtime::Handle::try_current().is_err());
        drop(smtp);
    }

    #[test]
    fn markdown_renders_and_escapes_raw_html() {
        let h = markdown_to_html("# T\n\n**b** <script>x</script>\n\n<img src=x onerror=y>");
        assert!(h.contains("<h1>T</h1>") && h.contains("<strong>b</strong>"), "{h}");
        assert!(!h.contains("<script>") && !h.contains("<img"), "{h}");
    }

    #[test]
    fn mime_has_alternative_parts_attachments_and_a_stable_message_id() {
        let e = Email {
            to: vec!["a@example.test".into()],
            bcc: vec!["hidden@example.test".into()],
            subject: "s".into(),
            text: Some("plain".into()),
            html: Some("<p>html</p>".into()),
            attachments: vec![Attached { filename: "a.txt".into(), content_type: "text/plain".into(), data: "aGk=".into() }],
            ..Default::default()
        };
        let from: Mailbox = "App <app@example.test>".parse().unwrap();
        let raw = String::from_utf8(build(&e, &from, "abc123").unwrap().formatted()).unwrap();
        assert!(raw.contains("Message-ID: <abc123@example.test>"), "{raw}");
        assert!(raw.contains("multipart/mixed") && raw.contains("multipart/alternative"), "{raw}");
        assert!(raw.contains("filename=\"a.txt\""), "{raw}");
        assert!(!raw.contains("hidden@example.test"), "Bcc is envelope only: {raw}");
    }

    #[test]
    fn validation_refuses_bad_addresses_and_header_injection() {
        let s = NotifySettings::default();
        let ok = Email { to: vec!["a@example.test".into()], subject: "s".into(), text: Some("t".into()), ..Default::default() };
        assert!(validate(&ok, &s).is_ok());
        let bad_to = Email { to: vec!["nope".into()], ..ok.clone() };
        assert!(validate(&bad_to, &s).is_err());
        let inject = Email { subject: "a\r\nBcc: x@evil.test".into(), ..ok.clone() };
        assert!(validate(&inject, &s).is_err());
        let many = Email { to: vec!["a@example.test".into(); 51], ..ok };
        assert!(validate(&many, &s).is_err());
    }
}
