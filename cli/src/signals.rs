//! Waiting for SIGTERM or SIGINT (Ctrl-C), the signals that start a graceful shutdown,
//! and SIGHUP, which re-reads the API keys file.

/// Resolves when the process is asked to stop.
pub async fn wait_for_termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Re-reads the API keys file on every SIGHUP; a file that cannot be read keeps the
/// keys in force and logs a warning. Runs for the process's life.
pub async fn reload_keys_on_hangup(keys: moe_router::api_keys::ApiKeys) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP: the API keys file will not be re-read");
            return;
        };
        while hup.recv().await.is_some() {
            match keys.reload() {
                Ok(n) => tracing::info!(keys = n, "SIGHUP: API keys reloaded"),
                Err(e) => {
                    tracing::warn!(error = %e, keys = keys.len(), "SIGHUP: keeping the previous API keys")
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = keys;
    }
}
