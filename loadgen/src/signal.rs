//! The shutdown signal shared by both binaries: SIGINT or SIGTERM.

use std::future::Future;

/// Registers SIGINT and SIGTERM handlers now and returns a future that
/// completes when either arrives.
///
/// Registration happens before the caller announces itself (e.g. prints
/// `listening on`), so a signal sent right afterwards is never lost to the
/// default action.
///
/// # Errors
///
/// Fails when the handlers cannot be installed. Must be called inside a
/// tokio runtime.
#[cfg(unix)]
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
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
///
/// Never fails on this platform; the `Result` matches the Unix version.
#[cfg(not(unix))]
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
