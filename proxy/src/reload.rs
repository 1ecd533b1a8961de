//! Reloading the static config file on SIGHUP and when its content
//! changes. Parsing and validation happen here, off the request path; only
//! a valid file reaches [`Proxy::apply`], so a bad file leaves the table in
//! force untouched.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::Signal;

use crate::config::{parse_config, ConfigError, ProxyConfig};
use crate::listen::{shutdown_started, ShutdownSignal};
use crate::proxy::{Proxy, Update};

/// How often the file's content is compared with the applied one.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Why the config file cannot be used.
#[derive(Debug)]
pub enum ConfigFileError {
    Unreadable(PathBuf, std::io::Error),
    Invalid(PathBuf, ConfigError),
}

impl std::fmt::Display for ConfigFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigFileError::Unreadable(path, error) => write!(f, "{}: {error}", path.display()),
            ConfigFileError::Invalid(path, error) => write!(f, "{}: {error}", path.display()),
        }
    }
}

impl std::error::Error for ConfigFileError {}

/// The file's text and the configuration it holds.
pub async fn read_config(path: &PathBuf) -> Result<(String, ProxyConfig), ConfigFileError> {
    let text =
        tokio::fs::read_to_string(path).await.map_err(|e| ConfigFileError::Unreadable(path.clone(), e))?;
    let config = parse_config(&text).map_err(|e| ConfigFileError::Invalid(path.clone(), e))?;
    Ok((text, config))
}

/// Takes SIGHUP from `hangup`, made by the caller before the proxy says it
/// is ready: a SIGHUP that arrives before its handler exists would end the
/// process (the default action).
pub async fn watch(
    path: PathBuf,
    proxy: Arc<Proxy>,
    mut applied_text: String,
    mut hangup: Signal,
    mut shutdown: ShutdownSignal,
) {
    // A rejected text is not parsed and logged again until it changes.
    let mut rejected_text = String::new();
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            _ = hangup.recv() => true,
            _ = ticker.tick() => false,
            _ = shutdown_started(&mut shutdown) => return,
        };
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(text) => text,
            Err(error) => {
                if forced {
                    tracing::error!(path = %path.display(), %error, "reload failed: cannot read the config file");
                    proxy.long_lived.metrics.reloads_failed.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
        };
        if !forced && (text == applied_text || text == rejected_text) {
            continue;
        }
        // Parsed on the blocking pool, like the build: a large file takes a
        // while, and the threads serving requests must not wait for it.
        let parsed = {
            let text = text.clone();
            tokio::task::spawn_blocking(move || parse_config(&text)).await
        };
        let parsed = match parsed {
            Ok(parsed) => parsed,
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        };
        match parsed {
            Ok(config) => {
                let previous = proxy.table.load();
                if config.listen != previous.settings.listen
                    || config.upstreams != previous.settings.upstreams
                {
                    tracing::warn!("listen addresses or upstream ports changed; they take effect at restart");
                }
                drop(previous);
                let version = proxy.apply_off_thread(Update::Whole(Box::new(config)), None).await;
                tracing::info!(version, "routing table reloaded");
                applied_text = text;
            }
            Err(error) => {
                tracing::error!(path = %path.display(), %error, "config rejected; the previous routing table stays in force");
                proxy.long_lived.metrics.reloads_failed.fetch_add(1, Ordering::Relaxed);
                rejected_text = text;
            }
        }
    }
}
