//! API keys: the set of bearer tokens the client APIs accept (`--api-key`,
//! `--api-keys-file`), shared by the HTTP middleware and the gRPC interceptor, and
//! reloadable from its file (SIGHUP) without a restart. No keys: the APIs are open.
//!
//! Keys never leave this module in readable form: `Debug` prints a count, and a check
//! compares every configured key in time that does not depend on where the given token
//! first differs, so response timing does not reveal a key's prefix.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// Why a keys file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ApiKeysError {
    #[error("reading the API keys file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the API keys file {path}, line {line}: a key must not contain whitespace")]
    Whitespace { path: PathBuf, line: usize },
    #[error("the API keys file {path} holds no key (an empty file would lock every client out)")]
    NoKeys { path: PathBuf },
    #[error("an API key given on the command line is empty")]
    Empty,
}

/// The keys in force, cheap to clone (all clones see reloads).
#[derive(Clone, Default)]
pub struct ApiKeys {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// `--api-key` values: fixed for the process's life.
    fixed: Vec<Vec<u8>>,
    /// `--api-keys-file`, re-read by [`ApiKeys::reload`].
    file: Option<PathBuf>,
    /// Fixed keys and the file's, as last loaded.
    current: RwLock<Vec<Vec<u8>>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[redacted; {} keys]", self.len())
    }
}

/// Keys of a keys file: one per line; blank lines and `#` comments are ignored.
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<Vec<u8>>, ApiKeysError> {
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if line.chars().any(char::is_whitespace) {
            return Err(ApiKeysError::Whitespace {
                path: path.to_owned(),
                line: i + 1,
            });
        }
        keys.push(line.as_bytes().to_vec());
    }
    Ok(keys)
}

fn read_file(path: &Path) -> Result<Vec<Vec<u8>>, ApiKeysError> {
    let text = std::fs::read_to_string(path).map_err(|source| ApiKeysError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_file(path, &text)
}

/// Equal in time that depends only on the lengths, never on the contents.
fn fixed_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

impl ApiKeys {
    /// Keys from the command line and, if given, a file (read now: a bad file is an error).
    pub fn load(fixed: &[String], file: Option<PathBuf>) -> Result<ApiKeys, ApiKeysError> {
        let fixed: Vec<Vec<u8>> = fixed
            .iter()
            .map(|k| k.trim())
            .map(|k| {
                if k.is_empty() {
                    Err(ApiKeysError::Empty)
                } else {
                    Ok(k.as_bytes().to_vec())
                }
            })
            .collect::<Result<_, _>>()?;
        let mut current = fixed.clone();
        if let Some(f) = &file {
            current.extend(read_file(f)?);
            if current.is_empty() {
                return Err(ApiKeysError::NoKeys { path: f.clone() });
            }
        }
        Ok(ApiKeys {
            inner: Arc::new(Inner {
                fixed,
                file,
                current: RwLock::new(current),
            }),
        })
    }

    /// No keys configured at start: the APIs are open. (A reload never opens them: a
    /// file left without keys is refused.)
    pub fn is_open(&self) -> bool {
        self.inner.fixed.is_empty() && self.inner.file.is_none()
    }

    /// Keys in force.
    pub fn len(&self) -> usize {
        self.inner.current.read().map(|k| k.len()).unwrap_or(0)
    }

    /// Whether no key is in force (only when open: see [`ApiKeys::is_open`]).
    pub fn is_empty(&self) -> bool {
        self.inner
            .current
            .read()
            .map(|k| k.is_empty())
            .unwrap_or(true)
    }

    /// The keys file, if any.
    pub fn file(&self) -> Option<&Path> {
        self.inner.file.as_deref()
    }

    /// Re-reads the keys file. On error the previous keys stay in force.
    pub fn reload(&self) -> Result<usize, ApiKeysError> {
        let Some(f) = &self.inner.file else {
            return Ok(self.len());
        };
        let mut next = self.inner.fixed.clone();
        next.extend(read_file(f)?);
        if next.is_empty() {
            return Err(ApiKeysError::NoKeys { path: f.clone() });
        }
        let n = next.len();
        if let Ok(mut cur) = self.inner.current.write() {
            *cur = next;
        }
        Ok(n)
    }

    /// Whether `token` is one of the keys; every key is compared (no early exit).
    pub fn accepts(&self, token: &[u8]) -> bool {
        let Ok(keys) = self.inner.current.read() else {
            return false;
        };
        keys.iter()
            .fold(false, |ok, k| fixed_time_eq(k, token) | ok)
    }

    /// Whether a request with this `authorization` header value may pass: always when
    /// open, else only `Bearer <key>` with a configured key.
    pub fn authorizes(&self, header: Option<&[u8]>) -> bool {
        if self.is_open() {
            return true;
        }
        let Some(h) = header else { return false };
        let Some(token) = h
            .strip_prefix(b"Bearer ")
            .or_else(|| h.strip_prefix(b"bearer "))
        else {
            return false;
        };
        self.accepts(token.trim_ascii())
    }
}

/// The gRPC interceptor for `moe.v1.Generation`: `authorization: Bearer <key>` metadata
/// or UNAUTHENTICATED.
pub fn grpc_interceptor(
    keys: ApiKeys,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |req: tonic::Request<()>| {
        let h = req.metadata().get("authorization").map(|v| v.as_bytes());
        if keys.authorizes(h) {
            Ok(req)
        } else {
            Err(tonic::Status::unauthenticated(
                "missing or invalid API key: send `authorization: Bearer <key>` metadata",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys_file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("keys");
        std::fs::write(&p, text).unwrap();
        (d, p)
    }

    #[test]
    fn file_ignores_blank_lines_and_comments() {
        let (_d, p) = keys_file("# team a\nk1\n\n  k2  # rotated 2026-01\n#k3\n");
        let keys = ApiKeys::load(&[], Some(p)).unwrap();
        assert_eq!(keys.len(), 2);
        assert!(keys.accepts(b"k1"));
        assert!(keys.accepts(b"k2"));
        assert!(!keys.accepts(b"k3"));
        assert!(!keys.accepts(b"k"));
    }

    #[test]
    fn a_key_with_inner_whitespace_is_refused() {
        let (_d, p) = keys_file("ok\nnot ok\n");
        assert!(matches!(
            ApiKeys::load(&[], Some(p)),
            Err(ApiKeysError::Whitespace { line: 2, .. })
        ));
    }

    #[test]
    fn missing_file_at_start_is_an_error() {
        assert!(ApiKeys::load(&[], Some("/nonexistent/keys".into())).is_err());
    }

    #[test]
    fn reload_replaces_file_keys_and_keeps_fixed_ones() {
        let (_d, p) = keys_file("old\n");
        let keys = ApiKeys::load(&["cli".into()], Some(p.clone())).unwrap();
        std::fs::write(&p, "new\n").unwrap();
        assert_eq!(keys.reload().unwrap(), 2);
        assert!(keys.accepts(b"new") && keys.accepts(b"cli"));
        assert!(!keys.accepts(b"old"));
    }

    #[test]
    fn reload_error_keeps_previous_keys() {
        let (_d, p) = keys_file("old\n");
        let keys = ApiKeys::load(&[], Some(p.clone())).unwrap();
        std::fs::remove_file(&p).unwrap();
        assert!(keys.reload().is_err());
        assert!(keys.accepts(b"old"));
        std::fs::write(&p, "bad key\n").unwrap();
        assert!(keys.reload().is_err());
        assert!(keys.accepts(b"old"));
        std::fs::write(&p, "# all keys revoked\n").unwrap();
        assert!(matches!(keys.reload(), Err(ApiKeysError::NoKeys { .. })));
        assert!(keys.accepts(b"old") && !keys.is_open());
    }

    #[test]
    fn authorization_header() {
        let keys = ApiKeys::load(&["sk-1".into()], None).unwrap();
        assert!(keys.authorizes(Some(b"Bearer sk-1")));
        assert!(!keys.authorizes(Some(b"Bearer sk-2")));
        assert!(!keys.authorizes(Some(b"sk-1")));
        assert!(!keys.authorizes(None));
        let open = ApiKeys::load(&[], None).unwrap();
        assert!(open.is_open() && open.authorizes(None));
    }

    #[test]
    fn fixed_time_compare_checks_every_byte() {
        assert!(fixed_time_eq(b"abcd", b"abcd"));
        assert!(!fixed_time_eq(b"abcd", b"abce"));
        assert!(!fixed_time_eq(b"xbcd", b"abcd"));
        assert!(!fixed_time_eq(b"abc", b"abcd"));
    }

    #[test]
    fn debug_never_shows_keys() {
        let keys = ApiKeys::load(&["sk-secret".into()], None).unwrap();
        let s = format!("{keys:?}");
        assert_eq!(s, "[redacted; 1 keys]");
    }
}
