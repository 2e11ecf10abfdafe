//! The bounds a listener keeps, and the flags that set them (the same in both binaries).

use std::time::Duration;

/// What one listener allows its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Open connections at most; beyond it the listener stops accepting until one closes.
    pub max_connections: usize,
    /// A connection must complete each request head within this long of being accepted or of
    /// its previous response; an idle keep-alive connection is closed after it.
    pub header_timeout: Duration,
    /// Longest wait for the next piece of a request body; then the request fails with 408.
    pub body_timeout: Duration,
    /// After a shutdown signal, how long requests in flight (streams included) may run on.
    pub shutdown_grace: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimitArgs::default().limits()
    }
}

/// `--max-connections`, `--http-header-timeout`, `--http-body-timeout`, `--shutdown-grace`.
/// The defaults let a slow
/// but honest client through (a head in 10 s, a body that never pauses for 60 s) while a
/// connection that sends nothing is closed in seconds.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct HttpLimitArgs {
    /// Open HTTP connections at most; more wait in the listen backlog until one closes.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Seconds a connection may take to send a request head, counted from its accept or its
    /// previous response (so idle keep-alive connections close after it too).
    #[arg(long, default_value_t = 10.0, value_parser = positive_seconds)]
    pub http_header_timeout: f64,
    /// Seconds a request body may pause before the request fails with 408.
    #[arg(long, default_value_t = 60.0, value_parser = positive_seconds)]
    pub http_body_timeout: f64,
    /// Seconds requests in flight may run on after SIGTERM or SIGINT (Kubernetes waits 30 s,
    /// its default terminationGracePeriodSeconds, before it kills).
    #[arg(long, default_value_t = 30.0, value_parser = positive_seconds)]
    pub shutdown_grace: f64,
}

impl Default for HttpLimitArgs {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            http_header_timeout: 10.0,
            http_body_timeout: 60.0,
            shutdown_grace: 30.0,
        }
    }
}

impl HttpLimitArgs {
    pub fn limits(&self) -> HttpLimits {
        HttpLimits {
            max_connections: self.max_connections as usize,
            header_timeout: Duration::from_secs_f64(self.http_header_timeout),
            body_timeout: Duration::from_secs_f64(self.http_body_timeout),
            shutdown_grace: Duration::from_secs_f64(self.shutdown_grace),
        }
    }
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!("expected seconds in (0, 86400], got {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        http: HttpLimitArgs,
    }

    #[test]
    fn flags_and_defaults() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(cli.http, HttpLimitArgs::default());
        assert_eq!(
            HttpLimits::default(),
            HttpLimits {
                max_connections: 1024,
                header_timeout: Duration::from_secs(10),
                body_timeout: Duration::from_secs(60),
                shutdown_grace: Duration::from_secs(30),
            }
        );
        let cli = Cli::try_parse_from([
            "x",
            "--max-connections",
            "8",
            "--http-header-timeout",
            "0.5",
            "--http-body-timeout",
            "2",
            "--shutdown-grace",
            "5",
        ])
        .unwrap();
        let l = cli.http.limits();
        assert_eq!(l.max_connections, 8);
        assert_eq!(l.header_timeout, Duration::from_millis(500));
        assert_eq!(l.body_timeout, Duration::from_secs(2));
        assert_eq!(l.shutdown_grace, Duration::from_secs(5));
        for bad in [
            ["x", "--max-connections", "0"],
            ["x", "--http-header-timeout", "0"],
            ["x", "--http-body-timeout", "nan"],
            ["x", "--http-body-timeout", "-1"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }
}
