//! Issue 24 parts 3, 5, 6 through the real binary: OpenID Connect sign-in against a local fake
//! provider (discovery document, JWKS with a P-256 key made here, authorize and token
//! endpoints checking PKCE), account safety (1,000 wrong passwords, lockout per address and per
//! account, password reset, email verification and sign-in links through the notify outbox, the
//! audit trail in the posterity log) and the `auth` Lua component.
//!
//! Different client IPs come from binding the client socket to other loopback addresses.
//! Mail goes to the notify outbox (an SMTP relay that is not there keeps it queued); the tests
//! read the links from the queued messages (`GET /notify/messages`).

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{ADMIN_KEY, Resp, Server, anon_client, api, call_fn, client, client_with_token, jpost, put_fn, read, signin, wait_for};
use serde_json::{Value, json};
use sha2::Digest;

/// Deploy `body` as the function `name` (`return function(input) <body> end`), as the admin.
async fn deploy(base: &str, name: &str, body: &str) {
    let r = put_fn(&client(), base, name, &format!("return function(input)\n{body}\nend")).await;
    assert_eq!(r.status, 200, "deploying {name}: {}", r.body);
}

// ----- the fake OpenID Connect provider -----

/// What the next ID token says, and how it is spoiled.
#[derive(Clone, Debug)]
struct Identity {
    sub: String,
    email: Option<String>,
    email_verified: Value,
    tamper: Tamper,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Tamper {
    None,
    WrongNonce,
    Expired,
    WrongAudience,
    WrongIssuer,
    OtherKey,
}

struct Pending {
    nonce: String,
    challenge: String,
    redirect_uri: String,
    identity: Identity,
}

struct Fake {
    base: String,
    key_der: Vec<u8>,
    other_key_der: Vec<u8>,
    jwk: Value,
    next: Mutex<Identity>,
    codes: Mutex<HashMap<String, Pending>>,
    token_requests: Mutex<Vec<HashMap<String, String>>>,
}

fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).unwrap();
    b
}

fn p256_key() -> (Vec<u8>, Value) {
    use p256::pkcs8::EncodePrivateKey;
    let sk = p256::ecdsa::SigningKey::from_slice(&random32()).unwrap();
    let der = sk.to_pkcs8_der().unwrap().as_bytes().to_vec();
    let pt = sk.verifying_key().to_encoded_point(false);
    let jwk = json!({"kty": "EC", "crv": "P-256", "kid": "k1", "use": "sig", "alg": "ES256",
                     "x": b64(pt.x().unwrap()), "y": b64(pt.y().unwrap())});
    (der, jwk)
}

const CLIENT_ID: &str = "ichibase-test";
const CLIENT_SECRET: &str = "s3cret-of-the-test-client";

async fn discovery(State(f): State<Arc<Fake>>) -> Response {
    axum::Json(json!({
        "issuer": f.base,
        "authorization_endpoint": format!("{}/authorize", f.base),
        "token_endpoint": format!("{}/token", f.base),
        "jwks_uri": format!("{}/jwks", f.base),
        "response_types_supported": ["code"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "code_challenge_methods_supported": ["S256"],
    }))
    .into_response()
}

async fn jwks(State(f): State<Arc<Fake>>) -> Response {
    axum::Json(json!({"keys": [f.jwk]})).into_response()
}

async fn authorize(State(f): State<Arc<Fake>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let need = |k: &str| q.get(k).cloned().unwrap_or_default();
    if need("response_type") != "code" || need("client_id") != CLIENT_ID || need("code_challenge_method") != "S256" {
        return (axum::http::StatusCode::BAD_REQUEST, format!("bad authorization request: {q:?}")).into_response();
    }
    if need("state").is_empty() || need("nonce").is_empty() || need("code_challenge").is_empty() {
        return (axum::http::StatusCode::BAD_REQUEST, "state, nonce and code_challenge are required").into_response();
    }
    if !need("scope").split(' ').any(|s| s == "openid") {
        return (axum::http::StatusCode::BAD_REQUEST, "scope without openid").into_response();
    }
    let code = b64(&random32());
    f.codes.lock().unwrap().insert(
        code.clone(),
        Pending {
            nonce: need("nonce"),
            challenge: need("code_challenge"),
            redirect_uri: need("redirect_uri"),
            identity: f.next.lock().unwrap().clone(),
        },
    );
    let mut to = reqwest::Url::parse(&need("redirect_uri")).unwrap();
    to.query_pairs_mut().append_pair("code", &code).append_pair("state", &need("state"));
    (axum::http::StatusCode::SEE_OTHER, [(axum::http::header::LOCATION, to.to_string())]).into_response()
}

async fn token(State(f): State<Arc<Fake>>, body: String) -> Response {
    let form: HashMap<String, String> = form_urlencoded::parse(body.as_bytes()).into_owned().collect();
    f.token_requests.lock().unwrap().push(form.clone());
    let refuse = |why: &str| (axum::http::StatusCode::BAD_REQUEST, axum::Json(json!({"error": "invalid_grant", "error_description": why}))).into_response();
    let get = |k: &str| form.get(k).cloned().unwrap_or_default();
    if get("grant_type") != "authorization_code" || get("client_id") != CLIENT_ID || get("client_secret") != CLIENT_SECRET {
        return refuse("bad client or grant type");
    }
    let Some(p) = f.codes.lock().unwrap().remove(&get("code")) else { return refuse("unknown or used code") };
    if p.redirect_uri != get("redirect_uri") {
        return refuse("redirect_uri differs");
    }
    if b64(&sha2::Sha256::digest(get("code_verifier").as_bytes())) != p.challenge {
        return refuse("PKCE verifier does not match the challenge");
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let id = &p.identity;
    let mut claims = json!({
        "iss": if id.tamper == Tamper::WrongIssuer { "https://evil.example".to_string() } else { f.base.clone() },
        "sub": id.sub,
        "aud": if id.tamper == Tamper::WrongAudience { "someone-else" } else { CLIENT_ID },
        "iat": now,
        "exp": if id.tamper == Tamper::Expired { now - 3600 } else { now + 600 },
        "nonce": if id.tamper == Tamper::WrongNonce { "not-the-nonce".to_string() } else { p.nonce.clone() },
        "email_verified": id.email_verified,
    });
    if let Some(e) = &id.email {
        claims["email"] = json!(e);
    }
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("k1".into());
    let der = if id.tamper == Tamper::OtherKey { &f.other_key_der } else { &f.key_der };
    let id_token = jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_ec_der(der)).unwrap();
    axum::Json(json!({"access_token": "at-unused", "token_type": "Bearer", "expires_in": 600, "id_token": id_token})).into_response()
}

async fn start_fake() -> Arc<Fake> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let (key_der, jwk) = p256_key();
    let (other_key_der, _) = p256_key();
    let fake = Arc::new(Fake {
        base: format!("http://{addr}"),
        key_der,
        other_key_der,
        jwk,
        next: Mutex::new(Identity { sub: "nobody".into(), email: None, email_verified: json!(false), tamper: Tamper::None }),
        codes: Mutex::new(HashMap::new()),
        token_requests: Mutex::new(Vec::new()),
    });
    let app = axum::Router::new()
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/jwks", get(jwks))
        .route("/authorize", get(authorize))
        .route("/token", post(token))
        .with_state(Arc::clone(&fake));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    fake
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

fn set_cookie(r: &Resp, name: &str) -> Option<String> {
    r.headers.get_all("set-cookie").iter().filter_map(|v| v.to_str().ok()).find_map(|c| {
        let first = c.split(';').next()?;
        let (k, v) = first.split_once('=')?;
        (k == name && !v.is_empty()).then(|| v.to_string())
    })
}

/// Start at ichibase, pass the provider's authorize endpoint: (callback URL, state cookie).
async fn begin(base: &str, fake: &Fake, who: Identity) -> (String, String) {
    *fake.next.lock().unwrap() = who;
    let c = no_redirects();
    let r = read(c.get(format!("{base}/auth/oidc/fake/start")).send().await.unwrap()).await;
    assert_eq!(r.status, 303, "start: {}", r.body);
    let to_provider = r.header("location").unwrap().to_string();
    assert!(to_provider.starts_with(&fake.base), "{to_provider}");
    let cookie = set_cookie(&r, "ichibase_oidc").expect("the start sets the state cookie");
    let r = read(c.get(&to_provider).send().await.unwrap()).await;
    assert_eq!(r.status, 303, "authorize: {}", r.body);
    let callback = r.header("location").unwrap().to_string();
    assert!(callback.starts_with(&format!("{base}/auth/oidc/fake/callback?")), "{callback}");
    (callback, cookie)
}

async fn finish(callback: &str, cookie: &str) -> Resp {
    let mut rb = no_redirects().get(callback);
    if !cookie.is_empty() {
        rb = rb.header("cookie", format!("ichibase_oidc={cookie}"));
    }
    read(rb.send().await.unwrap()).await
}

async fn oidc_sign_in(base: &str, fake: &Fake, who: Identity) -> Resp {
    let (cb, cookie) = begin(base, fake, who).await;
    finish(&cb, &cookie).await
}

fn who(sub: &str, email: &str, verified: bool) -> Identity {
    Identity { sub: sub.into(), email: Some(email.into()), email_verified: json!(verified), tamper: Tamper::None }
}

fn assert_refused(r: &Resp, status: u16, code: u32, says: &str, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.body);
    assert_eq!(r.code(), Some(code), "{what}: {}", r.body);
    assert!(r.body.contains(says), "{what}: the answer says {says:?}: {}", r.body);
    assert!(set_cookie(r, "ichibase_session").is_none(), "{what}: no session cookie");
}

fn oidc_env(fake: &Fake) -> Vec<(String, String)> {
    vec![
        (
            "ICHIBASE_OIDC__PROVIDERS".into(),
            format!(
                "{{fake = {{discovery_url = \"{}/.well-known/openid-configuration\", client_id = \"{CLIENT_ID}\", client_secret = \"{CLIENT_SECRET}\"}}}}",
                fake.base
            ),
        ),
        ("ICHIBASE_OIDC__LEEWAY_SECS".into(), "30".into()),
    ]
}

fn start_server(env: &[(String, String)]) -> (Server, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let s = Server::start_in(tmp.path(), &["--signup-open", "true", "--posterity-flush-secs", "0.2"], &env);
    (s, tmp)
}

/// Posterity rows of sign-ins: (outcome, method, error) in order.
async fn audit_rows(base: &str) -> Vec<(String, String, String)> {
    let r = read(
        client()
            .post(format!("{base}/analytics"))
            .body("SELECT outcome, detail->>'method', coalesce(error, '') FROM log WHERE kind = 'auth' AND name = 'signin' ORDER BY ts")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
        .lines()
        .map(|l| {
            let mut f = l.split('\t');
            let mut next = || f.next().unwrap_or("").to_string();
            (next(), next(), next())
        })
        .collect()
}

#[tokio::test]
async fn oidc_sign_in_links_by_verified_email_and_refuses_forgeries() {
    let fake = start_fake().await;
    let (s, _tmp) = start_server(&oidc_env(&fake));
    let base = s.url.clone();

    // A new identity with a verified email: an account is created and signed in.
    let r = oidc_sign_in(&base, &fake, who("g-1", "carol@example.com", true)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["user"]["email"], "carol@example.com");
    assert!(set_cookie(&r, "ichibase_session").is_some(), "the session cookie is set");
    let carol = j["user"]["id"].as_str().unwrap().to_string();
    let (st, me) = api(&client_with_token(j["access_token"].as_str().unwrap()), "GET", format!("{base}/auth/me"), None).await;
    assert_eq!((st, me["user_id"].as_str()), (200, Some(carol.as_str())), "{me}");
    // PKCE: the token request carried a verifier that matched the challenge (the fake checks),
    // and the client secret.
    assert!(fake.token_requests.lock().unwrap().iter().all(|f| f.get("code_verifier").is_some_and(|v| v.len() >= 43)));
    // The same identity again: the same account, even with another email now.
    let r = oidc_sign_in(&base, &fake, who("g-1", "carol.new@example.com", true)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["user"]["id"], carol.as_str());

    // A verified email that has a password account links to it.
    let dave = common::signup(&base, "dave@example.com").await;
    let r = oidc_sign_in(&base, &fake, who("g-2", "DAVE@example.com", true)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["user"]["id"], dave.id.as_str(), "linked to the existing account");

    // An unverified email never links to an existing account ...
    let erin = common::signup(&base, "erin@example.com").await;
    for v in [json!(false), json!("false"), Value::Null] {
        let mut id = who("g-3", "erin@example.com", false);
        id.email_verified = v.clone();
        let r = oidc_sign_in(&base, &fake, id).await;
        assert_refused(&r, 403, 1142, "did not verify", &format!("unverified email ({v})"));
    }
    // ... and is not linked afterwards either: a later verified sign-in of g-3 links by email.
    let r = oidc_sign_in(&base, &fake, who("g-3", "erin@example.com", true)).await;
    assert_eq!(r.json()["user"]["id"], erin.id.as_str());
    // Without an email at all: refused too (by default).
    let r = oidc_sign_in(&base, &fake, Identity { sub: "g-4".into(), email: None, email_verified: json!(true), tamper: Tamper::None }).await;
    assert_refused(&r, 403, 1142, "cannot be linked", "no email");

    // Forged or spoiled ID tokens.
    for (t, says) in [
        (Tamper::WrongNonce, "nonce"),
        (Tamper::Expired, "expired"),
        (Tamper::WrongAudience, "audience"),
        (Tamper::WrongIssuer, "issuer"),
        (Tamper::OtherKey, "signature"),
    ] {
        let mut id = who("g-1", "carol@example.com", true);
        id.tamper = t;
        let r = oidc_sign_in(&base, &fake, id).await;
        assert_refused(&r, 401, 1140, says, &format!("{t:?}"));
    }

    // Bad state: altered, from another browser (no cookie / another cookie), replayed.
    let (cb, cookie) = begin(&base, &fake, who("g-1", "carol@example.com", true)).await;
    let altered = cb.replace("state=", "state=x");
    assert_refused(&finish(&altered, &cookie).await, 401, 1140, "state", "altered state");
    assert_refused(&finish(&cb, "").await, 401, 1140, "state", "no state cookie");
    let (_, other_cookie) = begin(&base, &fake, who("g-1", "carol@example.com", true)).await;
    assert_refused(&finish(&cb, &other_cookie).await, 401, 1140, "state", "another browser's cookie");
    let ok = finish(&cb, &cookie).await;
    assert_eq!(ok.status, 200, "the real browser still finishes: {}", ok.body);
    assert_refused(&finish(&cb, &cookie).await, 401, 1140, "state", "a replayed callback");
    // A state that was never issued, with a matching cookie.
    let forged = format!("{base}/auth/oidc/fake/callback?code=abc&state=forged-state");
    assert_refused(&finish(&forged, "forged-state").await, 401, 1140, "state", "a forged state");
    // The provider's own refusal.
    let r = finish(&format!("{base}/auth/oidc/fake/callback?error=access_denied&state=x"), "x").await;
    assert_refused(&r, 401, 1140, "access_denied", "provider error");
    // Unknown provider, and return_to elsewhere.
    let r = read(no_redirects().get(format!("{base}/auth/oidc/nope/start")).send().await.unwrap()).await;
    assert_eq!(r.status, 404, "{}", r.body);
    let r = read(no_redirects().get(format!("{base}/auth/oidc/fake/start?return_to=//evil.example/")).send().await.unwrap()).await;
    assert_eq!(r.status, 400, "{}", r.body);

    // return_to: a 303 back to the app with the session cookie.
    *fake.next.lock().unwrap() = who("g-1", "carol@example.com", true);
    let c = no_redirects();
    let r = read(c.get(format!("{base}/auth/oidc/fake/start?return_to=/app/home")).send().await.unwrap()).await;
    let cookie = set_cookie(&r, "ichibase_oidc").unwrap();
    let r = read(c.get(r.header("location").unwrap()).send().await.unwrap()).await;
    let r = finish(r.header("location").unwrap(), &cookie).await;
    assert_eq!((r.status, r.header("location")), (303, Some("/app/home")), "{}", r.body);
    assert!(set_cookie(&r, "ichibase_session").is_some());

    // Every attempt is in the audit trail, with its reason.
    let rows = wait_for("the OIDC audit rows", 30, || {
        let base = base.clone();
        async move {
            let rows = audit_rows(&base).await;
            (rows.iter().filter(|r| r.1 == "oidc:fake").count() >= 20).then_some(rows)
        }
    })
    .await;
    assert!(rows.iter().any(|r| r.0 == "error" && r.1 == "oidc:fake" && r.2.contains("nonce")), "{rows:?}");
    assert!(rows.iter().any(|r| r.0 == "ok" && r.1 == "oidc:fake"), "{rows:?}");
}

// ----- account safety -----

fn from_ip(third: u8, last: u8) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, third, last)))
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

fn mail_env() -> Vec<(String, String)> {
    vec![
        // Nothing listens there: messages stay queued and the tests read them from the outbox.
        ("ICHIBASE_NOTIFY__SMTP_URL".into(), "smtp://127.0.0.1:9".into()),
        ("ICHIBASE_NOTIFY__FROM".into(), "App <app@example.test>".into()),
        ("ICHIBASE_NOTIFY__BACKOFF_BASE_SECS".into(), "60".into()),
        ("ICHIBASE_AUTH_SAFETY__PUBLIC_URL".into(), "https://app.example.test".into()),
    ]
}

/// The newest link of `path` mailed to `to`: the token.
async fn mailed_token(base: &str, to: &str, path: &str) -> String {
    wait_for(&format!("a {path} mail to {to}"), 30, || async {
        let (st, v) = api(&client(), "GET", format!("{base}/notify/messages?channel=email&limit=100"), None).await;
        assert_eq!(st, 200, "{v}");
        let msgs = v["messages"].as_array().cloned().or_else(|| v.as_array().cloned()).unwrap_or_default();
        msgs.iter()
            .filter(|m| m["message"]["to"][0].as_str() == Some(to))
            .filter_map(|m| {
                let text = m["message"]["text"].as_str()?;
                let marker = format!("https://app.example.test/auth/{path}?token=");
                let at = text.find(&marker)? + marker.len();
                Some(text[at..].split_whitespace().next()?.to_string())
            })
            .next()
    })
    .await
}

async fn mails_to(base: &str, to: &str) -> usize {
    let (_, v) = api(&client(), "GET", format!("{base}/notify/messages?channel=email&limit=100"), None).await;
    let msgs = v["messages"].as_array().cloned().or_else(|| v.as_array().cloned()).unwrap_or_default();
    msgs.iter().filter(|m| m["message"]["to"][0].as_str() == Some(to)).count()
}

#[tokio::test]
async fn a_thousand_wrong_passwords_are_slowed_and_locked_while_the_owner_signs_in_elsewhere() {
    let mut env = mail_env();
    env.extend([
        ("ICHIBASE_AUTH_GUARD__SIGNIN_FAILURES_BEFORE_BACKOFF".to_string(), "5".to_string()),
        ("ICHIBASE_AUTH_GUARD__ACCOUNT_FAILURES_BEFORE_BACKOFF".to_string(), "20".to_string()),
        ("ICHIBASE_AUTH_GUARD__IP_FAILURES_BEFORE_BACKOFF".to_string(), "1000".to_string()),
        ("ICHIBASE_AUTH_GUARD__BACKOFF_BASE_SECS".to_string(), "1".to_string()),
        ("ICHIBASE_AUTH_GUARD__BACKOFF_MAX_SECS".to_string(), "600".to_string()),
    ]);
    let (s, _tmp) = start_server(&env);
    let base = s.url.clone();
    let email = "alice@example.com";
    let pw = common::password_of(email);
    common::signup(&base, email).await;

    // 1,000 wrong passwords from one address.
    let attacker = from_ip(0, 2);
    let (mut checked, mut locked, mut max_wait) = (0, 0, 0u64);
    for i in 0..1000 {
        let r = signin(&attacker, &base, email, &format!("guess number {i}")).await;
        match r.status {
            401 => checked += 1,
            429 => {
                locked += 1;
                max_wait = max_wait.max(r.header("retry-after").unwrap().parse().unwrap());
            }
            other => panic!("attempt {i}: {other} {}", r.body),
        }
    }
    assert_eq!(checked + locked, 1000);
    eprintln!("1,000 wrong passwords from one address: {checked} checked (401), {locked} refused (429), Retry-After up to {max_wait} s");
    // 5 allowed, then one more each time a lock-out (1, 2, 4, 8, ... s) ran out during the run.
    assert!(checked >= 5 && checked <= 14, "only the allowance and a few after lock-outs were checked: {checked}");
    assert!(max_wait >= 1);
    // The lock-out grows: each time it runs out, one more wrong password doubles it.
    let mut waits = Vec::new();
    for _ in 0..2 {
        loop {
            let r = signin(&attacker, &base, email, "one more guess").await;
            if r.status == 401 {
                break;
            }
            let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
            tokio::time::sleep(Duration::from_millis(wait * 1000 + 300)).await;
        }
        let r = signin(&attacker, &base, email, "and another").await;
        assert_eq!(r.status, 429, "{}", r.body);
        waits.push(r.header("retry-after").unwrap().parse::<u64>().unwrap());
    }
    eprintln!("lock-outs after the run: Retry-After {waits:?} s");
    assert!(waits[0] >= 2 && waits[1] > waits[0], "the lock-out doubles: {waits:?}");
    // The attacker's address gets no answer about the right password either (it is freshly
    // locked for a few seconds now).
    let r = signin(&attacker, &base, email, &pw).await;
    assert_eq!(r.status, 429, "{}", r.body);
    // The owner on another address (never used before) signs in.
    let r = signin(&from_ip(0, 3), &base, email, &pw).await;
    assert_eq!(r.status, 200, "the owner elsewhere: {}", r.body);

    // Spread over many addresses: the account locks for new addresses, not known ones.
    // (Each further failure doubles the account's lock-out: guess on, from new addresses, until
    // it is a few seconds long, so the checks below do not race its end.)
    let mut i = 0u8;
    loop {
        i += 1;
        assert!(i < 200, "the account never locked");
        let r = signin(&from_ip(1, i), &base, email, "spread guess!!").await;
        match r.status {
            401 => continue,
            429 if r.body.contains("for this account") => {
                let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
                if wait >= 3 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(wait * 1000 + 300)).await;
            }
            _ => panic!("{} {}", r.status, r.body),
        }
    }
    let r = signin(&from_ip(2, 1), &base, email, &pw).await;
    assert_eq!(r.status, 429, "a new address while the account is under attack: {}", r.body);
    assert!(r.body.contains("for this account"), "{}", r.body);
    let r = signin(&from_ip(0, 3), &base, email, &pw).await;
    assert_eq!(r.status, 200, "the owner's known address still signs in: {}", r.body);
    let r = signin(&from_ip(0, 1), &base, email, &pw).await;
    assert_eq!(r.status, 200, "the address of the sign-up still signs in: {}", r.body);

    // The way back in from a new address: a reset link (which also marks the address known).
    let newcomer = from_ip(2, 1);
    let r = jpost(&newcomer, &base, "/auth/reset/request", json!({"email": email})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let token = mailed_token(&base, email, "reset").await;
    let new_pw = "a brand new passphrase";
    let r = jpost(&newcomer, &base, "/auth/reset", json!({"token": token, "password": new_pw})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = signin(&newcomer, &base, email, new_pw).await;
    assert_eq!(r.status, 200, "after the reset, from the new address: {}", r.body);

    // The audit trail has the failures (with their reasons and addresses) and the successes.
    let rows = wait_for("the sign-in audit rows", 30, || {
        let base = base.clone();
        async move {
            let rows = audit_rows(&base).await;
            (rows.len() >= 1000 && rows.iter().any(|r| r.0 == "ok" && r.1 == "reset")).then_some(rows)
        }
    })
    .await;
    assert!(rows.iter().filter(|r| r.0 == "error" && r.2.contains("Too many")).count() >= 900, "locked attempts are logged");
    assert!(rows.iter().any(|r| r.0 == "error" && r.2.contains("Wrong email or password")));
    assert!(rows.iter().any(|r| r.0 == "ok" && r.1 == "password"));
    assert!(rows.iter().any(|r| r.0 == "ok" && r.1 == "reset"));
}

#[tokio::test]
async fn reset_verify_and_sign_in_links_go_through_the_outbox_once() {
    let (s, _tmp) = start_server(&mail_env());
    let base = s.url.clone();
    let email = "frank@example.com";
    let frank = common::signup(&base, email).await;

    // No enumeration: the same answer for an account and for nobody.
    let a = jpost(&anon_client(), &base, "/auth/reset/request", json!({"email": email})).await;
    let b = jpost(&anon_client(), &base, "/auth/reset/request", json!({"email": "nobody@example.com"})).await;
    assert_eq!((a.status, &a.body), (b.status, &b.body));
    let a = signin(&anon_client(), &base, "nobody@example.com", "wrong password!").await;
    let b = signin(&anon_client(), &base, email, "wrong password!").await;
    assert_eq!((a.status, a.json()["error"]["message"].clone()), (b.status, b.json()["error"]["message"].clone()));
    let token = mailed_token(&base, email, "reset").await;
    assert_eq!(mails_to(&base, "nobody@example.com").await, 0, "no mail for nobody");

    // The page does not spend the token; a weak password does not either.
    let page = read(anon_client().get(format!("{base}/auth/reset?token={token}")).send().await.unwrap()).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<form"), "{}", page.body);
    let r = jpost(&anon_client(), &base, "/auth/reset", json!({"token": token, "password": "12345678"})).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = jpost(&anon_client(), &base, "/auth/reset", json!({"token": token, "password": "frank's new secret"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Once only; the old password and the old sessions are gone.
    let r = jpost(&anon_client(), &base, "/auth/reset", json!({"token": token, "password": "another new secret"})).await;
    assert_eq!((r.status, r.code()), (400, Some(1143)), "{}", r.body);
    assert_eq!(signin(&anon_client(), &base, email, &common::password_of(email)).await.status, 401);
    let (st, _) = api(&frank.client, "GET", format!("{base}/auth/me"), None).await;
    assert_eq!(st, 401, "sessions were revoked by the reset");
    let r = signin(&anon_client(), &base, email, "frank's new secret").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let frank_token = r.json()["access_token"].as_str().unwrap().to_string();
    // Garbage tokens.
    for t in ["", "it_", "nope", &"it_x".repeat(100)] {
        let r = jpost(&anon_client(), &base, "/auth/reset", json!({"token": t, "password": "frank's other secret"})).await;
        assert_eq!(r.status, 400, "{t}: {}", r.body);
    }

    // Email verification: the reset proved the mailbox already.
    let fc = client_with_token(&frank_token);
    let (st, v) = api(&fc, "POST", format!("{base}/auth/verify/request"), Some(json!({}))).await;
    assert_eq!((st, v["status"].as_str()), (200, Some("verified")), "{v}");
    let gina = common::signup(&base, "gina@example.com").await;
    let (st, v) = api(&gina.client, "POST", format!("{base}/auth/verify/request"), Some(json!({}))).await;
    assert_eq!((st, v["status"].as_str()), (200, Some("sent")), "{v}");
    let token = mailed_token(&base, "gina@example.com", "verify").await;
    deploy(&base, "whoami", "return auth.user()").await;
    assert_eq!(call_fn(&gina.client, &base, "whoami", json!({})).await.json()["email_verified"], false);
    let r = jpost(&anon_client(), &base, "/auth/verify", json!({"token": token})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(call_fn(&gina.client, &base, "whoami", json!({})).await.json()["email_verified"], true);
    let r = jpost(&anon_client(), &base, "/auth/verify", json!({"token": token})).await;
    assert_eq!(r.status, 400, "a verification link works once: {}", r.body);
    // Anonymous callers cannot ask for one.
    let (st, _) = api(&anon_client(), "POST", format!("{base}/auth/verify/request"), Some(json!({}))).await;
    assert_eq!(st, 401);

    // Mail flooding is bounded per address (5 an hour by default).
    for _ in 0..8 {
        jpost(&anon_client(), &base, "/auth/reset/request", json!({"email": "gina@example.com"})).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let n = mails_to(&base, "gina@example.com").await;
    assert!(n <= 6, "1 verification + at most 5 resets: {n}");
}

// ----- the auth Lua component -----

#[tokio::test]
async fn lua_auth_component() {
    let mut env = mail_env();
    env.push(("ICHIBASE_AUTH_SAFETY__PRIVILEGED_FUNCTIONS".into(), "[\"onboard*\"]".into()));
    let (s, _tmp) = start_server(&env);
    let base = s.url.clone();
    let admin = client();
    let hank = common::signup(&base, "hank@example.com").await;

    deploy(&base, "whoami", "return {user = auth.user()}").await;
    let r = call_fn(&anon_client(), &base, "whoami", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["user"].is_null(), "anon has no user: {}", r.body);
    let u = call_fn(&hank.client, &base, "whoami", json!({})).await.json()["user"].clone();
    assert_eq!(u["id"], hank.id.as_str());
    assert_eq!(u["role"], "user");
    assert_eq!(u["email"], "hank@example.com");
    assert_eq!(u["claims"]["sub"], hank.id.as_str());
    assert_eq!(u["device"], "test", "the session's device: {u}");
    assert_eq!(u["session"], hank.signin["session_id"]);

    // auth.require
    deploy(&base, "editors_only", "local u = auth.require('editor') return u.id").await;
    let r = call_fn(&hank.client, &base, "editors_only", json!({})).await;
    assert_eq!((r.status, r.code()), (403, Some(1144)), "{}", r.body);
    assert!(r.body.contains("'editor'") && r.body.contains("'user'"), "names the role needed and held: {}", r.body);
    assert_eq!(call_fn(&anon_client(), &base, "editors_only", json!({})).await.status, 401);
    assert_eq!(call_fn(&admin, &base, "editors_only", json!({})).await.status, 200, "the admin passes role checks");
    // Not a module loader: `auth.require("io")` asks for the role 'io'.
    deploy(&base, "require_io", "return type(auth.require('io'))").await;
    let r = call_fn(&hank.client, &base, "require_io", json!({})).await;
    assert_eq!((r.status, r.code()), (403, Some(1144)), "{}", r.body);
    deploy(&base, "users_or_editors", "return auth.require({'editor', 'user'}).role").await;
    assert_eq!(call_fn(&hank.client, &base, "users_or_editors", json!({})).await.json(), json!("user"));
    deploy(&base, "claim_check", "return auth.require({email = input.email}).id").await;
    let r = call_fn(&hank.client, &base, "claim_check", json!({"email": "hank@example.com"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = call_fn(&hank.client, &base, "claim_check", json!({"email": "root@example.com"})).await;
    assert_eq!((r.status, r.code()), (403, Some(1144)), "{}", r.body);
    assert!(r.body.contains("claim 'email'"), "{}", r.body);

    // auth.can: the authorizer's own answer, with the policy views that give access.
    let r = common::post(&admin, &base, &[], "CREATE TABLE notes (id INTEGER PRIMARY KEY, owner TEXT, body TEXT)").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = jpost(&admin, &base, "/admin/policies", json!({"name": "my_notes", "table": "notes", "roles": ["user"], "operations": ["select", "insert"], "using": "owner = auth_userid()"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    deploy(&base, "can", "local ok, via = auth.can(input.op, input.t) return {ok = ok, via = via}").await;
    let can = |c: reqwest::Client, op: &'static str, t: &'static str| {
        let base = base.clone();
        async move { call_fn(&c, &base, "can", json!({"op": op, "t": t})).await }
    };
    let r = can(hank.client.clone(), "select", "notes").await.json();
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["via"], json!(["my_notes"]), "{r}");
    assert_eq!(can(hank.client.clone(), "select", "my_notes").await.json()["ok"], true);
    assert_eq!(can(hank.client.clone(), "insert", "my_notes").await.json()["ok"], true);
    assert_eq!(can(hank.client.clone(), "delete", "my_notes").await.json()["ok"], false);
    assert_eq!(can(anon_client(), "select", "my_notes").await.json()["ok"], false);
    assert_eq!(can(admin.clone(), "delete", "notes").await.json()["ok"], true);
    // What auth.can says is what SQL does.
    let r = common::post(&hank.client, &base, &[], "SELECT * FROM notes").await;
    assert_ne!(r.status, 200, "{}", r.body);
    let r = common::post(&hank.client, &base, &[], "SELECT * FROM my_notes").await;
    assert_eq!(r.status, 200, "{}", r.body);

    // Hostile arguments: typed 400s, never a crash.
    let hostile = [
        "return auth.require(42)",
        "return auth.require(nil)",
        "return auth.require({'editor', x = 1})",
        "return auth.require({[{}] = 1})",
        "return auth.require(string.rep('r', 100000))",
        "return auth.can(nil, 'notes')",
        "return auth.can('drop', 'notes')",
        "return auth.can('select', string.rep('t', 1000))",
        "return auth.can('select', {})",
        "return auth.invite('x@example.com')",
        "return auth.invite({email = 'x@example.com', evil = true})",
        "return auth.invite({email = string.rep('a', 10000)})",
        "return auth.invite({email = 'not an email'})",
        "return auth.invite({})",
        "return auth.send_sign_in_link({email = {}})",
        "return auth.revoke_device(function() end)",
        "return auth.revoke_device({user = 1})",
        "return auth.revoke_device('')",
        "return db.tx(function() return auth.invite({email = 'tx@example.com'}) end)",
    ];
    for (i, src) in hostile.iter().enumerate() {
        let name = format!("hostile{i}");
        deploy(&base, &name, src).await;
        let r = call_fn(&admin, &base, &name, json!({})).await;
        assert_eq!(r.status, 400, "{src}: {}", r.body);
    }
    // Privileged functions: not for a user calling an ordinary function ...
    deploy(&base, "invite_plain", "return auth.invite({email = input.email})").await;
    let r = call_fn(&hank.client, &base, "invite_plain", json!({"email": "ivy@example.com"})).await;
    assert_eq!((r.status, r.code()), (403, Some(497)), "{}", r.body);
    assert!(r.body.contains("privileged_functions"), "{}", r.body);
    // ... but from a function the admin listed, for any caller.
    deploy(&base, "onboard_invite", "return auth.invite({email = input.email})").await;
    let r = call_fn(&hank.client, &base, "onboard_invite", json!({"email": "ivy@example.com"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["created"], true);
    // A user may not hand out the admin role.
    deploy(&base, "onboard_admin", "return auth.invite({email = input.email, role = 'admin'})").await;
    let r = call_fn(&hank.client, &base, "onboard_admin", json!({"email": "mallory@example.com"})).await;
    assert_eq!(r.status, 403, "{}", r.body);
    // The invitation sets a password once.
    let token = mailed_token(&base, "ivy@example.com", "reset").await;
    let r = jpost(&anon_client(), &base, "/auth/reset", json!({"token": token, "password": "ivy's first secret"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ivy = signin(&anon_client(), &base, "ivy@example.com", "ivy's first secret").await;
    assert_eq!(ivy.status, 200, "{}", ivy.body);

    // A sign-in link: one session, once.
    deploy(&base, "onboard_link", "return auth.send_sign_in_link({email = input.email})").await;
    let r = call_fn(&hank.client, &base, "onboard_link", json!({"email": "hank@example.com"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = call_fn(&hank.client, &base, "onboard_link", json!({"email": "nobody@example.com"})).await;
    assert_eq!(r.status, 404, "{}", r.body);
    let token = mailed_token(&base, "hank@example.com", "link").await;
    let page = read(anon_client().get(format!("{base}/auth/link?token={token}")).send().await.unwrap()).await;
    assert_eq!(page.status, 200, "the page does not spend the link");
    let r = jpost(&anon_client(), &base, "/auth/link", json!({"token": token, "device": "phone"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let linked = r.json();
    assert_eq!(linked["user"]["id"], hank.id.as_str());
    let r = jpost(&anon_client(), &base, "/auth/link", json!({"token": token})).await;
    assert_eq!((r.status, r.code()), (400, Some(1143)), "{}", r.body);

    // auth.revoke_device: the linked "phone" session dies at once; hank's first one lives.
    let phone = client_with_token(linked["access_token"].as_str().unwrap());
    assert_eq!(api(&phone, "GET", format!("{base}/auth/me"), None).await.0, 200);
    deploy(&base, "onboard_revoke", "return auth.revoke_device(input.id)").await;
    let r = call_fn(&hank.client, &base, "onboard_revoke", json!({"id": linked["session_id"]})).await;
    assert_eq!((r.status, r.json()), (200, json!(true)), "{}", r.body);
    assert_eq!(api(&phone, "GET", format!("{base}/auth/me"), None).await.0, 401, "the revoked device");
    assert_eq!(api(&hank.client, "GET", format!("{base}/auth/me"), None).await.0, 200, "the other device");
    // A device id (GET /auth/devices): every session of that device ends.
    let tablet = signin(&anon_client(), &base, "hank@example.com", &common::password_of("hank@example.com")).await;
    assert_eq!(tablet.status, 200, "{}", tablet.body);
    let tablet = tablet.json();
    let tablet_client = client_with_token(tablet["access_token"].as_str().unwrap());
    assert_eq!(api(&tablet_client, "GET", format!("{base}/auth/me"), None).await.0, 200);
    let r = call_fn(&hank.client, &base, "onboard_revoke", json!({"id": tablet["device_id"]})).await;
    assert_eq!((r.status, r.json()), (200, json!(true)), "{}", r.body);
    assert_eq!(api(&tablet_client, "GET", format!("{base}/auth/me"), None).await.0, 401, "the revoked device");
    assert_eq!(api(&hank.client, "GET", format!("{base}/auth/me"), None).await.0, 200, "another device");
    // {user = id}: every session of the user.
    deploy(&base, "onboard_signout", "return auth.revoke_device({user = input.user})").await;
    let r = call_fn(&admin, &base, "onboard_signout", json!({"user": hank.id})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(api(&hank.client, "GET", format!("{base}/auth/me"), None).await.0, 401);
    let _ = ADMIN_KEY;
}
