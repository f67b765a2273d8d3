# Test peers of the notify module (tests/notify.rs):
# - aiosmtpd: the SMTP server mail is delivered to (tests/notify_peers/smtp_sink.py);
# - http_ece + cryptography: the push service's independent RFC 8291 decryption and the
#   RFC 8292 VAPID JWT check (tests/notify_peers/push_service.py).
# Exports ICHIBASE_NOTIFY_PYTHON: the interpreter that has them.
NOTIFY_VENV="$HOME/.cache/ichibase-peers/notify-py"
py_venv "$NOTIFY_VENV" "import aiosmtpd, http_ece, cryptography" \
    "aiosmtpd==1.4.6" "http-ece==1.2.1" "cryptography==44.0.2"
export ICHIBASE_NOTIFY_PYTHON="$NOTIFY_VENV/bin/python"
