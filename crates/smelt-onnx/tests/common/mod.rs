//! Shared helpers for the integration tests: locating the real model assets.
#![allow(dead_code)]

use std::path::PathBuf;

/// `$SMELT_ASSETS`, else `${XDG_CACHE_HOME:-$HOME/.cache}/smelt/assets`. Panics when missing:
/// these tests must fail, not skip, without their data.
pub fn assets_dir() -> PathBuf {
    let dir = match std::env::var_os("SMELT_ASSETS") {
        Some(d) => PathBuf::from(d),
        None => {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .expect("neither XDG_CACHE_HOME nor HOME is set");
            cache.join("smelt").join("assets")
        }
    };
    assert!(
        dir.is_dir(),
        "test assets not found at {}: run scripts/fetch-assets.sh",
        dir.display()
    );
    dir
}

/// A file under the assets folder; panics if it is missing.
pub fn asset(rel: &str) -> PathBuf {
    let p = assets_dir().join(rel);
    assert!(
        p.exists(),
        "test asset {} is missing: run scripts/fetch-assets.sh",
        p.display()
    );
    p
}
