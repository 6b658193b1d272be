//! A configuration file re-read when its bytes change (the auth file, the
//! healing policy): polled every interval; a version that does not parse is
//! logged and the previous one kept, so a typo never takes effect.

use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Reads `path` every `interval` until `shutdown`; when its bytes differ
/// from the last read (`loaded` at first), hands the text to `apply`, which
/// takes a good version (answering a summary for the log) or refuses it
/// (answering why). `what` names the file in the log.
pub fn spawn_reload(
    what: &'static str,
    path: PathBuf,
    loaded: Vec<u8>,
    interval: Duration,
    shutdown: CancellationToken,
    apply: impl Fn(&str) -> Result<String, String> + Send + 'static,
) {
    tokio::spawn(async move {
        let mut last = Some(loaded);
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let bytes = match tokio::fs::read(&path).await {
                Ok(bytes) => bytes,
                Err(error) => {
                    if last.take().is_some() {
                        tracing::warn!(file = what, path = %path.display(), %error, "file unreadable, keeping the previous version");
                    }
                    continue;
                }
            };
            if last.as_deref() == Some(bytes.as_slice()) {
                continue;
            }
            last = Some(bytes.clone());
            let applied = String::from_utf8(bytes)
                .map_err(|_| "not UTF-8".to_string())
                .and_then(|text| apply(&text));
            match applied {
                Ok(summary) => {
                    tracing::info!(file = what, path = %path.display(), %summary, "file reloaded");
                }
                Err(error) => {
                    tracing::warn!(file = what, path = %path.display(), %error, "file invalid, keeping the previous version");
                }
            }
        }
    });
}

/// Reads a configuration file at start: its bytes and text, or an error
/// naming it.
pub fn read(what: &str, path: &std::path::Path) -> Result<(Vec<u8>, String), String> {
    let bytes =
        std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
    let text = String::from_utf8(bytes.clone())
        .map_err(|_| format!("{what} {}: not UTF-8", path.display()))?;
    Ok((bytes, text))
}
