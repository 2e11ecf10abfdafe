//! The side channel between pods (`VLLM_NIXL_SIDE_CHANNEL_HOST:PORT`): a producer's server,
//! which answers claims, renewals and releases of its pinned blocks against the lease table,
//! and a decode side's clients, one thread and one connection per producer, so a slow or
//! unreachable producer holds up only its own requests. Every socket has a timeout.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::leases::Leases;
use crate::wire::{read_frame, write_frame, ChannelReply, ChannelRequest, PeerMetadata};

/// Connections one server serves at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 256;
/// A connection with no request for this long is closed.
const IDLE: Duration = Duration::from_secs(120);
/// A client's connect, and its wait for each reply.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// A producer's side-channel server.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start(
        bind: SocketAddr,
        leases: Arc<Mutex<Leases>>,
        metadata: Arc<PeerMetadata>,
    ) -> Result<Self, String> {
        let listener = TcpListener::bind(bind)
            .map_err(|e| format!("KV transfer side channel: binding {bind}: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("KV transfer side channel: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("kv-side-channel".into())
            .spawn(move || accept(listener, flag, leases, metadata))
            .map_err(|e| format!("starting the side channel: {e}"))?;
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wakes the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, CONNECT_TIMEOUT);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    leases: Arc<Mutex<Leases>>,
    metadata: Arc<PeerMetadata>,
) {
    let open = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        let Ok(conn) = conn else { continue };
        if open.load(Ordering::Acquire) >= MAX_CONNECTIONS {
            continue;
        }
        open.fetch_add(1, Ordering::AcqRel);
        let (leases, metadata, open, stop) =
            (leases.clone(), metadata.clone(), open.clone(), stop.clone());
        let spawned = std::thread::Builder::new()
            .name("kv-side-conn".into())
            .spawn(move || {
                serve(conn, &leases, &metadata, &stop);
                open.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            tracing::warn!("KV transfer side channel: could not start a connection thread");
        }
    }
}

fn serve(mut conn: TcpStream, leases: &Mutex<Leases>, metadata: &PeerMetadata, stop: &AtomicBool) {
    let _ = conn.set_read_timeout(Some(IDLE));
    let _ = conn.set_write_timeout(Some(REPLY_TIMEOUT));
    let _ = conn.set_nodelay(true);
    while !stop.load(Ordering::Acquire) {
        let request: ChannelRequest = match read_frame(&mut conn) {
            Ok(r) => r,
            Err(e) => {
                if e.kind() == ErrorKind::InvalidData {
                    let reply = ChannelReply::Refused {
                        reason: format!("bad side-channel message: {e}"),
                    };
                    let _ = write_frame(&mut conn, &reply);
                }
                break;
            }
        };
        let reply = answer(request, leases, metadata);
        if write_frame(&mut conn, &reply).is_err() {
            break;
        }
    }
    let _ = conn.shutdown(Shutdown::Both);
}

/// One request against the lease table.
pub fn answer(
    request: ChannelRequest,
    leases: &Mutex<Leases>,
    metadata: &PeerMetadata,
) -> ChannelReply {
    let now = Instant::now();
    let mut leases = leases.lock().unwrap_or_else(|p| p.into_inner());
    let ms = |d: Duration| d.as_millis() as u64;
    match request {
        ChannelRequest::Claim {
            engine_id,
            request_id,
            block_ids,
            tokens_digest,
            want_metadata,
        } => {
            if engine_id != metadata.engine_id {
                return ChannelReply::Refused {
                    reason: format!(
                        "unknown engine {engine_id}: this pod is engine {}",
                        metadata.engine_id
                    ),
                };
            }
            match leases.claim(&request_id, &block_ids, tokens_digest, now) {
                Ok(left) => ChannelReply::Claimed {
                    expires_in_ms: ms(left),
                    generation: metadata.generation,
                    metadata: want_metadata.then(|| metadata.clone()),
                },
                Err(e) => ChannelReply::Refused {
                    reason: e.to_string(),
                },
            }
        }
        ChannelRequest::Renew { request_id } => match leases.renew(&request_id, now) {
            Ok(left) => ChannelReply::Renewed {
                expires_in_ms: ms(left),
            },
            Err(e) => ChannelReply::Refused {
                reason: e.to_string(),
            },
        },
        ChannelRequest::Release { request_id } => ChannelReply::Released {
            held: leases.release(&request_id, now),
        },
    }
}

/// A reply to a client's request, or why there is none, tagged as the caller asked.
#[derive(Debug)]
pub struct Answer {
    pub tag: u64,
    pub reply: Result<ChannelReply, String>,
}

/// The decode side's clients, one per producer address.
pub struct Clients {
    peers: HashMap<(String, u16), Sender<(u64, ChannelRequest)>>,
    answers_tx: Sender<Answer>,
    answers: Receiver<Answer>,
}

impl Default for Clients {
    fn default() -> Self {
        let (answers_tx, answers) = mpsc::channel();
        Self {
            peers: HashMap::new(),
            answers_tx,
            answers,
        }
    }
}

impl Clients {
    /// Sends `request` to the producer at `host:port`; its answer comes back with `tag`.
    pub fn send(&mut self, host: &str, port: u16, tag: u64, request: ChannelRequest) {
        let key = (host.to_string(), port);
        let mut msg = (tag, request);
        for _ in 0..2 {
            let tx = self
                .peers
                .entry(key.clone())
                .or_insert_with(|| spawn_client(key.0.clone(), key.1, self.answers_tx.clone()));
            match tx.send(msg) {
                Ok(()) => return,
                // Its thread ended (idle): start another.
                Err(mpsc::SendError(m)) => {
                    msg = m;
                    self.peers.remove(&key);
                }
            }
        }
        let _ = self.answers_tx.send(Answer {
            tag: msg.0,
            reply: Err("could not start a side-channel client".into()),
        });
    }

    /// Answers that arrived since the last call.
    pub fn answers(&self) -> Vec<Answer> {
        self.answers.try_iter().collect()
    }
}

/// A client thread ends after this long without requests.
const CLIENT_IDLE: Duration = Duration::from_secs(60);

fn spawn_client(host: String, port: u16, answers: Sender<Answer>) -> Sender<(u64, ChannelRequest)> {
    let (tx, rx) = mpsc::channel::<(u64, ChannelRequest)>();
    let peer = format!("{host}:{port}");
    let spawned = std::thread::Builder::new()
        .name("kv-side-client".into())
        .spawn(move || {
            let mut conn: Option<TcpStream> = None;
            while let Ok((tag, request)) = rx.recv_timeout(CLIENT_IDLE) {
                let reply = exchange(&mut conn, &host, port, &request);
                if reply.is_err() {
                    conn = None;
                }
                if answers.send(Answer { tag, reply }).is_err() {
                    return;
                }
            }
        });
    if spawned.is_err() {
        // The dropped receiver makes the next send fail, and the caller answers for it.
        tracing::warn!("KV transfer: could not start a side-channel client for {peer}");
    }
    tx
}

fn exchange(
    conn: &mut Option<TcpStream>,
    host: &str,
    port: u16,
    request: &ChannelRequest,
) -> Result<ChannelReply, String> {
    let peer = format!("{host}:{port}");
    if conn.is_none() {
        *conn = Some(connect(host, port).map_err(|e| format!("side channel {peer}: {e}"))?);
    }
    let Some(stream) = conn.as_mut() else {
        return Err(format!("side channel {peer}: not connected"));
    };
    write_frame(stream, request).map_err(|e| format!("side channel {peer}: {e}"))?;
    read_frame(stream).map_err(|e| format!("side channel {peer}: {e}"))
}

fn connect(host: &str, port: u16) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => {
                s.set_read_timeout(Some(REPLY_TIMEOUT))?;
                s.set_write_timeout(Some(REPLY_TIMEOUT))?;
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::new(ErrorKind::NotFound, "no address")))
}
