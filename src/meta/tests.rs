//! Tests of the meta file on real files in temporary directories.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use tempfile::TempDir;

use super::bitmap::BITS_PER_BLOCK;
use super::file::IoEvent;
use super::superblock::BLOCK_SIZE;
use super::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const EXT: u64 = EXTENT_SIZE;

fn setup(size: u64, al_extents: u32) -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.meta");
    Meta::create_with(&path, "r0", "alpha", size, al_extents, false).unwrap();
    (dir, path)
}

fn open(path: &Path, size: u64) -> Meta {
    Meta::open(path, "r0", "alpha", size).unwrap()
}

fn flip(path: &Path, block: u64, pos: usize) {
    let mut data = std::fs::read(path).unwrap();
    data[block as usize * BLOCK_SIZE + pos] ^= 0x5A;
    std::fs::write(path, data).unwrap();
}

fn layout(m: &Meta) -> Layout {
    Layout::new(m.superblock().size, m.superblock().al_extents)
}

fn expect_corrupt(r: Result<Meta, MetaError>, block: u64, region: &str) -> String {
    match r {
        Err(e @ MetaError::Corrupt { .. }) => {
            let MetaError::Corrupt {
                block: b,
                region: rg,
                ..
            } = &e
            else {
                unreachable!()
            };
            assert_eq!((*b, *rg), (block, region), "{e}");
            e.to_string()
        }
        Err(e) => panic!("expected Corrupt at block {block}, got {e}"),
        Ok(_) => panic!("expected Corrupt at block {block}, got Ok"),
    }
}

#[test]
fn create_open_round_trip() {
    let (_d, path) = setup(GIB, DEFAULT_AL_EXTENTS);
    let mut m = open(&path, GIB);
    let sb = m.superblock().clone();
    assert_eq!(
        (sb.resource.as_str(), sb.node.as_str(), sb.size),
        ("r0", "alpha", GIB)
    );
    assert_eq!(sb.gens, Generations::just_created());
    assert_eq!((sb.bytes_per_bit, sb.al_extents, sb.epoch), (4096, 1237, 0));
    assert!(!sb.flags.consistent);
    assert!(!sb.flags.al_clean, "an open node is not clean");
    assert_eq!(m.recovery(), &Recovery::default());
    assert_eq!(m.out_of_sync_bytes(), 0);
    assert_eq!(m.bitmap_words().len(), 262_144 / 64);
    assert!(m.hot_extents().is_empty());

    m.update(|s| {
        s.gens.new_current(true);
        s.flags.consistent = true;
        s.flags.peer_outdated = true;
        s.epoch = 9;
    })
    .unwrap();
    let sb = m.superblock().clone();
    m.close_clean().unwrap();
    drop(m);
    let m = open(&path, GIB);
    assert_eq!(m.superblock().gens, sb.gens);
    assert_eq!(m.superblock().epoch, 9);
    assert!(m.superblock().flags.consistent && m.superblock().flags.peer_outdated);
    assert!(!m.recovery().unclean);
}

#[test]
fn update_is_durable_and_guards_fixed_fields() {
    let (_d, path) = setup(GIB, 67);
    let mut m = open(&path, GIB);
    let writes = m.stats().superblock_writes;
    m.update(|s| s.epoch = 3).unwrap();
    assert_eq!(m.stats().superblock_writes, writes + 1);
    assert!(m.stats().syncs >= 1);
    // Durable without any close: a crash keeps it.
    drop(m);
    let mut m = open(&path, GIB);
    assert_eq!(m.superblock().epoch, 3);
    for f in [
        (|s: &mut Superblock| s.size += 1) as fn(&mut Superblock),
        |s| s.node = "beta".into(),
        |s| s.al_extents = 100,
        |s| s.flags.al_clean = true,
    ] {
        let e = m.update(f).unwrap_err();
        assert!(matches!(e, MetaError::Invalid { .. }), "{e}");
    }
    assert_eq!(m.superblock().size, GIB);
}

/// A superblock write that reaches the file but whose fdatasync fails: the old block is
/// written back, so memory and the file agree that nothing changed.
#[test]
fn a_failed_superblock_sync_leaves_memory_and_file_alike() {
    use super::fault::{MetaFault, MetaFaults, MetaPoint};
    let (_d, path) = setup(GIB, 67);
    let mut m = open(&path, GIB);
    let failing_sync = vec![MetaFault {
        point: MetaPoint::Sync,
        errno: libc::EIO,
    }];
    let faults = std::sync::Arc::new(MetaFaults::new(failing_sync.clone()));
    m.set_faults(faults.clone());
    assert!(
        m.update(|s| s.epoch = 7).is_err(),
        "the failed sync is reported"
    );
    assert_eq!(m.superblock().epoch, 0, "memory says nothing changed");
    let on_file = dump_file(&path).unwrap();
    assert_eq!(on_file["epoch"], 0, "and so does the file");
    faults.set(Vec::new());
    m.update(|s| s.epoch = 7).unwrap();
    drop(m);
    assert_eq!(open(&path, GIB).superblock().epoch, 7);

    // A clean close whose sync fails: the file must not say clean while memory does not, or
    // the next activity-log write would not mark it unclean and a crash would skip the replay.
    let mut m = open(&path, GIB);
    m.set_faults(faults.clone());
    faults.set(failing_sync);
    assert!(m.close_clean().is_err());
    faults.set(Vec::new());
    m.activate(3 * EXT, 4096).unwrap();
    m.mark_out_of_sync(3 * EXT, 4096);
    drop(m); // a crash
    let m = open(&path, GIB);
    assert!(m.recovery().unclean, "the crash after the close is seen");
    assert!(m.out_of_sync_bytes() >= 4096, "the hot extent is marked");
}

/// An activity-log transaction whose fdatasync failed may still be in the file. The extent
/// it evicted must not stay hot in memory: a later write there would skip the log, and a
/// crash that finds the failed transaction in the file would not replay the extent.
#[test]
fn a_failed_activity_log_sync_leaves_no_extent_hot_that_the_file_may_lack() {
    use super::fault::{MetaFault, MetaFaults, MetaPoint};
    let (_d, path) = setup(GIB, 67);
    let mut m = open(&path, GIB);
    for e in 40..40 + 67 {
        m.activate(e * EXT, 1).unwrap();
    }
    let faults = std::sync::Arc::new(MetaFaults::new(vec![MetaFault {
        point: MetaPoint::Sync,
        errno: libc::EIO,
    }]));
    m.set_faults(faults.clone());
    // Evicts extent 40, the least recently used; the transaction reaches the file.
    assert!(
        m.activate(200 * EXT, 1).is_err(),
        "the failed sync is reported"
    );
    assert!(!m.is_hot(40 * EXT), "the evicted extent is cold in memory");
    assert!(!m.is_hot(200 * EXT), "and the new one is not hot yet");
    faults.set(Vec::new());
    // A write to extent 40 now goes through the log again.
    assert!(m.activate(40 * EXT + 8192, 4096).unwrap(), "a transaction");
    m.mark_out_of_sync(40 * EXT + 8192, 4096);
    drop(m); // a crash
    let m = open(&path, GIB);
    assert!(
        m.recovery().replayed_extents.contains(&40),
        "{:?}",
        m.recovery()
    );
    assert_eq!(m.next_out_of_sync(40 * EXT).map(|r| r.0), Some(40 * EXT));
    drop(m);

    // A clean close whose emptying transaction fails: every extent is activated again.
    let mut m = open(&path, GIB);
    m.activate(5 * EXT, 1).unwrap();
    m.set_faults(faults.clone());
    faults.set(vec![MetaFault {
        point: MetaPoint::Sync,
        errno: libc::EIO,
    }]);
    assert!(m.close_clean().is_err());
    assert!(m.hot_extents().is_empty());
    faults.set(Vec::new());
    assert!(m.activate(5 * EXT, 4096).unwrap(), "a transaction");
}

#[test]
fn create_refuses_to_overwrite_without_force() {
    let (_d, path) = setup(GIB, 67);
    let e = Meta::create(&path, "r0", "alpha", GIB, false).unwrap_err();
    assert!(matches!(e, MetaError::Exists { .. }));
    assert!(e.to_string().contains("holds valid tandem metadata"), "{e}");
    let old_id = open(&path, GIB).superblock().md_id;

    Meta::create(&path, "r1", "beta", 2 * GIB, true).unwrap();
    let m = Meta::open(&path, "r1", "beta", 2 * GIB).unwrap();
    assert_ne!(m.superblock().md_id, old_id);
    assert_eq!(m.superblock().al_extents, DEFAULT_AL_EXTENTS);
    drop(m);

    // Damaged tandem metadata is also refused.
    flip(&path, 0, 100);
    let e = Meta::create(&path, "r1", "beta", GIB, false).unwrap_err();
    assert!(e.to_string().contains("damaged"), "{e}");
    // So is a file with other data (a data disk by mistake); zeros are fine.
    let other = path.with_file_name("disk.img");
    std::fs::write(&other, b"\x7fELF or a filesystem").unwrap();
    let e = Meta::create(&other, "r0", "alpha", GIB, false).unwrap_err();
    assert!(
        e.to_string().contains("does not hold tandem metadata"),
        "{e}"
    );
    std::fs::write(&other, vec![0u8; 8192]).unwrap();
    Meta::create(&other, "r0", "alpha", GIB, false).unwrap();
    // Shrinking with force truncates the old, larger file.
    Meta::create(&other, "r0", "alpha", 8 * MIB, true).unwrap();
    let l = Layout::new(8 * MIB, DEFAULT_AL_EXTENTS);
    assert_eq!(
        std::fs::metadata(&other).unwrap().len(),
        l.total_blocks() * 4096
    );
    open(&other, 8 * MIB);
}

#[test]
fn create_rejects_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.meta");
    for (r, n, size, al) in [
        ("", "a", GIB, 1237),
        ("r", &*"n".repeat(65), GIB, 1237),
        ("r", "a", 0, 1237),
        ("r", "a", MAX_DEVICE_SIZE + 1, 1237),
        ("r", "a", GIB, 66),
    ] {
        let e = Meta::create_with(&p, r, n, size, al, false).unwrap_err();
        assert!(matches!(e, MetaError::Invalid { .. }), "{e}");
        assert!(e.to_string().starts_with(&p.display().to_string()));
    }
    assert!(!p.exists());
}

#[test]
fn open_reports_not_tandem_busy_and_mismatch() {
    let (_d, path) = setup(GIB, 67);
    let m = open(&path, GIB);
    assert!(matches!(
        Meta::open(&path, "r0", "alpha", GIB),
        Err(MetaError::Busy { .. })
    ));
    drop(m);

    let check = |r: Result<Meta, MetaError>, field: &str, words: &[&str]| {
        let e = r.unwrap_err();
        let MetaError::Mismatch { field: f, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!(*f, field);
        let s = e.to_string();
        for w in words {
            assert!(s.contains(w), "{s}");
        }
    };
    check(
        Meta::open(&path, "r9", "alpha", GIB),
        "resource",
        &["\"r0\"", "\"r9\""],
    );
    check(
        Meta::open(&path, "r0", "beta", GIB),
        "node",
        &["\"alpha\"", "\"beta\""],
    );
    check(
        Meta::open(&path, "r0", "alpha", 2 * GIB),
        "size",
        &["1073741824", "2147483648"],
    );

    let junk = path.with_file_name("junk");
    std::fs::write(&junk, vec![7u8; 10000]).unwrap();
    let e = Meta::open(&junk, "r0", "alpha", GIB).unwrap_err();
    assert!(matches!(e, MetaError::NotTandem { .. }));
    assert!(e
        .to_string()
        .ends_with("not tandem metadata; run tandem create-md"));
    std::fs::write(&junk, b"").unwrap();
    assert!(matches!(dump_file(&junk), Err(MetaError::NotTandem { .. })));
    let e = Meta::open(&path.with_file_name("missing"), "r0", "alpha", GIB).unwrap_err();
    assert!(matches!(e, MetaError::Io { .. }) && e.to_string().contains("missing"));
}

#[test]
fn one_flipped_byte_in_any_region_is_corrupt() {
    let size = 300 * MIB; // 3 bitmap blocks
    let (_d, path) = setup(size, 67);
    let l = Layout::new(size, 67);
    assert_eq!(l.bm_blocks, 3);
    let pristine = std::fs::read(&path).unwrap();
    let positions = [
        8, 12, 13, 17, 30, 64, 100, 129, 200, 511, 512, 1000, 2048, 4095,
    ];
    let mut cases = vec![];
    for &pos in &positions {
        cases.push((0, pos, "superblock"));
        for b in l.al_offset..l.bm_offset {
            cases.push((b, pos, "activity log"));
        }
        for b in l.bm_offset..l.total_blocks() {
            cases.push((b, pos, "bitmap"));
        }
    }
    for (block, pos, region) in cases {
        std::fs::write(&path, &pristine).unwrap();
        flip(&path, block, pos);
        let msg = expect_corrupt(Meta::open(&path, "r0", "alpha", size), block, region);
        assert!(
            msg.starts_with(&format!("{}: block {block} ({region}) ", path.display())),
            "{msg}"
        );
        // dump-md reports the same, and nothing was rewritten.
        assert!(matches!(dump_file(&path), Err(MetaError::Corrupt { .. })));
    }
    std::fs::write(&path, &pristine).unwrap();
    flip(&path, l.bm_offset + 1, 300);
    let msg = Meta::open(&path, "r0", "alpha", size)
        .unwrap_err()
        .to_string();
    assert_eq!(
        msg,
        format!(
            "{}: block {} (bitmap) has a bad checksum",
            path.display(),
            l.bm_offset + 1
        )
    );
    // A flipped magic in block 0: not ours at all.
    std::fs::write(&path, &pristine).unwrap();
    flip(&path, 0, 2);
    assert!(matches!(
        Meta::open(&path, "r0", "alpha", size),
        Err(MetaError::NotTandem { .. })
    ));
}

#[test]
fn truncated_file_is_corrupt() {
    let (_d, path) = setup(GIB, 67);
    let l = Layout::new(GIB, 67);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len((l.total_blocks() - 1) * 4096).unwrap();
    let msg = expect_corrupt(
        Meta::open(&path, "r0", "alpha", GIB),
        l.total_blocks() - 1,
        "bitmap",
    );
    assert!(msg.contains("missing"), "{msg}");
}

#[test]
fn blocks_from_an_older_create_are_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    Meta::create_with(&a, "r0", "alpha", GIB, 67, false).unwrap();
    Meta::create_with(&b, "r0", "alpha", GIB, 67, false).unwrap();
    let l = Layout::new(GIB, 67);
    // Copy one bitmap block of b into a: a valid block of another instance.
    let mut da = std::fs::read(&a).unwrap();
    let db = std::fs::read(&b).unwrap();
    let at = (l.bm_offset as usize + 2) * 4096;
    da[at..at + 4096].copy_from_slice(&db[at..at + 4096]);
    std::fs::write(&a, &da).unwrap();
    let msg = expect_corrupt(
        Meta::open(&a, "r0", "alpha", GIB),
        l.bm_offset + 2,
        "bitmap",
    );
    assert!(msg.contains("another metadata instance"), "{msg}");
}

#[test]
fn bitmap_edges() {
    let size = 10 * 4096 + 100; // 11 bits, the last one covers 100 bytes
    let (_d, path) = setup(size, 67);
    let mut m = open(&path, size);
    assert_eq!(m.bitmap_words().len(), 1);
    m.mark_out_of_sync(4095, 2); // touches blocks 0 and 1
    assert_eq!(m.out_of_sync_bytes(), 8192);
    m.mark_in_sync(1, 8190); // no whole block inside
    assert_eq!(m.out_of_sync_bytes(), 8192);
    m.mark_in_sync(4096, 4096);
    assert_eq!(m.out_of_sync_bytes(), 4096);
    m.mark_in_sync(0, 4096);
    assert_eq!(m.out_of_sync_bytes(), 0);
    m.mark_out_of_sync(100, 0);
    assert_eq!(m.out_of_sync_bytes(), 0);

    // The partial last block counts its real size, and a range reaching the end clears it.
    m.mark_out_of_sync(size - 1, 1);
    assert_eq!(m.out_of_sync_bytes(), 100);
    assert_eq!(m.next_out_of_sync(0), Some((10 * 4096, 100)));
    assert_eq!(m.next_out_of_sync(size - 1), Some((10 * 4096, 100)));
    assert_eq!(m.next_out_of_sync(size), None);
    assert_eq!(m.next_out_of_sync(u64::MAX), None);
    m.mark_in_sync(size - 100, 50);
    assert_eq!(m.out_of_sync_bytes(), 100);
    m.mark_in_sync(size - 100, 100);
    assert_eq!(m.out_of_sync_bytes(), 0);
    m.mark_out_of_sync(size - 1, u64::MAX); // huge lengths clip
    m.mark_in_sync(10 * 4096, u64::MAX);
    assert_eq!(m.out_of_sync_bytes(), 0);
    // Past the end: nothing.
    m.mark_out_of_sync(size, 4096);
    m.mark_out_of_sync(1 << 40, 4096);
    assert_eq!(m.out_of_sync_bytes(), 0);

    // Runs, from inside a dirty block.
    m.mark_out_of_sync(2 * 4096, 3 * 4096);
    m.mark_out_of_sync(7 * 4096, 1);
    assert_eq!(m.next_out_of_sync(0), Some((8192, 3 * 4096)));
    assert_eq!(m.next_out_of_sync(3 * 4096 + 5), Some((3 * 4096, 2 * 4096)));
    assert_eq!(m.next_out_of_sync(5 * 4096), Some((7 * 4096, 4096)));
    assert_eq!(m.next_out_of_sync(8 * 4096), None);

    m.set_all_out_of_sync();
    assert_eq!(m.out_of_sync_bytes(), size);
    assert_eq!(m.bitmap_words()[0], (1 << 11) - 1);
    assert_eq!(m.next_out_of_sync(0), Some((0, size)));
}

#[test]
fn runs_are_capped_at_one_mib_and_cross_bitmap_blocks() {
    let size = GIB;
    let (_d, path) = setup(size, 67);
    let mut m = open(&path, size);
    let boundary = BITS_PER_BLOCK * 4096; // first byte of bitmap block 1
    m.mark_out_of_sync(boundary - 8192, 3 * MIB);
    assert_eq!(m.next_out_of_sync(0), Some((boundary - 8192, MIB)));
    assert_eq!(
        m.next_out_of_sync(boundary - 8192 + MIB),
        Some((boundary - 8192 + MIB, MIB))
    );
    let mut pos = 0;
    let mut total = 0;
    while let Some((o, l)) = m.next_out_of_sync(pos) {
        assert!(l <= MIB && o >= pos);
        total += l;
        pos = o + l;
    }
    assert_eq!(total, 3 * MIB);
    m.mark_in_sync(0, size);
    assert_eq!(m.next_out_of_sync(0), None);
    m.mark_out_of_sync(size - 4096, 4096);
    assert_eq!(m.next_out_of_sync(0), Some((size - 4096, 4096)));
}

#[test]
fn merge_bitmap_ors_and_persists() {
    let size = 64 * MIB + 4096 * 3; // 16387 bits: a partial last word
    let (_d, path) = setup(size, 67);
    let mut m = open(&path, size);
    let n = m.bitmap_words().len();
    assert_eq!(n, 16387usize.div_ceil(64));
    assert!(matches!(
        m.merge_bitmap(&vec![0; n + 1]),
        Err(MetaError::Invalid { .. })
    ));
    m.mark_out_of_sync(0, 4096);
    let mut peer = vec![0u64; n];
    peer[0] = 0b110;
    peer[100] = u64::MAX;
    peer[n - 1] = u64::MAX; // bits past the end are ignored
    m.merge_bitmap(&peer).unwrap();
    assert_eq!(m.bitmap_words()[0], 0b111);
    assert_eq!(m.out_of_sync_bytes(), (3 + 64 + 3) * 4096);
    m.flush_bitmap().unwrap();
    let words = m.bitmap_words().to_vec();
    drop(m); // crash: flushed bits survive
    let m = open(&path, size);
    assert_eq!(m.bitmap_words(), &words[..]);
}

#[test]
fn activate_writes_transactions_only_for_cold_extents() {
    let (_d, path) = setup(GIB, 67);
    let mut m = open(&path, GIB);
    let tx0 = m.stats().al_transactions;
    assert!(m.activate(5 * EXT + 10, 100).unwrap());
    assert_eq!(m.hot_extents(), vec![5]);
    assert!(m.is_hot(5 * EXT) && !m.is_hot(6 * EXT));
    assert!(!m.activate(5 * EXT, EXT).unwrap(), "already hot");
    assert_eq!(m.stats().al_transactions, tx0 + 1);
    // A range over three extents, one already hot: one transaction for the other two.
    assert!(m.activate(4 * EXT + 1, 2 * EXT).unwrap());
    assert_eq!(m.hot_extents(), vec![4, 5, 6]);
    assert_eq!(m.stats().al_transactions, tx0 + 2);
    assert!(!m.activate(0, 0).unwrap());
    assert!(!m.activate(GIB, 4096).unwrap(), "past the end");
    assert!(
        m.activate(GIB - 1, 1 << 40).unwrap(),
        "clipped to the device"
    );
    assert_eq!(*m.hot_extents().last().unwrap(), 255);
    // More than al_extents extents at once cannot be covered.
    let e = m.activate(0, 68 * EXT).unwrap_err();
    assert!(matches!(e, MetaError::Invalid { .. }), "{e}");
    // Exactly al_extents extents, more than 64 of them cold: several transactions.
    let before = m.stats().al_transactions;
    assert!(m.activate(100 * EXT, 67 * EXT).unwrap());
    assert_eq!(m.stats().al_transactions, before + 2);
    assert_eq!(m.hot_extents(), (100..167).collect::<Vec<_>>());
}

#[test]
fn pinned_extents_stay_hot_until_released() {
    let (_d, path) = setup(GIB, 67);
    let mut m = open(&path, GIB);
    m.activate_pinned(0, 2 * EXT).unwrap(); // extents 0 and 1, a write in flight
    for e in 2..2 + 65 {
        m.activate(e * EXT, 1).unwrap();
    }
    // Extents 0 and 1 are the least recently used but pinned: 2 and 3 go instead.
    m.activate(100 * EXT, 2 * EXT).unwrap();
    assert!(m.is_hot(0) && m.is_hot(EXT));
    assert!(!m.is_hot(2 * EXT) && !m.is_hot(3 * EXT));
    m.release(0, 2 * EXT);
    m.activate(102 * EXT, 1).unwrap();
    assert!(!m.is_hot(0), "released, now evictable");

    // All pinned: refused, nothing written, nothing changed.
    let hot = m.hot_extents();
    for &e in &hot {
        m.activate_pinned(e * EXT, 1).unwrap();
    }
    let tx = m.stats().al_transactions;
    let e = m.activate(200 * EXT, 1).unwrap_err();
    assert!(e.to_string().contains("activity log full"), "{e}");
    assert_eq!(m.stats().al_transactions, tx);
    assert_eq!(m.hot_extents(), hot);
    m.release(hot[5] * EXT, 1);
    assert!(m.activate(200 * EXT, 1).unwrap());
    assert!(!m.is_hot(hot[5] * EXT));
}

#[test]
fn eviction_writes_the_bitmap_block_first() {
    let (_d, path) = setup(GIB, 67);
    let mut m = open(&path, GIB);
    let l = layout(&m);
    m.activate(40 * EXT, 4096).unwrap(); // extent 40 lives in bitmap block 1
    m.mark_out_of_sync(40 * EXT + 8192, 4096);
    for e in 41..41 + 66 {
        m.activate(e * EXT, 1).unwrap();
    }
    // The log is full; the bitmap still only in memory.
    let on_disk = std::fs::read(&path).unwrap();
    let word_off =
        (l.bm_offset as usize + 1) * 4096 + 128 + ((40 * 1024 - BITS_PER_BLOCK as usize) / 64) * 8;
    assert_eq!(on_disk[word_off], 0, "not flushed yet");
    m.events.clear();
    m.activate(200 * EXT, 1).unwrap(); // evicts extent 40, the least recently used
    assert!(!m.is_hot(40 * EXT));
    let ev = m.events.clone();
    let bm = ev
        .iter()
        .position(|e| {
            *e == IoEvent::Write {
                block: l.bm_offset + 1,
                count: 1,
            }
        })
        .expect("bitmap block of the evicted extent written");
    let al = ev
        .iter()
        .position(|e| matches!(e, IoEvent::Write { block, .. } if (l.al_offset..l.bm_offset).contains(block)))
        .expect("AL transaction written");
    assert!(bm < al, "{ev:?}");
    assert!(
        ev[bm + 1..al].contains(&IoEvent::Sync),
        "bitmap synced before the AL write: {ev:?}"
    );
    assert_eq!(ev.last(), Some(&IoEvent::Sync));
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(on_disk[word_off], 0b100, "bit 2 of extent 40 is on disk");
    // Evicting a clean extent writes no bitmap block.
    m.events.clear();
    m.activate(201 * EXT, 1).unwrap();
    assert!(!m
        .events
        .iter()
        .any(|e| matches!(e, IoEvent::Write { block, .. } if *block >= l.bm_offset)));
}

#[test]
fn crash_replays_hot_extents_and_flags_crashed_primary() {
    let (_d, path) = setup(GIB, 67);
    let mut m = open(&path, GIB);
    m.update(|s| s.flags.was_primary = true).unwrap();
    m.activate(3 * EXT, 4096).unwrap();
    m.activate(10 * EXT + 5 * MIB / 2, 4096).unwrap();
    m.mark_out_of_sync(3 * EXT, 4096);
    m.mark_out_of_sync(100 * EXT, 4096); // a cold extent, flushed
    m.flush_bitmap().unwrap();
    drop(m); // crash

    let m = open(&path, GIB);
    let r = m.recovery().clone();
    assert!(r.unclean && r.crashed_primary);
    assert_eq!(r.replayed_extents, vec![3, 10]);
    assert_eq!(r.marked_bytes, 2 * EXT - 4096);
    assert_eq!(m.out_of_sync_bytes(), 2 * EXT + 4096);
    assert_eq!(m.next_out_of_sync(0), Some((3 * EXT, MIB)));
    let f = m.superblock().flags;
    assert!(f.crashed_primary && !f.was_primary && !f.al_clean);
    assert!(
        m.hot_extents().is_empty(),
        "the log starts empty after recovery"
    );

    // The recovery is durable: crashing again right away replays nothing new but keeps the
    // bits and the flag.
    drop(m);
    let m = open(&path, GIB);
    assert!(m.recovery().unclean && !m.recovery().crashed_primary);
    assert!(m.recovery().replayed_extents.is_empty());
    assert_eq!(m.out_of_sync_bytes(), 2 * EXT + 4096);
    assert!(m.superblock().flags.crashed_primary);
    drop(m);

    // A secondary's crash does not make it a crashed primary.
    let (_d2, p2) = setup(GIB, 67);
    let mut m = open(&p2, GIB);
    m.activate(0, 1).unwrap();
    drop(m);
    let m = open(&p2, GIB);
    assert!(m.recovery().unclean && !m.recovery().crashed_primary);
    assert_eq!(m.out_of_sync_bytes(), EXT);
}

/// A process crash keeps the page cache; a machine that went down (another boot id) may
/// have lost writes the node acknowledged, so its copy comes back Outdated and rolled back.
#[test]
fn an_unclean_shutdown_under_another_boot_id_rolls_the_copy_back() {
    const A: [u8; 16] = [1; 16];
    const B: [u8; 16] = [2; 16];
    const C: [u8; 16] = [3; 16];
    let open_at = |path: &Path, boot| Meta::open_booted(path, "r0", "alpha", GIB, boot).unwrap();
    let (_d, path) = setup(GIB, 67);
    // Never opened: no boot id on record, so nothing can be told.
    let mut m = open_at(&path, A);
    assert_eq!(m.superblock().boot_id, A);
    m.update(|s| s.flags.consistent = true).unwrap();
    m.activate(0, 4096).unwrap();
    drop(m); // the process dies; the machine runs on
    let mut m = open_at(&path, A);
    assert!(m.recovery().unclean && !m.recovery().rolled_back);
    assert!(!m.superblock().flags.rolled_back && !m.superblock().flags.outdated);
    m.activate(0, 4096).unwrap();
    drop(m); // the machine goes down
    let m = open_at(&path, B);
    assert!(m.recovery().rolled_back);
    let f = m.superblock().flags;
    assert!(f.rolled_back && f.outdated && f.consistent);
    assert_eq!(m.superblock().boot_id, B);
    // Durable and sticky: only a full resync or a forced promotion clears it.
    drop(m);
    let mut m = open_at(&path, B);
    assert!(!m.recovery().rolled_back && m.superblock().flags.rolled_back);
    m.update(|s| {
        s.flags.rolled_back = false;
        s.flags.outdated = false;
    })
    .unwrap();
    // A clean shutdown loses nothing, whatever boots next.
    m.close_clean().unwrap();
    drop(m);
    let mut m = open_at(&path, C);
    assert!(!m.recovery().rolled_back && !m.superblock().flags.rolled_back);
    // A copy that wrote without its peer flushed first: what a power loss takes is only
    // its own unmirrored writes, which no other copy holds, so it is not rolled back.
    m.update(|s| s.gens.bitmap = 0x77).unwrap();
    m.activate(0, 4096).unwrap();
    drop(m);
    let mut m = open_at(&path, A);
    assert!(m.recovery().unclean && !m.recovery().rolled_back);
    // Nor is a copy that is Inconsistent anyway.
    m.update(|s| {
        s.gens.bitmap = 0;
        s.flags.consistent = false;
    })
    .unwrap();
    drop(m);
    let m = open_at(&path, B);
    assert!(m.recovery().unclean && !m.recovery().rolled_back);
    // The boot id is managed by `Meta`, like `al_clean`.
    let mut m = m;
    assert!(m.update(|s| s.boot_id = C).is_err());
}

#[test]
fn close_clean_then_open_replays_nothing() {
    let (_d, path) = setup(GIB, 67);
    let mut m = open(&path, GIB);
    m.update(|s| s.flags.was_primary = true).unwrap();
    m.activate(3 * EXT, 4096).unwrap();
    m.mark_out_of_sync(3 * EXT, 4096);
    m.close_clean().unwrap();
    assert!(m.superblock().flags.al_clean);
    assert!(m.hot_extents().is_empty());
    drop(m);
    let mut m = open(&path, GIB);
    assert_eq!(m.recovery(), &Recovery::default());
    assert_eq!(m.out_of_sync_bytes(), 4096);
    assert!(!m.superblock().flags.crashed_primary);

    // Still usable after close_clean: the next write makes it unclean again.
    m.close_clean().unwrap();
    m.activate(7 * EXT, 1).unwrap();
    assert!(!m.superblock().flags.al_clean);
    drop(m);
    let m = open(&path, GIB);
    assert_eq!(m.recovery().replayed_extents, vec![7]);
}

#[test]
fn torn_newest_transaction_falls_back_to_the_previous_one() {
    let (_d, path) = setup(GIB, 67);
    let mut m = open(&path, GIB);
    let l = layout(&m);
    for e in 0..67 {
        m.activate(e * EXT, 1).unwrap();
    }
    m.mark_out_of_sync(0, 4096); // extent 0 is dirty in memory
    m.events.clear();
    m.activate(100 * EXT, 1).unwrap(); // evicts extent 0
    let tx_block = m
        .events
        .iter()
        .rev()
        .find_map(|e| match e {
            IoEvent::Write { block, .. } if *block < l.bm_offset => Some(*block),
            _ => None,
        })
        .unwrap();
    drop(m);
    let pristine = std::fs::read(&path).unwrap();

    // Torn in the body, header intact: the previous transaction plus the salvaged update.
    flip(&path, tx_block, 3000);
    let m = open(&path, GIB);
    let r = m.recovery().clone();
    assert_eq!(r.torn_al_block, Some(tx_block));
    let mut want: Vec<u64> = (0..67).collect();
    want.push(100);
    assert_eq!(r.replayed_extents, want, "hot in either transaction");
    drop(m);
    // The torn block was superseded; the file is fully valid again.
    let m = open(&path, GIB);
    assert_eq!(m.recovery().torn_al_block, None);
    assert_eq!(m.out_of_sync_bytes(), 68 * EXT);
    drop(m);

    // Torn header: only the previous transaction is known, which still lists extent 0.
    std::fs::write(&path, &pristine).unwrap();
    flip(&path, tx_block, 25);
    let m = open(&path, GIB);
    assert_eq!(m.recovery().torn_al_block, Some(tx_block));
    assert_eq!(m.recovery().replayed_extents, (0..67).collect::<Vec<_>>());
    drop(m);

    // The transaction before the newest is not the frontier: corrupt.
    std::fs::write(&path, &pristine).unwrap();
    let prev = l.al_offset + (tx_block - l.al_offset + l.al_blocks as u64 - 1) % l.al_blocks as u64;
    flip(&path, prev, 3000);
    expect_corrupt(Meta::open(&path, "r0", "alpha", GIB), prev, "activity log");

    // After a clean close no block may be torn.
    std::fs::write(&path, &pristine).unwrap();
    let mut m = open(&path, GIB);
    m.close_clean().unwrap();
    let newest = m.events.iter().rev().find_map(|e| match e {
        IoEvent::Write { block, .. } if *block > 0 && *block < l.bm_offset => Some(*block),
        _ => None,
    });
    drop(m);
    flip(&path, newest.unwrap(), 3000);
    expect_corrupt(
        Meta::open(&path, "r0", "alpha", GIB),
        newest.unwrap(),
        "activity log",
    );
}

#[test]
fn torn_bitmap_block_after_a_crash_is_marked_entirely() {
    let size = 300 * MIB;
    let (_d, path) = setup(size, 67);
    let mut m = open(&path, size);
    let l = layout(&m);
    m.mark_out_of_sync(0, 4096);
    m.flush_bitmap().unwrap();
    drop(m); // crash
    flip(&path, l.bm_offset + 1, 1000);
    let m = open(&path, size);
    assert_eq!(m.recovery().torn_bitmap_blocks, vec![l.bm_offset + 1]);
    assert_eq!(m.recovery().marked_bytes, BITS_PER_BLOCK * 4096);
    assert_eq!(m.out_of_sync_bytes(), 4096 + BITS_PER_BLOCK * 4096);
    drop(m);
    let m = open(&path, size);
    assert!(m.recovery().torn_bitmap_blocks.is_empty(), "rewritten");
    assert_eq!(m.out_of_sync_bytes(), 4096 + BITS_PER_BLOCK * 4096);
}

#[test]
fn dump_shows_generations_flags_and_the_log() {
    let (_d, path) = setup(GIB, 67);
    let v = dump_file(&path).unwrap();
    assert_eq!(v["generation"]["current"], "0000000000000004");
    assert_eq!(v["generation"]["bitmap"], "0000000000000000");
    assert_eq!(v["generation"]["history"][1], "0000000000000000");
    assert_eq!(v["flags"], serde_json::json!(["al_clean"]));
    assert_eq!(v["resource"], "r0");
    assert_eq!(v["node"], "alpha");
    assert_eq!(v["size"], GIB);
    assert_eq!(v["bitmap_blocks"], 9);
    assert_eq!(v["out_of_sync_bytes"], 0);

    let mut m = open(&path, GIB);
    m.update(|s| {
        s.gens.current = 0x6A0F_1234_5678_9ABD;
        s.flags.consistent = true;
        s.flags.was_primary = true;
    })
    .unwrap();
    m.activate(2 * EXT, 1).unwrap();
    m.mark_out_of_sync(0, 8192);
    let live = m.dump();
    assert_eq!(live["generation"]["current"], "6A0F123456789ABD");
    assert_eq!(
        live["flags"],
        serde_json::json!(["consistent", "was_primary"])
    );
    assert_eq!(live["out_of_sync_bytes"], 8192);
    assert_eq!(live["activity_log"]["hot_extents"], serde_json::json!([2]));
    drop(m); // crash: dump-md shows the unclean state without changing it
    let before = std::fs::read(&path).unwrap();
    let v = dump_file(&path).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(v["generation"]["current"], "6A0F123456789ABD");
    assert_eq!(v["activity_log"]["hot_extents"], serde_json::json!([2]));
    assert_eq!(v["out_of_sync_bytes"], 0, "the mark was never flushed");
    assert!(!v["flags"].as_array().unwrap().contains(&"al_clean".into()));
    // dump-md works while the node holds the lock.
    let _m = open(&path, GIB);
    assert!(dump_file(&path).is_ok());
}

#[test]
fn large_device_limits() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.meta");
    let size = 64 * GIB;
    Meta::create(&p, "r0", "alpha", size, false).unwrap();
    let mut m = Meta::open(&p, "r0", "alpha", size).unwrap();
    assert_eq!(m.bitmap_words().len() as u64, size / 4096 / 64);
    m.set_all_out_of_sync();
    m.flush_bitmap().unwrap();
    m.close_clean().unwrap();
    drop(m);
    let m = Meta::open(&p, "r0", "alpha", size).unwrap();
    assert_eq!(m.out_of_sync_bytes(), size);
    let e = Meta::create(&p, "r0", "alpha", MAX_DEVICE_SIZE + 4096, true).unwrap_err();
    assert!(e.to_string().contains("4 TiB"), "{e}");
}

#[test]
fn largest_device() {
    // 128 MiB of bitmap in one allocation: exempt from the store tests' allocation cap.
    crate::store::tests::untracked(largest_device_inner);
}

fn largest_device_inner() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("max.meta");
    Meta::create(&p, "r0", "alpha", MAX_DEVICE_SIZE, false).unwrap();
    let mut m = Meta::open(&p, "r0", "alpha", MAX_DEVICE_SIZE).unwrap();
    m.activate(MAX_DEVICE_SIZE - 1, 1).unwrap();
    m.set_all_out_of_sync();
    m.close_clean().unwrap();
}

// ---- property: crash safety ------------------------------------------------------------

const P_EXTENTS: u64 = 130;
const P_SIZE: u64 = P_EXTENTS * EXT - 3000;
const P_BITS: u64 = P_SIZE.div_ceil(4096);

#[derive(Debug, Clone)]
enum Op {
    /// Activate, write; with `mark` also mark out of sync (peer not reachable).
    Write {
        block: u64,
        blocks: u64,
        mark: bool,
    },
    /// Resync finished for a range.
    Clear {
        block: u64,
        blocks: u64,
    },
    /// A sequential stream: one 4 KiB write into each of `count` extents from `first` on
    /// (wrapping), every `mark_every`-th one marked; fills the log and evicts.
    Sweep {
        first: u64,
        count: u64,
        mark_every: u64,
    },
    Flush,
    Primary(bool),
    Crash,
    /// Crash while the AL transaction of this write was being written: the transaction block
    /// is torn (in its body, or also in its header) and the write never happened.
    TornWrite {
        block: u64,
        blocks: u64,
        header: bool,
    },
    CleanReopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..P_BITS, 1..2048u64, any::<bool>())
            .prop_map(|(block, blocks, mark)| Op::Write { block, blocks, mark }),
        3 => (0..P_BITS, 1..40_000u64).prop_map(|(block, blocks)| Op::Clear { block, blocks }),
        2 => (0..P_EXTENTS, 1..100u64, 1..5u64).prop_map(|(first, count, mark_every)| Op::Sweep {
            first,
            count,
            mark_every
        }),
        1 => Just(Op::Flush),
        1 => any::<bool>().prop_map(Op::Primary),
        1 => Just(Op::Crash),
        1 => (0..P_BITS, 1..2048u64, any::<bool>())
            .prop_map(|(block, blocks, header)| Op::TornWrite { block, blocks, header }),
        1 => Just(Op::CleanReopen),
    ]
}

fn set_model(words: &mut [u64], block: u64, blocks: u64, value: bool) {
    for i in block..(block + blocks).min(P_BITS) {
        let (w, b) = ((i / 64) as usize, i % 64);
        if value {
            words[w] |= 1 << b;
        } else {
            words[w] &= !(1 << b);
        }
    }
}

fn or(a: &[u64], b: &[u64]) -> Vec<u64> {
    a.iter().zip(b).map(|(x, y)| x | y).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// After a crash, every block that was marked out of sync and not marked in sync since, and
    /// every block of an extent that was hot at the crash (so possibly written without the peer
    /// confirming it), is out of sync; nothing is out of sync that was not at some point since
    /// the last flush, unless its extent was hot. A clean close preserves the bitmap exactly.
    #[test]
    fn crash_safety(ops in proptest::collection::vec(op(), 1..160)) {
        let (_d, path) = setup(P_SIZE, 67);
        let mut m = open(&path, P_SIZE);
        let nwords = P_BITS.div_ceil(64) as usize;
        // The bitmap as the model expects it in memory, and every bit that may be on disk.
        let mut mem = vec![0u64; nwords];
        let mut maybe_disk = mem.clone();
        let mut was_primary = false;
        let mut crashed = false;
        for op in ops {
            match op {
                Op::Write { block, blocks, mark } => {
                    m.activate(block * 4096, blocks * 4096).unwrap();
                    let last = ((block + blocks) * 4096).min(P_SIZE) - 1;
                    for e in block * 4096 / EXT..=last / EXT {
                        prop_assert!(m.is_hot(e * EXT));
                    }
                    if mark {
                        m.mark_out_of_sync(block * 4096, blocks * 4096);
                        set_model(&mut mem, block, blocks, true);
                        set_model(&mut maybe_disk, block, blocks, true);
                    }
                }
                Op::Sweep { first, count, mark_every } => {
                    for i in 0..count {
                        let e = (first + i) % P_EXTENTS;
                        let block = e * 1024 + (i * 37) % 1000;
                        m.activate(block * 4096, 4096).unwrap();
                        prop_assert!(m.is_hot(block * 4096));
                        if i % mark_every == 0 {
                            m.mark_out_of_sync(block * 4096, 4096);
                            set_model(&mut mem, block, 1, true);
                            set_model(&mut maybe_disk, block, 1, true);
                        }
                    }
                    if count >= 67 {
                        prop_assert_eq!(m.hot_extents().len(), 67);
                    }
                }
                Op::Clear { block, blocks } => {
                    m.mark_in_sync(block * 4096, blocks * 4096);
                    set_model(&mut mem, block, blocks, false);
                }
                Op::Flush => {
                    m.flush_bitmap().unwrap();
                    maybe_disk.clone_from(&mem);
                }
                Op::Primary(p) => {
                    m.update(|s| s.flags.was_primary = p).unwrap();
                    was_primary = p;
                }
                Op::TornWrite { block, blocks, header } => {
                    let hot_before = m.hot_extents();
                    m.events.clear();
                    let wrote = m.activate(block * 4096, blocks * 4096).unwrap();
                    let hot_after = m.hot_extents();
                    let al_end = Layout::new(P_SIZE, 67).bm_offset;
                    let tx_block = m.events.iter().rev().find_map(|e| match e {
                        IoEvent::Write { block, .. } if (1..al_end).contains(block) => Some(*block),
                        _ => None,
                    });
                    drop(m);
                    if wrote {
                        flip(&path, tx_block.unwrap(), if header { 25 } else { 3000 });
                    }
                    m = open(&path, P_SIZE);
                    let r = m.recovery().clone();
                    prop_assert_eq!(r.torn_al_block, if wrote { tx_block } else { None });
                    prop_assert_eq!(r.crashed_primary, was_primary);
                    crashed |= was_primary;
                    // At least everything hot before the torn transaction, at most that and what
                    // the torn transaction named.
                    let mut want = hot_before.clone();
                    if !wrote || !header {
                        want = hot_before.iter().chain(&hot_after).copied().collect();
                        want.sort_unstable();
                        want.dedup();
                    }
                    prop_assert_eq!(&r.replayed_extents, &want);
                    let mut hot_bits = vec![0u64; nwords];
                    for &e in &want {
                        set_model(&mut hot_bits, e * 1024, 1024, true);
                    }
                    let got = m.bitmap_words().to_vec();
                    let must = or(&mem, &hot_bits);
                    let may = or(&maybe_disk, &hot_bits);
                    for w in 0..nwords {
                        prop_assert_eq!(got[w] & must[w], must[w], "bits lost in word {}", w);
                        prop_assert_eq!(got[w] & !may[w], 0, "bits invented in word {}", w);
                    }
                    mem.clone_from(&got);
                    maybe_disk = got;
                    was_primary = false;
                }
                Op::Crash => {
                    let hot = m.hot_extents();
                    drop(m);
                    m = open(&path, P_SIZE);
                    let r = m.recovery().clone();
                    prop_assert!(r.unclean);
                    prop_assert_eq!(&r.replayed_extents, &hot);
                    prop_assert_eq!(r.crashed_primary, was_primary);
                    crashed |= was_primary;
                    prop_assert_eq!(m.superblock().flags.crashed_primary, crashed);
                    prop_assert!(!m.superblock().flags.was_primary);
                    let mut hot_bits = vec![0u64; nwords];
                    for &e in &hot {
                        set_model(&mut hot_bits, e * 1024, 1024, true);
                    }
                    let got = m.bitmap_words().to_vec();
                    let must = or(&mem, &hot_bits);
                    let may = or(&maybe_disk, &hot_bits);
                    for w in 0..nwords {
                        prop_assert_eq!(got[w] & must[w], must[w], "bits lost in word {}", w);
                        prop_assert_eq!(got[w] & !may[w], 0, "bits invented in word {}", w);
                    }
                    mem.clone_from(&got);
                    maybe_disk = got;
                    was_primary = false;
                }
                Op::CleanReopen => {
                    m.close_clean().unwrap();
                    drop(m);
                    m = open(&path, P_SIZE);
                    prop_assert!(!m.recovery().unclean);
                    prop_assert!(m.recovery().replayed_extents.is_empty());
                    maybe_disk.clone_from(&mem);
                    was_primary = false;
                }
            }
            prop_assert_eq!(m.bitmap_words(), &mem[..]);
        }
    }
}
