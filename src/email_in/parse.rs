//! MIME: a raw message → the fields handed to Lua (addresses, subject, ids, date, the text,
//! the HTML as readable text) and its attachments. Parsing never fails: a message mail-parser
//! cannot read becomes its raw text. Owns nothing; pure functions.

use mail_parser::{Address, HeaderValue, MessageParser, MimeHeaders};

/// One attachment's bytes and what it says about itself.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub name: String,
    pub content_type: String,
    pub data: Vec<u8>,
}

/// What a message says.
#[derive(Debug, Clone, Default)]
pub struct Parsed {
    pub message_id: Option<String>,
    pub in_reply_to: Option<String>,
    pub references: Vec<String>,
    /// The From address (lowercase) and display name.
    pub from: Option<String>,
    pub from_name: Option<String>,
    pub reply_to: Option<String>,
    pub to: Vec<String>,
    pub cc: Vec<String>,
    pub subject: Option<String>,
    /// RFC 3339.
    pub date: Option<String>,
    /// The plain-text body, or the HTML turned into text when there is none.
    pub text: String,
    /// The HTML body as readable text (when there is an HTML body).
    pub html_text: Option<String>,
    /// The HTML body itself.
    pub html: Option<String>,
    pub attachments: Vec<Attachment>,
}

fn addresses(a: Option<&Address<'_>>) -> Vec<String> {
    a.map(|a| a.iter().filter_map(|x| x.address().map(|s| s.to_ascii_lowercase())).collect())
        .unwrap_or_default()
}

fn ids(v: &HeaderValue<'_>) -> Vec<String> {
    match v {
        HeaderValue::Text(t) => vec![t.to_string()],
        HeaderValue::TextList(l) => l.iter().map(|t| t.to_string()).collect(),
        _ => Vec::new(),
    }
}

/// Cut `s` to at most `max` bytes at a character boundary.
pub fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut i = max;
        while !s.is_char_boundary(i) {
            i -= 1;
        }
        s.truncate(i);
    }
    s
}

/// Parse `raw`; texts are cut to `max_text` bytes.
pub fn parse(raw: &[u8], max_text: usize) -> Parsed {
    let Some(m) = MessageParser::default().parse(raw) else {
        let text = String::from_utf8_lossy(raw).into_owned();
        let body = text.split_once("\r\n\r\n").map(|x| x.1.to_string()).unwrap_or(text);
        return Parsed { text: cut(body, max_text), ..Default::default() };
    };
    let from = m.from().and_then(|a| a.first());
    let html = (m.html_body_count() > 0)
        .then(|| m.html_part(0).and_then(|p| p.text_contents()).map(str::to_string))
        .flatten();
    let has_text = m.text_bodies().any(|p| !p.is_text_html());
    let html_text = html.as_deref().map(mail_parser::decoders::html::html_to_text);
    let text = if has_text {
        m.body_text(0).map(|t| t.into_owned()).unwrap_or_default()
    } else {
        html_text.clone().or_else(|| m.body_text(0).map(|t| t.into_owned())).unwrap_or_default()
    };
    let mut attachments = Vec::new();
    for p in m.attachments() {
        let content_type = p
            .content_type()
            .map(|c| match c.subtype() {
                Some(s) => format!("{}/{}", c.ctype(), s),
                None => c.ctype().to_string(),
            })
            .unwrap_or_else(|| "application/octet-stream".into())
            .to_ascii_lowercase();
        let name = p
            .attachment_name()
            .map(str::to_string)
            .unwrap_or_else(|| if p.is_message() { "message.eml".into() } else { "attachment".into() });
        attachments.push(Attachment { name, content_type, data: p.contents().to_vec() });
    }
    Parsed {
        message_id: m.message_id().map(|s| s.to_string()),
        in_reply_to: ids(m.in_reply_to()).into_iter().next(),
        references: ids(m.references()),
        from: from.and_then(|a| a.address()).map(|s| s.to_ascii_lowercase()),
        from_name: from.and_then(|a| a.name()).map(str::to_string),
        reply_to: m.reply_to().and_then(|a| a.first()).and_then(|a| a.address()).map(|s| s.to_ascii_lowercase()),
        to: addresses(m.to()),
        cc: addresses(m.cc()),
        subject: m.subject().map(str::to_string),
        date: m.date().map(|d| d.to_rfc3339()),
        text: cut(text, max_text),
        html_text: html_text.map(|t| cut(t, max_text)),
        html: html.map(|t| cut(t, max_text)),
        attachments,
    }
}

/// A file name safe for the file store: letters, digits, `.`, `-`, `_` (others become `_`),
/// no leading dot, at most 100 characters.
pub fn safe_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    let mut s: String = base
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' { c } else { '_' })
        .take(100)
        .collect();
    while s.starts_with('.') {
        s.remove(0);
    }
    if s.is_empty() { "attachment".into() } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MULTIPART: &str = "From: Alice <Alice@Example.com>\r\nTo: news@in.example.com, b@x.org\r\nCc: c@x.org\r\n\
Subject: =?UTF-8?B?5pel5pys6Kqe?= hello\r\nMessage-ID: <m1@example.com>\r\nIn-Reply-To: <m0@example.com>\r\n\
References: <a@x> <m0@example.com>\r\nDate: Tue, 1 Dec 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"B\"\r\n\r\n--B\r\nContent-Type: multipart/alternative; boundary=\"A\"\r\n\r\n\
--A\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nPlain body\r\n--A\r\nContent-Type: text/html\r\n\r\n\
<html><body><p>Rich <b>body</b></p><script>x()</script></body></html>\r\n--A--\r\n--B\r\n\
Content-Type: text/csv; name=\"data.csv\"\r\nContent-Disposition: attachment; filename=\"data.csv\"\r\n\
Content-Transfer-Encoding: base64\r\n\r\nYSxiCjEsMgo=\r\n--B--\r\n";

    #[test]
    fn multipart_with_attachment() {
        let p = parse(MULTIPART.as_bytes(), 1 << 20);
        assert_eq!(p.from.as_deref(), Some("alice@example.com"));
        assert_eq!(p.from_name.as_deref(), Some("Alice"));
        assert_eq!(p.to, vec!["news@in.example.com", "b@x.org"]);
        assert_eq!(p.cc, vec!["c@x.org"]);
        assert_eq!(p.subject.as_deref(), Some("日本語 hello"));
        assert_eq!(p.message_id.as_deref(), Some("m1@example.com"));
        assert_eq!(p.in_reply_to.as_deref(), Some("m0@example.com"));
        assert_eq!(p.references, vec!["a@x", "m0@example.com"]);
        assert!(p.date.as_deref().unwrap().starts_with("2026-12-01T10:00:00"));
        assert_eq!(p.text.trim(), "Plain body");
        let ht = p.html_text.unwrap();
        assert!(ht.contains("Rich body") && !ht.contains("x()"), "{ht}");
        assert_eq!(p.attachments.len(), 1);
        assert_eq!(p.attachments[0].name, "data.csv");
        assert_eq!(p.attachments[0].content_type, "text/csv");
        assert_eq!(p.attachments[0].data, b"a,b\n1,2\n");
    }

    #[test]
    fn html_only_gives_text_and_garbage_never_fails() {
        let p = parse(b"From: a@b\r\nContent-Type: text/html\r\n\r\n<p>Hello&amp;bye</p>", 1 << 20);
        assert_eq!(p.text.trim(), "Hello&bye");
        let p = parse(b"\xff\xfe\x00garbage", 1 << 20);
        assert!(p.attachments.is_empty());
        let p = parse(b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n--x\r\n--x--", 10);
        assert!(p.text.len() <= 10);
        assert_eq!(cut("日本語".into(), 4), "日");
    }

    #[test]
    fn safe_names() {
        assert_eq!(safe_name("../../etc/passwd"), "passwd");
        assert_eq!(safe_name("..hidden"), "hidden");
        assert_eq!(safe_name("a b?.pdf"), "a_b_.pdf");
        assert_eq!(safe_name(""), "attachment");
        assert_eq!(safe_name("報告.pdf"), "__.pdf");
    }
}
