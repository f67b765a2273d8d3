//! The SMTP listener (RFC 5321 receiver subset): EHLO/HELO, MAIL (with `SIZE=`), RCPT, DATA,
//! RSET, NOOP, VRFY, QUIT; PIPELINING, 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES. No STARTTLS
//! or AUTH: it receives mail for its own addresses, it relays nothing.
//!
//! Written on tokio rather than with `mailin-embedded`: that crate reads lines without a length
//! bound (one endless line grows memory until the process dies), queues connections past its
//! thread pool without a cap and has no timeouts — the limits here (connections in all and per
//! client, line length, message size, recipients, command and DATA timeouts, bad commands,
//! per-sender rate) are what an open port needs.
//!
//! A message is answered `250` only after it is stored (`store::insert_all` committed):
//! nothing a client was told is accepted can be lost. Owns the listener and its sessions.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sha2::Digest;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::{EmailIn, Policy, dkim, log_event, parse, sender_matches, store};
use crate::app::App;
use crate::core::{RequestContext, Result};
use crate::storage::ExecControl;

/// Bind the listener (when `--smtp-listen` or `[email_in] listen` is set) and accept.
pub fn start(app: &App) -> anyhow::Result<()> {
    let Some(svc) = app.get::<EmailIn>() else { return Ok(()) };
    let Some(addr) = svc.listen else { return Ok(()) };
    let std_listener = std::net::TcpListener::bind(addr)
        .map_err(|e| anyhow::anyhow!("inbound email: cannot listen on {addr} (--smtp-listen): {e}"))?;
    std_listener.set_nonblocking(true)?;
    let _rt = tokio::runtime::Handle::try_current()?;
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    let bound = listener.local_addr()?;
    *svc.bound.lock().unwrap_or_else(|e| e.into_inner()) = Some(bound);
    tracing::info!(addr = %bound, domains = ?svc.settings.accepted_domains(), "inbound email: SMTP listening");
    println!("ichibase smtp listening on {bound}");
    let app = app.clone();
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let app = app.clone();
                    tokio::spawn(async move { connection(app, stream, peer).await });
                }
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "inbound email: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(())
}

/// Counts a connection while it lives.
struct Slot {
    app: App,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(svc) = self.app.get::<EmailIn>() {
            let mut c = svc.conns.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = c.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    c.remove(&self.ip);
                }
            }
        }
    }
}

async fn connection(app: App, mut stream: TcpStream, peer: SocketAddr) {
    let svc = app.get::<EmailIn>().expect("email_in service");
    let s = &svc.settings;
    let admitted = {
        let mut c = svc.conns.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = c.values().sum();
        let mine = c.get(&peer.ip()).copied().unwrap_or(0);
        if total >= s.max_connections || mine >= s.max_connections_per_ip {
            false
        } else {
            *c.entry(peer.ip()).or_insert(0) += 1;
            true
        }
    };
    if !admitted {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            stream.write_all(b"421 4.7.0 Too many connections, try again later\r\n"),
        )
        .await;
        return;
    }
    let _slot = Slot { app: app.clone(), ip: peer.ip() };
    let _ = stream.set_nodelay(true);
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::with_capacity(16 << 10, r);
    let mut sess = Session { app: app.clone(), svc, peer, helo: None, mail_from: None, rcpts: Vec::new(), bad: 0 };
    if let Err(e) = sess.run(&mut r, &mut w).await {
        tracing::debug!(peer = %peer, error = %e, "inbound email: connection ended");
    }
    let _ = w.shutdown().await;
}

/// One accepted recipient of the current transaction.
#[derive(Debug, Clone)]
struct Rcpt {
    address: String,
    route: String,
    tag: Option<String>,
    user_id: String,
    function: String,
    /// Why it is to be quarantined (an unknown sender).
    quarantine: Option<String>,
}

struct Session<'a> {
    app: App,
    svc: &'a EmailIn,
    peer: SocketAddr,
    helo: Option<String>,
    /// The envelope sender of the open transaction (lowercase; empty for `<>`).
    mail_from: Option<String>,
    rcpts: Vec<Rcpt>,
    bad: u32,
}

/// One line read under a length cap.
enum Line {
    Text(Vec<u8>),
    TooLong,
    Eof,
}

/// Read up to and including `\n`; a line longer than `max` is read to its end and dropped.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, buf: &mut Vec<u8>, max: usize) -> std::io::Result<Line> {
    buf.clear();
    let mut too_long = false;
    loop {
        let avail = r.fill_buf().await?;
        if avail.is_empty() {
            return Ok(Line::Eof);
        }
        match avail.iter().position(|&b| b == b'\n') {
            Some(i) => {
                if !too_long && buf.len() + i < max {
                    buf.extend_from_slice(&avail[..=i]);
                } else {
                    too_long = true;
                }
                r.consume(i + 1);
                return Ok(if too_long { Line::TooLong } else { Line::Text(std::mem::take(buf)) });
            }
            None => {
                let n = avail.len();
                if !too_long && buf.len() + n < max {
                    buf.extend_from_slice(avail);
                } else {
                    too_long = true;
                    buf.clear();
                }
                r.consume(n);
            }
        }
    }
}

/// The address inside `<...>` of a MAIL/RCPT argument (source routes dropped), and the rest.
fn path_arg(arg: &str) -> Option<(String, &str)> {
    let arg = arg.trim_start();
    let (inner, rest) = if let Some(a) = arg.strip_prefix('<') {
        let end = a.find('>')?;
        (&a[..end], &a[end + 1..])
    } else {
        // Lenient: a bare address up to the first space.
        match arg.split_once(' ') {
            Some((a, rest)) => (a, rest),
            None => (arg, ""),
        }
    };
    let inner = inner.rsplit_once(':').map(|(_, a)| a).unwrap_or(inner);
    Some((inner.trim().to_lowercase(), rest))
}

fn valid_address(a: &str) -> bool {
    let Some((local, domain)) = a.rsplit_once('@') else { return false };
    !local.is_empty()
        && !domain.is_empty()
        && a.len() <= 320
        && !a.chars().any(|c| c.is_control() || c.is_whitespace() || c == '<' || c == '>' || c == ',')
}

impl Session<'_> {
    async fn reply(&self, w: &mut (impl AsyncWriteExt + Unpin), text: &str) -> std::io::Result<()> {
        w.write_all(text.as_bytes()).await?;
        w.write_all(b"\r\n").await?;
        w.flush().await
    }

    fn reset(&mut self) {
        self.mail_from = None;
        self.rcpts.clear();
    }

    async fn run(
        &mut self,
        r: &mut (impl AsyncBufRead + Unpin),
        w: &mut (impl AsyncWriteExt + Unpin),
    ) -> std::io::Result<()> {
        let svc: &EmailIn = self.svc;
        let s = &svc.settings;
        let cmd_timeout = Duration::from_secs_f64(s.command_timeout_secs);
        self.reply(w, &format!("220 {} ESMTP ichibase", s.hostname)).await?;
        let mut buf = Vec::with_capacity(512);
        loop {
            let line = match tokio::time::timeout(cmd_timeout, read_line(r, &mut buf, s.max_line_bytes)).await {
                Err(_) => {
                    let _ = self.reply(w, "421 4.4.2 Timeout waiting for a command, closing").await;
                    return Ok(());
                }
                Ok(l) => l?,
            };
            let line = match line {
                Line::Eof => return Ok(()),
                Line::TooLong => {
                    if self.bad_command(w, "500 5.5.2 Line too long").await? {
                        return Ok(());
                    }
                    continue;
                }
                Line::Text(t) => t,
            };
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\r', '\n']);
            let (verb, arg) = match text.split_once(' ') {
                Some((v, a)) => (v.to_ascii_uppercase(), a),
                None => (text.to_ascii_uppercase(), ""),
            };
            match verb.as_str() {
                "EHLO" | "HELO" => {
                    let name = arg.trim();
                    if name.is_empty() {
                        if self.bad_command(w, "501 5.5.4 EHLO needs a domain or address").await? {
                            return Ok(());
                        }
                        continue;
                    }
                    self.reset();
                    self.helo = Some(name.chars().take(255).collect());
                    if verb == "EHLO" {
                        let text = format!(
                            "250-{} greets {}\r\n250-SIZE {}\r\n250-8BITMIME\r\n250-PIPELINING\r\n250-SMTPUTF8\r\n250 ENHANCEDSTATUSCODES",
                            s.hostname,
                            self.helo.as_deref().unwrap_or(""),
                            s.max_message_bytes
                        );
                        self.reply(w, &text).await?;
                    } else {
                        self.reply(w, &format!("250 {}", s.hostname)).await?;
                    }
                }
                "MAIL" => {
                    let reply = self.mail(arg);
                    let bad = !reply.starts_with('2');
                    if bad && reply.starts_with('5') && reply.contains("5.5.") {
                        if self.bad_command(w, &reply).await? {
                            return Ok(());
                        }
                    } else {
                        self.reply(w, &reply).await?;
                    }
                }
                "RCPT" => {
                    let reply = self.rcpt(arg).await;
                    if reply.starts_with("50") {
                        if self.bad_command(w, &reply).await? {
                            return Ok(());
                        }
                    } else {
                        self.reply(w, &reply).await?;
                    }
                }
                "DATA" => {
                    if self.mail_from.is_none() {
                        if self.bad_command(w, "503 5.5.1 MAIL first").await? {
                            return Ok(());
                        }
                        continue;
                    }
                    if self.rcpts.is_empty() {
                        self.reply(w, "554 5.5.1 No valid recipients").await?;
                        continue;
                    }
                    self.reply(w, "354 End data with <CR><LF>.<CR><LF>").await?;
                    match self.data(r).await? {
                        Data::Closed => return Ok(()),
                        Data::Timeout => {
                            let _ = self.reply(w, "421 4.4.2 Timeout receiving the message, closing").await;
                            return Ok(());
                        }
                        Data::TooBig(n) => {
                            let svc = self.svc;
                            log_event(&self.app, None, None, &self.rcpt_names(), "refused", 0.0, Some("message too large"),
                                json!({"mail_from": self.mail_from, "remote_ip": self.peer.ip().to_string(), "bytes_over": n, "max_message_bytes": svc.settings.max_message_bytes}));
                            self.reset();
                            self.reply(w, &format!("552 5.3.4 Message too large (over {} bytes)", svc.settings.max_message_bytes)).await?;
                        }
                        Data::Message(raw) => {
                            let reply = self.deliver(raw).await;
                            self.reset();
                            self.reply(w, &reply).await?;
                        }
                    }
                }
                "RSET" => {
                    self.reset();
                    self.reply(w, "250 2.0.0 OK").await?;
                }
                "NOOP" => self.reply(w, "250 2.0.0 OK").await?,
                "VRFY" => self.reply(w, "252 2.1.5 Cannot VRFY; send mail and it will be delivered if the address exists").await?,
                "HELP" => self.reply(w, "214 2.0.0 EHLO HELO MAIL RCPT DATA RSET NOOP VRFY QUIT").await?,
                "QUIT" => {
                    self.reply(w, &format!("221 2.0.0 {} closing", s.hostname)).await?;
                    return Ok(());
                }
                "STARTTLS" | "AUTH" | "EXPN" | "TURN" | "ETRN" | "BDAT" => {
                    if self.bad_command(w, &format!("502 5.5.1 {verb} is not available")).await? {
                        return Ok(());
                    }
                }
                _ => {
                    if self.bad_command(w, "500 5.5.2 Unknown command").await? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Answer a bad command; true when the connection is to be closed (too many of them).
    async fn bad_command(&mut self, w: &mut (impl AsyncWriteExt + Unpin), reply: &str) -> std::io::Result<bool> {
        self.bad += 1;
        if self.bad > self.svc.settings.max_bad_commands {
            self.reply(w, "421 4.7.0 Too many bad commands, closing").await?;
            return Ok(true);
        }
        self.reply(w, reply).await?;
        Ok(false)
    }

    fn rcpt_names(&self) -> String {
        self.rcpts.iter().map(|r| r.address.as_str()).collect::<Vec<_>>().join(",")
    }

    fn mail(&mut self, arg: &str) -> String {
        if self.helo.is_none() {
            return "503 5.5.1 EHLO or HELO first".into();
        }
        if self.mail_from.is_some() {
            return "503 5.5.1 A transaction is open (RSET first)".into();
        }
        let Some(rest) = arg.get(..5).filter(|p| p.eq_ignore_ascii_case("FROM:")).map(|_| &arg[5..]) else {
            return "501 5.5.4 Syntax: MAIL FROM:<address>".into();
        };
        let Some((addr, params)) = path_arg(rest) else {
            return "501 5.5.4 Syntax: MAIL FROM:<address>".into();
        };
        if !addr.is_empty() && !valid_address(&addr) {
            return "553 5.1.7 Bad sender address".into();
        }
        for p in params.split_whitespace() {
            if let Some(v) = p.get(..5).filter(|k| k.eq_ignore_ascii_case("SIZE=")).map(|_| &p[5..]) {
                match v.parse::<u64>() {
                    Ok(n) if n > self.svc.settings.max_message_bytes as u64 => {
                        return format!("552 5.3.4 Message too large (over {} bytes)", self.svc.settings.max_message_bytes);
                    }
                    Ok(_) => {}
                    Err(_) => return "501 5.5.4 SIZE= needs a number".into(),
                }
            }
        }
        let key = if addr.is_empty() { format!("<>@{}", self.peer.ip()) } else { addr.clone() };
        if !self.svc.rate.allow(&key) {
            log_event(&self.app, None, None, &addr, "rate_limited", 0.0, Some("sender over [email_in] rate_per_sender_per_minute"),
                json!({"mail_from": addr, "remote_ip": self.peer.ip().to_string()}));
            return "450 4.7.1 Too many messages from this sender, try again later".into();
        }
        self.mail_from = Some(addr);
        "250 2.1.0 OK".into()
    }

    async fn rcpt(&mut self, arg: &str) -> String {
        let Some(mail_from) = self.mail_from.clone() else {
            return "503 5.5.1 MAIL first".into();
        };
        let Some(rest) = arg.get(..3).filter(|p| p.eq_ignore_ascii_case("TO:")).map(|_| &arg[3..]) else {
            return "501 5.5.4 Syntax: RCPT TO:<address>".into();
        };
        let Some((addr, _)) = path_arg(rest) else {
            return "501 5.5.4 Syntax: RCPT TO:<address>".into();
        };
        if !valid_address(&addr) {
            return "501 5.1.3 Bad recipient address".into();
        }
        let svc: &EmailIn = self.svc;
        let s = &svc.settings;
        if self.rcpts.iter().any(|r| r.address == addr) {
            return "250 2.1.5 OK".into();
        }
        if self.rcpts.len() >= s.max_recipients {
            return format!("452 4.5.3 Too many recipients (at most {})", s.max_recipients);
        }
        let refuse = |why: &str, reply: String| {
            log_event(&self.app, None, None, &addr, "refused", 0.0, Some(why),
                json!({"mail_from": mail_from, "remote_ip": self.peer.ip().to_string()}));
            reply
        };
        let domain = addr.rsplit_once('@').map(|x| x.1).unwrap_or("");
        if !s.accepted_domains().iter().any(|d| d == domain) {
            return refuse("relaying denied", "550 5.7.1 Relaying denied: this server receives mail for its own domains only".into());
        }
        let Some((route_key, route, tag)) = s.route(&addr) else {
            return refuse("unknown recipient", "550 5.1.1 No such recipient".into());
        };
        let (user, function) = (route.user.clone(), route.function.clone());
        let resolved = self
            .app
            .storage()
            .read(&RequestContext::system(), ExecControl::lookup(), move |c| super::handler::find_user(c, &user))
            .await;
        let (user_id, user_email) = match resolved {
            Ok(Some((id, _, email))) => (id, email),
            Ok(None) => {
                tracing::warn!(address = %route_key, user = %route.user, "inbound email: the address's user does not exist or is disabled");
                return refuse("the address's user does not exist", "550 5.1.1 Mailbox unavailable".into());
            }
            Err(e) => {
                tracing::warn!(error = %e, "inbound email: looking up a recipient failed");
                return "451 4.3.0 Temporary failure, try again later".into();
            }
        };
        let known = sender_matches(&route.senders, &mail_from)
            || sender_matches(&s.senders, &mail_from)
            || (!mail_from.is_empty() && mail_from.eq_ignore_ascii_case(&user_email));
        let mut quarantine = None;
        if !known {
            match route.unknown_senders.unwrap_or(s.unknown_senders) {
                Policy::Accept => {}
                Policy::Quarantine => quarantine = Some(format!("unknown sender {mail_from:?}")),
                Policy::Refuse => {
                    return refuse("unknown sender", "550 5.7.1 Sender not allowed for this recipient".into());
                }
            }
        }
        self.rcpts.push(Rcpt { address: addr, route: route_key, tag, user_id, function, quarantine });
        "250 2.1.5 OK".into()
    }

    /// Read DATA up to the lone dot: dot-unstuffed, lines ending in CRLF.
    async fn data(&mut self, r: &mut (impl AsyncBufRead + Unpin)) -> std::io::Result<Data> {
        let svc: &EmailIn = self.svc;
        let s = &svc.settings;
        let deadline = Instant::now() + Duration::from_secs_f64(s.data_timeout_secs);
        let cmd_timeout = Duration::from_secs_f64(s.command_timeout_secs);
        let mut raw = Vec::with_capacity(8192);
        let mut over = 0usize;
        let mut buf = Vec::with_capacity(1024);
        loop {
            let until = deadline.min(Instant::now() + cmd_timeout);
            let line = match tokio::time::timeout_at(until.into(), read_line(r, &mut buf, s.max_line_bytes)).await {
                Err(_) => return Ok(Data::Timeout),
                Ok(l) => l?,
            };
            let line = match line {
                Line::Eof => return Ok(Data::Closed),
                Line::TooLong => {
                    // A line past the cap makes the message unacceptable (552 at its end).
                    over += s.max_line_bytes;
                    continue;
                }
                Line::Text(t) => t,
            };
            let mut content = &line[..];
            if let Some(c) = content.strip_suffix(b"\n") {
                content = c;
            }
            if let Some(c) = content.strip_suffix(b"\r") {
                content = c;
            }
            if content == b"." {
                break;
            }
            let content = content.strip_prefix(b".").unwrap_or(content);
            if over > 0 || raw.len() + content.len() + 2 > s.max_message_bytes {
                over += content.len() + 2;
                raw = Vec::new();
                continue;
            }
            raw.extend_from_slice(content);
            raw.extend_from_slice(b"\r\n");
        }
        Ok(if over > 0 { Data::TooBig(over) } else { Data::Message(raw) })
    }

    /// Check, parse and store a received message for every recipient; the SMTP reply.
    async fn deliver(&mut self, raw: Vec<u8>) -> String {
        let started = Instant::now();
        let app = self.app.clone();
        let svc = self.svc;
        let mail_from = self.mail_from.clone().unwrap_or_default();
        let ip = self.peer.ip();
        let max_text = svc.settings.max_text_bytes;
        // Parsing and hashing a large message is CPU work: off the async threads.
        let (raw, parsed, dk) = {
            let app2 = app.clone();
            let joined = tokio::task::spawn_blocking(move || {
                let svc = app2.get::<EmailIn>().expect("email_in service");
                let dk = dkim::verify(&raw, &svc.keys, super::now_ms() / 1000);
                let parsed = parse::parse(&raw, max_text);
                (raw, parsed, dk)
            })
            .await;
            match joined {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(error = %e, "inbound email: parsing a message failed");
                    return "451 4.3.0 Temporary failure, try again later".into();
                }
            }
        };
        let spf = dkim::spf(&svc.spf, &mail_from, Some(ip));
        let names = self.rcpt_names();
        let base_detail = json!({"mail_from": mail_from, "from": parsed.from, "subject": parsed.subject, "message_id": parsed.message_id,
            "remote_ip": ip.to_string(), "size": raw.len(), "dkim": dk.result, "dkim_detail": dk.detail, "spf": spf});
        let mut dkim_reason = None;
        if dk.result == "fail" {
            match svc.settings.dkim_fail {
                Policy::Refuse => {
                    log_event(&app, None, None, &names, "refused", started.elapsed().as_secs_f64() * 1e3, Some("DKIM signature failed"), base_detail);
                    return format!("550 5.7.20 DKIM signature failed: {}", dk.detail.chars().take(200).collect::<String>());
                }
                Policy::Quarantine => dkim_reason = Some(format!("DKIM signature failed: {}", dk.detail)),
                Policy::Accept => {}
            }
        }
        let dedupe_key = match &parsed.message_id {
            Some(m) if !m.is_empty() => format!("mid:{m}"),
            _ => format!("sha256:{:x}", sha2::Sha256::digest(&raw)),
        };
        // A message already stored for a recipient (a client resending after a lost reply)
        // is not stored or handled again.
        let recipients: Vec<String> = self.rcpts.iter().map(|r| r.address.clone()).collect();
        let key2 = dedupe_key.clone();
        let seen = match app
            .storage()
            .read(&RequestContext::system(), ExecControl::lookup(), move |c| store::existing(c, &key2, &recipients))
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "inbound email: looking for duplicates failed");
                return "451 4.3.0 Temporary failure, try again later".into();
            }
        };
        let files = app.get::<crate::files::Files>();
        let mut new = Vec::new();
        for rc in self.rcpts.clone() {
            if seen.iter().any(|(r, _)| *r == rc.address) {
                continue;
            }
            let id = uuid::Uuid::new_v4().simple().to_string();
            let mut ctx = RequestContext::new(None, crate::core::Role::Named("user".into()));
            ctx.user_id = Some(rc.user_id.clone());
            let mut attachments = Vec::new();
            for (i, a) in parsed.attachments.iter().enumerate() {
                let mut entry = json!({"name": a.name, "content_type": a.content_type, "size": a.data.len(), "path": null});
                let limit = files
                    .map(|f| f.settings.max_file_bytes)
                    .unwrap_or(0)
                    .min(svc.settings.max_attachment_bytes);
                if i >= svc.settings.max_attachments {
                    entry["skipped"] = json!(format!("over [email_in] max_attachments ({})", svc.settings.max_attachments));
                } else if a.data.len() > limit {
                    entry["skipped"] = json!(format!("over [email_in] max_attachment_bytes / [files] max_file_bytes ({limit} bytes)"));
                } else if let Some(f) = files {
                    let path = format!("email/{id}/{}-{}", i + 1, parse::safe_name(&a.name));
                    // Bounded like file.* in Lua ([files] timeout_secs): a stuck store is a 451.
                    let put = tokio::time::timeout(
                        Duration::from_secs_f64(f.settings.timeout_secs),
                        f.put(&ctx, &path, a.data.clone()),
                    )
                    .await;
                    let failed = match put {
                        Ok(Ok(_)) => None,
                        Ok(Err(e)) => Some(e.message),
                        Err(_) => Some(format!("no answer within {} s ([files] timeout_secs)", f.settings.timeout_secs)),
                    };
                    if let Some(e) = failed {
                        tracing::warn!(error = %e, "inbound email: storing an attachment failed");
                        return "451 4.3.0 Temporary failure storing the message, try again later".into();
                    }
                    entry["path"] = json!(path);
                }
                attachments.push(entry);
            }
            let email = json!({
                "from": parsed.from, "from_name": parsed.from_name, "reply_to": parsed.reply_to,
                "to": parsed.to, "cc": parsed.cc, "subject": parsed.subject,
                "text": parsed.text, "html_text": parsed.html_text, "html": parsed.html,
                "message_id": parsed.message_id, "in_reply_to": parsed.in_reply_to, "references": parsed.references,
                "date": parsed.date, "attachments": attachments,
                "dkim": dk.result, "dkim_domain": dk.domain, "spf": spf,
                "recipient": rc.address, "tag": rc.tag, "mail_from": mail_from,
                "received_at": super::now_ms(),
            });
            let reason = dkim_reason.clone().or(rc.quarantine.clone());
            new.push(store::NewMessage {
                id,
                dedupe_key: dedupe_key.clone(),
                message_id: parsed.message_id.clone(),
                recipient: rc.address.clone(),
                route: rc.route.clone(),
                user_id: rc.user_id.clone(),
                function: rc.function.clone(),
                mail_from: mail_from.clone(),
                from_addr: parsed.from.clone(),
                subject: parsed.subject.clone(),
                remote_ip: Some(ip.to_string()),
                helo: self.helo.clone(),
                status: if reason.is_some() { "quarantined" } else { "pending" },
                reason,
                dkim: dk.result,
                dkim_detail: dk.detail.clone(),
                spf,
                email: email.to_string(),
                // Kept with every recipient's row (few: at most max_recipients).
                raw: raw.clone(),
            });
        }
        let msgs = Arc::new(new);
        let m2 = Arc::clone(&msgs);
        let stored = match app
            .storage()
            .write(&RequestContext::system(), ExecControl::lookup(), move |c| -> Result<_> { store::insert_all(c, &m2) })
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "inbound email: storing a message failed");
                return "451 4.3.0 Temporary failure storing the message, try again later".into();
            }
        };
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let mut ids = Vec::new();
        for (m, (id, fresh)) in msgs.iter().zip(&stored) {
            let mut d = base_detail.clone();
            d["id"] = json!(id);
            let outcome = if !fresh {
                "duplicate"
            } else if m.status == "quarantined" {
                d["reason"] = json!(m.reason);
                "quarantined"
            } else {
                "accepted"
            };
            log_event(&app, Some(&m.user_id), None, &m.recipient, outcome, ms, None, d);
            ids.push(id.clone());
        }
        for (r, id) in &seen {
            let mut d = base_detail.clone();
            d["id"] = json!(id);
            log_event(&app, None, None, r, "duplicate", ms, None, d);
            ids.push(id.clone());
        }
        if msgs.iter().any(|m| m.status == "pending") {
            svc.wake.notify_one();
        }
        format!("250 2.0.0 OK: stored as {}", ids.join(" "))
    }
}

enum Data {
    Message(Vec<u8>),
    TooBig(usize),
    Timeout,
    Closed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(path_arg("<Alice@Example.com> SIZE=10").unwrap(), ("alice@example.com".into(), " SIZE=10"));
        assert_eq!(path_arg("<>").unwrap().0, "");
        assert_eq!(path_arg("<@relay.org:bob@x.org>").unwrap().0, "bob@x.org");
        assert_eq!(path_arg("bob@x.org").unwrap().0, "bob@x.org");
        assert!(path_arg("<unclosed").is_none());
        assert!(valid_address("a@b"));
        assert!(!valid_address("a b@c"));
        assert!(!valid_address("@c"));
    }

    #[tokio::test]
    async fn lines_are_capped() {
        let input = format!("short\r\n{}\r\nnext\r\npartial", "x".repeat(5000));
        let mut r = BufReader::with_capacity(64, input.as_bytes());
        let mut buf = Vec::new();
        assert!(matches!(read_line(&mut r, &mut buf, 1000).await.unwrap(), Line::Text(t) if t == b"short\r\n"));
        assert!(matches!(read_line(&mut r, &mut buf, 1000).await.unwrap(), Line::TooLong));
        assert!(matches!(read_line(&mut r, &mut buf, 1000).await.unwrap(), Line::Text(t) if t == b"next\r\n"));
        assert!(matches!(read_line(&mut r, &mut buf, 1000).await.unwrap(), Line::Eof));
    }
}
