"""SMTP peer of tests/notify.rs: an aiosmtpd server that parses every message it receives
with Python's own MIME parser and appends what it found, one JSON object per line, to a file.

usage: smtp_sink.py PORT OUT.jsonl [--starttls DIR]
Prints "ready" once listening. With --starttls it makes a CA and a certificate for localhost
(DIR/ca.pem, the CA clients must trust) and refuses mail before STARTTLS. Checks (a failure is recorded as "mime_error"): the message
parses, has exactly one Message-ID, a Date, and a From; every part decodes.
"""
import asyncio
import base64
import email
import email.policy
import json
import logging
import sys
import threading

from aiosmtpd.controller import Controller

port, out_path = int(sys.argv[1]), sys.argv[2]
# Refused handshakes (a client that does not trust the CA, as a test wants) are not news.
logging.getLogger("mail.log").setLevel(logging.CRITICAL)
lock = threading.Lock()


class Sink:
    async def handle_DATA(self, server, session, envelope):
        rec = {"mail_from": envelope.mail_from, "rcpt_tos": list(envelope.rcpt_tos),
               "tls": session.ssl is not None}
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


kwargs = {}
if len(sys.argv) > 4 and sys.argv[3] == "--starttls":
    import datetime
    import os
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = sys.argv[4]
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "notify test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    with open(os.path.join(d, "ca.pem"), "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(os.path.join(d, "server.pem"), "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(os.path.join(d, "server.key"), "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(os.path.join(d, "server.pem"), os.path.join(d, "server.key"))
    kwargs = {"tls_context": ctx, "require_starttls": True}

controller = Controller(Sink(), hostname="127.0.0.1", port=port, **kwargs)
controller.start()
print("ready", flush=True)
try:
    threading.Event().wait()
finally:
    controller.stop()
