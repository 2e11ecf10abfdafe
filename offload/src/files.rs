//! The storage tier's files, shaped as vLLM 0.33's `fs` tier lays them out (our bytes, not
//! theirs): a base folder per model and KV layout, `<root>/<model>_<fingerprint>/` with a
//! `config.json` of the layout fields, and one file per block at
//! `<hash hex[0..3]>/<hash hex[3..5]>/<hash hex>.bin`. A file is a header (magic, layout
//! fingerprint, block hash, payload length, xxh3 checksum of the payload) and the block's bytes.
//! Writes go to a temporary file in the same folder and are renamed into place, so pods sharing
//! the folder never read half a file; a file whose header or checksum does not match is removed
//! and reads as a miss.
//!
//! A file's modification time is when it was last used (written or read; atime is often not
//! kept), less a microsecond per block of depth in its chain ([`chain_time`]): among blocks used
//! together the sweep removes the deepest first, so what is left of a prefix stays usable.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use kvcache::{BlockHash, BlockLayout};

const MAGIC: &[u8; 8] = b"AGKVBLK1";
/// magic, fingerprint (8), hash length (1) and hash (32), payload length (8), checksum (8).
const HEADER_BYTES: usize = 8 + 8 + 1 + 32 + 8 + 8;

/// Why a stored block could not be read back.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadError {
    Missing,
    /// Wrong magic, layout, hash, length or checksum: the file was removed.
    Corrupt,
    Io(String),
}

/// One model's and layout's folder of block files.
#[derive(Debug)]
pub struct BlockFiles {
    base: PathBuf,
    fingerprint: u64,
    block_bytes: usize,
}

/// Distinguishes temporary files of concurrent writers in one process.
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// The use time recorded for the block at `depth` (0: a chain's first) of a run used at `at`.
pub fn chain_time(at: SystemTime, depth: usize) -> SystemTime {
    at - Duration::from_micros(depth as u64)
}

impl BlockFiles {
    /// The folder for `model` and `layout` under `root`, which must exist (a missing volume
    /// is a start-up error, not a silently empty tier). `hash_scheme` names the block hash
    /// (algorithm and seed): blocks hashed otherwise are other files.
    pub fn open(
        root: &Path,
        model: &str,
        layout: &BlockLayout,
        hash_scheme: &str,
    ) -> Result<Self, String> {
        if !root.is_dir() {
            return Err(format!(
                "the storage tier's root_dir {} is not a directory",
                root.display()
            ));
        }
        let config = format!(
            "{{\"model\":{model:?},\"block_size\":{},\"dtype\":{:?},\"num_layers\":{},\
             \"num_kv_heads\":{},\"head_dim\":{},\"hash\":{hash_scheme:?},\"format\":1}}",
            layout.block_size,
            layout.dtype,
            layout.num_layers,
            layout.num_kv_heads,
            layout.head_dim
        );
        let fingerprint = xxhash_rust::xxh3::xxh3_64(config.as_bytes());
        let base = root.join(format!("{}_{fingerprint:016x}", model.replace('/', "_")));
        fs::create_dir_all(&base).map_err(|e| format!("cannot create {}: {e}", base.display()))?;
        let config_path = base.join("config.json");
        if !config_path.exists() {
            // Best effort: the folder's name already pins the layout.
            let _ = publish(&config_path, config.as_bytes(), SystemTime::now());
        }
        Ok(Self {
            base,
            fingerprint,
            block_bytes: layout.block_bytes(),
        })
    }

    pub fn base(&self) -> &Path {
        &self.base
    }

    fn path(&self, hash: &BlockHash) -> PathBuf {
        let hex = hex(hash.as_bytes());
        self.base
            .join(&hex[0..3])
            .join(&hex[3..5])
            .join(format!("{hex}.bin"))
    }

    pub fn contains(&self, hash: &BlockHash) -> bool {
        self.path(hash).is_file()
    }

    /// Writes `data` (one block) under `hash`, atomically, as used at `used`.
    pub fn write(&self, hash: &BlockHash, data: &[u8], used: SystemTime) -> io::Result<()> {
        let path = self.path(hash);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let mut bytes = Vec::with_capacity(HEADER_BYTES + data.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&self.fingerprint.to_le_bytes());
        let h = hash.as_bytes();
        bytes.push(h.len() as u8);
        let mut padded = [0u8; 32];
        padded[..h.len()].copy_from_slice(h);
        bytes.extend_from_slice(&padded);
        bytes.extend_from_slice(&(data.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(data).to_le_bytes());
        bytes.extend_from_slice(data);
        publish(&path, &bytes, used)
    }

    /// Reads the block under `hash` into `out` (`block_bytes` long), checking every header
    /// field and the checksum; a bad file is removed.
    pub fn read(&self, hash: &BlockHash, out: &mut [u8]) -> Result<(), ReadError> {
        let path = self.path(hash);
        let mut file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ReadError::Missing),
            Err(e) => return Err(ReadError::Io(e.to_string())),
        };
        let mut header = [0u8; HEADER_BYTES];
        let ok = file.read_exact(&mut header).is_ok()
            && self.header_matches(&header, hash)
            && out.len() == self.block_bytes
            && file.read_exact(out).is_ok()
            && file.read(&mut [0u8; 1]).is_ok_and(|n| n == 0)
            && u64::from_le_bytes(header[57..65].try_into().unwrap_or_default())
                == xxhash_rust::xxh3::xxh3_64(out);
        if ok {
            Ok(())
        } else {
            let _ = fs::remove_file(&path);
            Err(ReadError::Corrupt)
        }
    }

    /// Marks a block as used at `used`, for the sweep of any pod sharing the folder; a
    /// missing file is left missing.
    pub fn touch(&self, hash: &BlockHash, used: SystemTime) {
        if let Ok(f) = fs::OpenOptions::new().write(true).open(self.path(hash)) {
            let _ = f.set_modified(used);
        }
    }

    /// Keeps the folder within `max_bytes`: when over it, removes the least recently used
    /// block files (by modification time) until at most `keep` of the cap is left; returns the
    /// hashes removed. Temporary files are left to their writers.
    pub fn sweep(&self, max_bytes: u64, keep: f64) -> Vec<BlockHash> {
        let mut files = Vec::new();
        let mut total = 0u64;
        let dirs = |p: &Path| -> Vec<PathBuf> {
            fs::read_dir(p)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.path())
                        .filter(|p| p.is_dir())
                        .collect()
                })
                .unwrap_or_default()
        };
        for outer in dirs(&self.base) {
            for inner in dirs(&outer) {
                let Ok(entries) = fs::read_dir(&inner) else {
                    continue;
                };
                for e in entries.flatten() {
                    let path = e.path();
                    let Some(hash) = block_hash_of(&path) else {
                        continue;
                    };
                    let Ok(meta) = e.metadata() else { continue };
                    let used = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                    total += meta.len();
                    files.push((used, meta.len(), path, hash));
                }
            }
        }
        if total <= max_bytes {
            return Vec::new();
        }
        files.sort_by_key(|f| f.0);
        let target = (max_bytes as f64 * keep) as u64;
        let mut removed = Vec::new();
        for (_, len, path, hash) in files {
            if total <= target {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                total = total.saturating_sub(len);
                removed.push(hash);
            }
        }
        removed
    }

    fn header_matches(&self, header: &[u8; HEADER_BYTES], hash: &BlockHash) -> bool {
        let h = hash.as_bytes();
        let len = u64::from_le_bytes(header[49..57].try_into().unwrap_or_default());
        &header[0..8] == MAGIC
            && header[8..16] == self.fingerprint.to_le_bytes()
            && usize::from(header[16]) == h.len()
            && &header[17..17 + h.len()] == h
            && len == self.block_bytes as u64
    }
}

/// Writes `bytes` to a temporary file beside `path` and renames it into place.
fn publish(path: &Path, bytes: &[u8], used: SystemTime) -> io::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("block");
    let temp = path.with_file_name(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result = fs::File::create(&temp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.set_modified(used)
        })
        .and_then(|()| fs::rename(&temp, path));
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// The hash a block file is named after (`<hex>.bin`).
fn block_hash_of(path: &Path) -> Option<BlockHash> {
    let stem = path.file_name()?.to_str()?.strip_suffix(".bin")?;
    if stem.len() % 2 != 0 || stem.len() > 64 || stem.starts_with('.') {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..stem.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&stem[i..i + 2], 16).ok())
        .collect();
    Some(BlockHash::from_digest(&bytes?))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(dtype: &'static str) -> BlockLayout {
        BlockLayout {
            num_layers: 2,
            num_blocks: 8,
            block_size: 2,
            num_kv_heads: 1,
            head_dim: 2,
            dtype,
            dtype_bytes: 2,
        }
    }

    fn temp_root(name: &str) -> PathBuf {
        let root =
            std::env::temp_dir().join(format!("offload-files-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        root
    }

    #[test]
    fn a_block_round_trips_and_damage_is_a_removed_miss() {
        let root = temp_root("roundtrip");
        let files =
            BlockFiles::open(&root, "org/model", &layout("float16"), "sha256_cbor").unwrap();
        assert!(files.base().starts_with(&root));
        assert!(files.base().join("config.json").is_file());
        let hash = BlockHash::from_digest(&[7; 32]);
        let data: Vec<u8> = (0..32).collect();
        assert!(!files.contains(&hash));
        files.write(&hash, &data, SystemTime::now()).unwrap();
        assert!(files.contains(&hash));
        let mut out = vec![0; 32];
        files.read(&hash, &mut out).unwrap();
        assert_eq!(out, data);
        // No temporary file is left behind.
        let dir = files.path(&hash).parent().unwrap().to_path_buf();
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);

        // A flipped payload byte, then a truncated file: each a miss, and gone.
        let path = files.path(&hash);
        let mut bytes = fs::read(&path).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert_eq!(files.read(&hash, &mut out), Err(ReadError::Corrupt));
        assert!(!files.contains(&hash));
        files.write(&hash, &data, SystemTime::now()).unwrap();
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        assert_eq!(files.read(&hash, &mut out), Err(ReadError::Corrupt));
        assert_eq!(files.read(&hash, &mut out), Err(ReadError::Missing));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_sweep_removes_the_least_recently_used_down_to_its_target() {
        let root = temp_root("sweep");
        let files = BlockFiles::open(&root, "m", &layout("float16"), "sha256_cbor").unwrap();
        let hashes: Vec<BlockHash> = (1..=5).map(|i| BlockHash::from_digest(&[i; 32])).collect();
        let t0 = SystemTime::now() - Duration::from_secs(100);
        for (i, h) in hashes.iter().enumerate() {
            files
                .write(h, &[i as u8; 32], t0 + Duration::from_secs(i as u64))
                .unwrap();
        }
        // Block 0 is the oldest, but used just now.
        files.read(&hashes[0], &mut [0; 32]).unwrap();
        files.touch(&hashes[0], SystemTime::now());
        let size = fs::metadata(files.path(&hashes[0])).unwrap().len();
        assert!(
            files.sweep(10 * size, 0.9).is_empty(),
            "under the cap nothing goes"
        );
        let removed = files.sweep(4 * size, 0.5);
        assert_eq!(removed, hashes[1..4].to_vec());
        assert!(files.contains(&hashes[0]) && files.contains(&hashes[4]));
        // A chain used at one instant gives up its deepest blocks first.
        let chain: Vec<BlockHash> = (10..14).map(|i| BlockHash::from_digest(&[i; 32])).collect();
        let now = SystemTime::now();
        for (depth, h) in chain.iter().enumerate() {
            files.write(h, &[0; 32], chain_time(now, depth)).unwrap();
        }
        files.touch(&hashes[0], now + Duration::from_secs(1));
        files.touch(&hashes[4], now + Duration::from_secs(1));
        assert_eq!(files.sweep(4 * size, 1.0), vec![chain[3], chain[2]]);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn another_layout_never_reads_these_files() {
        let root = temp_root("layout");
        let f16 = BlockFiles::open(&root, "m", &layout("float16"), "sha256_cbor").unwrap();
        let bf16 = BlockFiles::open(&root, "m", &layout("bfloat16"), "sha256_cbor").unwrap();
        let seeded = BlockFiles::open(&root, "m", &layout("float16"), "sha256_cbor/42").unwrap();
        assert_ne!(f16.base(), bf16.base());
        assert_ne!(f16.base(), seeded.base());
        let hash = BlockHash::from_digest(&[1; 32]);
        f16.write(&hash, &[5; 32], SystemTime::now()).unwrap();
        assert!(!bf16.contains(&hash));
        // A file copied into the other layout's folder fails its header check.
        let theirs = bf16.path(&hash);
        fs::create_dir_all(theirs.parent().unwrap()).unwrap();
        fs::copy(f16.path(&hash), &theirs).unwrap();
        assert_eq!(bf16.read(&hash, &mut [0; 32]), Err(ReadError::Corrupt));
        assert!(BlockFiles::open(&root.join("absent"), "m", &layout("float16"), "x").is_err());
        fs::remove_dir_all(&root).unwrap();
    }
}
