//! The one error type of the engine.
//!
//! Every failure a client can see is an [`Error`]: a [`ErrorCode`] (numeric code, symbolic name,
//! HTTP status) plus a human message. Codes below 1000 are ClickHouse's own numbers, so clients
//! that know ClickHouse recognise them; codes from 1000 are ichibase's.
//! This module maps SQLite errors onto codes; it must not know about HTTP bodies or formats
//! (the `apis` layer renders errors).

use std::fmt;

/// A failure category: ClickHouse-compatible numeric code, symbolic name and HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    SyntaxError,
    UnknownTable,
    UnknownIdentifier,
    UnknownFunction,
    UnknownFormat,
    UnknownSetting,
    UnknownDatabase,
    UnknownType,
    BadArguments,
    UnknownQueryParameter,
    BadQueryParameter,
    IncorrectData,
    TimeoutExceeded,
    QueryWasCancelled,
    TooManyRowsOrBytes,
    Readonly,
    AccessDenied,
    NotImplemented,
    RequestTooLarge,
    ConstraintViolation,
    DatabaseBusy,
    StorageError,
    ShuttingDown,
    NotFound,
    AuthenticationFailed,
    LuaError,
    LuaLimit,
    /// A name is taken or an object is not in the state the request needs.
    Conflict,
    /// The language-model provider failed or answered something unusable.
    LlmUnavailable,
    /// No language-model provider is configured.
    LlmNotConfigured,
    /// A bundle's migrations or checks failed when verified.
    CheckFailed,
    /// A rate or concurrency limit of the caller (identity or address) was reached; retry later.
    TooManyRequests,
    /// A memory budget (per request or server-wide) would be exceeded.
    MemoryLimitExceeded,
    Internal,
}

impl ErrorCode {
    /// Numeric code (ClickHouse's where one exists).
    pub fn number(self) -> u32 {
        use ErrorCode::*;
        match self {
            SyntaxError => 62,
            UnknownTable => 60,
            UnknownIdentifier => 47,
            UnknownFunction => 46,
            UnknownFormat => 73,
            UnknownSetting => 115,
            UnknownDatabase => 81,
            UnknownType => 50,
            BadArguments => 36,
            UnknownQueryParameter => 456,
            BadQueryParameter => 457,
            IncorrectData => 117,
            TimeoutExceeded => 159,
            QueryWasCancelled => 394,
            TooManyRowsOrBytes => 396,
            Readonly => 164,
            AccessDenied => 497,
            NotImplemented => 48,
            Internal => 1000,
            RequestTooLarge => 1001,
            ConstraintViolation => 1002,
            DatabaseBusy => 1003,
            StorageError => 1004,
            ShuttingDown => 1005,
            NotFound => 1006,
            AuthenticationFailed => 516,
            LuaError => 1010,
            LuaLimit => 1011,
            Conflict => 1007,
            LlmUnavailable => 1020,
            LlmNotConfigured => 1021,
            CheckFailed => 1022,
            TooManyRequests => 202,
            MemoryLimitExceeded => 241,
        }
    }

    /// Symbolic name, as ClickHouse prints it in parentheses after the message.
    pub fn name(self) -> &'static str {
        use ErrorCode::*;
        match self {
            SyntaxError => "SYNTAX_ERROR",
            UnknownTable => "UNKNOWN_TABLE",
            UnknownIdentifier => "UNKNOWN_IDENTIFIER",
            UnknownFunction => "UNKNOWN_FUNCTION",
            UnknownFormat => "UNKNOWN_FORMAT",
            UnknownSetting => "UNKNOWN_SETTING",
            UnknownDatabase => "UNKNOWN_DATABASE",
            UnknownType => "UNKNOWN_TYPE",
            BadArguments => "BAD_ARGUMENTS",
            UnknownQueryParameter => "UNKNOWN_QUERY_PARAMETER",
            BadQueryParameter => "BAD_QUERY_PARAMETER",
            IncorrectData => "INCORRECT_DATA",
            TimeoutExceeded => "TIMEOUT_EXCEEDED",
            QueryWasCancelled => "QUERY_WAS_CANCELLED",
            TooManyRowsOrBytes => "TOO_MANY_ROWS_OR_BYTES",
            Readonly => "READONLY",
            AccessDenied => "ACCESS_DENIED",
            NotImplemented => "NOT_IMPLEMENTED",
            Internal => "INTERNAL_ERROR",
            RequestTooLarge => "REQUEST_TOO_LARGE",
            ConstraintViolation => "CONSTRAINT_VIOLATION",
            DatabaseBusy => "DATABASE_BUSY",
            StorageError => "STORAGE_ERROR",
            ShuttingDown => "SHUTTING_DOWN",
            NotFound => "NOT_FOUND",
            AuthenticationFailed => "AUTHENTICATION_FAILED",
            LuaError => "LUA_ERROR",
            LuaLimit => "LUA_LIMIT_EXCEEDED",
            Conflict => "CONFLICT",
            LlmUnavailable => "LLM_UNAVAILABLE",
            LlmNotConfigured => "LLM_NOT_CONFIGURED",
            CheckFailed => "CHECK_FAILED",
            TooManyRequests => "TOO_MANY_SIMULTANEOUS_QUERIES",
            MemoryLimitExceeded => "MEMORY_LIMIT_EXCEEDED",
        }
    }

    /// HTTP status the error is answered with.
    pub fn http_status(self) -> u16 {
        use ErrorCode::*;
        match self {
            SyntaxError
            | UnknownIdentifier
            | UnknownType
            | BadArguments
            | UnknownQueryParameter
            | BadQueryParameter
            | IncorrectData
            | TooManyRowsOrBytes => 400,
            AuthenticationFailed => 401,
            LuaError | LuaLimit | CheckFailed => 422,
            Conflict => 409,
            LlmUnavailable => 502,
            LlmNotConfigured => 503,
            AccessDenied | Readonly => 403,
            UnknownTable | UnknownFunction | UnknownFormat | UnknownSetting | UnknownDatabase
            | NotFound => 404,
            TimeoutExceeded => 408,
            TooManyRequests => 429,
            MemoryLimitExceeded => 503,
            ConstraintViolation => 409,
            RequestTooLarge => 413,
            QueryWasCancelled => 499,
            NotImplemented => 501,
            DatabaseBusy | ShuttingDown => 503,
            StorageError | Internal => 500,
        }
    }
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
    pub fn from_sqlite(err: &rusqlite::Error) -> Self {
        use rusqlite::ffi::ErrorCode as C;
        match err {
            rusqlite::Error::SqliteFailure(e, msg) => {
                let text = msg.clone().unwrap_or_else(|| e.to_string());
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
}
