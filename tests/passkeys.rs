//! Passkeys in headless Chromium with virtual authenticators (CDP `WebAuthn.*`; the harness is
//! tests/common/browser.rs + tests/browser/driver.mjs) against the real binary, on the embedded
//! sign-in page `/auth/passkey` at `http://test.localhost:<port>` (relying party
//! `test.localhost`, a secure context in Chromium and mapped to 127.0.0.1 by the driver):
//! register a passkey, sign in without a user name, sign in on a second device (a second
//! browser context with its own authenticator and passkey), list devices, revoke the second
//! device and see its WebSocket closed and its refresh token refused. Then the adversarial
//! cases: a replayed assertion, an answer to another challenge, a registration challenge used
//! to sign in, another user's challenge, another user's account named by the user handle,
//! another user's credential id, a wrong origin, garbage.

mod common;
#[path = "common/browser.rs"]
mod browser;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use browser::{Browser, Page};
use common::*;
use serde_json::{Value, json};

const WAIT: u64 = 60;

/// A virtual platform authenticator for `p`: resident keys, user verification that succeeds.
fn authenticator(p: &Page) -> String {
    p.cdp("WebAuthn.enable", json!({"enableUI": false}));
    let r = p.cdp(
        "WebAuthn.addVirtualAuthenticator",
        json!({"options": {
            "protocol": "ctap2", "transport": "internal", "hasResidentKey": true,
            "hasUserVerification": true, "isUserVerified": true, "automaticPresenceSimulation": true
        }}),
    );
    r["authenticatorId"].as_str().expect("authenticator id").to_string()
}

fn open_page(p: &Page, url: &str) {
    p.goto(url);
    p.wait_for(None, "document.body.dataset.ready === 'yes'", WAIT);
}

fn password_signin(p: &Page, email: &str) {
    p.fill(None, "#email", email);
    p.fill(None, "#password", &password_of(email));
    p.click(None, "#signin-password");
    p.wait_for(None, "document.body.dataset.signedIn === 'yes'", WAIT);
}

fn add_passkey(p: &Page, name: &str, count: usize) {
    p.fill(None, "#passkey-name", name);
    p.click(None, "#add-passkey");
    p.wait_for(None, &format!("document.querySelector('#passkeys').dataset.count === '{count}'"), WAIT);
}

fn sign_out(p: &Page) {
    p.click(None, "#signout");
    p.wait_for(None, "document.body.dataset.signedIn === 'no'", WAIT);
}

/// An assertion from the page's authenticator for a fresh challenge, not yet finished.
fn assertion(p: &Page) -> Value {
    p.eval(None, "(async () => { const m = await import('/auth/passkeys.js'); return await m.passkeyAssertion(); })()")
}

async fn finish(base: &str, a: &Value) -> Resp {
    jpost(&anon_client(), base, "/auth/passkeys/signin/finish", a.clone()).await
}

fn err_name(r: &Resp) -> String {
    r.json()["error"]["name"].as_str().unwrap_or_default().to_string()
}

async fn create_user(base: &str, email: &str) -> String {
    let (s, v) = api(&client(), "POST", format!("{base}/admin/users"), Some(json!({"email": email, "password": password_of(email)}))).await;
    assert_eq!(s, 200, "{v}");
    v["id"].as_str().unwrap().to_string()
}

/// The user handle WebAuthn carries for a user id (its UUID's 16 bytes, base64url).
fn handle_of(user_id: &str) -> String {
    let hex: String = user_id.chars().filter(|c| *c != '-').collect();
    let bytes: Vec<u8> = (0..16).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect();
    URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test(flavor = "multi_thread")]
async fn passkeys_devices_and_revocation_in_chromium() {
    let Some(b) = Browser::launch() else { return };
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_in(
        dir.path(),
        &[],
        &[
            ("ICHIBASE_PASSKEYS__RP_ID", "test.localhost"),
            ("ICHIBASE_PASSKEYS__RP_ORIGINS", r#"["http://test.localhost"]"#),
            ("ICHIBASE_PASSKEYS__ALLOW_ANY_PORT", "true"),
        ],
    );
    let port = s.url.rsplit(':').next().unwrap().to_string();
    let base = s.url.clone();
    let site = format!("http://test.localhost:{port}");
    let ann_id = create_user(&base, "ann@example.com").await;
    let bob_id = create_user(&base, "bob@example.com").await;

    // Device 1 (a laptop): password sign-in, then a passkey; it is a resident credential.
    let laptop = b.page();
    let laptop_auth = authenticator(&laptop);
    open_page(&laptop, &format!("{site}/auth/passkey"));
    password_signin(&laptop, "ann@example.com");
    add_passkey(&laptop, "Laptop passkey", 1);
    let creds = laptop.cdp("WebAuthn.getCredentials", json!({"authenticatorId": laptop_auth}));
    let creds = creds["credentials"].as_array().unwrap().clone();
    assert_eq!(creds.len(), 1, "{creds:?}");
    assert_eq!(creds[0]["isResidentCredential"], json!(true));
    assert_eq!(creds[0]["rpId"], json!("test.localhost"));
    let ann_cred_id = creds[0]["credentialId"].as_str().unwrap().to_string();

    // Sign out, then sign in with the passkey: no user name typed.
    sign_out(&laptop);
    laptop.click(None, "#signin-passkey");
    laptop.wait_for(None, "document.body.dataset.signedIn === 'yes'", WAIT);
    let status = laptop.eval(None, "document.querySelector('#status').textContent");
    assert!(status.as_str().unwrap().contains("Signed in with a passkey as ann@example.com"), "{status}");
    let who = laptop.eval(None, "document.querySelector('#who').textContent");
    assert_eq!(who, json!("ann@example.com"));

    // Device 2 (a phone: its own browser context and authenticator): a password sign-in, a
    // second passkey, then a passkey sign-in; it opens a WebSocket.
    let phone = b.page();
    authenticator(&phone);
    open_page(&phone, &format!("{site}/auth/passkey"));
    password_signin(&phone, "ann@example.com");
    add_passkey(&phone, "Phone passkey", 2);
    sign_out(&phone);
    let t = phone.eval(
        None,
        r#"(async () => {
            const m = await import('/auth/passkeys.js');
            const t = await m.signInWithPasskey('Ann phone');
            window.__ws = { state: 'connecting' };
            const ws = new WebSocket(`ws://${location.host}/ws?access_token=${t.access_token}`);
            ws.onopen = () => { window.__ws.state = 'open'; };
            ws.onclose = (e) => { window.__ws.state = 'closed'; window.__ws.code = e.code; window.__ws.reason = e.reason; };
            return { access: t.access_token, refresh: t.refresh_token, device: t.device_id, user: t.user.id };
        })()"#,
    );
    assert_eq!(t["user"], json!(ann_id));
    phone.wait_for(None, "window.__ws.state === 'open'", WAIT);
    let phone_device = t["device"].as_str().unwrap().to_string();

    // The laptop lists two devices and revokes the phone.
    open_page(&laptop, &format!("{site}/auth/passkey"));
    laptop.wait_for(None, "document.querySelector('#devices').dataset.count === '2'", WAIT);
    let devices = laptop.eval(None, "document.querySelector('#devices').textContent");
    assert!(devices.as_str().unwrap().contains("Ann phone") && devices.as_str().unwrap().contains("(this device)"), "{devices}");
    laptop.click(None, &format!("[data-revoke-device='{phone_device}']"));
    laptop.wait_for(None, "document.querySelector('#devices').dataset.count === '1'", WAIT);

    // The phone's socket is closed, its refresh and access tokens refused, its page signed out.
    let closed = phone.wait_for(None, "window.__ws.state === 'closed' && window.__ws", WAIT);
    assert_eq!(closed["code"], json!(1008), "{closed}");
    assert!(closed["reason"].as_str().unwrap().contains("revoked"), "{closed}");
    let r = jpost(&anon_client(), &base, "/auth/refresh", json!({"refresh_token": t["refresh"]})).await;
    assert_eq!(r.status, 401, "{}", r.body);
    let (st, _) = api(&client_with_token(t["access"].as_str().unwrap()), "GET", format!("{base}/auth/me"), None).await;
    assert_eq!(st, 401);
    open_page(&phone, &format!("{site}/auth/passkey"));
    assert_eq!(phone.eval(None, "document.body.dataset.signedIn"), json!("no"));
    // The laptop is still signed in; both passkeys are listed.
    open_page(&laptop, &format!("{site}/auth/passkey"));
    assert_eq!(laptop.eval(None, "document.body.dataset.signedIn"), json!("yes"));
    assert_eq!(laptop.eval(None, "document.querySelector('#passkeys').dataset.count"), json!("2"));

    // ----- adversarial -----

    // A replayed assertion: the first answer signs in, the same answer again is refused.
    let a = assertion(&laptop);
    let t0 = std::time::Instant::now();
    let r = finish(&base, &a).await;
    let passkey_ms = t0.elapsed().as_secs_f64() * 1e3;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["user"]["id"], json!(ann_id));
    // Figures for the README (not assertions): a passkey sign-in's server side (one signature
    // check) against a password sign-in (argon2id), in the same run.
    let t0 = std::time::Instant::now();
    r_token(&base, "ann@example.com").await;
    let password_ms = t0.elapsed().as_secs_f64() * 1e3;
    eprintln!("sign-in round trip: passkey finish {passkey_ms:.1} ms, password {password_ms:.1} ms (ratio {:.2})", passkey_ms / password_ms);
    let r = finish(&base, &a).await;
    assert_eq!((r.status, err_name(&r)), (400, "PASSKEY_CHALLENGE_INVALID".into()), "{}", r.body);

    // An answer to one challenge presented for another.
    let a1 = assertion(&laptop);
    let a2 = assertion(&laptop);
    let mut crossed = a2.clone();
    crossed["challenge_id"] = a1["challenge_id"].clone();
    let r = finish(&base, &crossed).await;
    assert_eq!((r.status, err_name(&r)), (401, "PASSKEY_REJECTED".into()), "{}", r.body);
    // ... and both challenges are spent now or still single-use.
    let r = finish(&base, &a1).await;
    assert_eq!(err_name(&r), "PASSKEY_CHALLENGE_INVALID", "{}", r.body);
    let r = finish(&base, &a2).await;
    assert_eq!(r.status, 200, "the untouched challenge still works once: {}", r.body);

    // Bob, with a passkey of his own in a third context.
    let bobp = b.page();
    authenticator(&bobp);
    open_page(&bobp, &format!("{site}/auth/passkey"));
    password_signin(&bobp, "bob@example.com");
    add_passkey(&bobp, "Bob's key", 1);
    // Bob's assertion naming Ann's account (the user handle is not signed): refused.
    let mut forged = assertion(&bobp);
    forged["credential"]["response"]["userHandle"] = json!(handle_of(&ann_id));
    let r = finish(&base, &forged).await;
    assert_eq!((r.status, err_name(&r)), (401, "PASSKEY_UNKNOWN".into()), "{}", r.body);
    // Bob's signature presented as Ann's credential: refused (the signature is checked against
    // Ann's public key).
    let mut forged = assertion(&bobp);
    let ann_b64u = URL_SAFE_NO_PAD.encode(base64::engine::general_purpose::STANDARD.decode(&ann_cred_id).unwrap());
    forged["credential"]["id"] = json!(ann_b64u);
    forged["credential"]["rawId"] = json!(ann_b64u);
    forged["credential"]["response"]["userHandle"] = json!(handle_of(&ann_id));
    let r = finish(&base, &forged).await;
    assert_eq!((r.status, err_name(&r)), (401, "PASSKEY_REJECTED".into()), "{}", r.body);
    // Bob's own answer still signs Bob in (the forgeries spent only their own challenges).
    let r = finish(&base, &assertion(&bobp)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["user"]["id"], json!(bob_id));

    // A disabled user's passkey does not sign in; enabled again, it does.
    let r = json_request(&client(), reqwest::Method::PATCH, format!("{base}/admin/users/{bob_id}"), Some(json!({"disabled": true}))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = finish(&base, &assertion(&bobp)).await;
    assert_eq!((r.status, err_name(&r)), (401, "AUTHENTICATION_FAILED".into()), "{}", r.body);
    let r = json_request(&client(), reqwest::Method::PATCH, format!("{base}/admin/users/{bob_id}"), Some(json!({"disabled": false}))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = finish(&base, &assertion(&bobp)).await;
    assert_eq!(r.status, 200, "{}", r.body);

    // Registration challenges: not for signing in, and not for another user.
    let ann = client_with_token(r_token(&base, "ann@example.com").await.as_str());
    let bob = client_with_token(r_token(&base, "bob@example.com").await.as_str());
    let (st, reg) = api(&ann, "POST", format!("{base}/auth/passkeys/register/start"), Some(json!({}))).await;
    assert_eq!(st, 200, "{reg}");
    assert_eq!(reg["options"]["publicKey"]["authenticatorSelection"]["residentKey"], json!("required"));
    assert_eq!(reg["options"]["publicKey"]["rp"]["id"], json!("test.localhost"));
    let mut wrong_kind = assertion(&bobp);
    wrong_kind["challenge_id"] = reg["challenge_id"].clone();
    let r = finish(&base, &wrong_kind).await;
    assert_eq!((r.status, err_name(&r)), (400, "PASSKEY_CHALLENGE_INVALID".into()), "{}", r.body);
    let (_, reg) = api(&ann, "POST", format!("{base}/auth/passkeys/register/start"), Some(json!({}))).await;
    let fake_reg = json!({"id": "AA", "rawId": "AA", "type": "public-key",
        "response": {"attestationObject": "AA", "clientDataJSON": "AA"}});
    let (st, v) = api(&bob, "POST", format!("{base}/auth/passkeys/register/finish"),
        Some(json!({"challenge_id": reg["challenge_id"], "credential": fake_reg}))).await;
    assert_eq!((st, v["error"]["name"].as_str()), (400, Some("PASSKEY_CHALLENGE_INVALID")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("another user"), "{v}");
    // Registering needs a signed-in session.
    let (st, _) = api(&anon_client(), "POST", format!("{base}/auth/passkeys/register/start"), Some(json!({}))).await;
    assert_eq!(st, 401);
    // Garbage and unknown challenges are typed errors.
    let (st, v) = api(&anon_client(), "POST", format!("{base}/auth/passkeys/signin/finish"),
        Some(json!({"challenge_id": "x", "credential": {"nope": 1}}))).await;
    assert_eq!((st, v["error"]["name"].as_str()), (400, Some("BAD_ARGUMENTS")), "{v}");
    let mut unknown = assertion(&laptop);
    unknown["challenge_id"] = json!("not-a-challenge");
    let r = finish(&base, &unknown).await;
    assert_eq!(err_name(&r), "PASSKEY_CHALLENGE_INVALID", "{}", r.body);

    // A wrong origin: a page on evil.test.localhost (the browser lets a subdomain use its
    // parent as relying party id) gets an assertion for this server's challenge, with Ann's
    // passkey; the server, expecting http://test.localhost only, refuses it.
    open_page(&laptop, &format!("http://evil.test.localhost:{port}/auth/passkey"));
    let a = assertion(&laptop);
    let client_data = URL_SAFE_NO_PAD.decode(a["credential"]["response"]["clientDataJSON"].as_str().unwrap()).unwrap();
    assert!(String::from_utf8_lossy(&client_data).contains("http://evil.test.localhost"));
    let r = finish(&base, &a).await;
    assert_eq!((r.status, err_name(&r)), (401, "PASSKEY_REJECTED".into()), "{}", r.body);

    // The console offers the same passkey sign-in: Ann's passkey identifies her there, and the
    // console (admins only) says so by name.
    laptop.goto(&format!("{site}/console"));
    laptop.wait_for(None, "!!document.querySelector('#signin-with-passkey')", WAIT);
    laptop.click(None, "#signin-with-passkey");
    let refused = laptop.wait_for(
        None,
        "(() => { const e = document.querySelector('#signin-error'); \
          return e && e.textContent.includes('needs the admin role') ? e.textContent : false; })()",
        WAIT,
    );
    let refused = refused.as_str().unwrap_or_default().to_string();
    assert!(refused.contains("needs the admin role") && refused.contains("ann@example.com"), "{refused}");

    // Passkeys are listed, renamed and deleted; a deleted passkey no longer signs in.
    let (st, list) = api(&ann, "GET", format!("{base}/auth/passkeys"), None).await;
    assert_eq!(st, 200, "{list}");
    let keys = list["passkeys"].as_array().unwrap().clone();
    assert_eq!(keys.len(), 2, "{list}");
    assert!(keys.iter().all(|k| k["last_used_at"].is_string()), "{list}");
    let laptop_key = keys.iter().find(|k| k["name"] == json!("Laptop passkey")).unwrap();
    let id = laptop_key["id"].as_str().unwrap();
    let r = json_request(&ann, reqwest::Method::PATCH, format!("{base}/auth/passkeys/{id}"), Some(json!({"name": "Old laptop"}))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = json_request(&bob, reqwest::Method::DELETE, format!("{base}/auth/passkeys/{id}"), None).await;
    assert_eq!(r.status, 404, "Bob cannot delete Ann's passkey");
    let r = json_request(&ann, reqwest::Method::DELETE, format!("{base}/auth/passkeys/{id}"), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    open_page(&laptop, &format!("{site}/auth/passkey"));
    let a = assertion(&laptop);
    let r = finish(&base, &a).await;
    assert_eq!((r.status, err_name(&r)), (401, "PASSKEY_UNKNOWN".into()), "{}", r.body);
}

/// A fresh password sign-in's access token.
async fn r_token(base: &str, email: &str) -> String {
    let r = signin(&anon_client(), base, email, &password_of(email)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["access_token"].as_str().unwrap().to_string()
}
