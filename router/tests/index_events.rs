//! The prefix index driven by KV events the way engines send them: chains, several pods, tiers,
//! removal, clears, the memory caps, and events it cannot map.

mod common;

use common::{block_stored, engine_chain};
use kvevents::{BlockRemoved, ExternalBlockHash, ExtraKey, KvEvent};
use router::index::{IndexConfig, PodMatch, PrefixIndex, TierWeights};

const BS: usize = 4;

fn index_with(f: impl FnOnce(&mut IndexConfig)) -> PrefixIndex {
    let mut cfg = IndexConfig::new("test-model");
    cfg.block_size = BS;
    cfg.shards = 4;
    f(&mut cfg);
    PrefixIndex::new(cfg).unwrap()
}

/// BlockStored for blocks `from..to` of `tokens` (engine hashes as ints).
fn stored(tokens: &[u32], from: usize, to: usize, medium: Option<&str>) -> KvEvent {
    let hashes = engine_chain(tokens, BS);
    KvEvent::BlockStored(block_stored(
        hashes[from..to]
            .iter()
            .map(|&h| ExternalBlockHash::Int(h))
            .collect(),
        from.checked_sub(1)
            .map(|p| ExternalBlockHash::Int(hashes[p])),
        tokens[from * BS..to * BS].to_vec(),
        BS,
        medium,
    ))
}

/// The engine hashes of some blocks of `tokens`.
fn picked(tokens: &[u32], blocks: &[usize]) -> Vec<ExternalBlockHash> {
    let hashes = engine_chain(tokens, BS);
    blocks
        .iter()
        .map(|&i| ExternalBlockHash::Int(hashes[i]))
        .collect()
}

fn removed(tokens: &[u32], blocks: &[usize], medium: Option<&str>) -> KvEvent {
    KvEvent::BlockRemoved(BlockRemoved {
        block_hashes: picked(tokens, blocks),
        medium: medium.map(str::to_string),
        group_idx: None,
    })
}

/// Offloaded copies as vLLM's CPU offloading announces them: hashes only.
fn offloaded(tokens: &[u32], blocks: &[usize], medium: &str) -> KvEvent {
    KvEvent::BlockStored(block_stored(
        picked(tokens, blocks),
        None,
        vec![],
        BS,
        Some(medium),
    ))
}

fn toks(seed: u32, blocks: usize) -> Vec<u32> {
    (0..(blocks * BS) as u32).map(|i| seed * 1000 + i).collect()
}

/// (pod, blocks, score) sorted by pod.
fn scores(ix: &PrefixIndex, tokens: &[u32]) -> Vec<(String, usize, f64)> {
    salted_scores(ix, tokens, None)
}

/// `scores` of a request with a `cache_salt`.
fn salted_scores(
    ix: &PrefixIndex,
    tokens: &[u32],
    salt: Option<&str>,
) -> Vec<(String, usize, f64)> {
    let mut v: Vec<_> = ix
        .longest_prefix(&ix.block_keys(tokens, salt))
        .into_iter()
        .map(|PodMatch { pod, blocks, score }| (pod.to_string(), blocks, score))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn chain_stored_in_pieces_matches_the_prompt() {
    let ix = index_with(|_| {});
    let t = toks(1, 6);
    ix.apply("a", &stored(&t, 0, 2, None));
    ix.apply("a", &stored(&t, 2, 4, Some("GPU")));
    // Prompt: the 4 stored blocks, 2 more, and a partial block that is never hashed.
    let mut prompt = toks(1, 6);
    prompt.extend([1, 2]);
    assert_eq!(scores(&ix, &prompt), vec![("a".into(), 4, 4.0 / 6.0)]);
    // A prompt diverging in block 1 matches only block 0.
    let mut other = t.clone();
    other[BS + 1] = 999_999;
    assert_eq!(scores(&ix, &other), vec![("a".into(), 1, 1.0 / 6.0)]);
    // A prompt with different first block matches nothing.
    assert!(scores(&ix, &toks(2, 6)).is_empty());
    let s = ix.stats();
    assert_eq!(
        (s.pods, s.keys, s.pod_entries, s.engine_hashes),
        (1, 4, 4, 4)
    );
}

#[test]
fn both_hash_forms_map_to_the_same_blocks() {
    let ix = index_with(|_| {});
    let t = toks(3, 3);
    let KvEvent::BlockStored(mut e) = stored(&t, 0, 3, None) else {
        unreachable!()
    };
    // The 32-byte form of a digest whose last 8 bytes are the int form.
    let digest = |h: &ExternalBlockHash| match h {
        ExternalBlockHash::Int(v) => {
            let mut b = vec![0x77; 24];
            b.extend_from_slice(&v.to_be_bytes());
            ExternalBlockHash::Bytes(b)
        }
        ExternalBlockHash::Bytes(_) => unreachable!(),
    };
    e.block_hashes = e.block_hashes.iter().map(digest).collect();
    ix.apply("a", &KvEvent::BlockStored(e));
    assert_eq!(scores(&ix, &t), vec![("a".into(), 3, 1.0)]);
    // Removal in the int form finds the blocks stored in the bin form.
    ix.apply("a", &removed(&t, &[2], None));
    assert_eq!(scores(&ix, &t), vec![("a".into(), 2, 2.0 / 3.0)]);
}

#[test]
fn several_pods_each_with_their_run() {
    let ix = index_with(|_| {});
    let t = toks(4, 8);
    ix.apply("a", &stored(&t, 0, 8, None));
    ix.apply("b", &stored(&t, 0, 3, None));
    ix.apply("c", &stored(&t, 0, 1, None));
    ix.apply("c", &stored(&t, 1, 2, None));
    ix.apply("d", &stored(&toks(5, 8), 0, 8, None));
    assert_eq!(
        scores(&ix, &t),
        vec![
            ("a".into(), 8, 1.0),
            ("b".into(), 3, 3.0 / 8.0),
            ("c".into(), 2, 2.0 / 8.0)
        ]
    );
    assert_eq!(ix.stats().pod_entries, 8 + 3 + 2 + 8);
}

#[test]
fn removal_breaks_the_run_and_tiers_are_separate() {
    let ix = index_with(|_| {});
    let t = toks(6, 4);
    ix.apply("a", &stored(&t, 0, 4, None));
    ix.apply("a", &offloaded(&t, &[0, 1, 2, 3], "CPU"));
    // GPU copies of blocks 1..4 evicted: those blocks now count at the CPU weight.
    ix.apply("a", &removed(&t, &[1, 2, 3], Some("GPU")));
    let got = scores(&ix, &t);
    assert_eq!((got[0].1, got.len()), (4, 1));
    assert!((got[0].2 - (1.0 + 3.0 * 0.8) / 4.0).abs() < 1e-12);
    // CPU copy of block 2 dropped too: the run stops at block 2.
    ix.apply("a", &removed(&t, &[2], Some("CPU")));
    let got = scores(&ix, &t);
    assert_eq!(got[0].1, 2);
    assert!((got[0].2 - 1.8 / 4.0).abs() < 1e-12);
    // Removing a tier a block is not in changes nothing; the engine map keeps only live blocks.
    ix.apply("a", &removed(&t, &[0], Some("STORAGE")));
    assert_eq!(scores(&ix, &t)[0].1, 2);
    assert_eq!(ix.stats().engine_hashes, 3);
    ix.apply("a", &removed(&t, &[0, 1, 3], Some("CPU")));
    ix.apply("a", &removed(&t, &[0], None));
    let s = ix.stats();
    assert_eq!((s.keys, s.pod_entries, s.engine_hashes), (0, 0, 0));
    assert!(scores(&ix, &t).is_empty());
}

#[test]
fn tier_weights_are_configurable_and_best_tier_wins() {
    let ix = index_with(|c| {
        c.tier_weights = TierWeights {
            gpu: 1.0,
            cpu: 0.5,
            storage: 0.25,
        }
    });
    let t = toks(7, 2);
    ix.apply("a", &stored(&t, 0, 2, Some("STORAGE")));
    ix.apply("a", &offloaded(&t, &[1], "cpu"));
    assert_eq!(scores(&ix, &t), vec![("a".into(), 2, (0.25 + 0.5) / 2.0)]);
    // An unknown medium counts as storage.
    ix.apply("b", &stored(&t, 0, 2, Some("LMCACHE_DISK")));
    assert_eq!(scores(&ix, &t)[1], ("b".into(), 2, 0.25));
    assert!(PrefixIndex::new({
        let mut c = IndexConfig::new("m");
        c.tier_weights.cpu = 1.5;
        c
    })
    .is_err());
}

#[test]
fn clear_and_remove_pod() {
    let ix = index_with(|_| {});
    let t = toks(8, 3);
    ix.apply("a", &stored(&t, 0, 3, None));
    ix.apply("b", &stored(&t, 0, 3, None));
    ix.apply("a", &KvEvent::AllBlocksCleared);
    assert_eq!(scores(&ix, &t), vec![("b".into(), 3, 1.0)]);
    // After a clear, the pod's old engine hashes are unknown: children of them are ignored.
    ix.apply("a", &stored(&t, 1, 3, None));
    assert_eq!(ix.stats().unresolved_blocks, 2);
    assert_eq!(scores(&ix, &t).len(), 1);
    ix.clear_pod("b");
    assert!(scores(&ix, &t).is_empty());
    ix.apply("b", &stored(&t, 0, 3, None));
    ix.remove_pod("b");
    ix.remove_pod("nope");
    let s = ix.stats();
    assert_eq!(
        (s.pods, s.keys, s.pod_entries, s.engine_hashes),
        (1, 0, 0, 0)
    );
    // A removed pod that comes back starts empty.
    ix.apply("b", &stored(&t, 0, 1, None));
    assert_eq!(scores(&ix, &t), vec![("b".into(), 1, 1.0 / 3.0)]);
}

#[test]
fn unknown_engine_hashes_and_bad_events_are_ignored() {
    let ix = index_with(|_| {});
    let t = toks(9, 4);
    // Parent never stored, offload of an unknown block, removal of an unknown block.
    ix.apply("a", &stored(&t, 2, 4, None));
    ix.apply("a", &offloaded(&t, &[0], "CPU"));
    ix.apply("a", &removed(&t, &[0, 1], None));
    // Token count that does not fit the block size.
    let KvEvent::BlockStored(mut e) = stored(&t, 0, 2, None) else {
        unreachable!()
    };
    e.token_ids.pop();
    ix.apply("a", &KvEvent::BlockStored(e));
    ix.apply("a", &KvEvent::Unknown("FutureEvent".into()));
    let s = ix.stats();
    assert_eq!(
        (s.keys, s.engine_hashes, s.unresolved_blocks),
        (0, 0, 2 + 1 + 2)
    );
    assert!(scores(&ix, &t).is_empty());
}

/// `stored` for a request with a cache salt, as the agent (and vLLM) announce it: the salt is
/// the first block's only extra key, later blocks have none.
fn salted_stored(tokens: &[u32], from: usize, to: usize, salt: &str) -> KvEvent {
    let KvEvent::BlockStored(mut e) = stored(tokens, from, to, None) else {
        unreachable!()
    };
    let mut keys = vec![None; to - from];
    if from == 0 {
        keys[0] = Some(vec![ExtraKey::Str(salt.into())]);
    }
    e.extra_keys = Some(keys);
    KvEvent::BlockStored(e)
}

#[test]
fn extra_keys_make_distinct_blocks() {
    let ix = index_with(|_| {});
    let t = toks(10, 2);
    ix.apply("a", &salted_stored(&t, 0, 2, "salt"));
    // The salted first block is not the plain prompt's first block.
    assert!(scores(&ix, &t).is_empty());
    assert_eq!(ix.stats().keys, 2);
}

#[test]
fn salted_requests_match_chains_stored_under_their_salt() {
    let ix = index_with(|_| {});
    let t = toks(15, 4);
    // A salted chain stored in two steps (the continuation carries no extra keys), and the
    // same tokens unsalted on another pod.
    ix.apply("a", &salted_stored(&t, 0, 2, "tenant-1"));
    ix.apply("a", &salted_stored(&t, 2, 3, "tenant-1"));
    ix.apply("b", &stored(&t, 0, 4, None));
    let a = vec![("a".to_string(), 3, 0.75)];
    assert_eq!(salted_scores(&ix, &t, Some("tenant-1")), a);
    assert_eq!(
        scores(&ix, &t),
        vec![("b".to_string(), 4, 1.0)],
        "unsalted requests match only unsalted blocks"
    );
    assert!(salted_scores(&ix, &t, Some("tenant-2")).is_empty());
    // An empty salt is no salt (as in the engine).
    assert_eq!(salted_scores(&ix, &t, Some("")), scores(&ix, &t));
}

#[test]
fn key_cap_evicts_keys_not_used_since_stored() {
    // One shard so the cap is exact.
    let ix = index_with(|c| {
        c.shards = 1;
        c.max_keys = 4;
    });
    let (t1, t2) = (toks(11, 2), toks(12, 2));
    ix.apply("a", &stored(&t1, 0, 2, None));
    ix.apply("a", &stored(&t2, 0, 2, None));
    assert_eq!(ix.stats().keys, 4);
    // Scoring t1 marks its keys used; a new chain then evicts t2's unused ones.
    assert_eq!(scores(&ix, &t1)[0].1, 2);
    let t3 = toks(13, 2);
    ix.apply("a", &stored(&t3, 0, 2, None));
    assert_eq!(ix.stats().keys, 4);
    assert_eq!(scores(&ix, &t1)[0].1, 2);
    assert!(scores(&ix, &t2).is_empty());
    assert_eq!(scores(&ix, &t3)[0].1, 2);
    // Removing an evicted block is harmless; the engine map forgets it.
    ix.apply("a", &removed(&t2, &[0, 1], None));
    assert_eq!(ix.stats().engine_hashes, 4);
}

#[test]
fn pods_per_key_cap_keeps_the_latest_stores() {
    let ix = index_with(|c| c.max_pods_per_key = 2);
    let t = toks(14, 1);
    for pod in ["a", "b", "c"] {
        ix.apply(pod, &stored(&t, 0, 1, None));
    }
    let got: Vec<String> = scores(&ix, &t).into_iter().map(|s| s.0).collect();
    assert_eq!(got, vec!["b", "c"]);
    // "a" stores again: now "b" is the stalest.
    ix.apply("a", &stored(&t, 0, 1, Some("CPU")));
    let got: Vec<String> = scores(&ix, &t).into_iter().map(|s| s.0).collect();
    assert_eq!(got, vec!["a", "c"]);
    assert_eq!(ix.stats().pod_entries, 2);
}

/// Issue 17 (4): one pod (or a publisher spoofing it) cannot map more than
/// `max_blocks_per_pod` blocks; what it holds stays, other pods are unaffected, and blocks it
/// frees make room again.
#[test]
fn a_pod_maps_at_most_its_block_limit() {
    let ix = index_with(|c| c.max_blocks_per_pod = 6);
    let (t1, t2) = (toks(21, 4), toks(22, 4));
    ix.apply("a", &stored(&t1, 0, 4, None));
    ix.apply("a", &stored(&t2, 0, 4, None));
    ix.apply("b", &stored(&t2, 0, 4, None));
    let s = ix.stats();
    assert_eq!((s.engine_hashes, s.refused_blocks), (10, 2));
    let a = |t: &[u32]| scores(&ix, t).into_iter().find(|m| m.0 == "a").map(|m| m.1);
    assert_eq!((a(&t1), a(&t2)), (Some(4), Some(2)));
    assert_eq!(
        scores(&ix, &t2).iter().find(|m| m.0 == "b").map(|m| m.1),
        Some(4)
    );
    // A block already mapped is not new: storing it again (another tier) is fine.
    ix.apply("a", &stored(&t1, 0, 4, Some("CPU")));
    assert_eq!(ix.stats().refused_blocks, 2);
    ix.apply("a", &removed(&t1, &[2, 3], None));
    ix.apply("a", &removed(&t1, &[2, 3], Some("CPU")));
    ix.apply("a", &stored(&t2, 2, 4, None));
    assert_eq!((a(&t2), ix.stats().refused_blocks), (Some(4), 2));
}

#[test]
fn concurrent_ingest_and_scoring() {
    let ix = std::sync::Arc::new(index_with(|_| {}));
    let t = toks(15, 32);
    std::thread::scope(|s| {
        for p in 0..4 {
            let ix = ix.clone();
            let t = t.clone();
            s.spawn(move || {
                let pod = format!("p{p}");
                for _ in 0..50 {
                    ix.apply(&pod, &stored(&t, 0, 32, None));
                    ix.apply(&pod, &removed(&t, &(p..32).collect::<Vec<_>>(), None));
                }
            });
        }
        let ix = ix.clone();
        let t = t.clone();
        s.spawn(move || {
            for _ in 0..200 {
                for m in ix.longest_prefix(&ix.block_keys(&t, None)) {
                    assert!(m.score <= 1.0 && m.blocks <= 32);
                }
            }
        });
    });
    // Each pod p ends holding its first p blocks.
    let got = scores(&ix, &t);
    assert_eq!(
        got.iter().map(|g| g.1).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "{got:?}"
    );
}

#[test]
fn long_prompts_runs_end_anywhere() {
    // 300 blocks: the lookups go in chunks of growing size; runs end inside and at their
    // boundaries.
    let ix = index_with(|c| c.shards = 16);
    let t = toks(16, 300);
    ix.apply("a", &stored(&t, 0, 300, None));
    ix.apply("b", &stored(&t, 0, 33, None));
    ix.apply("c", &stored(&t, 0, 97, None));
    ix.apply("d", &stored(&t, 0, 150, None));
    ix.apply("d", &removed(&t, &[60], None));
    ix.apply("e", &stored(&t, 0, 300, Some("CPU")));
    ix.apply("e", &removed(&t, &[10], Some("CPU")));
    ix.apply("f", &stored(&t, 0, 299, None));
    let got: Vec<(String, usize)> = scores(&ix, &t).into_iter().map(|s| (s.0, s.1)).collect();
    let want = [
        ("a", 300),
        ("b", 33),
        ("c", 97),
        ("d", 60),
        ("e", 10),
        ("f", 299),
    ];
    assert_eq!(got, want.map(|(p, n)| (p.to_string(), n)));
    let e = scores(&ix, &t).into_iter().find(|s| s.0 == "e").unwrap();
    assert!((e.2 - 10.0 * 0.8 / 300.0).abs() < 1e-12);
}

#[test]
fn a_storage_group_shares_its_files_with_every_member() {
    let ix = index_with(|_| {});
    for pod in ["a", "b"] {
        ix.set_storage_group(pod, Some("nfs"));
    }
    let t = toks(17, 4);
    // a computes the prompt and writes its files; c (no group) holds a GPU copy of block 0.
    ix.apply("a", &stored(&t, 0, 4, None));
    ix.apply("a", &offloaded(&t, &[0, 1, 2, 3], "STORAGE"));
    ix.apply("c", &stored(&t, 0, 1, None));
    let storage = TierWeights::default().storage;
    assert_eq!(
        scores(&ix, &t),
        vec![
            ("a".into(), 4, 1.0),
            ("b".into(), 4, storage),
            ("c".into(), 1, 0.25)
        ]
    );
    // a's device copies go and a restarts: the files stay, for both.
    ix.apply("a", &removed(&t, &[0, 1, 2, 3], None));
    ix.clear_pod("a");
    assert_eq!(
        scores(&ix, &t)[..2],
        [("a".into(), 4, storage), ("b".into(), 4, storage)]
    );
    // b's sweeper removes a file a wrote: gone for both; b stores it again self-describing.
    ix.apply("b", &removed(&t, &[2], Some("STORAGE")));
    assert_eq!(scores(&ix, &t)[1], ("b".into(), 2, 2.0 * storage / 4.0));
    ix.apply("b", &stored(&t, 2, 3, Some("STORAGE")));
    assert_eq!(scores(&ix, &t)[0], ("a".into(), 4, storage));
    // A pod leaving keeps the group; the last member leaving drops it.
    ix.remove_pod("a");
    assert_eq!(scores(&ix, &t)[0], ("b".into(), 4, storage));
    assert_eq!(ix.stats().engine_hashes, 4 + 1);
    ix.remove_pod("b");
    assert_eq!(scores(&ix, &t), vec![("c".into(), 1, 0.25)]);
    assert_eq!(ix.stats().engine_hashes, 1);
    // Another group's pod sees none of it, and a pod can leave its group.
    ix.set_storage_group("d", Some("other"));
    ix.set_storage_group("e", Some("nfs2"));
    ix.apply("e", &stored(&t, 0, 2, Some("STORAGE")));
    ix.set_storage_group("e", None);
    assert_eq!(scores(&ix, &t), vec![("c".into(), 1, 0.25)]);
}
