//! The open meta file: create, open (validate + crash recovery), superblock updates, the bitmap
//! and the activity log, and `dump-md`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;

use super::actlog::{ActLog, RingState, UPDATES_PER_TX};
use super::bitmap::{Bitmap, BmFault};
use super::error::MetaError;
use super::fault::MetaPoint;
use super::gen::{hex, Generations};
use super::superblock::{
    check_geometry, check_name, Layout, MetaFlags, SbFault, Superblock, BITS_PER_EXTENT,
    BLOCK_SIZE, BYTES_PER_BIT, DEFAULT_AL_EXTENTS, EXTENT_SHIFT, FORMAT_VERSION, SB_MAGIC,
};

/// Largest run `next_out_of_sync` returns.
pub const MAX_RUN: u64 = 1 << 20;
/// Blocks per read or write call when streaming the bitmap.
const IO_CHUNK_BLOCKS: u64 = 256;
const BPB: u64 = BYTES_PER_BIT as u64;

/// What `open` found and did about an unclean shutdown.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Recovery {
    /// The superblock did not say "closed cleanly".
    pub unclean: bool,
    /// This open set `crashed_primary` (unclean and `was_primary`).
    pub crashed_primary: bool,
    /// This open set `rolled_back`: unclean, under another boot id than the one recorded
    /// (the machine went down with the node running), with a consistent copy that was in
    /// step with its peer (no bitmap generation: a node that wrote alone flushed its data
    /// first, so only its own unmirrored writes can be gone, and no copy holds those).
    pub rolled_back: bool,
    /// Extents the activity log listed as hot (plus any salvaged from a torn transaction);
    /// all their bits are now out of sync.
    pub replayed_extents: Vec<u64>,
    /// Bytes that became out of sync because of the replay and of torn bitmap blocks.
    pub marked_bytes: u64,
    /// File block of an activity-log transaction that was torn by the crash and ignored.
    pub torn_al_block: Option<u64>,
    /// File blocks of bitmap blocks torn by the crash: all their bits are now out of sync.
    pub torn_bitmap_blocks: Vec<u64>,
}

/// Counters of metadata writes, for tests and status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MetaStats {
    pub superblock_writes: u64,
    pub bitmap_block_writes: u64,
    pub al_transactions: u64,
    pub syncs: u64,
}

/// One write or sync, in order (tests check write ordering with it).
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IoEvent {
    Write { block: u64, count: u64 },
    Sync,
}

/// The metadata of one node, open for reading and writing (exclusively locked).
///
/// Dropping a `Meta` without `close_clean` is what a crash looks like to the next `open`.
#[derive(Debug)]
pub struct Meta {
    path: PathBuf,
    file: Flock<File>,
    sb: Superblock,
    layout: Layout,
    bitmap: Bitmap,
    al: ActLog,
    /// The activity log on disk may list hot extents (a reset transaction is needed to empty it).
    al_on_disk: bool,
    recovery: Recovery,
    stats: MetaStats,
    /// Injected failures (tests, `up --fault-file`).
    faults: Option<std::sync::Arc<super::fault::MetaFaults>>,
    #[cfg(test)]
    pub(crate) events: Vec<IoEvent>,
}

fn lock(path: &Path, file: File) -> Result<Flock<File>, MetaError> {
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        if e == Errno::EWOULDBLOCK {
            MetaError::Busy { path: path.into() }
        } else {
            MetaError::io(path, "locking", io::Error::from(e))
        }
    })
}

fn read_at(path: &Path, file: &File, block: u64, buf: &mut [u8]) -> Result<(), MetaError> {
    file.read_exact_at(buf, block * BLOCK_SIZE as u64)
        .map_err(|e| {
            MetaError::io(
                path,
                format!(
                    "reading {} block(s) at block {block}",
                    buf.len() / BLOCK_SIZE
                ),
                e,
            )
        })
}

fn file_len(path: &Path, file: &File) -> Result<u64, MetaError> {
    let md = file
        .metadata()
        .map_err(|e| MetaError::io(path, "reading file status", e))?;
    if md.file_type().is_block_device() {
        // st_size is 0 for block devices; ask for the end.
        use std::io::Seek;
        let mut f: &File = file;
        f.seek(io::SeekFrom::End(0))
            .map_err(|e| MetaError::io(path, "finding the device size", e))
    } else {
        Ok(md.len())
    }
}

/// Read and decode block 0.
fn read_superblock(path: &Path, file: &File) -> Result<Superblock, MetaError> {
    let len = file_len(path, file)?;
    if len < BLOCK_SIZE as u64 {
        return Err(MetaError::NotTandem { path: path.into() });
    }
    let mut b = vec![0u8; BLOCK_SIZE];
    read_at(path, file, 0, &mut b)?;
    Superblock::decode(&b).map_err(|f| match f {
        SbFault::NotTandem => MetaError::NotTandem { path: path.into() },
        SbFault::Corrupt(what) => MetaError::corrupt(path, 0, "superblock", what),
    })
}

/// Everything after the superblock, validated.
struct Loaded {
    /// Torn bitmap blocks are left clear here.
    bitmap: Bitmap,
    ring: RingState,
    /// Bitmap block indexes (not file blocks) that failed their checksum after an unclean
    /// shutdown.
    torn_bitmap: Vec<u64>,
}

fn read_rest(path: &Path, file: &File, sb: &Superblock) -> Result<Loaded, MetaError> {
    let layout = sb.layout();
    let unclean = !sb.flags.al_clean;
    let need = layout.total_blocks() * BLOCK_SIZE as u64;
    let len = file_len(path, file)?;
    if len < need {
        let block = len / BLOCK_SIZE as u64;
        return Err(MetaError::corrupt(
            path,
            block,
            layout.region(block),
            format!("is missing: the file ends at byte {len}, the metadata needs {need} bytes"),
        ));
    }

    let mut al = vec![0u8; layout.al_blocks as usize * BLOCK_SIZE];
    read_at(path, file, layout.al_offset, &mut al)?;
    let blocks: Vec<&[u8]> = al.chunks(BLOCK_SIZE).collect();
    let ring =
        super::actlog::scan_ring(&blocks, sb.md_id, sb.al_extents, layout.n_extents, unclean)
            .map_err(|(pos, what)| {
                MetaError::corrupt(path, layout.al_offset + pos as u64, "activity log", what)
            })?;

    let mut bitmap = Bitmap::new(layout.nbits);
    let mut torn_bitmap = Vec::new();
    let mut buf = vec![0u8; (IO_CHUNK_BLOCKS as usize) * BLOCK_SIZE];
    let mut idx = 0;
    while idx < layout.bm_blocks {
        let n = IO_CHUNK_BLOCKS.min(layout.bm_blocks - idx);
        let chunk = &mut buf[..n as usize * BLOCK_SIZE];
        read_at(path, file, layout.bm_offset + idx, chunk)?;
        for (i, b) in chunk.chunks(BLOCK_SIZE).enumerate() {
            let bi = idx + i as u64;
            match bitmap.decode_block(bi, sb.md_id, b) {
                Ok(()) => {}
                Err(BmFault::BadChecksum) if unclean => torn_bitmap.push(bi),
                Err(BmFault::BadChecksum) => {
                    return Err(MetaError::corrupt(
                        path,
                        layout.bm_offset + bi,
                        "bitmap",
                        "has a bad checksum",
                    ))
                }
                Err(BmFault::Invalid(what)) => {
                    return Err(MetaError::corrupt(
                        path,
                        layout.bm_offset + bi,
                        "bitmap",
                        what,
                    ))
                }
            }
        }
        idx += n;
    }
    Ok(Loaded {
        bitmap,
        ring,
        torn_bitmap,
    })
}

/// The kernel's boot id, which changes with every boot: how `open` tells a process that
/// crashed from a machine that went down. Zero where the kernel has none (detection off).
pub fn boot_id() -> [u8; 16] {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .and_then(|t| parse_boot_id(&t).ok())
        .unwrap_or([0; 16])
}

/// A boot id as the kernel writes it: 32 hex digits, dashes allowed.
pub fn parse_boot_id(text: &str) -> Result<[u8; 16], String> {
    let hex: Vec<u8> = text.trim().bytes().filter(|&c| c != b'-').collect();
    if hex.len() != 32 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return Err(format!("{text:?} is not a boot id (32 hex digits)"));
    }
    let mut id = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).expect("ASCII hex digits");
        id[i] = u8::from_str_radix(s, 16).expect("hex digits");
    }
    Ok(id)
}

fn oos_bytes(bitmap: &Bitmap, size: u64) -> u64 {
    let n = bitmap.nbits();
    let mut bytes = bitmap.count() * BPB;
    if n > 0 && bitmap.is_set(n - 1) {
        bytes -= n * BPB - size;
    }
    bytes
}

fn extent_bits(e: u64) -> (u64, u64) {
    (e * BITS_PER_EXTENT, (e + 1) * BITS_PER_EXTENT)
}

#[derive(Serialize)]
struct GenView {
    current: String,
    bitmap: String,
    history: [String; 2],
}

impl From<&Generations> for GenView {
    fn from(g: &Generations) -> Self {
        GenView {
            current: hex(g.current),
            bitmap: hex(g.bitmap),
            history: [hex(g.history[0]), hex(g.history[1])],
        }
    }
}

#[derive(Serialize)]
struct AlView {
    ring_blocks: u32,
    newest_transaction: u64,
    hot_extents: Vec<u64>,
    /// File block of a torn newest transaction (only after an unclean shutdown).
    torn_block: Option<u64>,
}

#[derive(Serialize)]
struct LayoutView {
    al_offset: u64,
    al_blocks: u32,
    bitmap_offset: u64,
    total_blocks: u64,
}

#[derive(Serialize)]
struct DumpView<'a> {
    path: String,
    format_version: u32,
    md_id: String,
    resource: &'a str,
    node: &'a str,
    size: u64,
    bytes_per_bit: u32,
    al_extents: u32,
    epoch: u64,
    primary_epoch: u64,
    generation: GenView,
    flags: Vec<&'static str>,
    out_of_sync_bytes: u64,
    bitmap_blocks: u64,
    activity_log: AlView,
    layout: LayoutView,
    /// File blocks of bitmap blocks torn by a crash (counted as entirely out of sync).
    torn_bitmap_blocks: Vec<u64>,
}

fn dump_view(
    path: &Path,
    sb: &Superblock,
    bitmap: &Bitmap,
    al: AlView,
    torn_bitmap_blocks: Vec<u64>,
) -> serde_json::Value {
    let layout = sb.layout();
    let v = DumpView {
        path: path.display().to_string(),
        format_version: FORMAT_VERSION,
        md_id: hex(sb.md_id),
        resource: &sb.resource,
        node: &sb.node,
        size: sb.size,
        bytes_per_bit: sb.bytes_per_bit,
        al_extents: sb.al_extents,
        epoch: sb.epoch,
        primary_epoch: sb.primary_epoch,
        generation: GenView::from(&sb.gens),
        flags: sb.flags.names(),
        out_of_sync_bytes: oos_bytes(bitmap, sb.size),
        bitmap_blocks: layout.bm_blocks,
        activity_log: al,
        layout: LayoutView {
            al_offset: layout.al_offset,
            al_blocks: layout.al_blocks,
            bitmap_offset: layout.bm_offset,
            total_blocks: layout.total_blocks(),
        },
        torn_bitmap_blocks,
    };
    serde_json::to_value(v).expect("the dump view serialises")
}

/// Read-only inspection for `tandem dump-md PATH`: validates every block like `open` (torn
/// blocks of an unclean shutdown are reported, not fatal) but changes nothing and takes no lock.
pub fn dump_file(path: &Path) -> Result<serde_json::Value, MetaError> {
    let file = File::open(path).map_err(|e| MetaError::io(path, "opening", e))?;
    let sb = read_superblock(path, &file)?;
    let layout = sb.layout();
    let mut loaded = read_rest(path, &file, &sb)?;
    for &b in &loaded.torn_bitmap {
        loaded.bitmap.fill_block(b);
    }
    let al = AlView {
        ring_blocks: layout.al_blocks,
        newest_transaction: loaded.ring.newest,
        hot_extents: loaded.ring.hot.iter().map(|&e| e as u64).collect(),
        torn_block: loaded
            .ring
            .torn
            .as_ref()
            .map(|(pos, _)| layout.al_offset + *pos as u64),
    };
    let torn = loaded
        .torn_bitmap
        .iter()
        .map(|b| layout.bm_offset + b)
        .collect();
    Ok(dump_view(path, &sb, &loaded.bitmap, al, torn))
}

impl Meta {
    /// `create-md` with the default number of activity-log extents (1237).
    pub fn create(
        path: &Path,
        resource: &str,
        node: &str,
        size: u64,
        force: bool,
    ) -> Result<(), MetaError> {
        Self::create_with(path, resource, node, size, DEFAULT_AL_EXTENTS, force)
    }

    /// `create-md`: a fresh superblock (generation "just created", not consistent, closed
    /// cleanly), an all-clear bitmap and an empty activity log of `al_extents` extents.
    /// Refuses without `force` if the file holds tandem metadata (valid or damaged) or any other
    /// non-zero data in its first 4 KiB (it might be a data disk). Regular files are created or
    /// resized to fit; a block device must be large enough.
    pub fn create_with(
        path: &Path,
        resource: &str,
        node: &str,
        size: u64,
        al_extents: u32,
        force: bool,
    ) -> Result<(), MetaError> {
        check_name("resource", resource).map_err(|e| MetaError::invalid(path, e))?;
        check_name("node", node).map_err(|e| MetaError::invalid(path, e))?;
        check_geometry(size, al_extents).map_err(|e| MetaError::invalid(path, e))?;
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| MetaError::io(path, "opening for create-md", e))?;
        let file = lock(path, file)?;
        let is_device = file
            .metadata()
            .map_err(|e| MetaError::io(path, "reading file status", e))?
            .file_type()
            .is_block_device();
        let len = file_len(path, &file)?;

        let mut head = vec![0u8; BLOCK_SIZE.min(len as usize)];
        read_at(path, &file, 0, &mut head)?;
        if head.starts_with(&SB_MAGIC) && !force {
            let detail = match Superblock::decode(&head) {
                Ok(sb) => format!(
                    "holds valid tandem metadata (resource {}, node {})",
                    sb.resource, sb.node
                ),
                Err(_) => "holds damaged tandem metadata".to_string(),
            };
            return Err(MetaError::Exists {
                path: path.into(),
                detail,
            });
        }
        if !force && head.iter().any(|&b| b != 0) && !head.starts_with(&SB_MAGIC) {
            return Err(MetaError::Exists {
                path: path.into(),
                detail: "is not empty and does not hold tandem metadata (a data disk?)".into(),
            });
        }

        let layout = Layout::new(size, al_extents);
        let need = layout.total_blocks() * BLOCK_SIZE as u64;
        let mut md_id_bytes = [0u8; 8];
        getrandom::getrandom(&mut md_id_bytes).map_err(|e| {
            MetaError::io(
                path,
                "reading random bytes",
                io::Error::other(e.to_string()),
            )
        })?;
        let sb = Superblock {
            resource: resource.into(),
            node: node.into(),
            size,
            gens: Generations::just_created(),
            flags: MetaFlags {
                al_clean: true,
                ..MetaFlags::default()
            },
            epoch: 0,
            bytes_per_bit: BYTES_PER_BIT,
            al_extents,
            md_id: u64::from_le_bytes(md_id_bytes),
            boot_id: [0; 16],
            primary_epoch: 0,
        };

        let write = |block: u64, data: &[u8]| {
            file.write_all_at(data, block * BLOCK_SIZE as u64)
                .map_err(|e| MetaError::io(path, format!("writing block {block}"), e))
        };
        let sync = || {
            file.sync_data()
                .map_err(|e| MetaError::io(path, "fdatasync", e))
        };

        if is_device && len < need {
            return Err(MetaError::invalid(
                path,
                format!("device holds {len} bytes; the metadata needs {need}"),
            ));
        }
        // Invalidate the old superblock first, so a crash in the middle leaves "not tandem
        // metadata" rather than a mixture of old and new blocks.
        if head.iter().any(|&b| b != 0) {
            write(0, &[0u8; BLOCK_SIZE])?;
            sync()?;
        }
        if !is_device {
            file.set_len(need)
                .map_err(|e| MetaError::io(path, format!("resizing to {need} bytes"), e))?;
        }

        let mut al = ActLog::new(al_extents, 0);
        let mut ring = Vec::with_capacity(layout.al_blocks as usize * BLOCK_SIZE);
        for _ in 0..layout.al_blocks {
            let tx = al.build_reset();
            ring.extend_from_slice(&tx.encode(sb.md_id, al_extents));
            al.commit(&tx, 0);
        }
        write(layout.al_offset, &ring)?;

        let bitmap = Bitmap::new(layout.nbits);
        let mut buf = vec![0u8; IO_CHUNK_BLOCKS as usize * BLOCK_SIZE];
        let mut idx = 0;
        while idx < layout.bm_blocks {
            let n = IO_CHUNK_BLOCKS.min(layout.bm_blocks - idx);
            for i in 0..n {
                let off = i as usize * BLOCK_SIZE;
                bitmap.encode_block(idx + i, sb.md_id, &mut buf[off..off + BLOCK_SIZE]);
            }
            write(layout.bm_offset + idx, &buf[..n as usize * BLOCK_SIZE])?;
            idx += n;
        }
        sync()?;
        write(0, &sb.encode())?;
        sync()?;
        if !existed {
            if let Some(dir) = path.parent() {
                let dir = if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                };
                if let Ok(d) = File::open(dir) {
                    d.sync_all()
                        .map_err(|e| MetaError::io(path, "syncing the parent directory", e))?;
                }
            }
        }
        Ok(())
    }

    /// Open and validate every block; check resource, node and size; recover from an unclean
    /// shutdown. Recovery (see [`Recovery`]): every extent the activity log lists as hot is
    /// marked out of sync, bitmap blocks torn by the crash are marked entirely out of sync, a
    /// torn newest AL transaction is ignored, and `crashed_primary` is set if `was_primary` was.
    /// Then, in this order and each durable before the next: the superblock (not clean,
    /// `was_primary` cleared: the node starts as Secondary), the bitmap, and a reset of the AL.
    pub fn open(path: &Path, resource: &str, node: &str, size: u64) -> Result<Meta, MetaError> {
        Self::open_booted(path, resource, node, size, boot_id())
    }

    /// `open` under the given boot id (the simulator's machines have their own).
    pub fn open_booted(
        path: &Path,
        resource: &str,
        node: &str,
        size: u64,
        boot: [u8; 16],
    ) -> Result<Meta, MetaError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| MetaError::io(path, "opening", e))?;
        let file = lock(path, file)?;
        let sb = read_superblock(path, &file)?;
        let mismatch = |field, expected: String, found: String| MetaError::Mismatch {
            path: path.into(),
            field,
            expected,
            found,
        };
        if sb.resource != resource {
            return Err(mismatch(
                "resource",
                format!("{resource:?}"),
                format!("{:?}", sb.resource),
            ));
        }
        if sb.node != node {
            return Err(mismatch(
                "node",
                format!("{node:?}"),
                format!("{:?}", sb.node),
            ));
        }
        if sb.size != size {
            return Err(mismatch(
                "size",
                format!("{size} bytes"),
                format!("{} bytes", sb.size),
            ));
        }
        let layout = sb.layout();
        let loaded = read_rest(path, &file, &sb)?;
        let unclean = !sb.flags.al_clean;

        let mut bitmap = loaded.bitmap;
        let before = oos_bytes(&bitmap, size);
        for &b in &loaded.torn_bitmap {
            bitmap.fill_block(b);
        }
        let mut replayed: Vec<u64> = loaded.ring.hot.iter().map(|&e| e as u64).collect();
        if let Some((_, salvaged)) = &loaded.ring.torn {
            replayed.extend(salvaged.iter().map(|&e| e as u64));
            replayed.sort_unstable();
            replayed.dedup();
        }
        for &e in &replayed {
            let (a, b) = extent_bits(e);
            bitmap.set_range(a, b, true);
        }
        let rebooted = sb.boot_id != [0; 16]
            && sb.boot_id != boot
            && !crate::mutation::active(crate::mutation::Mutation::PowerLossDetection);
        let recovery = Recovery {
            unclean,
            crashed_primary: unclean && sb.flags.was_primary,
            rolled_back: unclean && rebooted && sb.flags.consistent && sb.gens.bitmap == 0,
            marked_bytes: oos_bytes(&bitmap, size) - before,
            replayed_extents: replayed,
            torn_al_block: loaded
                .ring
                .torn
                .as_ref()
                .map(|(pos, _)| layout.al_offset + *pos as u64),
            torn_bitmap_blocks: loaded
                .torn_bitmap
                .iter()
                .map(|b| layout.bm_offset + b)
                .collect(),
        };
        if recovery.unclean {
            tracing::warn!(
                path = %path.display(),
                replayed_extents = recovery.replayed_extents.len(),
                marked_bytes = recovery.marked_bytes,
                crashed_primary = recovery.crashed_primary,
                rolled_back = recovery.rolled_back,
                torn_al_block = ?recovery.torn_al_block,
                torn_bitmap_blocks = ?recovery.torn_bitmap_blocks,
                "metadata was not closed cleanly; applied the activity log"
            );
        }
        let al_on_disk = !loaded.ring.hot.is_empty() || loaded.ring.torn.is_some();
        let mut meta = Meta {
            path: path.into(),
            file,
            al: ActLog::new(sb.al_extents, loaded.ring.newest + 1),
            sb,
            layout,
            bitmap,
            al_on_disk,
            recovery,
            stats: MetaStats::default(),
            faults: None,
            #[cfg(test)]
            events: Vec::new(),
        };

        let mut next = meta.sb.clone();
        next.flags.crashed_primary |= meta.recovery.crashed_primary;
        if meta.recovery.rolled_back {
            next.flags.rolled_back = true;
            next.flags.outdated = true;
        }
        next.boot_id = boot;
        next.flags.was_primary = false;
        next.flags.al_clean = false;
        if next != meta.sb {
            meta.write_superblock(next)?;
        }
        meta.flush_bitmap()?;
        if meta.al_on_disk {
            meta.reset_al()?;
        }
        Ok(meta)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// What this `open` recovered.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    pub fn stats(&self) -> MetaStats {
        self.stats
    }

    /// Change the superblock and make it durable (write + fdatasync) before returning. The
    /// fixed fields (resource, node, size, bytes_per_bit, al_extents, md_id) and
    /// `flags.al_clean` may not change; trying is `Invalid` and changes nothing. On an IO
    /// error memory keeps the old superblock, and so does the file unless even writing it
    /// back failed (see `write_superblock`).
    pub fn update(&mut self, f: impl FnOnce(&mut Superblock)) -> Result<(), MetaError> {
        let mut next = self.sb.clone();
        f(&mut next);
        let fixed = [
            ("resource", next.resource == self.sb.resource),
            ("node", next.node == self.sb.node),
            ("size", next.size == self.sb.size),
            ("bytes_per_bit", next.bytes_per_bit == self.sb.bytes_per_bit),
            ("al_extents", next.al_extents == self.sb.al_extents),
            ("md_id", next.md_id == self.sb.md_id),
            ("boot_id", next.boot_id == self.sb.boot_id),
            (
                "flags.al_clean",
                next.flags.al_clean == self.sb.flags.al_clean,
            ),
        ];
        if let Some((field, _)) = fixed.iter().find(|(_, same)| !same) {
            return Err(MetaError::invalid(
                &self.path,
                format!("a superblock update may not change {field}"),
            ));
        }
        if next == self.sb {
            return Ok(());
        }
        self.write_superblock(next)
    }

    // ---- bitmap ------------------------------------------------------------------------

    /// Mark every 4 KiB block that `[offset, offset+len)` touches as out of sync (clipped to
    /// the device). In memory only: durable through the activity log while the extent is hot
    /// (a crash marks the whole extent) and through `flush_bitmap` or the eviction of the
    /// extent; for extents that are not hot, call `flush_bitmap` before relying on it.
    pub fn mark_out_of_sync(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.sb.size);
        if offset >= end {
            return;
        }
        self.bitmap.set_range(offset / BPB, end.div_ceil(BPB), true);
    }

    /// Mark in sync the 4 KiB blocks that lie entirely inside `[offset, offset+len)`; the
    /// device's partial last block counts as whole when the range reaches the device end.
    pub fn mark_in_sync(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        let first = offset.div_ceil(BPB);
        let last = if end >= self.sb.size {
            self.layout.nbits
        } else {
            end / BPB
        };
        self.bitmap.set_range(first, last, false);
    }

    /// Bytes of the device marked out of sync (the partial last block counts its real size).
    pub fn out_of_sync_bytes(&self) -> u64 {
        oos_bytes(&self.bitmap, self.sb.size)
    }

    /// The next run of out-of-sync blocks starting in or after the 4 KiB block that contains
    /// byte `from` (`None` if `from` is at or past the device end): `(offset, len)` with `offset` 4 KiB aligned, `len ≤ 1 MiB`, clipped to the
    /// device end.
    pub fn next_out_of_sync(&self, from: u64) -> Option<(u64, u64)> {
        if from >= self.sb.size {
            return None;
        }
        let start = self.bitmap.next_set(from / BPB)?;
        let end = self.bitmap.run_end(start, start + MAX_RUN / BPB);
        let offset = start * BPB;
        Some((offset, (end * BPB).min(self.sb.size) - offset))
    }

    /// Mark the whole device out of sync (full sync).
    pub fn set_all_out_of_sync(&mut self) {
        self.bitmap.set_all();
    }

    /// The in-memory bitmap: bit `i` (4 KiB block `i`) is bit `i % 64` of word `i / 64`.
    /// `ceil(size / 4096 / 64)` words; bits past the device end are zero.
    pub fn bitmap_words(&self) -> &[u64] {
        self.bitmap.words()
    }

    /// OR the peer's bitmap into ours (same layout as `bitmap_words`; the length must match;
    /// bits past the device end are ignored). In memory only until `flush_bitmap`.
    pub fn merge_bitmap(&mut self, words: &[u64]) -> Result<(), MetaError> {
        let expected = self.bitmap.words().len();
        if words.len() != expected {
            return Err(MetaError::invalid(
                &self.path,
                format!(
                    "peer bitmap has {} words, this device needs {expected}",
                    words.len()
                ),
            ));
        }
        self.bitmap.merge(words);
        Ok(())
    }

    /// Write every dirty bitmap block, then fdatasync.
    pub fn flush_bitmap(&mut self) -> Result<(), MetaError> {
        if !self.bitmap.any_dirty() {
            return Ok(());
        }
        let dirty = self.bitmap.dirty_blocks();
        self.write_bitmap_blocks(&dirty)
    }

    // ---- activity log ------------------------------------------------------------------

    /// Make the extents of `[offset, offset+len)` hot before data is written there (clipped to
    /// the device). If any is cold: choose slots (free, else least recently used), write the
    /// bitmap blocks of every extent this evicts (+ fdatasync), then the AL transaction
    /// (+ fdatasync). Ranges with more than 64 cold extents take several transactions, each
    /// durable before the next. Returns whether a transaction was written. A range spanning
    /// more extents than `al_extents` is `Invalid`.
    ///
    /// Eviction picks the least recently activated extent and assumes no write into it is still
    /// in flight. A caller that cannot guarantee this uses `activate_pinned` and `release`.
    pub fn activate(&mut self, offset: u64, len: u64) -> Result<bool, MetaError> {
        self.activate_inner(offset, len, false)
    }

    /// Like `activate`, and the extents stay pinned (never evicted) until `release` is called
    /// for the same range, once the write is complete on both nodes or marked out of sync
    /// (DRBD's extent reference count). If every evictable slot is pinned the call fails with
    /// `Invalid` ("activity log full") and nothing changes; the caller waits for releases.
    pub fn activate_pinned(&mut self, offset: u64, len: u64) -> Result<bool, MetaError> {
        self.activate_inner(offset, len, true)
    }

    /// Unpin the extents of a range activated with `activate_pinned`.
    pub fn release(&mut self, offset: u64, len: u64) {
        if let Some((e0, e1)) = self.extent_range(offset, len) {
            for e in e0..=e1 {
                self.al.unpin(e as u32);
            }
        }
    }

    fn extent_range(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 || offset >= self.sb.size {
            return None;
        }
        let end = offset.saturating_add(len).min(self.sb.size);
        Some((offset >> EXTENT_SHIFT, (end - 1) >> EXTENT_SHIFT))
    }

    fn activate_inner(&mut self, offset: u64, len: u64, pin: bool) -> Result<bool, MetaError> {
        let Some((e0, e1)) = self.extent_range(offset, len) else {
            return Ok(false);
        };
        if crate::mutation::active(crate::mutation::Mutation::ActivityLog) {
            return Ok(false);
        }
        let count = e1 - e0 + 1;
        if count > self.sb.al_extents as u64 {
            return Err(MetaError::invalid(
                &self.path,
                format!(
                    "a write of {len} bytes at {offset} spans {count} extents, more than the \
                     {} the activity log holds",
                    self.sb.al_extents
                ),
            ));
        }
        let now = self.al.begin();
        let cold: Vec<u32> = (e0..=e1)
            .map(|e| e as u32)
            .filter(|&e| !self.al.touch(e, now))
            .collect();
        let written = !cold.is_empty();
        if written {
            if self.al.available(now) < cold.len() {
                return Err(MetaError::invalid(
                    &self.path,
                    format!(
                        "activity log full: {} of {} extents have writes in flight",
                        self.al.pinned(),
                        self.sb.al_extents
                    ),
                ));
            }
            self.ensure_unclean()?;
        }
        for chunk in cold.chunks(UPDATES_PER_TX) {
            let plan = self
                .al
                .plan(chunk, now)
                .expect("enough slots were counted above");
            let mut evicted: Vec<u64> = plan
                .iter()
                .filter(|a| a.evicted != super::actlog::EMPTY)
                .map(|a| Bitmap::block_of_extent(a.evicted as u64))
                .filter(|&b| self.bitmap.is_dirty(b))
                .collect();
            evicted.sort_unstable();
            evicted.dedup();
            self.write_bitmap_blocks(&evicted)?;
            let tx = self.al.build(&plan);
            if let Err(e) = self.write_transaction(&tx) {
                // The file may hold this transaction though the call fails: an evicted
                // extent that memory kept hot would take writes whose bits a crash forgets
                // (the simulator, seed 450100 of `--meta-eio`).
                if !crate::mutation::active(crate::mutation::Mutation::AlForget) {
                    self.al.forget_evicted(&plan);
                }
                return Err(e);
            }
            self.al.commit(&tx, now);
            self.al_on_disk = true;
        }
        if pin {
            for e in e0..=e1 {
                self.al.pin(e as u32);
            }
        }
        Ok(written)
    }

    /// Hot extents pinned by writes in flight.
    pub fn pinned_extents(&self) -> usize {
        self.al.pinned()
    }

    /// Whether the extent holding byte `offset` is hot.
    pub fn is_hot(&self, offset: u64) -> bool {
        self.al.is_hot((offset >> EXTENT_SHIFT) as u32)
    }

    /// Hot extents (extent `e` covers bytes `[e * 4 MiB, (e + 1) * 4 MiB)`), sorted.
    pub fn hot_extents(&self) -> Vec<u64> {
        self.al
            .hot_extents()
            .into_iter()
            .map(|e| e as u64)
            .collect()
    }

    /// Clean shutdown (no writes may be in flight): flush the bitmap, empty the activity log,
    /// set `al_clean`; each step durable before the next. A later `open` replays nothing. The
    /// `Meta` stays usable; the next write to the bitmap or the AL clears `al_clean` again.
    pub fn close_clean(&mut self) -> Result<(), MetaError> {
        self.flush_bitmap()?;
        if self.al_on_disk {
            self.reset_al()?;
        }
        if !self.sb.flags.al_clean {
            let mut next = self.sb.clone();
            next.flags.al_clean = true;
            self.write_superblock(next)?;
        }
        Ok(())
    }

    /// For `dump-md`: superblock fields, generations as 16-digit hex, flags by name,
    /// out-of-sync bytes, hot AL extents, bitmap block count.
    pub fn dump(&self) -> serde_json::Value {
        let al = AlView {
            ring_blocks: self.layout.al_blocks,
            newest_transaction: self.al.next_tr() - 1,
            hot_extents: self.hot_extents(),
            torn_block: None,
        };
        dump_view(&self.path, &self.sb, &self.bitmap, al, Vec::new())
    }

    // ---- writing -----------------------------------------------------------------------

    /// Fail from here on wherever `faults` says (see `meta::fault`).
    pub fn set_faults(&mut self, faults: std::sync::Arc<super::fault::MetaFaults>) {
        self.faults = Some(faults);
    }

    fn injected(&self, point: MetaPoint, op: String) -> Result<(), MetaError> {
        match self.faults.as_ref().and_then(|f| f.check(point)) {
            Some(errno) => Err(MetaError::io(
                &self.path,
                format!("{op} (injected fault)"),
                std::io::Error::from_raw_os_error(errno),
            )),
            None => Ok(()),
        }
    }

    fn write(&mut self, block: u64, data: &[u8]) -> Result<(), MetaError> {
        let point = if block == 0 {
            MetaPoint::Superblock
        } else if block < self.layout.bm_offset {
            MetaPoint::ActivityLog
        } else {
            MetaPoint::Bitmap
        };
        self.injected(point, format!("writing block {block}"))?;
        #[cfg(test)]
        self.events.push(IoEvent::Write {
            block,
            count: (data.len() / BLOCK_SIZE) as u64,
        });
        let file = &self.file;
        off_async_worker(|| file.write_all_at(data, block * BLOCK_SIZE as u64))
            .map_err(|e| MetaError::io(&self.path, format!("writing block {block}"), e))
    }

    fn sync(&mut self) -> Result<(), MetaError> {
        self.injected(MetaPoint::Sync, "fdatasync".into())?;
        #[cfg(test)]
        self.events.push(IoEvent::Sync);
        self.stats.syncs += 1;
        let file = &self.file;
        off_async_worker(|| file.sync_data()).map_err(|e| MetaError::io(&self.path, "fdatasync", e))
    }

    /// Memory and the file's block 0 never disagree: callers act on memory, and the next
    /// fdatasync of the file (any metadata write's) makes the file's block durable. So when
    /// the write reached the file but the fdatasync failed, the old block is written back
    /// and the error says nothing changed; only if that write fails too does memory take
    /// the new block, which the file then holds. (Left apart, a generation bump the node
    /// gave up on came back after a power loss and made a stale copy the resync source:
    /// the simulator, seed 49904 of `--meta-eio`; an `al_clean` on disk that memory lacks
    /// would never be cleared before the next crash.)
    fn write_superblock(&mut self, next: Superblock) -> Result<(), MetaError> {
        self.write(0, &next.encode())?;
        match self.sync() {
            Ok(()) => {
                self.stats.superblock_writes += 1;
                self.sb = next;
                Ok(())
            }
            Err(e) => {
                let old = self.sb.encode();
                let skip = crate::mutation::active(crate::mutation::Mutation::SuperblockWriteBack);
                if skip || self.write(0, &old).is_err() {
                    self.sb = next;
                }
                Err(e)
            }
        }
    }

    /// Before the first bitmap or AL write after a clean close: the superblock must no longer
    /// claim "clean", or a write torn by a crash would later look like corruption.
    fn ensure_unclean(&mut self) -> Result<(), MetaError> {
        if self.sb.flags.al_clean {
            let mut next = self.sb.clone();
            next.flags.al_clean = false;
            self.write_superblock(next)?;
        }
        Ok(())
    }

    /// Write the given bitmap blocks (indexes, sorted) and fdatasync; then they are clean.
    fn write_bitmap_blocks(&mut self, blocks: &[u64]) -> Result<(), MetaError> {
        if blocks.is_empty() {
            return Ok(());
        }
        self.ensure_unclean()?;
        let mut i = 0;
        let mut buf = Vec::new();
        while i < blocks.len() {
            let mut j = i + 1;
            while j < blocks.len()
                && blocks[j] == blocks[j - 1] + 1
                && ((j - i) as u64) < IO_CHUNK_BLOCKS
            {
                j += 1;
            }
            buf.resize((j - i) * BLOCK_SIZE, 0);
            for (k, &b) in blocks[i..j].iter().enumerate() {
                self.bitmap.encode_block(
                    b,
                    self.sb.md_id,
                    &mut buf[k * BLOCK_SIZE..(k + 1) * BLOCK_SIZE],
                );
            }
            self.write(self.layout.bm_offset + blocks[i], &buf)?;
            self.stats.bitmap_block_writes += (j - i) as u64;
            i = j;
        }
        self.sync()?;
        for &b in blocks {
            self.bitmap.clear_dirty(b);
        }
        Ok(())
    }

    fn write_transaction(&mut self, tx: &super::actlog::Transaction) -> Result<(), MetaError> {
        let block = self.layout.al_offset + self.al.position(tx.tr) as u64;
        self.write(block, &tx.encode(self.sb.md_id, self.sb.al_extents))?;
        self.sync()?;
        self.stats.al_transactions += 1;
        Ok(())
    }

    /// Write a transaction that empties the activity log. The caller has made the bitmap of
    /// every hot extent durable first.
    fn reset_al(&mut self) -> Result<(), MetaError> {
        self.ensure_unclean()?;
        let tx = self.al.build_reset();
        if let Err(e) = self.write_transaction(&tx) {
            // The file may hold the empty log: every extent must be activated again.
            if !crate::mutation::active(crate::mutation::Mutation::AlForget) {
                self.al.forget_all();
            }
            return Err(e);
        }
        self.al.commit(&tx, 0);
        self.al_on_disk = false;
        Ok(())
    }
}

/// Run blocking metadata IO. On a worker of the node's (multi-threaded) runtime the worker
/// hands its other tasks to another thread first, so an fdatasync of the metadata does not
/// stall pings, NBD connections or the peer link behind it.
fn off_async_worker<T>(io: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(io)
        }
        // Outside a runtime (create-md, dump-md, tests) or on a single-threaded one.
        _ => io(),
    }
}
