//! ClickHouse-style SQL over SQLite: lexing, parameters, request parsing, input and output
//! formats, and execution against [`crate::storage::Storage`].
//!
//! Owns everything between "the text of a request" and "bytes of an answer". Must not know
//! about HTTP (status codes, headers): the `apis` layer maps [`exec::Msg`] onto responses.

pub mod binary;
pub mod compress;
pub mod embedded;
pub mod exec;
pub mod format;
pub mod input;
pub mod lexer;
pub mod params;
pub mod parse;
pub mod session;
pub mod spool;
pub mod system;

pub use exec::{Msg, QuerySettings, Summary};
pub use format::Format;
