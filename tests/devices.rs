//! Devices (`/auth/devices`) and HTTPS (`--tls-cert`, `--tls-key`) against the real binary:
//! sessions belong to devices; a device is rejoined by its id or cookie; revoking a device ends
//! its access tokens, refresh tokens, session cookie and open WebSockets at once; "sign out
//! everywhere"; nobody manages another user's devices; HTTPS with a certificate made here.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

async fn create_user(base: &str, email: &str) {
    let (s, v) = api(&client(), "POST", format!("{base}/admin/users"), Some(json!({"email": email, "password": password_of(email)}))).await;
    assert_eq!(s, 200, "{v}");
}

async fn signin_as(base: &str, email: &str, body: Value) -> Resp {
    let mut b = json!({"email": email, "password": password_of(email)});
    for (k, v) in body.as_object().unwrap() {
        b[k] = v.clone();
    }
    jpost(&anon_client(), base, "/auth/signin", b).await
}

fn bearer(token: &str) -> reqwest::Client {
    client_with_token(token)
}

/// Wait (up to 30 s) for the server to close `ws` with code 1008; the reason.
async fn closed_with_1008<S>(ws: &mut S) -> String
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next()).await.expect("the socket was not closed within 30 s");
        match m {
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 1008, "{f:?}");
                return f.reason.to_string();
            }
            Some(Ok(Message::Close(None))) | None | Some(Err(_)) => panic!("closed without a 1008 frame"),
            Some(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn devices_list_rename_revoke_and_sign_out_everywhere() {
    let s = Server::start(&[]);
    let base = s.url.clone();
    create_user(&base, "ann@example.com").await;
    create_user(&base, "bob@example.com").await;

    // Two devices of Ann: a laptop (by name) and a phone (by user agent).
    let laptop = signin_as(&base, "ann@example.com", json!({"device": "Ann's laptop"})).await;
    assert_eq!(laptop.status, 200, "{}", laptop.body);
    let laptop = laptop.json();
    let laptop_dev = laptop["device_id"].as_str().unwrap().to_string();
    let phone_client = reqwest::Client::builder().user_agent("Phone/1.0 (test)").build().unwrap();
    let r = jpost(&phone_client, &base, "/auth/signin", json!({"email": "ann@example.com", "password": password_of("ann@example.com")})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The device cookie rides along with the session cookie.
    let cookies: Vec<&str> = r.headers.get_all("set-cookie").iter().filter_map(|v| v.to_str().ok()).collect();
    assert!(cookies.iter().any(|c| c.starts_with("ichibase_device=") && c.contains("HttpOnly") && c.contains("Path=/auth")), "{cookies:?}");
    let phone = r.json();
    let phone_dev = phone["device_id"].as_str().unwrap().to_string();
    assert_ne!(laptop_dev, phone_dev);

    // Signing in again on the laptop (its device id) joins the laptop device; a made-up or
    // another user's device id makes a new device.
    let again = signin_as(&base, "ann@example.com", json!({"device_id": laptop_dev})).await.json();
    assert_eq!(again["device_id"], json!(laptop_dev));
    let bob = signin_as(&base, "bob@example.com", json!({"device_id": laptop_dev})).await.json();
    assert_ne!(bob["device_id"], json!(laptop_dev), "Bob cannot join Ann's device");
    // ... and by the device cookie.
    let cookie_join = anon_client()
        .post(format!("{base}/auth/signin"))
        .header("cookie", format!("ichibase_device={phone_dev}"))
        .json(&json!({"email": "ann@example.com", "password": password_of("ann@example.com")}))
        .send()
        .await
        .unwrap();
    let cookie_join: Value = cookie_join.json().await.unwrap();
    assert_eq!(cookie_join["device_id"], json!(phone_dev));

    // The access token names the device.
    let ann = bearer(laptop["access_token"].as_str().unwrap());
    let (st, me) = api(&ann, "GET", format!("{base}/auth/me"), None).await;
    assert_eq!(st, 200);
    assert_eq!(me["claims"]["device_id"], json!(laptop_dev), "{me}");

    // The list: two devices, the laptop current with two sessions; the phone by its agent.
    let (st, list) = api(&ann, "GET", format!("{base}/auth/devices"), None).await;
    assert_eq!(st, 200, "{list}");
    let devices = list["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2, "{list}");
    let find = |id: &str| devices.iter().find(|d| d["id"] == json!(id)).unwrap().clone();
    let l = find(&laptop_dev);
    assert_eq!(l["current"], json!(true));
    assert_eq!(l["sessions"], json!(2));
    assert_eq!(l["name"], json!("Ann's laptop"));
    let p = find(&phone_dev);
    assert_eq!(p["current"], json!(false));
    assert_eq!(p["user_agent"], json!("Phone/1.0 (test)"));
    assert_eq!(p["last_ip"], json!("127.0.0.1"));
    for k in ["first_seen_at", "last_seen_at"] {
        assert!(p[k].as_str().unwrap().ends_with('Z'), "{p}");
    }

    // Rename; bad names and other users' devices are refused.
    let (st, v) = json_patch(&ann, format!("{base}/auth/devices/{phone_dev}"), json!({"name": "Ann's phone"})).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = json_patch(&ann, format!("{base}/auth/devices/{phone_dev}"), json!({"name": "  "})).await;
    assert_eq!((st, v["error"]["name"].as_str()), (400, Some("BAD_ARGUMENTS")), "{v}");
    let bob_c = bearer(bob["access_token"].as_str().unwrap());
    let (st, _) = json_patch(&bob_c, format!("{base}/auth/devices/{phone_dev}"), json!({"name": "mine now"})).await;
    assert_eq!(st, 404);
    let (st, _) = api(&bob_c, "DELETE", format!("{base}/auth/devices/{phone_dev}"), None).await;
    assert_eq!(st, 404, "Bob cannot revoke Ann's device");
    let (_, list) = api(&ann, "GET", format!("{base}/auth/devices"), None).await;
    assert!(list.to_string().contains("Ann's phone"), "{list}");
    // Unauthenticated: 401.
    let (st, _) = api(&anon_client(), "GET", format!("{base}/auth/devices"), None).await;
    assert_eq!(st, 401);

    // The phone: a WebSocket on its access token, its refresh token, its session cookie.
    let phone_token = phone["access_token"].as_str().unwrap().to_string();
    let ws_url = base.replace("http://", "ws://");
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{ws_url}/ws?access_token={phone_token}")).await.unwrap();
    let cookie_session = cookie_join["refresh_token"].as_str().unwrap().to_string();

    // Refreshing moves last-seen on and rotates the token.
    let r = jpost(&anon_client(), &base, "/auth/refresh", json!({"refresh_token": phone["refresh_token"]})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let refreshed = r.json();
    assert_eq!(refreshed["device_id"], json!(phone_dev));
    let phone_refresh = refreshed["refresh_token"].as_str().unwrap().to_string();

    // Revoke the phone from the laptop: everything of the phone dies at once.
    let t0 = std::time::Instant::now();
    let (st, v) = api(&ann, "DELETE", format!("{base}/auth/devices/{phone_dev}"), None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["sessions_revoked"], json!(2), "{v}");
    let reason = closed_with_1008(&mut ws).await;
    // A figure for the README, not an assertion.
    eprintln!("device revocation: the device's WebSocket closed {:.1} ms after the DELETE was sent", t0.elapsed().as_secs_f64() * 1e3);
    assert!(reason.contains("revoked"), "{reason}");
    let (st, v) = api(&bearer(&phone_token), "GET", format!("{base}/auth/me"), None).await;
    assert_eq!(st, 401, "the phone's access token: {v}");
    let r = jpost(&anon_client(), &base, "/auth/refresh", json!({"refresh_token": phone_refresh})).await;
    assert_eq!(r.status, 401, "the phone's refresh token: {}", r.body);
    let r = anon_client().get(format!("{base}/auth/me")).header("cookie", format!("ichibase_session={cookie_session}")).send().await.unwrap();
    assert_eq!(r.status(), 401, "the phone's session cookie");
    let (st, _) = api(&ann, "DELETE", format!("{base}/auth/devices/{phone_dev}"), None).await;
    assert_eq!(st, 404, "revoked already");
    // The laptop lives on; the phone is gone from the list. Signing in with the revoked device's
    // id starts a new device.
    let (st, list) = api(&ann, "GET", format!("{base}/auth/devices"), None).await;
    assert_eq!(st, 200);
    assert_eq!(list["devices"].as_array().unwrap().len(), 1, "{list}");
    let back = signin_as(&base, "ann@example.com", json!({"device_id": phone_dev})).await.json();
    assert_ne!(back["device_id"], json!(phone_dev));

    // Sign out everywhere but here: the new phone session ends, the laptop stays.
    let r = jpost(&ann, &base, "/auth/devices/revoke-all?keep_current=true", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["sessions_revoked"], json!(1), "{}", r.body);
    let (st, _) = api(&bearer(back["access_token"].as_str().unwrap()), "GET", format!("{base}/auth/me"), None).await;
    assert_eq!(st, 401);
    let (st, _) = api(&ann, "GET", format!("{base}/auth/me"), None).await;
    assert_eq!(st, 200);
    // Sign out everywhere: the laptop too (both its sessions), and its cookie is cleared.
    let second_laptop = bearer(again["access_token"].as_str().unwrap());
    let r = jpost(&ann, &base, "/auth/devices/revoke-all", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.headers.get_all("set-cookie").iter().any(|v| v.to_str().unwrap().starts_with("ichibase_session=;")));
    for c in [&ann, &second_laptop] {
        let (st, _) = api(c, "GET", format!("{base}/auth/me"), None).await;
        assert_eq!(st, 401);
    }
    // Bob was not touched.
    let (st, _) = api(&bob_c, "GET", format!("{base}/auth/me"), None).await;
    assert_eq!(st, 200);
}

async fn json_patch(c: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let r = json_request(c, reqwest::Method::PATCH, url, Some(body)).await;
    (r.status, serde_json::from_str(&r.body).unwrap_or(json!({"text": r.body})))
}

/// A certificate for localhost and 127.0.0.1, made here; (cert PEM path, key PEM path, cert PEM).
fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let cert_pem = ck.cert.pem();
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, &cert_pem).unwrap();
    std::fs::write(&k, ck.signing_key.serialize_pem()).unwrap();
    (c, k, cert_pem)
}

#[tokio::test(flavor = "multi_thread")]
async fn https_with_a_given_certificate() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key, pem) = self_signed(certs.path());
    let s = Server::start(&["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]);
    assert!(s.url.starts_with("https://127.0.0.1:"), "{}", s.url);
    let port = s.url.rsplit(':').next().unwrap().to_string();
    let trusting = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    for host in ["127.0.0.1", "localhost"] {
        let r = trusting.get(format!("https://{host}:{port}/ping")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{host}");
    }
    // The API works over it; the cookies are Secure.
    let r = trusting
        .post(format!("https://localhost:{port}/admin/users"))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"email": "tls@example.com", "password": password_of("tls@example.com")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = trusting
        .post(format!("https://localhost:{port}/auth/signin"))
        .json(&json!({"email": "tls@example.com", "password": password_of("tls@example.com")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cookies: Vec<String> = r.headers().get_all("set-cookie").iter().map(|v| v.to_str().unwrap().to_string()).collect();
    assert_eq!(cookies.len(), 2, "{cookies:?}");
    assert!(cookies.iter().all(|c| c.contains("; Secure")), "{cookies:?}");
    let tokens: Value = r.json().await.unwrap();
    // A WebSocket over TLS (wss://, what a phone's page opens).
    let mut ws = wss(&pem, &port, tokens["access_token"].as_str().unwrap()).await;
    let hello = loop {
        match ws.next().await.expect("a frame").expect("a frame") {
            Message::Text(t) => break serde_json::from_str::<Value>(&t).unwrap(),
            _ => continue,
        }
    };
    assert_eq!(hello["type"], json!("hello"), "{hello}");
    assert_eq!(hello["user_id"], tokens["user"]["id"]);
    // The sign-in page is served (a phone opens it).
    let page = trusting.get(format!("https://localhost:{port}/auth/passkey")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("Sign in with a passkey"));
    // A client that does not trust the certificate stops at the handshake; plain HTTP to the
    // HTTPS port gets no HTTP answer; the server keeps serving.
    let untrusting = reqwest::Client::new();
    assert!(untrusting.get(format!("https://localhost:{port}/ping")).send().await.is_err());
    let plain = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
    match plain.get(format!("http://127.0.0.1:{port}/ping")).send().await {
        Err(_) => {}
        Ok(r) => assert_ne!(r.status(), 200, "plain HTTP on the HTTPS port"),
    }
    let r = trusting.get(format!("https://localhost:{port}/ping")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// A WebSocket to `wss://localhost:<port>/ws` trusting only `pem` (rustls with ring).
async fn wss(
    pem: &str,
    port: &str,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}")).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(format!("wss://localhost:{port}/ws?access_token={token}"), tls)
        .await
        .unwrap();
    ws
}

#[test]
fn tls_settings_are_checked_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = self_signed(dir.path());
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ichibase"))
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(args)
            .env_remove("ICHIBASE_CONFIG")
            .env("ICHIBASE_ADMIN_KEY", ADMIN_KEY)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} started");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let e = run(&["--tls-cert", cert.to_str().unwrap()]);
    assert!(e.contains("--tls-cert and --tls-key go together"), "{e}");
    let e = run(&["--tls-cert", key.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]);
    assert!(e.contains("holds no CERTIFICATE"), "{e}");
    let e = run(&["--tls-cert", cert.to_str().unwrap(), "--tls-key", cert.to_str().unwrap()]);
    assert!(e.contains("TLS private key"), "{e}");
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let other_key = dir.path().join("other.pem");
    std::fs::write(&other_key, other.signing_key.serialize_pem()).unwrap();
    let e = run(&["--tls-cert", cert.to_str().unwrap(), "--tls-key", other_key.to_str().unwrap()]);
    assert!(e.contains("do not fit together"), "{e}");
    assert!(!dir.path().join("data").exists(), "a refused start creates nothing");
}
