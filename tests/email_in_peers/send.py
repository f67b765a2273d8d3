"""Send one message with Python's smtplib (the real SMTP client of the inbound-email tests).

Usage: python send.py < spec.json; prints one JSON line with the outcome.

spec: host, port, mail_from, rcpts [...], and either `raw` (the message as text) or
subject, from, to, text, html, attachments [{name, content_type, data_b64}], message_id,
headers {name: value}. Optional `dkim`: {selector, domain, key (PEM text, or base64 seed for
ed25519), algorithm ("rsa-sha256" | "ed25519-sha256"), canon ("relaxed/relaxed" ...)}
signs the message with dkimpy; `tamper`: a (old, new) pair replaced in the body after signing.
"""
import base64
import json
import smtplib
import sys
from email.message import EmailMessage
from email import policy


def build(spec):
    if "raw" in spec:
        return spec["raw"].encode()
    m = EmailMessage(policy=policy.SMTP)
    m["From"] = spec.get("from", spec["mail_from"])
    m["To"] = ", ".join(spec.get("to", spec["rcpts"]))
    m["Subject"] = spec.get("subject", "test")
    if spec.get("message_id"):
        m["Message-ID"] = spec["message_id"]
    for k, v in spec.get("headers", {}).items():
        m[k] = v
    m.set_content(spec.get("text", ""))
    if spec.get("html"):
        m.add_alternative(spec["html"], subtype="html")
    for a in spec.get("attachments", []):
        maintype, subtype = a["content_type"].split("/", 1)
        m.add_attachment(base64.b64decode(a["data_b64"]), maintype=maintype, subtype=subtype, filename=a["name"])
    return m.as_bytes(policy=policy.SMTP)


def sign(raw, d):
    import dkim
    canon = tuple(x.encode() for x in d.get("canon", "relaxed/relaxed").split("/"))
    key = d["key"].encode()
    sig = dkim.sign(raw, d["selector"].encode(), d["domain"].encode(), key,
                    include_headers=[b"from", b"to", b"subject", b"message-id"],
                    canonicalize=canon, signature_algorithm=d.get("algorithm", "rsa-sha256").encode())
    return sig + raw


def main():
    spec = json.load(sys.stdin)
    raw = build(spec)
    if spec.get("dkim"):
        raw = sign(raw, spec["dkim"])
    if spec.get("tamper"):
        old, new = spec["tamper"]
        head, sep, body = raw.partition(b"\r\n\r\n")
        raw = head + sep + body.replace(old.encode(), new.encode(), 1)
    out = {}
    try:
        with smtplib.SMTP(spec["host"], spec["port"], timeout=60) as s:
            refused = s.sendmail(spec["mail_from"], spec["rcpts"], raw)
            out = {"ok": True, "refused": {k: [v[0], v[1].decode()] for k, v in refused.items()}}
    except smtplib.SMTPRecipientsRefused as e:
        out = {"ok": False, "error": "recipients_refused",
               "refused": {k: [v[0], v[1].decode()] for k, v in e.recipients.items()}}
    except smtplib.SMTPSenderRefused as e:
        out = {"ok": False, "error": "sender_refused", "code": e.smtp_code, "message": e.smtp_error.decode()}
    except smtplib.SMTPDataError as e:
        out = {"ok": False, "error": "data_error", "code": e.smtp_code, "message": e.smtp_error.decode()}
    except smtplib.SMTPResponseException as e:
        out = {"ok": False, "error": "response", "code": e.smtp_code, "message": e.smtp_error.decode()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
