//! `file` in Lua: objects on object storage (a local directory by default, S3 when configured),
//! each caller confined to its own prefix, with Markdown notes whose front matter (YAML between
//! `---` lines, or TOML between `+++` lines) is read and written as a Lua table.
//!
//! - `file.put(path, content)` → `{path=, size=}`; `file.get(path)` → content or nil;
//!   `file.list([prefix])` → `{{path=, size=, modified=}, ...}`; `file.delete(path)` → boolean.
//! - `file.md.read(path)` → `{meta=table, body=string}` or nil;
//!   `file.md.write(path, meta, body[, "yaml"|"toml"])` → `{path=, size=}`.
//!
//! Paths are relative to the caller's prefix: `users/<user id>/` for a signed-in user,
//! `shared/` for the admin and the engine; anonymous callers have none. Owns the `[files]`
//! section and the objects under its root; touches no tables.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use mlua::{Lua, LuaSerdeExt, Value};
use object_store::ObjectStore;
use object_store::path::Path as OPath;
use serde::Deserialize;

use crate::app::AppBuilder;
use crate::core::{Error, ErrorCode, RequestContext, Result};
use crate::lua::components::{Component, lua_err};
use crate::lua::sandbox::Limit;
use crate::lua::{Env, to_json};

/// `[files]` in ichibase.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FilesSettings {
    /// Local directory of the store (default `<data-dir>/files`); unused with `s3_url`.
    pub dir: Option<String>,
    /// `s3://bucket/prefix` to keep files on S3 instead.
    pub s3_url: Option<String>,
    /// S3-compatible endpoint (e.g. `http://127.0.0.1:9000`).
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Largest file, bytes.
    pub max_file_bytes: usize,
    /// Most entries one `file.list` returns.
    pub max_list: usize,
    /// Seconds one storage operation may take (also bounded by the invocation's deadline).
    pub timeout_secs: f64,
}

impl Default for FilesSettings {
    fn default() -> Self {
        FilesSettings {
            dir: None,
            s3_url: None,
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            max_file_bytes: 10 << 20,
            max_list: 1000,
            timeout_secs: 10.0,
        }
    }
}

/// The file store.
pub struct Files {
    store: Arc<dyn ObjectStore>,
    root: String,
    pub settings: FilesSettings,
}

impl Files {
    pub fn new(s: FilesSettings, data_dir: &std::path::Path) -> anyhow::Result<Files> {
        anyhow::ensure!(s.max_file_bytes > 0 && s.max_list > 0, "[files] max_file_bytes and max_list must be positive");
        anyhow::ensure!(s.timeout_secs > 0.0 && s.timeout_secs.is_finite(), "[files] timeout_secs must be positive");
        let (store, root): (Arc<dyn ObjectStore>, String) = if let Some(u) = &s.s3_url {
            let rest = u
                .strip_prefix("s3://")
                .ok_or_else(|| anyhow::anyhow!("[files] s3_url must be s3://bucket/prefix"))?;
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let mut b = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_region(s.region.clone().unwrap_or_else(|| "us-east-1".into()));
            if let Some(ep) = &s.endpoint {
                b = b
                    .with_endpoint(ep.trim_end_matches('/'))
                    .with_allow_http(ep.starts_with("http://"))
                    .with_virtual_hosted_style_request(false);
            }
            if let Some(k) = &s.access_key_id {
                b = b.with_access_key_id(k);
            }
            if let Some(k) = &s.secret_access_key {
                b = b.with_secret_access_key(k);
            }
            (Arc::new(b.build()?), prefix.trim_matches('/').to_string())
        } else {
            let dir = s
                .dir
                .as_ref()
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| data_dir.join("files"));
            std::fs::create_dir_all(&dir)?;
            (Arc::new(object_store::local::LocalFileSystem::new_with_prefix(&dir)?), String::new())
        };
        Ok(Files { store, root, settings: s })
    }

    /// The caller's prefix.
    fn prefix(ctx: &RequestContext) -> Result<String> {
        if let Some(u) = &ctx.user_id {
            if u.is_empty() || u.contains('/') || u.contains("..") {
                return Err(Error::new(ErrorCode::AccessDenied, "file: this identity has no file area"));
            }
            Ok(format!("users/{u}"))
        } else if ctx.is_admin() {
            Ok("shared".into())
        } else {
            Err(Error::new(ErrorCode::AccessDenied, "file: sign in to use files (anonymous callers have none)"))
        }
    }

    /// The full object path of `rel` for `ctx`, after checking `rel`.
    fn path(&self, ctx: &RequestContext, rel: &str, allow_empty: bool) -> Result<OPath> {
        let bad = |why: &str| Error::new(ErrorCode::BadArguments, format!("file: bad path {rel:?}: {why}"));
        if rel.len() > 512 {
            return Err(bad("longer than 512 bytes"));
        }
        let rel = rel.trim_matches('/');
        if rel.is_empty() && !allow_empty {
            return Err(bad("empty"));
        }
        for seg in rel.split('/').filter(|_| !rel.is_empty()) {
            if seg.is_empty() || seg == "." || seg == ".." {
                return Err(bad("empty, '.' or '..' segments are not allowed"));
            }
            if seg.chars().any(|c| c.is_control() || c == '\\' || c == '%' || c == '*' || c == '?' || c == '#') {
                return Err(bad("control characters and \\ % * ? # are not allowed"));
            }
        }
        let mut full = String::new();
        if !self.root.is_empty() {
            full.push_str(&self.root);
            full.push('/');
        }
        full.push_str(&Self::prefix(ctx)?);
        if !rel.is_empty() {
            full.push('/');
            full.push_str(rel);
        }
        OPath::parse(&full).map_err(|e| bad(&e.to_string()))
    }

    fn user_root(&self, ctx: &RequestContext) -> Result<String> {
        let mut full = String::new();
        if !self.root.is_empty() {
            full.push_str(&self.root);
            full.push('/');
        }
        full.push_str(&Self::prefix(ctx)?);
        full.push('/');
        Ok(full)
    }

    fn storage_err(e: object_store::Error) -> Error {
        Error::new(ErrorCode::StorageError, format!("file: {e}"))
    }

    pub async fn put(&self, ctx: &RequestContext, rel: &str, data: Vec<u8>) -> Result<usize> {
        if data.len() > self.settings.max_file_bytes {
            return Err(Error::new(
                ErrorCode::RequestTooLarge,
                format!("file.put: {} bytes is over [files] max_file_bytes ({})", data.len(), self.settings.max_file_bytes),
            ));
        }
        let p = self.path(ctx, rel, false)?;
        let n = data.len();
        self.store.put(&p, data.into()).await.map_err(Self::storage_err)?;
        Ok(n)
    }

    pub async fn get(&self, ctx: &RequestContext, rel: &str) -> Result<Option<Vec<u8>>> {
        let p = self.path(ctx, rel, false)?;
        match self.store.get(&p).await {
            Ok(r) => {
                if r.meta.size as usize > self.settings.max_file_bytes {
                    return Err(Error::new(ErrorCode::RequestTooLarge, format!("file.get: {rel} is over [files] max_file_bytes")));
                }
                Ok(Some(r.bytes().await.map_err(Self::storage_err)?.to_vec()))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Self::storage_err(e)),
        }
    }

    pub async fn delete(&self, ctx: &RequestContext, rel: &str) -> Result<bool> {
        let p = self.path(ctx, rel, false)?;
        match self.store.head(&p).await {
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(Self::storage_err(e)),
            Ok(_) => {}
        }
        self.store.delete(&p).await.map_err(Self::storage_err)?;
        Ok(true)
    }

    /// (relative path, size, modified as Unix seconds), sorted by path.
    pub async fn list(&self, ctx: &RequestContext, prefix: &str) -> Result<Vec<(String, u64, f64)>> {
        let p = self.path(ctx, prefix, true)?;
        let root = self.user_root(ctx)?;
        let mut s = self.store.list(Some(&p));
        let mut out = Vec::new();
        while let Some(m) = s.next().await {
            let m = m.map_err(Self::storage_err)?;
            let full = m.location.to_string();
            let rel = full.strip_prefix(&root).unwrap_or(&full).to_string();
            out.push((rel, m.size, m.last_modified.timestamp_millis() as f64 / 1e3));
            if out.len() > self.settings.max_list {
                return Err(Error::new(
                    ErrorCode::TooManyRowsOrBytes,
                    format!("file.list: more than [files] max_list ({}) entries; list a narrower prefix", self.settings.max_list),
                ));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

/// Split Markdown into (front matter as JSON, body).
pub fn parse_markdown(text: &str) -> Result<(serde_json::Value, String)> {
    let bad = |m: String| Error::new(ErrorCode::IncorrectData, format!("file.md.read: {m}"));
    for (fence, yaml) in [("---", true), ("+++", false)] {
        let Some(rest) = text.strip_prefix(fence).and_then(|r| r.strip_prefix('\n').or_else(|| r.strip_prefix("\r\n"))) else {
            continue;
        };
        let mut meta_end = None;
        let mut at = 0;
        for line in rest.split_inclusive('\n') {
            if line.trim_end() == fence {
                meta_end = Some((at, at + line.len()));
                break;
            }
            at += line.len();
        }
        let Some((a, b)) = meta_end else {
            return Err(bad(format!("front matter opened with {fence} is not closed")));
        };
        let meta_text = &rest[..a];
        let body = rest[b..].to_string();
        let meta: serde_json::Value = if yaml {
            if meta_text.trim().is_empty() {
                serde_json::Value::Object(Default::default())
            } else {
                serde_yaml::from_str(meta_text).map_err(|e| bad(format!("YAML front matter: {e}")))?
            }
        } else {
            let t: toml::Table = toml::from_str(meta_text).map_err(|e| bad(format!("TOML front matter: {e}")))?;
            serde_json::to_value(t).map_err(|e| bad(e.to_string()))?
        };
        let meta = match meta {
            serde_json::Value::Null => serde_json::Value::Object(Default::default()),
            m @ serde_json::Value::Object(_) => m,
            _ => return Err(bad("front matter must be a mapping".into())),
        };
        return Ok((meta, body));
    }
    Ok((serde_json::Value::Object(Default::default()), text.to_string()))
}

/// Markdown with `meta` as front matter (YAML or TOML) and `body`.
pub fn render_markdown(meta: &serde_json::Value, body: &str, toml_format: bool) -> Result<String> {
    let empty = meta.as_object().is_none_or(|m| m.is_empty());
    if empty {
        return Ok(body.to_string());
    }
    if toml_format {
        let t = toml::to_string(meta).map_err(|e| Error::new(ErrorCode::BadArguments, format!("file.md.write: TOML front matter: {e}")))?;
        Ok(format!("+++\n{t}+++\n{body}"))
    } else {
        let y = serde_yaml::to_string(meta).map_err(|e| Error::new(ErrorCode::BadArguments, format!("file.md.write: YAML front matter: {e}")))?;
        Ok(format!("---\n{y}---\n{body}"))
    }
}

/// The files module.
pub struct FilesModule;

impl crate::modules::Module for FilesModule {
    fn name(&self) -> &'static str {
        "files"
    }
    fn section(&self) -> Option<&'static str> {
        Some("files")
    }
    fn provide(&self, b: &mut AppBuilder) -> anyhow::Result<()> {
        let s: FilesSettings = b.core().config.section("files")?;
        let f = Files::new(s, &b.core().config.data_dir)?;
        b.provide(f);
        Ok(())
    }
    fn lua_components(&self) -> &'static [&'static dyn Component] {
        &[&FileLua]
    }
}

/// Run a storage operation on the invocation's runtime, never past its deadline.
fn block<T>(env: &Env, f: &Files, fut: impl std::future::Future<Output = Result<T>>) -> mlua::Result<T> {
    let mut until = Instant::now() + std::time::Duration::from_secs_f64(f.settings.timeout_secs);
    let mut by_deadline = false;
    if let Some(d) = env.control.deadline {
        if d <= until {
            until = d;
            by_deadline = true;
        }
    }
    match env.rt.block_on(async { tokio::time::timeout_at(until.into(), fut).await }) {
        Ok(r) => r.map_err(lua_err),
        Err(_) if by_deadline => {
            env.meter.tripped.set(Some(Limit::Time));
            Err(mlua::Error::external(Limit::Time))
        }
        Err(_) => Err(lua_err(Error::new(
            ErrorCode::TimeoutExceeded,
            format!("file: the store did not answer within {} s ([files] timeout_secs)", f.settings.timeout_secs),
        ))),
    }
}

fn files_of(env: &Env) -> mlua::Result<&Files> {
    env.app
        .as_ref()
        .and_then(|a| a.get::<Files>())
        .ok_or_else(|| lua_err(Error::new(ErrorCode::NotImplemented, "file: not available in this context")))
}

fn arg_str(v: Value, what: &str) -> mlua::Result<String> {
    match v {
        Value::String(s) => Ok(s
            .to_str()
            .map_err(|_| lua_err(Error::new(ErrorCode::BadArguments, format!("{what} must be UTF-8"))))?
            .to_string()),
        _ => Err(lua_err(Error::new(ErrorCode::BadArguments, format!("{what} must be a string")))),
    }
}

fn json_to_lua(lua: &Lua, v: &serde_json::Value) -> mlua::Result<Value> {
    lua.to_value_with(
        v,
        mlua::SerializeOptions::new()
            .serialize_none_to_null(false)
            .serialize_unit_to_null(false),
    )
}

/// `file` in Lua.
pub struct FileLua;

impl Component for FileLua {
    /// Installed once per pooled state (`lua::pool`): reads the invocation only when called.
    fn reusable(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "file"
    }

    fn install(&self, lua: &Lua, env: &Rc<Env>) -> mlua::Result<()> {
        let t = lua.create_table()?;
        let e = Rc::clone(env);
        t.set(
            "put",
            lua.create_function(move |lua, (path, content): (Value, Value)| {
                let path = arg_str(path, "file.put: path")?;
                let data = match content {
                    Value::String(s) => s.as_bytes().to_vec(),
                    _ => return Err(lua_err(Error::new(ErrorCode::BadArguments, "file.put: content must be a string"))),
                };
                let f = files_of(&e)?;
                let n = block(&e, f, f.put(&e.ctx, &path, data))?;
                let r = lua.create_table()?;
                r.set("path", path)?;
                r.set("size", n)?;
                Ok(r)
            })?,
        )?;
        let e = Rc::clone(env);
        t.set(
            "get",
            lua.create_function(move |lua, path: Value| {
                let path = arg_str(path, "file.get: path")?;
                let f = files_of(&e)?;
                match block(&e, f, f.get(&e.ctx, &path))? {
                    Some(b) => Ok(Value::String(lua.create_string(&b)?)),
                    None => Ok(Value::Nil),
                }
            })?,
        )?;
        let e = Rc::clone(env);
        t.set(
            "delete",
            lua.create_function(move |_, path: Value| {
                let path = arg_str(path, "file.delete: path")?;
                let f = files_of(&e)?;
                block(&e, f, f.delete(&e.ctx, &path))
            })?,
        )?;
        let e = Rc::clone(env);
        t.set(
            "list",
            lua.create_function(move |lua, prefix: Value| {
                let prefix = match prefix {
                    Value::Nil => String::new(),
                    v => arg_str(v, "file.list: prefix")?,
                };
                let f = files_of(&e)?;
                let items = block(&e, f, f.list(&e.ctx, &prefix))?;
                let out = lua.create_table()?;
                out.set_metatable(Some(lua.array_metatable()))?;
                for (i, (p, size, modified)) in items.into_iter().enumerate() {
                    let r = lua.create_table()?;
                    r.set("path", p)?;
                    r.set("size", size)?;
                    r.set("modified", modified)?;
                    out.raw_set(i + 1, r)?;
                }
                Ok(out)
            })?,
        )?;
        let md = lua.create_table()?;
        let e = Rc::clone(env);
        md.set(
            "read",
            lua.create_function(move |lua, path: Value| {
                let path = arg_str(path, "file.md.read: path")?;
                let f = files_of(&e)?;
                let Some(b) = block(&e, f, f.get(&e.ctx, &path))? else {
                    return Ok(Value::Nil);
                };
                let text = String::from_utf8(b).map_err(|_| {
                    lua_err(Error::new(ErrorCode::IncorrectData, format!("file.md.read: {path} is not UTF-8 text")))
                })?;
                let (meta, body) = parse_markdown(&text).map_err(lua_err)?;
                let r = lua.create_table()?;
                r.set("meta", json_to_lua(lua, &meta)?)?;
                r.set("body", body)?;
                Ok(Value::Table(r))
            })?,
        )?;
        let e = Rc::clone(env);
        md.set(
            "write",
            lua.create_function(move |lua, (path, meta, body, format): (Value, Value, Value, Value)| {
                let path = arg_str(path, "file.md.write: path")?;
                let meta = match meta {
                    Value::Nil => serde_json::Value::Object(Default::default()),
                    t @ Value::Table(_) => to_json(&t).map_err(|m| lua_err(Error::new(ErrorCode::BadArguments, format!("file.md.write: meta: {m}"))))?,
                    _ => return Err(lua_err(Error::new(ErrorCode::BadArguments, "file.md.write: meta must be a table"))),
                };
                if !meta.is_object() && meta.as_array().is_none_or(|a| !a.is_empty()) {
                    return Err(lua_err(Error::new(ErrorCode::BadArguments, "file.md.write: meta must be a table with names")));
                }
                let meta = if meta.is_object() { meta } else { serde_json::Value::Object(Default::default()) };
                let body = match body {
                    Value::Nil => String::new(),
                    v => arg_str(v, "file.md.write: body")?,
                };
                let toml_format = match format {
                    Value::Nil => false,
                    v => match arg_str(v, "file.md.write: format")?.as_str() {
                        "yaml" => false,
                        "toml" => true,
                        other => return Err(lua_err(Error::new(ErrorCode::BadArguments, format!("file.md.write: format {other:?} is not yaml or toml")))),
                    },
                };
                let text = render_markdown(&meta, &body, toml_format).map_err(lua_err)?;
                let f = files_of(&e)?;
                let n = block(&e, f, f.put(&e.ctx, &path, text.into_bytes()))?;
                let r = lua.create_table()?;
                r.set("path", path)?;
                r.set("size", n)?;
                Ok(r)
            })?,
        )?;
        t.set("md", md)?;
        lua.globals().set(self.name(), t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn front_matter_round_trips() {
        let (m, b) = parse_markdown("---\ntitle: Hi\ntags: [a, b]\nn: 3\n---\n# Body\n").unwrap();
        assert_eq!(m["title"], "Hi");
        assert_eq!(m["tags"][1], "b");
        assert_eq!(m["n"], 3);
        assert_eq!(b, "# Body\n");
        let (m, b) = parse_markdown("+++\ntitle = \"T\"\n[x]\ny = true\n+++\nbody").unwrap();
        assert_eq!(m["x"]["y"], true);
        assert_eq!(b, "body");
        let (m, b) = parse_markdown("no front matter").unwrap();
        assert_eq!(m, serde_json::json!({}));
        assert_eq!(b, "no front matter");
        assert!(parse_markdown("---\ntitle: x\n").is_err());
        assert!(parse_markdown("---\n- a\n---\n").is_err());
        for toml_format in [false, true] {
            let meta = serde_json::json!({"title": "日本語", "n": 2, "list": ["a"]});
            let text = render_markdown(&meta, "body\n", toml_format).unwrap();
            let (m2, b2) = parse_markdown(&text).unwrap();
            assert_eq!(m2, meta, "{text}");
            assert_eq!(b2, "body\n");
        }
    }
}
