//! Graceful shutdown: SIGTERM and SIGINT cancel a token that every part of
//! a service watches (`docs/architecture.md`, "Shutdown").
//!
//! The handlers are installed by `main` before anything is served, and
//! installing them can fail: that is an error `main` reports, never a
//! panic in a detached task that would leave SIGTERM without a drain.

use std::future::Future;

use tokio_util::sync::CancellationToken;

/// Installs the SIGINT and SIGTERM handlers now and returns a future that
/// completes when either arrives.
///
/// Installing happens before the caller announces itself (e.g. prints
/// `listening on`), so a signal sent right afterwards is never lost to the
/// default action.
///
/// # Errors
/// The handlers cannot be installed. Must be called inside a tokio runtime.
#[cfg(unix)]
pub fn signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

/// Returns a future that completes on Ctrl-C.
///
/// # Errors
/// Never fails on this platform; the `Result` matches the Unix version.
#[cfg(not(unix))]
pub fn signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

/// Installs the handlers now ([`signal`]) and returns a token cancelled on
/// the first SIGTERM or SIGINT.
///
/// # Errors
/// The handlers cannot be installed. Must be called inside a tokio runtime.
pub fn on_signal() -> std::io::Result<CancellationToken> {
    let signalled = signal()?;
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        signalled.await;
        tracing::info!("shutdown signal received; draining");
        t.cancel();
    });
    Ok(token)
}

#[cfg(all(test, unix))]
mod tests {
    use std::time::Duration;

    /// The handlers really replace SIGTERM's default action: the process
    /// lives on and the token is cancelled.
    #[tokio::test]
    async fn sigterm_cancels_the_token() {
        let token = super::on_signal().expect("handlers install");
        assert!(!token.is_cancelled());
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success());
        tokio::time::timeout(Duration::from_secs(10), token.cancelled())
            .await
            .expect("cancelled on SIGTERM");
    }
}
