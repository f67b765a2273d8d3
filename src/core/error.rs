//! The one error type of the engine.
//!
//! Every failure a client can see is an [`Error`]: a [`ErrorCode`] (numeric code, symbolic name,
//! HTTP status) plus a human message. Codes below 1000 are ClickHouse's own numbers, so clients
//! that know ClickHouse recognise them; codes from 1000 are ichibase's.
//! This module maps SQLite errors onto codes; it must not know about HTTP bodies or formats
//! (the `apis` layer renders errors).

use std::fmt;

/// Declares [`ErrorCode`] from one table: each variant once, with its numeric code, symbolic
/// name, HTTP status and (optionally) a short note for the README's table of codes.
macro_rules! error_codes {
    ( $( $(#[doc = $doc:literal])* $variant:ident = $number:literal, $name:literal, $status:literal $(, $note:literal)? ; )* ) => {
        /// A failure category: ClickHouse-compatible numeric code, symbolic name and HTTP status.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum ErrorCode {
            $( $(#[doc = $doc])* $variant, )*
        }

        impl ErrorCode {
            /// Every code, in declaration order.
            pub const ALL: &[ErrorCode] = &[ $( ErrorCode::$variant, )* ];

            /// Numeric code (ClickHouse's where one exists).
            pub fn number(self) -> u32 {
                match self { $( ErrorCode::$variant => $number, )* }
            }

            /// Symbolic name, as ClickHouse prints it in parentheses after the message.
            pub fn name(self) -> &'static str {
                match self { $( ErrorCode::$variant => $name, )* }
            }

            /// HTTP status the error is answered with.
            pub fn http_status(self) -> u16 {
                match self { $( ErrorCode::$variant => $status, )* }
            }

            /// What the code covers, when the name alone does not say (for documentation).
            pub fn note(self) -> Option<&'static str> {
                match self { $( ErrorCode::$variant => None $( .or(Some($note)) )?, )* }
            }
        }
    };
}

error_codes! {
    SyntaxError = 62, "SYNTAX_ERROR", 400;
    UnknownTable = 60, "UNKNOWN_TABLE", 404;
    UnknownIdentifier = 47, "UNKNOWN_IDENTIFIER", 400;
    UnknownFunction = 46, "UNKNOWN_FUNCTION", 404;
    UnknownFormat = 73, "UNKNOWN_FORMAT", 404;
    UnknownSetting = 115, "UNKNOWN_SETTING", 404;
    UnknownDatabase = 81, "UNKNOWN_DATABASE", 404;
    UnknownType = 50, "UNKNOWN_TYPE", 400;
    BadArguments = 36, "BAD_ARGUMENTS", 400;
    UnknownQueryParameter = 456, "UNKNOWN_QUERY_PARAMETER", 400;
    BadQueryParameter = 457, "BAD_QUERY_PARAMETER", 400;
    IncorrectData = 117, "INCORRECT_DATA", 400;
    TimeoutExceeded = 159, "TIMEOUT_EXCEEDED", 408;
    QueryWasCancelled = 394, "QUERY_WAS_CANCELLED", 499, "client went away";
    TooManyRowsOrBytes = 396, "TOO_MANY_ROWS_OR_BYTES", 400;
    Readonly = 164, "READONLY", 403;
    AccessDenied = 497, "ACCESS_DENIED", 403;
    NotImplemented = 48, "NOT_IMPLEMENTED", 501;
    RequestTooLarge = 1001, "REQUEST_TOO_LARGE", 413, "SQL body over `max_body_size`, SQL over `max_query_size`, a JSON API body over `[http] max_json_body`, a function source over `[http] max_function_source`";
    ConstraintViolation = 1002, "CONSTRAINT_VIOLATION", 409, "UNIQUE, NOT NULL, CHECK, FOREIGN KEY";
    DatabaseBusy = 1003, "DATABASE_BUSY", 503;
    StorageError = 1004, "STORAGE_ERROR", 500, "I/O, corruption, disk full";
    ShuttingDown = 1005, "SHUTTING_DOWN", 503;
    NotFound = 1006, "NOT_FOUND", 404;
    AuthenticationFailed = 516, "AUTHENTICATION_FAILED", 401, "wrong, expired or revoked credentials";
    LuaError = 1010, "LUA_ERROR", 422, "a Lua function failed";
    LuaLimit = 1011, "LUA_LIMIT_EXCEEDED", 422, "CPU, memory or instruction limit of a Lua run";
    /// A name is taken or an object is not in the state the request needs.
    Conflict = 1007, "CONFLICT", 409, "a name is taken or an object is not in the state needed";
    /// The language-model provider failed or answered something unusable.
    LlmUnavailable = 1020, "LLM_UNAVAILABLE", 502, "the model provider failed or answered something unusable";
    /// No language-model provider is configured.
    LlmNotConfigured = 1021, "LLM_NOT_CONFIGURED", 503, "no `llm_url` set";
    /// A bundle's migrations or checks failed when verified.
    CheckFailed = 1022, "CHECK_FAILED", 422, "a bundle's migrations or checks failed";
    /// A notification channel is used without its `[notify]` settings.
    NotifyNotConfigured = 1050, "NOTIFY_NOT_CONFIGURED", 503, "a `notify.*` channel without its `[notify]` settings";
    /// A chat provider is used without its `[chat.*]` settings (token, secret, key).
    ChatNotConfigured = 1110, "CHAT_NOT_CONFIGURED", 503, "a chat provider without its `[chat.*]` settings";
    /// An inbound chat request whose signature, secret token or timestamp does not verify.
    ChatSignatureInvalid = 1111, "CHAT_SIGNATURE_INVALID", 401, "an inbound chat request whose signature or secret does not verify";
    /// An inbound chat request seen before (a replayed signed request) or outside the timestamp window.
    ChatReplayed = 1112, "CHAT_REPLAYED", 401, "a replayed or stale signed chat request";
    /// `chat.send{user=}` for a user with no linked chat.
    ChatNotLinked = 1113, "CHAT_NOT_LINKED", 404, "`chat.send{user=}` for a user without a linked chat";
    /// A rate or concurrency limit of the caller (identity or address) was reached; retry later.
    TooManyRequests = 202, "TOO_MANY_SIMULTANEOUS_QUERIES", 429, "rate or concurrency limit of the caller; retry later";
    /// A memory budget (per request or server-wide) would be exceeded.
    MemoryLimitExceeded = 241, "MEMORY_LIMIT_EXCEEDED", 503, "a memory budget, per request or server-wide";
    /// A UI's TSX did not compile (the message names line and column).
    UiCompileError = 1040, "UI_COMPILE_ERROR", 422, "a UI's TSX did not compile: line and column in the message";
    NoSearchIndex = 1090, "NO_SEARCH_INDEX", 404, "a search on a table without a (text or vector) search index";
    /// A model name that is not in `[ai.models]`, or no model configured.
    AiUnknownModel = 1030, "AI_UNKNOWN_MODEL", 404, "a model not in `[ai.models]`, or none configured";
    /// `ai.generate_object`'s answers failed the schema after every retry.
    AiObjectInvalid = 1031, "AI_OBJECT_INVALID", 422, "a generated object failed its JSON Schema after every retry";
    /// A daily `[ai.budget]` limit (cost or tokens; user, function or global) is reached.
    BudgetExceeded = 1032, "BUDGET_EXCEEDED", 429, "a daily `[ai.budget]` limit on cost or tokens";
    /// A model's `key_env` variable is not set.
    AiKeyMissing = 1033, "AI_KEY_MISSING", 503, "a model's `key_env` variable is not set";
    FlowFailed = 1070, "FLOW_FAILED", 422, "a workflow failed; `GET /flows/{id}` shows its error and trace id";
    FlowNondeterministic = 1071, "FLOW_NONDETERMINISTIC", 422, "a workflow's replay called its steps in another order than the journal recorded";
    FlowLimit = 1072, "FLOW_LIMIT_EXCEEDED", 422, "a `[flow]` limit: steps, journal or result size, events, active workflows";
    FlowCancelled = 1073, "FLOW_CANCELLED", 409, "the workflow was cancelled";
    /// An egress policy refused a request (host, port, method, path or address).
    EgressDenied = 1060, "EGRESS_DENIED", 403, "`http.fetch` refused by the egress policy (host, port, method, path, private address)";
    /// The remote host of an egress request failed (connect, TLS, reset).
    EgressFailed = 1061, "EGRESS_FAILED", 502, "`http.fetch`: the remote host could not be reached or broke off";
    /// An egress request or answer went over a size or redirect limit.
    EgressLimit = 1062, "EGRESS_LIMIT_EXCEEDED", 422, "`http.fetch` request/answer over `[egress]` size limits, or too many redirects";
    /// The privacy guard found a kind its policy blocks.
    PrivacyBlocked = 1063, "PRIVACY_BLOCKED", 422, "outgoing text carries a kind `[egress.guard] block` names";
    /// A vault secret is missing, out of the function's scope, not bound to the host or expired.
    VaultDenied = 1064, "VAULT_DENIED", 403, "vault secret missing, not for this function or host, or expired";
    /// The OAuth2 provider refused (e.g. a revoked refresh token).
    OauthFailed = 1065, "OAUTH_FAILED", 502, "the OAuth2 provider refused (revoked or expired grant: authorize again)";
    /// Retrying an inbound message that is not failed, or releasing one not quarantined.
    EmailInConflict = 1100, "EMAIL_IN_CONFLICT", 409, "retry of an inbound email that is not `failed`, release of one not `quarantined`";
    OidcFailed = 1140, "OIDC_FAILED", 401, "OpenID Connect sign-in refused: bad or expired `state`, wrong `nonce`, an ID token that fails its signature, issuer, audience or expiry check";
    OidcProviderError = 1141, "OIDC_PROVIDER_ERROR", 502, "the OpenID Connect provider's discovery document, keys or token endpoint failed or answered something unusable";
    OidcNotLinked = 1142, "OIDC_NOT_LINKED", 403, "an OpenID Connect identity that may not be linked: its email is not verified by the provider, or `[oidc] create_accounts` is off";
    AuthTokenInvalid = 1143, "AUTH_TOKEN_INVALID", 400, "a verification, reset, invitation or sign-in link that is invalid, expired or used already";
    AuthRequirementFailed = 1144, "AUTH_REQUIREMENT_FAILED", 403, "`auth.require` in a function: the caller lacks the role or claim";
    /// A passkey ceremony's challenge is unknown, expired, already answered, or of the other kind.
    PasskeyChallengeInvalid = 1130, "PASSKEY_CHALLENGE_INVALID", 400, "a passkey challenge unknown, expired or already used: start again";
    /// A passkey answer failed verification (origin, RP id, signature, user verification, counter).
    PasskeyRejected = 1131, "PASSKEY_REJECTED", 401, "a passkey answer failed verification (origin, RP id, signature, user verification)";
    /// The passkey is not registered here, or not for the account its user handle names.
    PasskeyUnknown = 1132, "PASSKEY_UNKNOWN", 401, "a passkey not registered here (or not for the account it names)";
    /// A CRR table change that would not merge: no primary key, a drop, rename or column drop.
    CrdtRefused = 1150, "CRDT_SCHEMA_REFUSED", 409, "a CRR table without a primary key, or a schema change of one that would not merge (drop, rename, drop column)";
    /// A table named in a sync request or `crdt disable` is not a CRR table.
    CrdtNotEnabled = 1151, "CRDT_NOT_ENABLED", 404, "the table is not a CRR table (`ichibase crdt enable TABLE`)";
    /// A change of a sync batch is malformed (key arity, causal length, a clock too far ahead).
    CrdtBadChange = 1152, "CRDT_BAD_CHANGE", 400, "a sync change is malformed: key arity, causal length, a clock beyond `max_clock_drift_ms`";
    /// The sync peer could not be reached or answered an error.
    CrdtPeerFailed = 1153, "CRDT_PEER_FAILED", 502, "`ichibase sync`: the peer could not be reached or answered an error";
    Internal = 1000, "INTERNAL_ERROR", 500, "bugs";
}

/// An error a client can see: a code and a message naming the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
        }
    }
    pub fn syntax(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::SyntaxError, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    /// Map a SQLite error onto a code. `phase` says whether the statement was being prepared
    /// (errors there are the client's SQL) or stepped.
    /// `Code: N. DB::Exception: message (NAME)`, the text of an [`Error`] an engine SQL function
    /// raised inside SQLite, back into that error.
    fn unwrap_engine(text: &str) -> Option<Error> {
        let rest = text.strip_prefix("Code: ")?;
        let (num, rest) = rest.split_once(". DB::Exception: ")?;
        let num: u32 = num.parse().ok()?;
        let code = ErrorCode::ALL.iter().copied().find(|c| c.number() == num)?;
        let message = rest.strip_suffix(&format!(" ({})", code.name()))?;
        Some(Error::new(code, message.strip_suffix('.').unwrap_or(message)))
    }

    pub fn from_sqlite(err: &rusqlite::Error) -> Self {
        use rusqlite::ffi::ErrorCode as C;
        match err {
            rusqlite::Error::SqliteFailure(e, msg) => {
                let text = msg.clone().unwrap_or_else(|| e.to_string());
                // An engine SQL function (`search()`) failed with an `Error`: keep its code.
                if let Some(inner) = Self::unwrap_engine(&text) {
                    return inner;
                }
                let code = match e.code {
                    C::ConstraintViolation if text.contains("violates WITH CHECK") => {
                        ErrorCode::AccessDenied
                    }
                    C::ConstraintViolation => ErrorCode::ConstraintViolation,
                    C::DatabaseBusy | C::DatabaseLocked => ErrorCode::DatabaseBusy,
                    C::OperationInterrupted => ErrorCode::QueryWasCancelled,
                    C::ReadOnly => ErrorCode::Readonly,
                    C::AuthorizationForStatementDenied | C::PermissionDenied => {
                        ErrorCode::AccessDenied
                    }
                    C::TooBig => ErrorCode::TooManyRowsOrBytes,
                    C::TypeMismatch | C::ParameterOutOfRange => ErrorCode::BadArguments,
                    C::SystemIoFailure
                    | C::DatabaseCorrupt
                    | C::DiskFull
                    | C::CannotOpen
                    | C::FileLockingProtocolFailed
                    | C::NotADatabase
                    | C::OutOfMemory => ErrorCode::StorageError,
                    _ => classify_message(&text),
                };
                Error::new(code, text)
            }
            rusqlite::Error::SqlInputError {
                msg, sql, offset, ..
            } => {
                let near = snippet(sql, *offset);
                Error::new(
                    classify_message(msg),
                    format!("{msg} (at offset {offset}: {near})"),
                )
            }
            rusqlite::Error::MultipleStatement => Error::syntax(
                "Multi-statements are not allowed; pass transaction=1 to run several statements in one transaction",
            ),
            other => Error::internal(other.to_string()),
        }
    }
}

/// SQLite reports most SQL problems as SQLITE_ERROR with a message; sort them by the message.
fn classify_message(msg: &str) -> ErrorCode {
    if msg.starts_with("no such table") || msg.starts_with("no such view") {
        ErrorCode::UnknownTable
    } else if msg.starts_with("no such column") || msg.contains("has no column named") {
        ErrorCode::UnknownIdentifier
    } else if msg.starts_with("no such function") || msg.starts_with("wrong number of arguments") {
        ErrorCode::UnknownFunction
    } else if msg.contains("syntax error")
        || msg.contains("incomplete input")
        || msg.contains("unrecognized token")
    {
        ErrorCode::SyntaxError
    } else if msg.contains("not authorized") || msg.contains("prohibited") {
        ErrorCode::AccessDenied
    } else {
        ErrorCode::BadArguments
    }
}

fn snippet(sql: &str, offset: i32) -> String {
    let start = usize::try_from(offset).unwrap_or(0).min(sql.len());
    let start = (0..=start)
        .rev()
        .find(|i| sql.is_char_boundary(*i))
        .unwrap_or(0);
    let tail: String = sql[start..].chars().take(40).collect();
    if tail.is_empty() {
        "end of query".into()
    } else {
        format!("'{tail}'")
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::from_sqlite(&e)
    }
}

impl fmt::Display for Error {
    /// ClickHouse's text shape: `Code: N. DB::Exception: message. (NAME)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Code: {}. DB::Exception: {}. ({})",
            self.code.number(),
            self.message,
            self.code.name()
        )
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_has_clickhouse_shape() {
        let e = Error::new(ErrorCode::UnknownFormat, "Unknown output format Foo");
        assert_eq!(
            e.to_string(),
            "Code: 73. DB::Exception: Unknown output format Foo. (UNKNOWN_FORMAT)"
        );
        assert_eq!(e.code.http_status(), 404);
    }

    #[test]
    fn sqlite_errors_are_classified() {
        let c = rusqlite::Connection::open_in_memory().unwrap();
        let e: Error = c.prepare("SELECT * FROM nope").unwrap_err().into();
        assert_eq!(e.code, ErrorCode::UnknownTable);
        let e: Error = c.prepare("SELEC 1").unwrap_err().into();
        assert_eq!(e.code, ErrorCode::SyntaxError);
        c.execute_batch("CREATE TABLE t(a INTEGER PRIMARY KEY)")
            .unwrap();
        c.execute("INSERT INTO t VALUES (1)", []).unwrap();
        let e: Error = c
            .execute("INSERT INTO t VALUES (1)", [])
            .unwrap_err()
            .into();
        assert_eq!(e.code, ErrorCode::ConstraintViolation);
    }

    #[test]
    fn numbers_and_names_are_unique() {
        let mut numbers = std::collections::HashSet::new();
        let mut names = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            assert!(
                numbers.insert(c.number()),
                "number {} is used twice",
                c.number()
            );
            assert!(names.insert(c.name()), "name {} is used twice", c.name());
            assert!((400..600).contains(&c.http_status()), "{c:?}");
        }
    }

    /// The README's table of codes, one row per HTTP status, generated from the declaration.
    fn readme_table() -> String {
        let mut statuses: Vec<u16> = ErrorCode::ALL.iter().map(|c| c.http_status()).collect();
        statuses.sort_unstable();
        statuses.dedup();
        let mut out = String::from("| status | codes |\n|---|---|\n");
        for s in statuses {
            let codes: Vec<String> = ErrorCode::ALL
                .iter()
                .filter(|c| c.http_status() == s)
                .map(|c| match c.note() {
                    Some(n) => format!("`{}` {} ({n})", c.name(), c.number()),
                    None => format!("`{}` {}", c.name(), c.number()),
                })
                .collect();
            out.push_str(&format!("| {s} | {} |\n", codes.join(", ")));
        }
        out
    }

    #[test]
    fn readme_lists_every_code() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        let table = readme_table();
        assert!(
            readme.contains(&table),
            "README.md's table of error codes is out of date; replace it with:\n\n{table}"
        );
    }
}
