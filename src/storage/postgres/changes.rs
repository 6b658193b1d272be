//! Wake-ups for watchers: LISTEN on the transitions channel.
//!
//! NOTIFY is only a wake-up; the transitions table stays the source of truth.
//! Notifications sent while the listener is disconnected are lost, so every
//! (re)connect also ticks the channel, and the fan-out re-reads from the table.
//! A notification whose payload is this store's own origin announces a batch
//! this process committed, which its committer hands to the fan-out itself: it
//! is skipped (a batch whose outcome the committer never learned, a connection
//! cut during COMMIT, is found by the fan-out's next read: the next local batch
//! after the gap, or the poll).

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{LISTENER_RETRY, TRANSITIONS_CHANNEL};

pub(super) fn spawn_listener(
    pool: PgPool,
    changes: watch::Sender<u64>,
    origin: std::sync::Arc<str>,
    shutdown: CancellationToken,
) {
    let tick = move || changes.send_modify(|n| *n = n.wrapping_add(1));
    tokio::spawn(async move {
        loop {
            let listener = async {
                let mut l = PgListener::connect_with(&pool).await?;
                l.listen(TRANSITIONS_CHANNEL).await?;
                Ok::<_, sqlx::Error>(l)
            };
            let mut listener = tokio::select! {
                _ = shutdown.cancelled() => return,
                l = listener => match l {
                    Ok(l) => l,
                    Err(error) => {
                        tracing::warn!(%error, "transition listener cannot connect, retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(LISTENER_RETRY) => continue,
                        }
                    }
                }
            };
            tracing::debug!("transition listener connected");
            tick();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    received = listener.try_recv() => match received {
                        Ok(Some(n)) if n.payload() == &*origin => {}
                        Ok(Some(_)) => tick(),
                        // The connection dropped: whatever was sent meanwhile is gone.
                        // The next try_recv reconnects; re-read from the table now.
                        Ok(None) => {
                            tracing::warn!("transition listener lost its connection");
                            tick();
                        }
                        Err(error) => {
                            tracing::warn!(%error, "transition listener failed, reconnecting");
                            tokio::select! {
                                _ = shutdown.cancelled() => return,
                                _ = tokio::time::sleep(LISTENER_RETRY) => break,
                            }
                        }
                    }
                }
            }
        }
    });
}
