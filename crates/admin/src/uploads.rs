//! `POST /plugin/upload`: a component sent as the body is saved in a private folder of this
//! process, then swapped in like `POST /plugin`; the folder goes when the process stops
//! serving ([`remove`]).

use std::path::PathBuf;

use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;

use super::reply::{ApiError, query};
use lbwasm_proxy::serve::{Control, PluginRequest, PluginSwapped};

/// Largest plugin upload accepted.
const MAX_UPLOAD: usize = 32 << 20;

/// `POST /plugin/upload`: saves the component under the temp directory, named by its
/// content hash (one file per distinct upload), then swaps it in as `POST /plugin` would.
pub(super) async fn upload(
    control: &Control,
    req: Request<Incoming>,
) -> Result<PluginSwapped, ApiError> {
    let listener = query(&req, "listener");
    let options = match query(&req, "options").filter(|o| !o.trim().is_empty()) {
        Some(o) => serde_json::from_str(&o)
            .map_err(|e| ApiError::bad(format!("invalid options JSON: {e}")))?,
        None => Default::default(),
    };
    let name = query(&req, "name").unwrap_or_default();
    let bytes = Limited::new(req.into_body(), MAX_UPLOAD)
        .collect()
        .await
        .map_err(|e| {
            let status = if e.is::<http_body_util::LengthLimitError>() {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            ApiError::new(status, format!("cannot read the upload: {e}"))
        })?;
    let bytes = bytes.to_bytes();
    if !bytes.starts_with(b"\0asm") {
        return Err(ApiError::bad("not a WebAssembly file (no \\0asm header)"));
    }
    let stem: String = std::path::Path::new(&name)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        .take(40)
        .collect();
    let stem = if stem.is_empty() {
        "plugin".to_string()
    } else {
        stem
    };
    // A directory of this process only, created 0700: no other local user can swap the file
    // between saving it and loading it.
    let dir = upload_dir();
    let path = dir.join(format!(
        "{stem}-{:016x}.wasm",
        xxhash_rust::xxh3::xxh3_64(&bytes)
    ));
    let saved = match private_dir(&dir) {
        Ok(()) => tokio::fs::write(&path, &bytes).await,
        Err(e) => Err(e),
    };
    saved.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot save the upload to {}: {e}", path.display()),
        )
    })?;
    let swapped = control
        .swap_plugin(PluginRequest {
            listener,
            plugin: path.to_string_lossy().into_owned(),
            options,
        })
        .await;
    if swapped.is_err() {
        let _ = tokio::fs::remove_file(&path).await;
    }
    Ok(swapped?)
}

/// Where `POST /plugin/upload` saves components: one private folder per process, removed
/// at exit by [`remove`].
fn upload_dir() -> PathBuf {
    std::env::temp_dir().join(format!("lbwasm-uploads-{}", std::process::id()))
}

/// Removes this process's upload folder, if it made one. `lbwasm serve` calls it on the way
/// out (SIGTERM, Ctrl-C, errors, through [`AdminApi::at_exit`]), when no plugin is loaded
/// from it any more: a loaded plugin is compiled code in memory and no longer reads its file.
///
/// [`AdminApi::at_exit`]: lbwasm_proxy::serve::AdminApi::at_exit
pub(super) fn remove() {
    let dir = upload_dir();
    // Only a real directory of ours: never follow a link someone else planted there.
    let ours = std::fs::symlink_metadata(&dir).is_ok_and(|meta| {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            // SAFETY: geteuid has no preconditions and cannot fail.
            meta.is_dir() && meta.uid() == unsafe { libc::geteuid() }
        }
        #[cfg(not(unix))]
        {
            meta.is_dir()
        }
    });
    if !ours {
        return;
    }
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => tracing::debug!(dir = %dir.display(), "removed the plugin upload folder"),
        Err(error) => {
            tracing::warn!(dir = %dir.display(), %error, "cannot remove the plugin upload folder")
        }
    }
}

/// Creates `dir` readable and writable by this user only, and checks an existing one is ours
/// and private (a directory planted by someone else is refused).
fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let meta = std::fs::symlink_metadata(dir)?;
                // SAFETY: geteuid has no preconditions and cannot fail.
                let uid = unsafe { libc::geteuid() };
                if meta.is_dir() && meta.uid() == uid && meta.permissions().mode() & 0o077 == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::other(format!(
                        "{} is not a private directory of ours",
                        dir.display()
                    )))
                }
            }
            Err(e) => Err(e),
        }
    }
    #[cfg(not(unix))]
    {
        std::fs::create_dir_all(dir)
    }
}
