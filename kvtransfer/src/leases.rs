//! The producer's pinned blocks: a finished prefill's full prompt blocks stay allocated under a
//! lease until a decode pod has read them (and released them) or the lease lapses; a claim or
//! a renewal extends it (vLLM 0.33's `kv_lease_duration`). Pure bookkeeping: the side channel
//! claims, renews and releases, the connector pins and collects what may be freed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kvcache::BlockId;

use crate::wire::tokens_digest;

struct Lease {
    block_ids: Vec<BlockId>,
    /// The tokens of those blocks, to check a claim's digest against.
    tokens: Vec<u32>,
    block_size: usize,
    expires: Instant,
}

/// Why a claim or renewal was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "request {0} holds no blocks here (never prefilled, already read, or its lease lapsed)"
    )]
    Unknown(String),
    #[error("request {request_id} holds blocks {held:?}, not {asked:?}")]
    WrongBlocks {
        request_id: String,
        held: Vec<BlockId>,
        asked: Vec<BlockId>,
    },
    #[error("request {0}'s blocks hold other tokens than the claim's")]
    WrongTokens(String),
}

pub struct Leases {
    duration: Duration,
    held: HashMap<String, Lease>,
    /// Released or lapsed, for the engine to free.
    done: Vec<String>,
    /// Leases that lapsed unread (vLLM's `nixl_num_kv_expired_reqs`).
    pub expired: u64,
}

impl Leases {
    pub fn new(duration: Duration) -> Self {
        Self {
            duration,
            held: HashMap::new(),
            done: Vec::new(),
            expired: 0,
        }
    }

    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// Pins `block_ids` (whole blocks of `tokens`) for `handle`; when the lease lapses.
    pub fn pin(
        &mut self,
        handle: &str,
        block_ids: Vec<BlockId>,
        tokens: Vec<u32>,
        block_size: usize,
        now: Instant,
    ) -> Instant {
        let expires = now + self.duration;
        self.held.insert(
            handle.to_string(),
            Lease {
                block_ids,
                tokens,
                block_size,
                expires,
            },
        );
        expires
    }

    /// A decode pod will read `block_ids`, a prefix of the pinned blocks, holding tokens whose
    /// digest is `digest`. Renews the lease; the time left on it.
    pub fn claim(
        &mut self,
        handle: &str,
        block_ids: &[BlockId],
        digest: u64,
        now: Instant,
    ) -> Result<Duration, Refusal> {
        let lease = self
            .held
            .get_mut(handle)
            .filter(|l| l.expires > now)
            .ok_or_else(|| Refusal::Unknown(handle.to_string()))?;
        if block_ids.is_empty() || !lease.block_ids.starts_with(block_ids) {
            return Err(Refusal::WrongBlocks {
                request_id: handle.to_string(),
                held: lease.block_ids.clone(),
                asked: block_ids.to_vec(),
            });
        }
        if tokens_digest(&lease.tokens[..block_ids.len() * lease.block_size]) != digest {
            return Err(Refusal::WrongTokens(handle.to_string()));
        }
        lease.expires = now + self.duration;
        Ok(self.duration)
    }

    pub fn renew(&mut self, handle: &str, now: Instant) -> Result<Duration, Refusal> {
        let lease = self
            .held
            .get_mut(handle)
            .filter(|l| l.expires > now)
            .ok_or_else(|| Refusal::Unknown(handle.to_string()))?;
        lease.expires = now + self.duration;
        Ok(self.duration)
    }

    /// The reader is done; true if the blocks were still pinned (so what it read is good).
    pub fn release(&mut self, handle: &str, now: Instant) -> bool {
        match self.held.remove(handle) {
            Some(lease) => {
                self.done.push(handle.to_string());
                lease.expires > now
            }
            None => false,
        }
    }

    /// Leases lapsed by `now` end; then every handle whose blocks may be freed.
    pub fn take_done(&mut self, now: Instant) -> Vec<String> {
        let lapsed: Vec<String> = self
            .held
            .iter()
            .filter(|(_, l)| l.expires <= now)
            .map(|(h, _)| h.clone())
            .collect();
        for h in lapsed {
            self.held.remove(&h);
            self.expired += 1;
            self.done.push(h);
        }
        std::mem::take(&mut self.done)
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Leases held, or released ones not yet collected by [`Self::take_done`].
    pub fn has_work(&self) -> bool {
        !self.held.is_empty() || !self.done.is_empty()
    }

    /// Blocks pinned now.
    pub fn pinned_blocks(&self) -> usize {
        self.held.values().map(|l| l.block_ids.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pinned(now: Instant) -> Leases {
        let mut l = Leases::new(Duration::from_secs(30));
        let tokens: Vec<u32> = (0..48).collect();
        l.pin("a", vec![7, 3, 9], tokens, 16, now);
        l
    }

    #[test]
    fn a_claim_checks_the_blocks_and_their_tokens_then_release_frees() {
        let t0 = Instant::now();
        let mut l = pinned(t0);
        let digest2: u64 = tokens_digest(&(0..32).collect::<Vec<u32>>());
        assert_eq!(
            l.claim("a", &[7, 3], digest2, t0),
            Ok(Duration::from_secs(30))
        );
        assert!(matches!(
            l.claim("a", &[3, 9], digest2, t0),
            Err(Refusal::WrongBlocks { .. })
        ));
        assert_eq!(
            l.claim("a", &[7, 3], digest2 ^ 1, t0),
            Err(Refusal::WrongTokens("a".into()))
        );
        assert_eq!(l.claim("b", &[7], 0, t0), Err(Refusal::Unknown("b".into())));
        assert!(l.take_done(t0).is_empty());
        assert_eq!(l.pinned_blocks(), 3);
        assert!(l.release("a", t0));
        assert!(!l.release("a", t0));
        assert_eq!(l.take_done(t0), vec!["a".to_string()]);
        assert!(l.is_empty() && l.expired == 0);
    }

    #[test]
    fn an_unread_lease_lapses_and_renewal_holds_it() {
        let t0 = Instant::now();
        let mut l = pinned(t0);
        let t20 = t0 + Duration::from_secs(20);
        assert!(l.renew("a", t20).is_ok());
        // 30 s after the pin, but only 10 after the renewal.
        assert!(l.take_done(t0 + Duration::from_secs(30)).is_empty());
        let late = t20 + Duration::from_secs(30);
        assert!(l.renew("a", late).is_err());
        assert_eq!(l.take_done(late), vec!["a".to_string()]);
        assert_eq!(l.expired, 1);
        // A read that finished after the lapse is not good.
        let mut l = pinned(t0);
        assert!(!l.release("a", t0 + Duration::from_secs(31)));
        assert_eq!(
            l.take_done(t0 + Duration::from_secs(31)),
            vec!["a".to_string()]
        );
    }
}
