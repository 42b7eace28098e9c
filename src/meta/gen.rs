//! Generation identifiers: the history of a node's data (DRBD's "UUIDs").

use serde::{Deserialize, Serialize};

/// `create-md` writes this as the current generation: "never synced".
pub const JUST_CREATED: u64 = 4;
/// Bit 0 of a generation records "was primary"; every comparison masks it out.
pub const PRIMARY_BIT: u64 = 1;

thread_local! {
    static SEEDED: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Draw this thread's new generations from `seed` instead of the kernel (the deterministic
/// simulator); `None` goes back to the kernel's random source.
#[doc(hidden)]
pub fn seed_this_thread(seed: Option<u64>) {
    SEEDED.with(|s| s.set(seed));
}

/// current / bitmap / two history slots, as in DRBD 8.4's two-node model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Generations {
    pub current: u64,
    /// The generation the out-of-sync bitmap tracks changes against; 0 while in sync.
    pub bitmap: u64,
    pub history: [u64; 2],
}

impl Generations {
    pub fn just_created() -> Self {
        Self {
            current: JUST_CREATED,
            bitmap: 0,
            history: [0, 0],
        }
    }

    /// A fresh random generation (bit 0 clear, never 0 or JUST_CREATED).
    pub fn random() -> u64 {
        loop {
            let v = SEEDED.with(|s| {
                s.get().map(|x| {
                    // splitmix64: the simulator's runs repeat from their seed.
                    let x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
                    s.set(Some(x));
                    let mut z = x;
                    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                    z ^ (z >> 31)
                })
            });
            let v = v.unwrap_or_else(|| {
                let mut b = [0u8; 8];
                getrandom::getrandom(&mut b).expect("the kernel's random source");
                u64::from_le_bytes(b)
            }) & !PRIMARY_BIT;
            if v > JUST_CREATED {
                return v;
            }
        }
    }

    /// Shift history: H1 := H0, H0 := `value`.
    fn push_history(&mut self, value: u64) {
        self.history[1] = self.history[0];
        self.history[0] = value;
    }

    /// Start a new data generation: B := C, C := new (DRBD's `uuid_new_current`). The caller
    /// must persist the result before acknowledging any write of the new generation.
    pub fn new_current(&mut self, primary: bool) {
        if self.bitmap == 0 {
            self.bitmap = self.current & !PRIMARY_BIT;
        }
        self.current = Self::random() | if primary { PRIMARY_BIT } else { 0 };
    }

    /// Start a new generation for writes made without the peer (the lazy bump). Bit 0 of the
    /// bitmap generation records whether this node was primary when the peer was lost, which
    /// is what `discard-younger-primary` compares: the node that was still secondary then and
    /// became primary later is the younger primary.
    pub fn split_from_peer(&mut self, primary_when_peer_lost: bool) {
        if self.bitmap == 0 {
            self.bitmap = (self.current & !PRIMARY_BIT)
                | if primary_when_peer_lost {
                    PRIMARY_BIT
                } else {
                    0
                };
        }
        self.current = Self::random() | PRIMARY_BIT;
    }

    /// Clear the bitmap generation, moving it into history (resync finished / in sync).
    pub fn clear_bitmap(&mut self) {
        if self.bitmap != 0 {
            let b = self.bitmap;
            self.push_history(b);
            self.bitmap = 0;
        }
    }

    /// Set or clear the "was primary" bit on the current generation.
    pub fn set_primary(&mut self, primary: bool) {
        if primary {
            self.current |= PRIMARY_BIT;
        } else {
            self.current &= !PRIMARY_BIT;
        }
    }

    /// The sync target adopts the source's history after a successful resync.
    pub fn adopt(&mut self, source: &Generations) {
        self.current = source.current & !PRIMARY_BIT;
        self.bitmap = 0;
        self.history = source.history;
    }
}

/// Format a generation as status and dump-md show it.
pub fn hex(g: u64) -> String {
    format!("{g:016X}")
}
