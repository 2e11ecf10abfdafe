use kernels::{CpuPagedAttention, KvLayout, PagedAttention, SeqAttn};
use std::time::Instant;
fn main() {
    let layout = KvLayout { num_layers: 1, num_blocks: 2048, block_size: 16, num_kv_heads: 3, head_dim: 64 };
    let k: Vec<f32> = (0..layout.layer_len()).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let v = k.clone();
    let table: Vec<u32> = (0..2048u32).rev().collect();
    let nh = 9;
    let attn = CpuPagedAttention;
    let run = |name: &str, seqs: &[SeqAttn], ntok: usize| {
        let q = vec![0.1f32; ntok * nh * 64];
        let mut out = vec![0f32; q.len()];
        let t = Instant::now(); let mut best = f64::MAX;
        while t.elapsed().as_secs_f64() < 1.5 { let s = Instant::now(); attn.attend(&layout, &k, &v, &q, nh, seqs, 0.125, &mut out); best = best.min(s.elapsed().as_secs_f64()); }
        println!("{name}: {:.1} us/call (min)", best * 1e6);
    };
    run("prefill 512", &[SeqAttn { block_table: &table, context_len: 512, query_start: 0, query_len: 512 }], 512);
    run("prefill 2048", &[SeqAttn { block_table: &table, context_len: 2048, query_start: 0, query_len: 2048 }], 2048);
    let d: Vec<SeqAttn> = (0..32).map(|i| SeqAttn { block_table: &table[i * 32..], context_len: 500, query_start: i, query_len: 1 }).collect();
    run("32 decodes ctx 500", &d, 32);
    let d: Vec<SeqAttn> = (0..8).map(|i| SeqAttn { block_table: &table[i * 32..], context_len: 100, query_start: i, query_len: 1 }).collect();
    run("8 decodes ctx 100", &d, 8);
    run("1 decode ctx 2000", &[SeqAttn { block_table: &table, context_len: 2000, query_start: 0, query_len: 1 }], 1);
    run("1 decode ctx 50", &[SeqAttn { block_table: &table, context_len: 50, query_start: 0, query_len: 1 }], 1);
}
