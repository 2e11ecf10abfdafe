//! The transfer thread over real UCX in one process: a producer registers a pool, a consumer
//! pulls blocks from it with one-sided GETs (whatever transport `UCX_TLS` allows; the e2e tests
//! run tcp and shared memory across processes).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvcache::{BlockLayout, KvPart, PoolArray};
use kvtransfer::transfer::{PullJob, Transfers};
use kvtransfer::wire::{PeerMetadata, PoolShape};

fn layout() -> BlockLayout {
    BlockLayout {
        num_layers: 2,
        num_blocks: 8,
        block_size: 4,
        num_kv_heads: 1,
        head_dim: 8,
        dtype: "float16",
        dtype_bytes: 2,
    }
}

#[test]
fn a_consumer_reads_the_producers_blocks_and_a_dead_peer_fails_the_pull() {
    let layout = layout();
    let region = layout.region_bytes();
    // Four arrays (2 layers, K and V), each byte tagged with its array and block.
    let mut arrays: Vec<Vec<u8>> = (0..4)
        .map(|a| {
            (0..layout.num_blocks * region)
                .map(|i| (a * 64 + i / region) as u8)
                .collect()
        })
        .collect();
    let pool: Vec<PoolArray> = arrays
        .iter_mut()
        .enumerate()
        .map(|(i, a)| PoolArray {
            layer: i / 2,
            part: if i % 2 == 0 { KvPart::K } else { KvPart::V },
            addr: a.as_mut_ptr() as usize,
            len: a.len(),
            device: false,
        })
        .collect();
    let producer = Transfers::start(layout.clone(), pool).unwrap();
    let consumer = Transfers::start(layout.clone(), Vec::new()).unwrap();
    let peer = Arc::new(PeerMetadata {
        engine_id: "p".into(),
        generation: 1,
        worker_address: producer.local.worker_address.clone(),
        shape: PoolShape::from(&layout),
        arrays: producer.local.arrays.clone(),
    });
    let pull = |id, blocks: Vec<u32>, peer: Arc<PeerMetadata>| {
        consumer.pull(PullJob {
            id,
            peer,
            remote_blocks: blocks,
            deadline: Instant::now() + Duration::from_secs(10),
        });
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(r) = consumer.finished().pop() {
                return r;
            }
            assert!(Instant::now() < until, "the pull never ended");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let r = pull(1, vec![5, 2], peer.clone());
    let data = r.data.unwrap();
    assert_eq!(r.descriptors, 8);
    assert_eq!(data.len(), 2 * layout.block_bytes());
    for (i, b) in [5usize, 2].into_iter().enumerate() {
        for a in 0..4 {
            let at = (i * 4 + a) * region;
            assert!(data[at..at + region]
                .iter()
                .all(|&x| x == (a * 64 + b) as u8));
        }
    }
    // Out of the peer's pool: refused before any GET.
    let r = pull(2, vec![8], peer.clone());
    assert!(r.data.unwrap_err().contains("outside"));
    // The producer is gone: the pull fails (or times out) rather than hanging.
    drop(producer);
    let stale = Arc::new(PeerMetadata {
        generation: 2,
        ..(*peer).clone()
    });
    let r = pull(3, vec![1], stale);
    assert!(r.data.is_err());
    drop(arrays);
}
