//! Turns SIGTERM and SIGINT into a cancellation token. A second signal exits at once.

use tokio_util::sync::CancellationToken;

/// Returns a token cancelled on the first SIGTERM or SIGINT.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut count = 0;
        loop {
            if wait_for_signal().await.is_err() {
                tracing::error!("Cannot install signal handlers; shutting down.");
                t.cancel();
                return;
            }
            count += 1;
            if count == 1 {
                tracing::info!("Shutdown requested; finishing the open transaction.");
                t.cancel();
            } else {
                tracing::warn!("Second signal; exiting without waiting.");
                std::process::exit(130);
            }
        }
    });
    token
}

async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
}
