//! The remediation policy in force: the flags' policy, or `--healing-policy`
//! read over it and re-read when the file changes (a version that does not
//! parse or holds an impossible value is refused and logged; the last good
//! one stays). At start, a bad file is an error naming the line.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::domain::brakes::{self, HealingPolicy};
use crate::error::Error;

/// The policy every handler reads, swapped atomically on reload.
pub struct PolicyHandle {
    current: RwLock<Arc<HealingPolicy>>,
}

impl PolicyHandle {
    /// A policy that never changes.
    pub fn fixed(policy: HealingPolicy) -> Arc<PolicyHandle> {
        Arc::new(PolicyHandle {
            current: RwLock::new(Arc::new(policy)),
        })
    }

    /// `path` read over `base` (the flags' policy), re-read whenever its
    /// content changes (checked every `interval`) until `shutdown`.
    pub fn watch(
        path: &Path,
        base: HealingPolicy,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> Result<Arc<PolicyHandle>, Error> {
        let (bytes, text) =
            super::file_watch::read("healing policy file", path).map_err(Error::InvalidArgument)?;
        let policy = brakes::parse_policy(&text, &base).map_err(|e| {
            Error::InvalidArgument(format!("healing policy file {}: {e}", path.display()))
        })?;
        tracing::info!(path = %path.display(), ?policy, "healing policy loaded");
        let handle = PolicyHandle::fixed(policy);
        let target = handle.clone();
        super::file_watch::spawn_reload(
            "healing policy",
            path.to_owned(),
            bytes,
            interval,
            shutdown,
            move |text| {
                let policy = brakes::parse_policy(text, &base)?;
                let summary = format!("{policy:?}");
                target.replace(policy);
                Ok(summary)
            },
        );
        Ok(handle)
    }

    pub fn current(&self) -> Arc<HealingPolicy> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn replace(&self, policy: HealingPolicy) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "fleetcare-healing-policy-{name}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn a_changed_file_is_taken_and_a_broken_one_keeps_the_last_good_policy() {
        let dir = scratch("reload");
        let path = dir.join("healing.toml");
        std::fs::write(&path, "max_unhealthy_percent = 30\n").unwrap();
        let shutdown = CancellationToken::new();
        let base = HealingPolicy::default();
        let handle = PolicyHandle::watch(
            &path,
            base.clone(),
            Duration::from_millis(20),
            shutdown.clone(),
        )
        .unwrap();
        assert_eq!(handle.current().max_unhealthy_percent, 30);
        assert_eq!(handle.current().retry_budget, base.retry_budget);

        let wait_for = |want: u32| {
            let handle = handle.clone();
            async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                while handle.current().max_unhealthy_percent != want {
                    assert!(tokio::time::Instant::now() < deadline, "reload not seen");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        std::fs::write(&path, "max_unhealthy_percent = 55\ndry_run = true\n").unwrap();
        wait_for(55).await;
        assert!(handle.current().dry_run);

        // Impossible, then unparsable: refused; a good version after them is
        // taken, so the refused ones were seen and skipped.
        std::fs::write(&path, "max_unhealthy_percent = 101\n").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(handle.current().max_unhealthy_percent, 55);
        std::fs::write(&path, "max_unhealthy_percent = = 3\n").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(handle.current().max_unhealthy_percent, 55);
        std::fs::write(&path, "max_unhealthy_percent = 20\n").unwrap();
        wait_for(20).await;
        shutdown.cancel();
    }

    #[test]
    fn a_bad_file_at_start_is_an_error_naming_the_line() {
        let dir = scratch("start");
        let path = dir.join("healing.toml");
        std::fs::write(&path, "# brakes\nretry_budget = 0\n").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let error = rt
            .block_on(async {
                PolicyHandle::watch(
                    &path,
                    HealingPolicy::default(),
                    Duration::from_secs(1),
                    CancellationToken::new(),
                )
                .map(|_| ())
            })
            .unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("line 2") && message.contains("retry_budget"),
            "{message}"
        );
    }
}
