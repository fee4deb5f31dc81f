//! weft's systemd integration, shared by `weft-cp` and `weft-dp` (the unit files live beside
//! this crate, in `systemd/`).
//!
//! - [`init_logging`]: to the journal, with each event's fields as journal fields, when the
//!   process's stderr is connected to the journal (`JOURNAL_STREAM`); otherwise human-readable
//!   (or JSON) lines on stderr, coloured only on a terminal.
//! - [`ready`], [`reloading`], [`stopping`], [`status`]: `sd_notify` messages for
//!   `Type=notify` units; no-ops when `NOTIFY_SOCKET` is unset.
//! - [`watchdog`]: pings `WATCHDOG=1` at half of `WATCHDOG_USEC` from the async runtime, so a
//!   wedged runtime stops pinging and systemd restarts the service.

use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::field::{Field, Visit};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;

/// Log line format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Where logs went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// The systemd journal.
    Journal,
    /// Standard error.
    Stderr,
}

/// Installs the global tracing subscriber; `filter_env` names the variable holding the
/// filter (e.g. `WEFT_LOG`), `default` applies when it is unset or invalid.
pub fn init_logging(filter_env: &str, default: &str, format: Format) -> Destination {
    let filter = EnvFilter::try_from_env(filter_env).unwrap_or_else(|_| EnvFilter::new(default));
    if systemd_journal_logger::connected_to_journal()
        && let Ok(journal) = systemd_journal_logger::JournalLog::new()
    {
        tracing_subscriber::registry()
            .with(filter)
            .with(JournalLayer { journal })
            .init();
        return Destination::Journal;
    }
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        Format::Text => fmt.init(),
        Format::Json => fmt.json().init(),
    }
    Destination::Stderr
}

/// Sends tracing events to the journal: the message as `MESSAGE`, each field as a journal
/// field (`mesh=default` becomes `MESH=default`), the level as `PRIORITY`.
struct JournalLayer {
    journal: systemd_journal_logger::JournalLog,
}

#[derive(Default)]
struct Fields {
    message: String,
    pairs: Vec<(String, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.pairs.push((field.name().to_owned(), value.to_owned()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.pairs
                .push((field.name().to_owned(), format!("{value:?}")));
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for JournalLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut fields = Fields::default();
        event.record(&mut fields);
        // The message keeps the fields too, for `journalctl` without `-o verbose`.
        let mut message = fields.message;
        for (k, v) in &fields.pairs {
            let _ = write!(message, " {k}={v}");
        }
        let level = match *meta.level() {
            tracing::Level::ERROR => log::Level::Error,
            tracing::Level::WARN => log::Level::Warn,
            tracing::Level::INFO => log::Level::Info,
            tracing::Level::DEBUG => log::Level::Debug,
            tracing::Level::TRACE => log::Level::Trace,
        };
        let kvs: Vec<(&str, &str)> = fields
            .pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let _ = self.journal.journal_send(
            &log::Record::builder()
                .args(format_args!("{message}"))
                .level(level)
                .target(meta.target())
                .module_path(meta.module_path())
                .file(meta.file())
                .line(meta.line())
                .key_values(&kvs)
                .build(),
        );
    }
}

fn notify(state: &[NotifyState<'_>]) {
    // Without NOTIFY_SOCKET this does nothing; a failure to reach systemd is not fatal.
    if let Err(e) = sd_notify::notify(false, state) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// `READY=1` with a status line.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `RELOADING=1` (follow with [`ready`]).
pub fn reloading() {
    notify(&[NotifyState::Reloading]);
}

/// `STOPPING=1` with a status line.
pub fn stopping(status: &str) {
    notify(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// `STATUS=…`.
pub fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC` for this PID), if any.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec))
}

/// Pings the watchdog at half the interval systemd asked for, forever; returns at once when
/// there is no watchdog. Spawn it on the runtime whose liveness it should prove.
pub async fn watchdog() {
    let Some(interval) = watchdog_interval() else {
        return;
    };
    let mut tick = tokio::time::interval(interval / 2);
    loop {
        tick.tick().await;
        notify(&[NotifyState::Watchdog]);
    }
}
