//! Where a binary listens: `--host` and `--port` with `vllm serve`'s defaults, the same flags
//! in both binaries, and the bind with an error that names the address.

use tokio::net::TcpListener;

#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct ListenArgs {
    /// Address to bind.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot bind {addr}: {source}")]
pub struct BindError {
    pub addr: String,
    pub source: std::io::Error,
}

impl ListenArgs {
    /// `HOST:PORT`.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub async fn bind(&self) -> Result<TcpListener, BindError> {
        let addr = self.addr();
        TcpListener::bind(&addr)
            .await
            .map_err(|source| BindError { addr, source })
    }
}
