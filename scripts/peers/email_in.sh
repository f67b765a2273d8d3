# Test peers of the inbound-email module (tests/email_in.rs):
# - dkimpy (+ dnspython it imports, PyNaCl for ed25519-sha256): signs test messages with
#   DKIM independently of the server's verifier (tests/email_in_peers/dkim_sign.py).
# The SMTP client is Python's own smtplib (any python3).
# Exports ICHIBASE_EMAIL_IN_PYTHON: the interpreter that has them.
EMAIL_IN_VENV="$HOME/.cache/ichibase-peers/email-in-py"
py_venv "$EMAIL_IN_VENV" "import dkim, nacl" \
    "dkimpy==1.1.8" "dnspython==2.7.0" "PyNaCl==1.5.0"
export ICHIBASE_EMAIL_IN_PYTHON="$EMAIL_IN_VENV/bin/python"
