//! The handle the server uses to talk to the engine thread, and the per-request output stream.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use tokio::sync::{mpsc as tokio_mpsc, oneshot};

use super::types::{EngineError, GenerateOutput, GenerateRequest};
use kvcache::{BlockHash, Medium};

/// Messages from handles to the engine thread.
pub(crate) enum EngineCommand {
    Add {
        request: GenerateRequest,
        outputs: tokio_mpsc::UnboundedSender<GenerateOutput>,
    },
    Abort(String),
    /// `reset_external`: the connector's tier too.
    ResetPrefixCache {
        reset_external: bool,
        reply: oneshot::Sender<bool>,
    },
    CachedBlocks(oneshot::Sender<Vec<TierBlocks>>),
}

/// The blocks one tier holds: the device pool first, then the connector's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierBlocks {
    pub medium: Medium,
    /// Sorted.
    pub hashes: Vec<BlockHash>,
}

/// Cheap to clone; every clone talks to the same engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<EngineCommand>,
    alive: Arc<AtomicBool>,
}

impl EngineHandle {
    pub(crate) fn new(commands: mpsc::Sender<EngineCommand>, alive: Arc<AtomicBool>) -> Self {
        Self { commands, alive }
    }

    /// Submits a request; its outputs arrive on the returned stream. Dropping the stream before
    /// the request finished aborts it (client disconnect frees its blocks).
    pub fn generate(&self, request: GenerateRequest) -> Result<RequestStream, EngineError> {
        if !self.is_alive() {
            return Err(EngineError::Dead);
        }
        let (tx, rx) = tokio_mpsc::unbounded_channel();
        let request_id = request.request_id.clone();
        self.commands
            .send(EngineCommand::Add {
                request,
                outputs: tx,
            })
            .map_err(|_| EngineError::Dead)?;
        Ok(RequestStream {
            request_id,
            outputs: rx,
            finished: false,
            engine: self.clone(),
        })
    }

    /// Aborts a request if it is still running; unknown ids are ignored.
    pub fn abort(&self, request_id: &str) {
        let _ = self
            .commands
            .send(EngineCommand::Abort(request_id.to_string()));
    }

    /// False once the engine thread has stopped (it died or the process is shutting down).
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Drops every cached block no request is using; false if some blocks are still in use.
    pub async fn reset_prefix_cache(&self, reset_external: bool) -> Result<bool, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(EngineCommand::ResetPrefixCache {
                reset_external,
                reply,
            })
            .map_err(|_| EngineError::Dead)?;
        rx.await.map_err(|_| EngineError::Dead)
    }

    /// The hashes of the blocks in the prefix cache and in each tier below it, sorted. Taken
    /// between engine steps, so it matches the state every published event batch so far
    /// describes.
    pub async fn cached_blocks(&self) -> Result<Vec<TierBlocks>, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(EngineCommand::CachedBlocks(tx))
            .map_err(|_| EngineError::Dead)?;
        rx.await.map_err(|_| EngineError::Dead)
    }
}

/// The outputs of one request, in order; the last one carries `finish`.
pub struct RequestStream {
    request_id: String,
    outputs: tokio_mpsc::UnboundedReceiver<GenerateOutput>,
    finished: bool,
    engine: EngineHandle,
}

impl RequestStream {
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// Next output, or `None` after the final one (or if the engine died).
    pub async fn recv(&mut self) -> Option<GenerateOutput> {
        if self.finished {
            return None;
        }
        let out = self.outputs.recv().await;
        match &out {
            Some(o) if o.finish.is_none() => {}
            _ => self.finished = true,
        }
        out
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.finished {
            self.engine.abort(&self.request_id);
        }
    }
}
