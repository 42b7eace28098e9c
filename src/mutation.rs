//! Safety mechanisms the simulator can switch off, one at a time, to show that its checks
//! catch their loss (issue 12, step 5). Only a build with the `mutations` feature has the
//! switch; without it `active` is a constant `false` and every hook compiles away. Even with
//! it, a mutation is active only on the thread that set it (the simulator's run), never in a
//! node.

/// One mechanism to remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    /// A primary acknowledges writes without its peer even when its lease ran out, and never
    /// steps down for a lapsed lease.
    LeaseCheck,
    /// A primary that loses its peer goes on alone at once, without fencing it.
    LinkLossFencing,
    /// Writes the peer acknowledged but did not flush are forgotten when the link is lost.
    UnflushedSet,
    /// The first write acknowledged without the peer does not start a new data generation.
    NewGeneration,
    /// Writes do not enter the activity log, so a crash replays nothing.
    ActivityLog,
    /// A node promoted while its peer was in sync goes on alone when the link is lost
    /// during the promotion, without fencing the peer.
    PromotionFence,
    /// A node does not notice that its machine went down (the boot id is ignored), so a copy
    /// that lost its page cache comes back as current as it was.
    PowerLossDetection,
    /// No data flush before a copy becomes the source for another (the sync handshake, each
    /// resync round, the first write without the peer, a forced promotion).
    SourceFlush,
    /// A superblock write whose fdatasync failed is not written back: the file keeps the
    /// new block while memory keeps the old.
    SuperblockWriteBack,
    /// When both machines went down, the epoch each side was last promoted in is ignored:
    /// the side that crashed as primary wins over one promoted later that stepped down.
    PrimaryEpoch,
    /// An activity-log transaction whose write or fdatasync failed leaves memory as it was:
    /// the extents it evicted stay hot in memory though the file may no longer hold them.
    AlForget,
    /// A promotion takes the role even when the copy changed during the witness's round
    /// trip (a handshake made it a sync target, or the peer primary).
    PromotionRecheck,
}

impl Mutation {
    pub const ALL: [Mutation; 12] = [
        Mutation::LeaseCheck,
        Mutation::LinkLossFencing,
        Mutation::UnflushedSet,
        Mutation::NewGeneration,
        Mutation::ActivityLog,
        Mutation::PromotionFence,
        Mutation::PowerLossDetection,
        Mutation::SourceFlush,
        Mutation::SuperblockWriteBack,
        Mutation::PrimaryEpoch,
        Mutation::AlForget,
        Mutation::PromotionRecheck,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mutation::LeaseCheck => "lease-check",
            Mutation::LinkLossFencing => "link-loss-fencing",
            Mutation::UnflushedSet => "unflushed-set",
            Mutation::NewGeneration => "new-generation",
            Mutation::ActivityLog => "activity-log",
            Mutation::PromotionFence => "promotion-fence",
            Mutation::PowerLossDetection => "power-loss-detection",
            Mutation::SourceFlush => "source-flush",
            Mutation::SuperblockWriteBack => "superblock-write-back",
            Mutation::PrimaryEpoch => "primary-epoch",
            Mutation::AlForget => "al-forget",
            Mutation::PromotionRecheck => "promotion-recheck",
        }
    }

    pub fn parse(s: &str) -> Option<Mutation> {
        Self::ALL.into_iter().find(|m| m.name() == s)
    }
}

#[cfg(feature = "mutations")]
thread_local! {
    static ACTIVE: std::cell::Cell<Option<Mutation>> = const { std::cell::Cell::new(None) };
}

/// Switch `m` on (or everything off) for this thread. Without the `mutations` feature this
/// panics: a mutation that silently does nothing would make its row of the table a lie.
pub fn set(m: Option<Mutation>) {
    #[cfg(feature = "mutations")]
    ACTIVE.with(|a| a.set(m));
    #[cfg(not(feature = "mutations"))]
    if m.is_some() {
        panic!("this build has no mutations (build with the `mutations` feature)");
    }
}

/// Whether `m` is switched off on this thread.
#[inline]
pub fn active(m: Mutation) -> bool {
    #[cfg(feature = "mutations")]
    {
        ACTIVE.with(|a| a.get() == Some(m))
    }
    #[cfg(not(feature = "mutations"))]
    {
        let _ = m;
        false
    }
}
