//! The HTTP/1.1 listener of the agent and the router (see README): `serve` runs an axum app
//! under [`HttpLimits`]; `limits` holds the bounds and their flags; `body` the body-read
//! deadline.

mod body;
mod limits;
mod listen;
mod serve;

pub use body::{body_timeout, BodyTimeout};
pub use limits::{HttpLimitArgs, HttpLimits};
pub use listen::{BindError, ListenArgs};
pub use serve::{serve, shutdown_signal};
