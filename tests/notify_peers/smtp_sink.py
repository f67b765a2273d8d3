"""SMTP peer of tests/notify.rs: an aiosmtpd server that parses every message it receives
with Python's own MIME parser and appends what it found, one JSON object per line, to a file.

usage: smtp_sink.py PORT OUT.jsonl
Prints "ready" once listening. Checks (a failure is recorded as "mime_error"): the message
parses, has exactly one Message-ID, a Date, and a From; every part decodes.
"""
import asyncio
import base64
import email
import email.policy
import json
import sys
import threading

from aiosmtpd.controller import Controller

port, out_path = int(sys.argv[1]), sys.argv[2]
lock = threading.Lock()


class Sink:
    async def handle_DATA(self, server, session, envelope):
        rec = {"mail_from": envelope.mail_from, "rcpt_tos": list(envelope.rcpt_tos)}
        try:
            msg = email.message_from_bytes(envelope.original_content or envelope.content, policy=email.policy.default)
            errors = []
            if len(msg.get_all("Message-ID", [])) != 1:
                errors.append("Message-ID must appear once")
            for h in ("Date", "From"):
                if msg[h] is None:
                    errors.append(f"no {h} header")
            rec.update({
                "message_id": str(msg["Message-ID"]),
                "subject": str(msg["Subject"]),
                "from": str(msg["From"]),
                "to": str(msg["To"]),
                "cc": str(msg["Cc"]) if msg["Cc"] else None,
                "bcc_header": msg["Bcc"] is not None,
                "reply_to": str(msg["Reply-To"]) if msg["Reply-To"] else None,
                "content_type": msg.get_content_type(),
                "parts": [],
            })
            for part in msg.walk():
                if part.is_multipart():
                    rec["parts"].append({"content_type": part.get_content_type()})
                    continue
                p = {"content_type": part.get_content_type(), "filename": part.get_filename()}
                if part.get_content_maintype() == "text" and not part.get_filename():
                    p["text"] = part.get_content()
                else:
                    p["base64"] = base64.b64encode(part.get_payload(decode=True)).decode()
                rec["parts"].append(p)
            if errors:
                rec["mime_error"] = "; ".join(errors)
        except Exception as e:  # noqa: BLE001 - recorded for the test to fail on
            rec["mime_error"] = repr(e)
        with lock, open(out_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
        return "250 OK queued"


controller = Controller(Sink(), hostname="127.0.0.1", port=port)
controller.start()
print("ready", flush=True)
try:
    threading.Event().wait()
finally:
    controller.stop()
