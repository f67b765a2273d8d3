"""Push-service peer of tests/notify.rs: plays both the browser (it makes the subscription's
P-256 key pair and auth secret) and the push service (RFC 8030) ichibase delivers to. Every
push is checked independently of ichibase's code: the RFC 8292 VAPID JWT (ES256 signature with
`cryptography`, `aud` = this service's origin, `exp` within 24 h, `sub` a mailto:/https: URI)
and the RFC 8291 aes128gcm payload, decrypted with `http_ece`.

usage: push_service.py PORT        prints "ready" once listening.
  GET  /subscribe/{device}   a new subscription: {endpoint, keys: {p256dh, auth}}
  POST /push/{device}        a push: 201 when it verifies and decrypts, 403 when not;
                             devices named gone-* answer 410, flaky-* answer 503 once
  GET  /received             every push received, as a JSON list
"""
import base64
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import http_ece
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

port = int(sys.argv[1])
origin = f"http://127.0.0.1:{port}"
lock = threading.Lock()
subs = {}        # device -> (private key, auth secret)
received = []    # records
flaky_seen = set()


def b64d(s):
    s = s.strip()
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def b64e(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def check_vapid(header):
    if not header or not header.startswith("vapid "):
        raise ValueError(f"Authorization is not 'vapid t=..., k=...': {header!r}")
    fields = dict(kv.strip().split("=", 1) for kv in header[len("vapid "):].split(","))
    token, k = fields["t"], fields["k"]
    h64, p64, s64 = token.split(".")
    jwt_header = json.loads(b64d(h64))
    if jwt_header.get("alg") != "ES256":
        raise ValueError(f"JWT alg {jwt_header.get('alg')!r}, want ES256")
    pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b64d(k))
    sig = b64d(s64)
    if len(sig) != 64:
        raise ValueError("ES256 signature must be 64 bytes (r || s)")
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    pub.verify(der, f"{h64}.{p64}".encode(), ec.ECDSA(hashes.SHA256()))
    claims = json.loads(b64d(p64))
    now = time.time()
    if claims.get("aud") != origin:
        raise ValueError(f"aud {claims.get('aud')!r}, want {origin!r}")
    if not (now < claims.get("exp", 0) <= now + 24 * 3600 + 60):
        raise ValueError(f"exp {claims.get('exp')} not within 24 h")
    sub = claims.get("sub", "")
    if not (sub.startswith("mailto:") or sub.startswith("https:")):
        raise ValueError(f"sub {sub!r} is not a mailto: or https: URI")
    return k, claims


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def reply(self, code, body=None):
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.startswith("/subscribe/"):
            device = self.path[len("/subscribe/"):]
            priv = ec.generate_private_key(ec.SECP256R1())
            auth = os.urandom(16)
            with lock:
                subs[device] = (priv, auth)
            point = priv.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
            self.reply(200, {"endpoint": f"{origin}/push/{device}",
                             "expirationTime": None,
                             "keys": {"p256dh": b64e(point), "auth": b64e(auth)}})
        elif self.path == "/received":
            with lock:
                self.reply(200, list(received))
        else:
            self.reply(404, {"error": "no such path"})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if not self.path.startswith("/push/"):
            return self.reply(404, {"error": "no such path"})
        device = self.path[len("/push/"):]
        if device.startswith("gone"):
            return self.reply(410, {"error": "subscription expired"})
        if device.startswith("flaky"):
            with lock:
                first = device not in flaky_seen
                flaky_seen.add(device)
            if first:
                return self.reply(503, {"error": "try later"})
        rec = {"device": device}
        try:
            if device not in subs:
                raise ValueError("unknown subscription")
            if self.headers.get("Content-Encoding") != "aes128gcm":
                raise ValueError(f"Content-Encoding {self.headers.get('Content-Encoding')!r}")
            rec["ttl"] = int(self.headers["TTL"])
            rec["topic"] = self.headers.get("Topic")
            rec["urgency"] = self.headers.get("Urgency")
            k, claims = check_vapid(self.headers.get("Authorization"))
            rec.update({"vapid_k": k, "aud": claims["aud"], "sub": claims["sub"]})
            priv, auth = subs[device]
            plain = http_ece.decrypt(body, private_key=priv, auth_secret=auth, version="aes128gcm")
            rec["payload"] = json.loads(plain)
        except (ValueError, KeyError, InvalidSignature, Exception) as e:  # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {e}"
            with lock:
                received.append(rec)
            return self.reply(403, {"error": rec["error"]})
        with lock:
            received.append(rec)
        self.reply(201)


server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
print("ready", flush=True)
server.serve_forever()
