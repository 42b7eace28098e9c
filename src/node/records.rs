//! What the node records in its metadata when its state changes, and in which order: the
//! record first, then the state change it allows (persist before publish). Plain synchronous
//! code on the metadata and the state; the runtime calls it with both locks held (the state's
//! first, then the metadata's, the order everywhere in the node), and the simulator calls
//! the same functions.

use super::core::{synced_copy, State};
use super::rules::needs_split_generation;
use super::DiskState;
use crate::meta::{Generations, Meta, MetaError};
use crate::repl::proto::PeerState;

/// What this node tells its peer about itself: the state, and the metadata as it stands.
pub fn peer_state(meta: &Meta, st: &State) -> PeerState {
    let sb = meta.superblock();
    PeerState {
        role: st.role(),
        disk: st.disk(),
        gens: sb.gens,
        crashed_primary: sb.flags.crashed_primary,
        rolled_back: sb.flags.rolled_back,
        peer_unflushed: sb.flags.peer_unflushed,
        out_of_sync_bytes: meta.out_of_sync_bytes(),
        discard_my_data: st.discard_my_data,
        epoch: sb.epoch,
        primary_epoch: sb.primary_epoch,
    }
}

/// Fencing granted this node `epoch` (or the handler proved the peer fenced: `None`): the
/// epoch and the "was primary" marks are on disk before the node is primary.
pub fn promotion(meta: &mut Meta, st: &mut State, epoch: Option<u64>) -> Result<(), MetaError> {
    meta.update(|sb| {
        if let Some(e) = epoch {
            sb.epoch = sb.epoch.max(e);
        }
        sb.primary_epoch = sb.epoch;
        sb.flags.was_primary = true;
        sb.flags.outdated = false;
        sb.gens.set_primary(true);
    })?;
    st.promoted();
    Ok(())
}

/// The node stopped being primary without an operator asking (lease, supersession). The
/// state changes first (stopping must not wait for a disk), then the "was primary" marks are
/// cleared. False if it was not primary; a failed record is returned beside it: the next
/// start then reads `was_primary` and treats the stop as a crash, which is safe.
pub fn stepped_down(meta: &mut Meta, st: &mut State) -> (bool, Option<MetaError>) {
    if !st.stepped_down() {
        return (false, None);
    }
    let r = meta
        .update(|sb| {
            sb.flags.was_primary = false;
            sb.gens.set_primary(false);
        })
        .err();
    (true, r)
}

/// This copy lacks writes the other has: Outdated on disk, then in the state. Returns
/// whether the state changed (it was UpToDate), and a failed record. The state changes even
/// if the record failed: a copy that may be stale must not promote now, and at the next
/// start the peer's handshake finds it out again.
pub fn outdated(meta: &mut Meta, st: &mut State) -> (bool, Option<MetaError>) {
    let r = meta.update(|sb| sb.flags.outdated = true).err();
    (st.outdated(), r)
}

/// The witness or an UpToDate identical peer proved this Outdated copy current: recorded,
/// then UpToDate. False if it is not Outdated (a resync began meanwhile) or the record
/// failed.
pub fn proven_current(meta: &mut Meta, st: &mut State) -> Result<bool, MetaError> {
    st.lapsed_in = None;
    // A copy that lost its page cache is not proven by identity of generations: only the
    // full resync that follows its next handshake makes it current.
    if st.disk() != DiskState::Outdated || meta.superblock().flags.rolled_back {
        return Ok(false);
    }
    meta.update(|sb| sb.flags.outdated = false)?;
    Ok(st.proven_current())
}

/// The witness lifted the peer's outdated mark (or there is none to lift): lift the
/// metadata's too, if this node is still primary. True if it was lifted.
pub fn peer_mark_lifted(meta: &mut Meta, st: &State) -> Result<bool, MetaError> {
    if st.role() != super::Role::Primary || !meta.superblock().flags.peer_outdated {
        return Ok(false);
    }
    meta.update(|sb| sb.flags.peer_outdated = false)?;
    Ok(true)
}

/// `invalidate`: this copy's data is discarded, recorded first (not consistent, every block
/// out of sync, on disk), then Inconsistent; a full resync from the peer follows. On error
/// the state is unchanged (the bitmap in memory may already say everything).
pub fn invalidated(meta: &mut Meta, st: &mut State) -> Result<(), MetaError> {
    meta.update(|sb| sb.flags.consistent = false)?;
    meta.set_all_out_of_sync();
    meta.flush_bitmap()?;
    st.invalidated();
    Ok(())
}

/// The resync from a source whose copy is `source` is complete: every block in sync, the
/// source's generations adopted, the copy as current as the source's, all on disk before
/// the state says so. On error nothing changes in the state: the next handshake resyncs
/// again from what the metadata says.
pub fn resync_done_as_target(
    meta: &mut Meta,
    st: &mut State,
    gens: Generations,
    source: DiskState,
) -> Result<DiskState, MetaError> {
    let disk = synced_copy(source);
    let size = meta.superblock().size;
    meta.mark_in_sync(0, size);
    meta.flush_bitmap()?;
    meta.update(|sb| {
        sb.gens.adopt(&gens);
        sb.flags.consistent = true;
        sb.flags.outdated = disk == DiskState::Outdated;
        sb.flags.crashed_primary = false;
        sb.flags.rolled_back = false;
        sb.flags.peer_unflushed = false;
    })?;
    st.resync_done_as_target(source);
    Ok(disk)
}

/// The source pushed every block and the target flushed: the bitmap and the finished
/// generation are on disk; returns the generations the target adopts.
pub fn resync_done_as_source(meta: &mut Meta) -> Result<Generations, MetaError> {
    meta.flush_bitmap()?;
    meta.update(|sb| {
        sb.gens.clear_bitmap();
        sb.flags.crashed_primary = false;
        // Every block of the peer's copy is now this one's: nothing it lost is left there,
        // and nothing it had not flushed.
        sb.flags.rolled_back = false;
        sb.flags.peer_unflushed = false;
    })?;
    Ok(meta.superblock().gens)
}

/// The peer does not have `[offset, offset+len)`: the range is marked (durable through the
/// activity log) and a new data generation is made durable (the lazy bump, only while the
/// bitmap generation is unset). Returns whether a generation was started.
pub fn written_without_peer(
    meta: &mut Meta,
    primary_when_peer_lost: bool,
    offset: u64,
    len: u64,
) -> Result<bool, MetaError> {
    // Marked first: if the new generation fails to persist, the range (written locally,
    // answered with an error) is still resynced rather than left different on the two copies.
    meta.mark_out_of_sync(offset, len);
    let bump = needs_split_generation(meta.superblock().gens.bitmap);
    if bump {
        meta.update(|sb| sb.gens.split_from_peer(primary_when_peer_lost))?;
    }
    Ok(bump)
}

/// The link was lost with `ranges` acknowledged by the peer and not flushed there: marked
/// out of sync, and the bitmap made durable.
pub fn unflushed_lost(meta: &mut Meta, ranges: &[(u64, u64)]) -> Result<(), MetaError> {
    for &(offset, len) in ranges {
        meta.mark_out_of_sync(offset, len);
    }
    meta.flush_bitmap()?;
    if ranges.is_empty() {
        return Ok(());
    }
    meta.update(|sb| sb.flags.peer_unflushed = true)
}

/// The handshake made this node the sync target: its copy is Inconsistent on disk before it
/// reads a single resync block (the state follows in `State::handshake_done`).
pub fn sync_target(meta: &mut Meta) -> Result<(), MetaError> {
    meta.update(|sb| sb.flags.consistent = false)
}

/// `primary --force` of a copy that is not UpToDate (or was never synced: `fresh`): it
/// becomes the reference. A new generation (the old one stays as the bitmap generation, so
/// a peer still at it is a sync target of everything, and only a peer that moved on since is
/// a split brain), every block marked for the peer, all on disk before the state says
/// UpToDate.
pub fn forced_reference(meta: &mut Meta, st: &mut State, fresh: bool) -> Result<(), MetaError> {
    meta.update(|sb| {
        if fresh {
            sb.gens.bitmap = 0;
            sb.gens.current = Generations::random();
        } else {
            sb.gens.new_current(false);
        }
        sb.flags.consistent = true;
        sb.flags.outdated = false;
        sb.flags.rolled_back = false;
    })?;
    meta.set_all_out_of_sync();
    meta.flush_bitmap()?;
    st.forced_up_to_date();
    Ok(())
}
