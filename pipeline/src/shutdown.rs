//! Turns SIGTERM and SIGINT into a cancellation token. A second signal exits at once.
//!
//! Each binary calls [`on_signals`] on the first line of `main`, so a SIGTERM that
//! arrives while the stage is still starting (reading its keys, waiting for the broker)
//! stops it cleanly instead of killing it; later calls return the same token.

use std::sync::OnceLock;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

static TOKEN: OnceLock<CancellationToken> = OnceLock::new();

/// Returns the process's token, cancelled on the first SIGTERM or SIGINT. The handlers
/// are in place when the first call returns. Must be called inside a Tokio runtime.
pub fn on_signals() -> CancellationToken {
    TOKEN.get_or_init(install).clone()
}

fn install() -> CancellationToken {
    let token = CancellationToken::new();
    // Registered here rather than in the task, so they are in place on return.
    let streams = signal(SignalKind::terminate())
        .and_then(|term| Ok((term, signal(SignalKind::interrupt())?)));
    match streams {
        Ok((term, int)) => {
            tokio::spawn(watch(term, int, token.clone()));
        }
        Err(e) => {
            tracing::error!(error = %e, "Cannot install signal handlers; shutting down.");
            token.cancel();
        }
    }
    token
}

async fn watch(mut term: Signal, mut int: Signal, token: CancellationToken) {
    let mut count = 0;
    loop {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        count += 1;
        if count == 1 {
            tracing::info!("Shutdown requested; finishing the open transaction.");
            token.cancel();
        } else {
            tracing::warn!("Second signal; exiting without waiting.");
            std::process::exit(130);
        }
    }
}
