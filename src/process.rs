//! What every command shares with the process around it: exit codes (the
//! one table: 0 clean, 64 bad usage or config, 1 runtime failure) and
//! waiting for a signal. Knows nothing of the commands.

/// Bad usage or an invalid config (BSD `EX_USAGE`).
pub const EXIT_USAGE: u8 = 64;
/// A runtime failure.
pub const EXIT_FAILURE: u8 = 1;

pub enum Signal {
    /// SIGINT or SIGTERM.
    Stop,
    /// SIGHUP.
    Reload,
}

/// The next SIGINT, SIGTERM or SIGHUP (Ctrl-C only, where the handlers
/// cannot be installed).
pub async fn wait_for_signal() -> Signal {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        let _ = tokio::signal::ctrl_c().await;
        return Signal::Stop;
    };
    tokio::select! {
        _ = term.recv() => Signal::Stop,
        _ = int.recv() => Signal::Stop,
        _ = hup.recv() => {
            tracing::info!("SIGHUP received: reloading");
            Signal::Reload
        }
    }
}
