//! What the client was promised, and the checks against it (DESIGN.md's invariants as the
//! simulator sees them).

use crate::world::Micros;

/// One tracked block's history as the client knows it.
#[derive(Debug, Clone)]
pub struct Hist {
    /// Every value the client wrote to the block, in order; `issued[0]` is the initial 0.
    pub issued: Vec<u64>,
    /// Index of the latest acknowledged write.
    pub acked: usize,
    /// Index of the latest write an acknowledged flush covers.
    pub floor: usize,
    /// Every copy that held the writes after `floor` was lost in a crash before it was
    /// flushed: any value since `floor` may be what the block holds now.
    pub widened: bool,
}

impl Default for Hist {
    fn default() -> Self {
        Self {
            issued: vec![0],
            acked: 0,
            floor: 0,
            widened: false,
        }
    }
}

impl Hist {
    /// The values a read may return now.
    pub fn allowed(&self) -> &[u64] {
        let from = if self.widened { self.floor } else { self.acked };
        &self.issued[from..]
    }

    /// Whether a copy holding `v` has the latest acknowledged write (or something newer).
    pub fn current(&self, v: u64) -> bool {
        self.issued[self.acked..].contains(&v)
    }
}

/// The client's view of the volume.
pub struct Expect {
    pub blocks: Vec<Hist>,
}

impl Expect {
    pub fn new(n: usize) -> Self {
        Self {
            blocks: vec![Hist::default(); n],
        }
    }

    pub fn issue(&mut self, b: usize, v: u64) -> usize {
        self.blocks[b].issued.push(v);
        self.blocks[b].issued.len() - 1
    }

    pub fn acked(&mut self, b: usize, idx: usize) {
        let h = &mut self.blocks[b];
        if idx > h.acked {
            h.acked = idx;
            h.widened = false;
        }
    }

    /// A flush was issued: what it covers once acknowledged.
    pub fn flush_snapshot(&self) -> Vec<usize> {
        self.blocks.iter().map(|h| h.acked).collect()
    }

    /// What the copies hold at least when they are in sync: the latest acknowledged write,
    /// or, where a crash already lost it, the flushed one.
    pub fn sync_snapshot(&self) -> Vec<usize> {
        self.blocks
            .iter()
            .map(|h| if h.widened { h.floor } else { h.acked })
            .collect()
    }

    /// An operator's split-brain resolution discarded one side's writes since `snap` (the
    /// acknowledged writes when the forced promotion split the copies): any of them, or
    /// what was there before, may be what the block holds now.
    pub fn discarded_since(&mut self, snap: &[usize]) {
        for (h, &i) in self.blocks.iter_mut().zip(snap) {
            h.widened = true;
            h.floor = h.floor.min(i);
        }
    }

    /// An operator forced a copy that holds `v` in block `b` to be the reference: what it
    /// lacks is given up (`primary --force` says so).
    pub fn forced(&mut self, b: usize, v: u64) {
        let h = &mut self.blocks[b];
        if h.current(v) {
            return;
        }
        if let Some(i) = h.issued.iter().rposition(|&x| x == v) {
            h.widened = true;
            h.floor = h.floor.min(i);
        }
    }

    pub fn flushed(&mut self, snap: &[usize]) {
        for (h, &i) in self.blocks.iter_mut().zip(snap) {
            // A flush does not bring back what a crash already lost.
            if !h.widened {
                h.floor = h.floor.max(i);
            }
        }
    }

    /// A read of block `b` returned `v` from `node`: the violation, if it is not allowed.
    pub fn check_read(&self, b: usize, v: u64, node: &str, why: &str) -> Option<String> {
        let h = &self.blocks[b];
        (!h.allowed().contains(&v)).then(|| {
            format!(
                "lost acknowledged write: block {b} on {node} ({why}) holds {v}, allowed {:?} \
                 (latest acknowledged {}, flushed {}, widened {})",
                h.allowed(),
                h.issued[h.acked],
                h.issued[h.floor],
                h.widened
            )
        })
    }
}

/// Who acknowledged writes in which epoch, for the one-writer rule.
#[derive(Default)]
pub struct Writers {
    /// Per node: the highest epoch it acknowledged a write in, and when.
    newest: [Option<(u64, Micros)>; 2],
    /// Per node: epochs it acknowledged a write in without its peer.
    alone: [Vec<u64>; 2],
    /// Per node: the epochs it was promoted to, and when.
    promoted: [Vec<(u64, Micros)>; 2],
}

impl Writers {
    /// Node `i` became primary in `epoch` at `t`.
    pub fn promoted(&mut self, i: usize, epoch: u64, t: Micros) {
        self.promoted[i].push((epoch, t));
    }

    /// Node `i` acknowledged a write in `epoch` at `t` (`alone`: without its peer).
    pub fn acked(
        &mut self,
        i: usize,
        name: &str,
        epoch: u64,
        alone: bool,
        t: Micros,
    ) -> Option<String> {
        let other = 1 - i;
        let mut bad = None;
        if let Some((e, at)) = self.newest[other] {
            if e > epoch && at <= t {
                bad = Some(format!(
                    "two writers: {name} acknowledged a write in epoch {epoch} after its peer \
                     acknowledged one in epoch {e}"
                ));
            }
        }
        // The witness granted the peer a newer epoch only after this node's lease ran out:
        // it must have stopped acknowledging by then.
        if let Some(&(e, _)) = self.promoted[other]
            .iter()
            .find(|&&(e, at)| e > epoch && at <= t)
        {
            bad = Some(format!(
                "two writers: {name} acknowledged a write in epoch {epoch} after its peer was \
                 promoted in epoch {e}"
            ));
        }
        if alone && self.alone[other].contains(&epoch) {
            bad = Some(format!(
                "two writers: both nodes acknowledged writes without their peer in epoch {epoch}"
            ));
        }
        if alone && !self.alone[i].contains(&epoch) {
            self.alone[i].push(epoch);
        }
        if self.newest[i].is_none_or(|(e, _)| epoch >= e) {
            self.newest[i] = Some((epoch, t));
        }
        bad
    }
}

/// The result of one seed.
#[derive(Debug, Default)]
pub struct Outcome {
    pub seed: u64,
    pub violations: Vec<String>,
    /// The last events before the first violation (or of the whole run, when asked).
    pub trace: Vec<String>,
    pub faults: u64,
    pub events: u64,
    pub acked_writes: u64,
    pub acked_flushes: u64,
    pub failed_writes: u64,
    pub reads_checked: u64,
    pub promotions: u64,
    /// Forced promotions (the operator's `primary --force`) and the split brains they caused.
    pub forced: u64,
    pub split_brains: u64,
    pub crashes: u64,
    pub sim_micros: Micros,
    /// Simulated time from the end of the faults until the copies were identical and in sync.
    pub converged_after: Option<Micros>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_must_see_the_latest_acknowledged_write_unless_every_copy_was_lost() {
        let mut e = Expect::new(1);
        let i1 = e.issue(0, 11);
        e.acked(0, i1);
        let snap = e.flush_snapshot();
        e.flushed(&snap);
        let i2 = e.issue(0, 12);
        e.acked(0, i2);
        assert!(e.check_read(0, 12, "a", "t").is_none());
        assert!(e.check_read(0, 11, "a", "t").is_some());
        e.blocks[0].widened = true;
        assert!(e.check_read(0, 11, "a", "t").is_none());
        assert!(
            e.check_read(0, 0, "a", "t").is_some(),
            "older than the flush"
        );
        // An unacknowledged write may or may not be there.
        e.issue(0, 13);
        assert!(e.check_read(0, 13, "a", "t").is_none());
    }

    #[test]
    fn a_stale_primary_writing_after_a_newer_epoch_is_two_writers() {
        let mut w = Writers::default();
        assert!(w.acked(0, "a", 1, false, 10).is_none());
        assert!(w.acked(1, "b", 2, true, 20).is_none());
        assert!(w.acked(0, "a", 1, true, 30).is_some());
        let mut w = Writers::default();
        assert!(w.acked(0, "a", 3, true, 10).is_none());
        assert!(w.acked(1, "b", 3, true, 20).is_some());
    }
}
