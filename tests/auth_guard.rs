//! Adversarial tests of the identity front door through the real binary (issue 12, items 8 and
//! 14-19): sign-in back-off per account and per client IP, a bounded password-hashing pool that
//! a sign-in flood cannot use to starve other requests, refresh-token reuse detection, empty
//! Basic credentials, uniform sign-up answers, password strength, private data files and
//! guessable admin keys refused at start.
//!
//! Different client IPs come from binding the client socket to other loopback addresses
//! (127.0.0.0/8 is all local on Linux).

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use common::{
    ADMIN_KEY, Resp, Server, anon_client, client_with_token, jpost, password_of, post, read, signin,
};
use serde_json::{Value, json};

fn from_ip(last: u8) -> reqwest::Client {
    from_ip4(0, last)
}

fn from_ip4(third: u8, last: u8) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, third, last)))
        .pool_max_idle_per_host(4)
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// Sign up (whose answer carries no tokens) and sign in; the sign-in answer.
async fn account(base: &str, email: &str) -> Value {
    common::signup(base, email).await.signin
}

/// A 429 with a Retry-After header of a whole number of seconds; returns it.
fn assert_locked(r: &Resp, what: &str) -> u64 {
    assert_eq!(r.status, 429, "{what}: {}", r.body);
    let secs: u64 = r
        .header("retry-after")
        .unwrap_or_else(|| panic!("{what}: 429 without Retry-After"))
        .parse()
        .unwrap_or_else(|e| panic!("{what}: Retry-After not a number: {e}"));
    assert!(secs >= 1, "{what}: Retry-After {secs}");
    assert!(
        r.body.to_lowercase().contains("too many"),
        "{what}: the answer says why: {}",
        r.body
    );
    secs
}

async fn basic(c: &reqwest::Client, base: &str, user: &str, pass: &str) -> Resp {
    read(
        c.post(format!("{base}/"))
            .basic_auth(user, Some(pass))
            .body("SELECT auth_role()")
            .send()
            .await
            .unwrap(),
    )
    .await
}

fn guard_env(pairs: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    pairs.to_vec()
}

fn start(env: &[(&str, &str)]) -> (Server, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_in(tmp.path(), &["--signup-open", "true"], env);
    (s, tmp)
}

#[tokio::test]
async fn signin_backs_off_per_account_across_ips() {
    let env = guard_env(&[
        ("ICHIBASE_AUTH_GUARD__SIGNIN_FAILURES_BEFORE_BACKOFF", "3"),
        ("ICHIBASE_AUTH_GUARD__ACCOUNT_FAILURES_BEFORE_BACKOFF", "3"),
        ("ICHIBASE_AUTH_GUARD__BACKOFF_BASE_SECS", "3"),
        ("ICHIBASE_AUTH_GUARD__IP_FAILURES_BEFORE_BACKOFF", "100000"),
    ]);
    let (s, _tmp) = start(&env);
    let base = &s.url;
    account(base, "alice@example.com").await;
    account(base, "bob@example.com").await;
    // Three wrong passwords, each from another IP: all checked, all 401.
    for i in 0..3u8 {
        let r = signin(
            &from_ip(10 + i),
            base,
            "alice@example.com",
            "wrong password!",
        )
        .await;
        assert_eq!(r.status, 401, "attempt {i}: {}", r.body);
    }
    // Now the account is locked for every address it has not signed in from, whatever the
    // password; the address it signed up and in from (127.0.0.1) is known and still gets in.
    let r = signin(
        &anon_client(),
        base,
        "alice@example.com",
        &password_of("alice@example.com"),
    )
    .await;
    assert_eq!(r.status, 200, "the owner's known address: {}", r.body);
    let r = signin(&from_ip(20), base, "alice@example.com", "wrong again!!").await;
    let secs = assert_locked(&r, "a 4th wrong password");
    assert!(secs <= 4, "first back-off is about the base (3 s): {secs}");
    let r = signin(
        &from_ip(21),
        base,
        "alice@example.com",
        &password_of("alice@example.com"),
    )
    .await;
    assert_locked(&r, "the right password while locked");
    let r = basic(
        &from_ip(22),
        base,
        "alice@example.com",
        &password_of("alice@example.com"),
    )
    .await;
    assert_locked(&r, "Basic auth with the right password while locked");
    let r = read(
        from_ip(23)
            .post(format!("{base}/"))
            .query(&[
                ("user", "alice@example.com"),
                ("password", &password_of("alice@example.com")),
            ])
            .body("SELECT 1")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_locked(&r, "URL user/password while locked");
    // Case and spaces do not make another account.
    let r = signin(
        &from_ip(24),
        base,
        " ALICE@example.com ",
        &password_of("alice@example.com"),
    )
    .await;
    assert_locked(&r, "the same account spelled differently");
    // Other accounts, from the same IPs, are untouched.
    let r = signin(
        &from_ip(10),
        base,
        "bob@example.com",
        &password_of("bob@example.com"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Unknown accounts lock the same way (no enumeration by lockout behaviour).
    for i in 0..3u8 {
        let r = signin(
            &from_ip(30 + i),
            base,
            "nobody@example.com",
            "wrong password!",
        )
        .await;
        assert_eq!(r.status, 401, "{}", r.body);
    }
    let r = signin(&from_ip(40), base, "nobody@example.com", "wrong password!").await;
    assert_locked(&r, "an unknown account");
    // After Retry-After the right password works again, and resets the count.
    tokio::time::sleep(Duration::from_millis(secs * 1000 + 300)).await;
    let r = signin(
        &from_ip(41),
        base,
        "alice@example.com",
        &password_of("alice@example.com"),
    )
    .await;
    assert_eq!(r.status, 200, "after the back-off: {}", r.body);
    let r = signin(&from_ip(41), base, "alice@example.com", "wrong password!").await;
    assert_eq!(r.status, 401, "a success resets the count: {}", r.body);
}

#[tokio::test]
async fn a_burst_of_wrong_passwords_checks_only_the_allowance() {
    // The reported attack: 40 wrong passwords in about a second, then the right one.
    let env = guard_env(&[
        ("ICHIBASE_AUTH_GUARD__SIGNIN_FAILURES_BEFORE_BACKOFF", "5"),
        ("ICHIBASE_AUTH_GUARD__ACCOUNT_FAILURES_BEFORE_BACKOFF", "5"),
        ("ICHIBASE_AUTH_GUARD__BACKOFF_BASE_SECS", "5"),
        ("ICHIBASE_AUTH_GUARD__IP_FAILURES_BEFORE_BACKOFF", "100000"),
    ]);
    let (s, _tmp) = start(&env);
    let base = s.url.clone();
    account(&base, "alice@example.com").await;
    let mut tasks = Vec::new();
    for i in 0..40u8 {
        let base = base.clone();
        tasks.push(tokio::spawn(async move {
            signin(
                &from_ip(50 + i),
                &base,
                "alice@example.com",
                &format!("guess number {i}"),
            )
            .await
            .status
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let checked = statuses.iter().filter(|s| **s == 401).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(checked + refused, 40, "{statuses:?}");
    assert!(
        checked <= 5,
        "at most the allowance is checked, concurrently too: {statuses:?}"
    );
    let r = signin(
        &from_ip(99),
        &base,
        "alice@example.com",
        &password_of("alice@example.com"),
    )
    .await;
    assert_locked(&r, "the right password after the burst");
}

#[tokio::test]
async fn signin_backs_off_per_ip_across_accounts() {
    let env = guard_env(&[
        (
            "ICHIBASE_AUTH_GUARD__SIGNIN_FAILURES_BEFORE_BACKOFF",
            "100000",
        ),
        ("ICHIBASE_AUTH_GUARD__IP_FAILURES_BEFORE_BACKOFF", "4"),
        ("ICHIBASE_AUTH_GUARD__BACKOFF_BASE_SECS", "30"),
    ]);
    let (s, _tmp) = start(&env);
    let base = &s.url;
    for e in ["carol@example.com", "dan@example.com"] {
        account(base, e).await;
    }
    let attacker = from_ip(30);
    // Spraying one guess over many accounts (known and unknown) from one IP.
    for e in [
        "dan@example.com",
        "x1@example.com",
        "x2@example.com",
        "carol@example.com",
    ] {
        let r = signin(&attacker, base, e, "Summer2024!!").await;
        assert_eq!(r.status, 401, "{e}: {}", r.body);
    }
    let r = signin(&attacker, base, "x3@example.com", "Summer2024!!").await;
    assert_locked(&r, "a 5th account from the same IP");
    let r = signin(
        &attacker,
        base,
        "carol@example.com",
        &password_of("carol@example.com"),
    )
    .await;
    assert_locked(&r, "a right password from the locked IP");
    let r = basic(
        &attacker,
        base,
        "dan@example.com",
        &password_of("dan@example.com"),
    )
    .await;
    assert_locked(&r, "Basic auth from the locked IP");
    // The same accounts from another IP are fine: the IP was blamed, not the accounts.
    let r = signin(
        &from_ip(31),
        base,
        "carol@example.com",
        &password_of("carol@example.com"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = basic(
        &from_ip(31),
        base,
        "dan@example.com",
        &password_of("dan@example.com"),
    )
    .await;
    assert_eq!((r.status, r.body.as_str()), (200, "user\n"));
    // Credentials that need no password check still work from the locked IP.
    let admin_from_attacker_ip = reqwest::Client::builder()
        .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 30)))
        .default_headers({
            let mut h = reqwest::header::HeaderMap::new();
            h.insert(
                "authorization",
                format!("Bearer {ADMIN_KEY}").parse().unwrap(),
            );
            h
        })
        .build()
        .unwrap();
    let r = post(&admin_from_attacker_ip, base, &[], "SELECT 1").await;
    assert_eq!(r.status, 200, "{}", r.body);
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::test]
async fn a_signin_flood_does_not_starve_small_queries() {
    // Back-off out of the way: only the bounded hashing pool protects the other users here.
    let env = guard_env(&[
        (
            "ICHIBASE_AUTH_GUARD__SIGNIN_FAILURES_BEFORE_BACKOFF",
            "1000000",
        ),
        ("ICHIBASE_AUTH_GUARD__ACCOUNT_FAILURES_BEFORE_BACKOFF", "1000000"),
        ("ICHIBASE_AUTH_GUARD__IP_FAILURES_BEFORE_BACKOFF", "1000000"),
    ]);
    let (s, _tmp) = start(&env);
    let base = s.url.clone();
    let alice = account(&base, "alice@example.com").await;
    let alice_client = client_with_token(alice["access_token"].as_str().unwrap());
    // The same small query without a flood, for comparison (the box may be loaded by others).
    let mut quiet = Vec::new();
    for _ in 0..40 {
        let t = Instant::now();
        assert_eq!(
            post(&alice_client, &base, &[], "SELECT 1").await.status,
            200
        );
        quiet.push(t.elapsed().as_secs_f64());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let quiet_p50 = percentile(&mut quiet, 0.5);
    let stop = Instant::now() + Duration::from_secs(12);
    let mut flood = Vec::new();
    for i in 0..32u8 {
        let base = base.clone();
        flood.push(tokio::spawn(async move {
            let c = from_ip4(1, 10 + i);
            let (mut checked, mut busy) = (0u32, 0u32);
            let mut n = 0u32;
            while Instant::now() < stop {
                n += 1;
                let email = if n % 2 == 0 {
                    "alice@example.com".to_string()
                } else {
                    format!("f{i}-{n}@example.com")
                };
                match signin(&c, &base, &email, "not the password").await.status {
                    401 => checked += 1,
                    429 | 503 => busy += 1,
                    s => panic!("flood got {s}"),
                }
            }
            (checked, busy)
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut lat = Vec::new();
    while Instant::now() + Duration::from_millis(500) < stop {
        let t = Instant::now();
        let r = post(&alice_client, &base, &[], "SELECT 1").await;
        assert_eq!(r.status, 200, "{}", r.body);
        lat.push(t.elapsed().as_secs_f64());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut checked, mut busy) = (0, 0);
    for f in flood {
        let (c, b) = f.await.unwrap();
        checked += c;
        busy += b;
    }
    let p50 = percentile(&mut lat, 0.5);
    let p99 = percentile(&mut lat, 0.99);
    eprintln!(
        "flood: {checked} password checks, {busy} refused busy; small queries: n={} p50={p50:.3}s p99={p99:.3}s (quiet p50={quiet_p50:.3}s)",
        lat.len()
    );
    assert!(
        checked >= 20,
        "the flood did reach the password check ({checked})"
    );
    assert!(lat.len() >= 10, "too few samples: {}", lat.len());
    // Generous margins (a shared 2-core box): hashing may take a core, not the machine.
    assert!(
        p50 < 3.0 * quiet_p50 + 0.015,
        "median of a small query during the flood: {p50:.3}s (quiet: {quiet_p50:.3}s)"
    );
    assert!(
        p99 < 1.0,
        "p99 of a small query during the flood: {p99:.3}s"
    );
}

#[tokio::test]
async fn refresh_token_reuse_revokes_the_session() {
    let (s, _tmp) = start(&[]);
    let base = &s.url;
    let first = account(base, "alice@example.com").await;
    let other = signin(
        &anon_client(),
        base,
        "alice@example.com",
        &password_of("alice@example.com"),
    )
    .await
    .json();
    let r0 = first["refresh_token"].as_str().unwrap().to_string();
    let r = jpost(
        &anon_client(),
        base,
        "/auth/refresh",
        json!({"refresh_token": r0}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let second = r.json();
    let r1 = second["refresh_token"].as_str().unwrap().to_string();
    let r = jpost(
        &anon_client(),
        base,
        "/auth/refresh",
        json!({"refresh_token": r1}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let third = r.json();
    let a2 = client_with_token(third["access_token"].as_str().unwrap());
    assert_eq!(post(&a2, base, &[], "SELECT 1").await.status, 200);
    // A thief replays the first (long spent) refresh token: refused, and the whole session is
    // revoked, so the holder of the newest tokens (maybe the thief) is cut off too.
    let r = jpost(
        &anon_client(),
        base,
        "/auth/refresh",
        json!({"refresh_token": r0}),
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(
        r.body.contains("reuse") || r.body.contains("used"),
        "{}",
        r.body
    );
    assert_eq!(
        post(&a2, base, &[], "SELECT 1").await.status,
        401,
        "newest access token"
    );
    let r = jpost(
        &anon_client(),
        base,
        "/auth/refresh",
        json!({"refresh_token": third["refresh_token"]}),
    )
    .await;
    assert_eq!(r.status, 401, "newest refresh token: {}", r.body);
    let cookie = format!(
        "ichibase_session={}",
        third["refresh_token"].as_str().unwrap()
    );
    let r = read(
        anon_client()
            .post(format!("{base}/"))
            .header("Cookie", cookie)
            .body("SELECT 1")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 401, "the session cookie: {}", r.body);
    // Other sessions of the user stay.
    let oc = client_with_token(other["access_token"].as_str().unwrap());
    assert_eq!(post(&oc, base, &[], "SELECT 1").await.status, 200);
    // Replaying the immediately previous token after a single rotation is caught the same way.
    let r = jpost(
        &anon_client(),
        base,
        "/auth/refresh",
        json!({"refresh_token": other["refresh_token"]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let newer = r.json();
    let r = jpost(
        &anon_client(),
        base,
        "/auth/refresh",
        json!({"refresh_token": other["refresh_token"]}),
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.body);
    let nc = client_with_token(newer["access_token"].as_str().unwrap());
    assert_eq!(post(&nc, base, &[], "SELECT 1").await.status, 401);
    // A forged secret for a live session id is just refused (it proves nothing was stolen) and
    // does not let anyone who knows a session id revoke it.
    let fresh = signin(
        &anon_client(),
        base,
        "alice@example.com",
        &password_of("alice@example.com"),
    )
    .await
    .json();
    let sid = fresh["session_id"].as_str().unwrap();
    let r = jpost(
        &anon_client(),
        base,
        "/auth/refresh",
        json!({"refresh_token": format!("ir_{sid}.forged")}),
    )
    .await;
    assert_eq!(r.status, 401);
    let fc = client_with_token(fresh["access_token"].as_str().unwrap());
    assert_eq!(post(&fc, base, &[], "SELECT 1").await.status, 200);
}

#[tokio::test]
async fn empty_basic_credentials_are_refused() {
    let (s, _tmp) = start(&[]);
    let base = &s.url;
    for h in [
        "Basic ",
        "Basic",
        "basic    ",
        "Basic Og==",
        "Basic OmFueXRoaW5n",
    ] {
        let r = read(
            anon_client()
                .post(format!("{base}/"))
                .header("Authorization", h)
                .body("SELECT auth_role()")
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 401, "{h:?} ran as: {}", r.body);
    }
    // No Authorization header at all is still anonymous, as are ClickHouse clients' default
    // user without a password.
    let r = post(&anon_client(), base, &[], "SELECT auth_role()").await;
    assert_eq!((r.status, r.body.as_str()), (200, "anon\n"));
    let r = basic(&anon_client(), base, "default", "").await;
    assert_eq!((r.status, r.body.as_str()), (200, "anon\n"));
}

#[tokio::test]
async fn signup_does_not_reveal_existing_accounts() {
    let (s, _tmp) = start(&[]);
    let base = &s.url;
    let new = jpost(
        &anon_client(),
        base,
        "/auth/signup",
        json!({"email": "alice@example.com", "password": "the first password"}),
    )
    .await;
    let mut answers = vec![];
    for (email, pw) in [
        ("alice@example.com", "a different password"),
        ("ALICE@example.com", "the first password"),
        ("bob@example.com", "bob's own password"),
    ] {
        answers.push((
            email,
            jpost(
                &anon_client(),
                base,
                "/auth/signup",
                json!({"email": email, "password": pw}),
            )
            .await,
        ));
    }
    let shape = |r: &Resp, email: &str| {
        assert_eq!(r.status, 200, "{email}: {}", r.body);
        assert!(
            r.header("set-cookie").is_none(),
            "{email}: a cookie gives it away"
        );
        assert!(!r.body.contains("token"), "{email}: {}", r.body);
        r.body
            .to_lowercase()
            .replace(&email.to_lowercase(), "EMAIL")
    };
    let reference = shape(&new, "alice@example.com");
    for (email, r) in &answers {
        assert_eq!(shape(r, email), reference, "{email}: the answer differs");
    }
    // Signing up again did not change the existing account.
    let r = signin(
        &anon_client(),
        base,
        "alice@example.com",
        "a different password",
    )
    .await;
    assert_eq!(r.status, 401);
    let r = signin(
        &anon_client(),
        base,
        "alice@example.com",
        "the first password",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = signin(
        &anon_client(),
        base,
        "bob@example.com",
        "bob's own password",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Bad input is still refused before anything is looked up.
    let r = jpost(
        &anon_client(),
        base,
        "/auth/signup",
        json!({"email": "not-an-email", "password": "long enough!"}),
    )
    .await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn trivial_passwords_are_refused() {
    let (s, _tmp) = start(&[]);
    let base = &s.url;
    for pw in [
        "12345678",
        "        ",
        "\t\t\t\t\t\t\t\t\t",
        "aaaaaaaaaaaaaaaaaaaaaaaa",
        "!!!!!!!!!!",
        "password",
        "Password1",
        "PASSWORD123",
        "qwertyuiop",
        "iloveyou",
        "abcdefgh",
        "1q2w3e4r",
        "dave@example.com",
        "DAVE@EXAMPLE.COM",
        "short",
    ] {
        let r = jpost(
            &anon_client(),
            base,
            "/auth/signup",
            json!({"email": "dave@example.com", "password": pw}),
        )
        .await;
        assert_eq!(r.status, 400, "{pw:?} was accepted: {}", r.body);
        assert!(r.body.contains("password"), "{}", r.body);
    }
    for (i, pw) in [
        "long enough!",
        "correct horse battery",
        "password-of-dave@example.com",
        "correcthorsebatterystaple",
    ]
    .iter()
    .enumerate()
    {
        let r = jpost(
            &anon_client(),
            base,
            "/auth/signup",
            json!({"email": format!("ok{i}@example.com"), "password": pw}),
        )
        .await;
        assert_eq!(r.status, 200, "{pw:?}: {}", r.body);
    }
    // Changing to a trivial password is refused too.
    let a = account(base, "erin@example.com").await;
    let c = client_with_token(a["access_token"].as_str().unwrap());
    let r = jpost(
        &c,
        base,
        "/auth/password",
        json!({"old_password": password_of("erin@example.com"), "new_password": "12345678"}),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    // The minimum length is a setting.
    let (s2, _tmp2) = start(&[("ICHIBASE_AUTH_GUARD__MIN_PASSWORD_LENGTH", "14")]);
    let r = jpost(
        &anon_client(),
        &s2.url,
        "/auth/signup",
        json!({"email": "f@example.com", "password": "long enough!"}),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("14"), "{}", r.body);
}

#[cfg(unix)]
#[tokio::test]
async fn data_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mode = |p: &std::path::Path| {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    };
    let check = |dir: &std::path::Path| {
        assert_eq!(mode(dir), 0o700, "data dir");
        for f in [
            "ichibase.db",
            "ichibase.db-wal",
            "ichibase.db-shm",
            "posterity.duckdb",
            "jwt-keys.json",
        ] {
            let p = dir.join(f);
            if f.ends_with("-shm") && !p.exists() {
                continue;
            }
            assert_eq!(mode(&p), 0o600, "{f}: {:o}", mode(&p));
        }
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let m = mode(&e.path());
            assert_eq!(m & 0o077, 0, "{} is {m:o}", e.path().display());
        }
    };
    {
        let s = Server::start_in(&dir, &[], &[]);
        let admin = common::client();
        let r = post(&admin, &s.url, &[], "CREATE TABLE t(x)").await;
        assert_eq!(r.status, 200, "{}", r.body);
        let r = jpost(&admin, &s.url, "/branches", json!({"name": "b1"})).await;
        assert_eq!(r.status, 200, "{}", r.body);
        check(&dir);
        let b = dir.join("branches");
        assert_eq!(mode(&b), 0o700);
        assert_eq!(mode(&b.join("b1.db")), 0o600);
    }
    // Files an older version left readable are tightened at the next start.
    for f in ["ichibase.db", "posterity.duckdb"] {
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let s = Server::start_in(&dir, &[], &[]);
    assert_eq!(
        post(&common::client(), &s.url, &[], "SELECT 1")
            .await
            .status,
        200
    );
    check(&dir);
}

/// Start the binary with `key` as ICHIBASE_ADMIN_KEY: Ok when it listens (then stopped),
/// Err(stderr) when it refuses to start.
fn start_with_admin_key(key: &str) -> Result<(), String> {
    use std::io::{BufRead, BufReader, Read};
    let tmp = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ichibase"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(tmp.path())
        .env_remove("ICHIBASE_CONFIG")
        .env("ICHIBASE_LOG", "warn")
        .env("ICHIBASE_ADMIN_KEY", key)
        .current_dir(tmp.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let listening = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(|l| l.ok())
        .any(|l| l.starts_with("ichibase listening on "));
    if listening {
        let _ = child.kill();
        let _ = child.wait();
        return Ok(());
    }
    let st = child.wait().unwrap();
    let e = err.join().unwrap();
    assert!(!st.success(), "exited successfully without listening: {e}");
    Err(e)
}

#[test]
fn guessable_admin_keys_are_refused_at_start() {
    let weak = [
        format!("ik_{}", "a".repeat(21)),
        format!("ik_{}", "a".repeat(60)),
        "ik_abcdefghijklmnopqrstuvwxyz".to_string(),
        "ik_0123456789012345678901234567".to_string(),
        "ik_passwordpasswordpasswordpassword".to_string(),
        "ik_test-admin-key-0123456789abcdef".to_string(),
        "ik_abababababababababababababab".to_string(),
        "ik_Xq7-short".to_string(),
    ];
    for k in &weak {
        match start_with_admin_key(k) {
            Ok(_) => panic!("{k} was accepted"),
            Err(e) => assert!(
                e.contains("ICHIBASE_ADMIN_KEY") || e.contains("admin_key"),
                "{k}: the error names the setting: {e}"
            ),
        }
    }
    // Random keys (what `openssl rand` or the server itself makes) are fine.
    for k in [
        "ik_Zk3vQ9pLr2XwB7mT4yHc8NfJ1sDgE6aU",
        "ik_9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    ] {
        start_with_admin_key(k).unwrap_or_else(|e| panic!("{k} refused: {e}"));
    }
}
