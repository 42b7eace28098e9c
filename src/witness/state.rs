//! The witness's decisions: plain code that applies one request to the state of one resource.
//!
//! Lease expiry uses the witness's monotonic clock only. A node counts its own lease from
//! when it *sent* the request, which is no later than when the witness received it, so the
//! node's view of its lease ends first; the takeover margin covers clock-rate drift.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::proto::{valid_name, Refusal, Reply, Request, MAX_LEASE_MS};

/// Extra wait past a lease's expiry before another node may take over.
pub fn margin(lease: Duration) -> Duration {
    (lease / 10).max(Duration::from_millis(50))
}

fn ms_ceil(d: Duration) -> u64 {
    let ms = d.as_millis() as u64;
    if Duration::from_millis(ms) < d {
        ms + 1
    } else {
        ms
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub node: String,
    pub expiry: Instant,
}

/// One resource's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceState {
    pub epoch: u64,
    pub holder: Option<Holder>,
    /// The lease length last granted; renewals extend by this much.
    pub lease: Duration,
    pub outdated: BTreeSet<String>,
}

/// What survives a restart (`DATA/<resource>.state`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Persisted {
    pub epoch: u64,
    pub holder: Option<String>,
    pub lease_ms: u64,
    pub outdated: Vec<String>,
}

impl ResourceState {
    pub fn persisted(&self) -> Persisted {
        Persisted {
            epoch: self.epoch,
            holder: self.holder.as_ref().map(|h| h.node.clone()),
            lease_ms: self.lease.as_millis() as u64,
            outdated: self.outdated.iter().cloned().collect(),
        }
    }

    /// Expiry times do not survive a restart, so a holder's lease restarts at `now`: it can
    /// only delay a takeover, never allow an early one.
    pub fn restore(p: Persisted, now: Instant) -> Self {
        let lease = Duration::from_millis(p.lease_ms.min(MAX_LEASE_MS));
        Self {
            epoch: p.epoch,
            holder: p.holder.map(|node| Holder {
                node,
                expiry: now + lease,
            }),
            lease,
            outdated: p.outdated.into_iter().collect(),
        }
    }

    fn superseded(&self) -> Reply {
        Reply::Refused(Refusal::Superseded {
            epoch: self.epoch,
            holder: self.holder.as_ref().map(|h| h.node.clone()),
        })
    }

    fn holds(&self, node: &str, epoch: u64) -> bool {
        epoch == self.epoch && self.holder.as_ref().is_some_and(|h| h.node == node)
    }

    /// Apply one request from `node`; returns the reply and whether the persisted part changed
    /// (and so must be on disk before the reply is sent).
    pub fn apply(&mut self, node: &str, req: Request, now: Instant) -> (Reply, bool) {
        let before = self.persisted();
        let reply = self.decide(node, req, now);
        let changed = self.persisted() != before;
        (reply, changed)
    }

    fn decide(&mut self, node: &str, req: Request, now: Instant) -> Reply {
        let invalid = |reason: String| Reply::Refused(Refusal::Invalid { reason });
        match req {
            Request::Acquire {
                have_epoch,
                lease_ms,
                outdate_peer,
                force,
            } => {
                if lease_ms == 0 || lease_ms > MAX_LEASE_MS {
                    return invalid(format!(
                        "lease of {lease_ms} ms is outside 1..={MAX_LEASE_MS} ms"
                    ));
                }
                if let Some(p) = &outdate_peer {
                    if p == node || !valid_name(p) {
                        return invalid(format!("{p:?} cannot be outdated by {node}"));
                    }
                }
                if self.outdated.contains(node) && !force {
                    return Reply::Refused(Refusal::Outdated { epoch: self.epoch });
                }
                if let Some(h) = &self.holder {
                    let takeover = h.expiry + margin(self.lease);
                    if h.node != node && now < takeover {
                        return Reply::Refused(Refusal::LeaseHeld {
                            holder: h.node.clone(),
                            epoch: self.epoch,
                            remaining_ms: ms_ceil(takeover - now),
                        });
                    }
                }
                let Some(epoch) = self.epoch.max(have_epoch).checked_add(1) else {
                    return invalid("epoch would overflow".into());
                };
                let lease = Duration::from_millis(lease_ms);
                self.epoch = epoch;
                self.lease = lease;
                self.holder = Some(Holder {
                    node: node.to_owned(),
                    expiry: now + lease,
                });
                self.outdated.remove(node);
                if let Some(p) = outdate_peer {
                    self.outdated.insert(p);
                }
                Reply::Granted { epoch }
            }
            Request::Renew { epoch } => {
                if !self.holds(node, epoch) {
                    return self.superseded();
                }
                self.renew(now);
                Reply::Renewed { epoch }
            }
            Request::Release { epoch } => {
                if !self.holds(node, epoch) {
                    return self.superseded();
                }
                self.holder = None;
                Reply::Released
            }
            Request::Outdate { epoch, peer } => {
                if !self.holds(node, epoch) {
                    return self.superseded();
                }
                if peer == node || !valid_name(&peer) {
                    return invalid(format!("{peer:?} cannot be outdated by {node}"));
                }
                self.outdated.insert(peer);
                self.renew(now);
                Reply::PeerOutdated { epoch }
            }
            Request::InSync { epoch, peer } => {
                if !self.holds(node, epoch) {
                    return self.superseded();
                }
                self.outdated.remove(&peer);
                Reply::Ok
            }
            Request::Query => Reply::State {
                epoch: self.epoch,
                holder: self.holder.as_ref().map(|h| h.node.clone()),
                lease_remaining_ms: self
                    .holder
                    .as_ref()
                    .map(|h| ms_ceil(h.expiry.saturating_duration_since(now))),
                outdated: self.outdated.iter().cloned().collect(),
            },
        }
    }

    fn renew(&mut self, now: Instant) {
        if let Some(h) = &mut self.holder {
            h.expiry = now + self.lease;
        }
    }
}

/// Every resource the witness knows.
#[derive(Debug, Default)]
pub struct WitnessState {
    pub resources: HashMap<String, ResourceState>,
}

impl WitnessState {
    /// The epoch of `resource` (0 if it has never been seen).
    pub fn epoch(&self, resource: &str) -> u64 {
        self.resources.get(resource).map_or(0, |r| r.epoch)
    }

    /// Apply a request in memory; returns the reply and whether it must be persisted.
    pub fn apply(
        &mut self,
        resource: &str,
        node: &str,
        req: Request,
        now: Instant,
    ) -> (Reply, bool) {
        self.resources
            .entry(resource.to_owned())
            .or_default()
            .apply(node, req, now)
    }

    /// Apply a request and, if it changed what is persisted, `save` it before the change
    /// takes effect. A failed save leaves the state as it was and refuses the request, so no
    /// reply ever promises something a restart would forget.
    pub fn apply_durably(
        &mut self,
        resource: &str,
        node: &str,
        req: Request,
        now: Instant,
        save: impl FnOnce(&str, &Persisted) -> io::Result<()>,
    ) -> Reply {
        let mut next = self.resources.get(resource).cloned().unwrap_or_default();
        let (reply, persist) = next.apply(node, req, now);
        if persist {
            if let Err(e) = save(resource, &next.persisted()) {
                return Reply::Refused(Refusal::Unavailable {
                    reason: e.to_string(),
                });
            }
        }
        self.resources.insert(resource.to_owned(), next);
        reply
    }

    /// Load every `*.state` file in `dir`. A state file that cannot be read is an error:
    /// silently forgetting an outdated node could let it promote over newer data.
    pub fn load(dir: &Path, now: Instant) -> io::Result<Self> {
        let mut state = Self::default();
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some(resource) = name.strip_suffix(".state") else {
                continue;
            };
            if !valid_name(resource) {
                tracing::warn!("ignoring {}: not a valid resource name", path.display());
                continue;
            }
            let text = fs::read(&path)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            let p: Persisted = serde_json::from_slice(&text).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is not a valid witness state file: {e}", path.display()),
                )
            })?;
            state
                .resources
                .insert(resource.to_owned(), ResourceState::restore(p, now));
        }
        Ok(state)
    }
}

pub fn state_path(dir: &Path, resource: &str) -> PathBuf {
    dir.join(format!("{resource}.state"))
}

/// Write `DATA/<resource>.state` atomically and durably: temp file, fsync, rename, fsync dir.
pub fn save(dir: &Path, resource: &str, p: &Persisted) -> io::Result<()> {
    let tmp = dir.join(format!(".{resource}.state.tmp"));
    let body = serde_json::to_vec_pretty(p).map_err(io::Error::other)?;
    let mut f = fs::File::create(&tmp)?;
    f.write_all(&body)?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, state_path(dir, resource))?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: u64 = 1000;

    fn acquire(have: u64, peer: Option<&str>, force: bool) -> Request {
        Request::Acquire {
            have_epoch: have,
            lease_ms: LEASE,
            outdate_peer: peer.map(str::to_owned),
            force,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn margin_is_a_tenth_but_at_least_50ms() {
        assert_eq!(margin(ms(2000)), ms(200));
        assert_eq!(margin(ms(300)), ms(50));
    }

    #[test]
    fn acquire_grants_a_new_epoch_above_both_sides() {
        let t = Instant::now();
        let mut s = ResourceState::default();
        assert_eq!(
            s.apply("alpha", acquire(0, None, false), t),
            (Reply::Granted { epoch: 1 }, true)
        );
        // The node's own epoch wins when it is ahead (e.g. a witness with a fresh data dir).
        let (r, _) = s.apply("alpha", acquire(9, None, false), t);
        assert_eq!(r, Reply::Granted { epoch: 10 });
        // The witness's wins when it is ahead.
        let (r, _) = s.apply("alpha", acquire(2, None, false), t);
        assert_eq!(r, Reply::Granted { epoch: 11 });
        assert_eq!(s.holder.as_ref().unwrap().node, "alpha");
        assert_eq!(s.holder.as_ref().unwrap().expiry, t + ms(LEASE));
    }

    #[test]
    fn a_live_lease_blocks_others_until_expiry_plus_margin_even_with_force() {
        let t = Instant::now();
        let mut s = ResourceState::default();
        s.apply("alpha", acquire(0, None, false), t);
        let end = t + ms(LEASE) + margin(ms(LEASE));
        for (at, force) in [(t, false), (t + ms(LEASE), true), (end - ms(1), true)] {
            let (r, persist) = s.apply("beta", acquire(0, Some("alpha"), force), at);
            let Reply::Refused(Refusal::LeaseHeld {
                holder,
                epoch,
                remaining_ms,
            }) = r
            else {
                panic!("{r:?}");
            };
            assert_eq!((holder.as_str(), epoch, persist), ("alpha", 1, false));
            assert_eq!(remaining_ms, ms_ceil(end - at));
        }
        let (r, _) = s.apply("beta", acquire(0, Some("alpha"), false), end);
        assert_eq!(r, Reply::Granted { epoch: 2 });
        assert_eq!(s.outdated, BTreeSet::from(["alpha".to_owned()]));
    }

    #[test]
    fn the_holder_may_reacquire_with_a_new_epoch() {
        let t = Instant::now();
        let mut s = ResourceState::default();
        s.apply("alpha", acquire(0, None, false), t);
        let (r, _) = s.apply("alpha", acquire(1, None, false), t + ms(10));
        assert_eq!(r, Reply::Granted { epoch: 2 });
    }

    #[test]
    fn an_outdated_node_is_refused_unless_forced() {
        let t = Instant::now();
        let mut s = ResourceState::default();
        s.apply("alpha", acquire(0, Some("beta"), false), t);
        s.apply("alpha", Request::Release { epoch: 1 }, t);
        let (r, persist) = s.apply("beta", acquire(0, None, false), t);
        assert_eq!(
            (r, persist),
            (Reply::Refused(Refusal::Outdated { epoch: 1 }), false)
        );
        let (r, _) = s.apply("beta", acquire(0, Some("alpha"), true), t);
        assert_eq!(r, Reply::Granted { epoch: 2 });
        // Forcing clears this node's mark and marks the peer.
        assert_eq!(s.outdated, BTreeSet::from(["alpha".to_owned()]));
    }

    #[test]
    fn the_outdated_check_comes_before_the_lease_check() {
        let t = Instant::now();
        let mut s = ResourceState::default();
        s.apply("alpha", acquire(0, Some("beta"), false), t);
        let (r, _) = s.apply("beta", acquire(0, None, false), t);
        assert_eq!(r, Reply::Refused(Refusal::Outdated { epoch: 1 }));
        let (r, _) = s.apply("beta", acquire(0, None, true), t);
        assert!(
            matches!(r, Reply::Refused(Refusal::LeaseHeld { .. })),
            "{r:?}"
        );
    }

    #[test]
    fn renew_extends_only_the_current_holders_lease() {
        let t = Instant::now();
        let mut s = ResourceState::default();
        s.apply("alpha", acquire(0, None, false), t);
        let (r, persist) = s.apply("alpha", Request::Renew { epoch: 1 }, t + ms(900));
        assert_eq!((r, persist), (Reply::Renewed { epoch: 1 }, false));
        assert_eq!(s.holder.as_ref().unwrap().expiry, t + ms(1900));
        // The renewal pushed the takeover point out.
        let (r, _) = s.apply("beta", acquire(0, None, false), t + ms(1500));
        assert!(matches!(r, Reply::Refused(Refusal::LeaseHeld { .. })));

        let superseded = Reply::Refused(Refusal::Superseded {
            epoch: 1,
            holder: Some("alpha".into()),
        });
        assert_eq!(
            s.apply("alpha", Request::Renew { epoch: 0 }, t).0,
            superseded
        );
        assert_eq!(
            s.apply("beta", Request::Renew { epoch: 1 }, t).0,
            superseded
        );
    }

    #[test]
    fn the_old_primary_is_superseded_after_a_takeover() {
        let t = Instant::now();
        let mut s = ResourceState::default();
        s.apply("alpha", acquire(0, None, false), t);
        let later = t + ms(5000);
        assert_eq!(
            s.apply("beta", acquire(1, Some("alpha"), false), later).0,
            Reply::Granted { epoch: 2 }
        );
        let superseded = Reply::Refused(Refusal::Superseded {
            epoch: 2,
            holder: Some("beta".into()),
        });
        for req in [
            Request::Renew { epoch: 1 },
            Request::Release { epoch: 1 },
            Request::Outdate {
                epoch: 1,
                peer: "beta".into(),
            },
            Request::InSync {
                epoch: 1,
                peer: "beta".into(),
            },
        ] {
            assert_eq!(s.apply("alpha", req, later), (superseded.clone(), false));
        }
        assert_eq!(s.holder.as_ref().unwrap().node, "beta");
        assert_eq!(s.outdated, BTreeSet::from(["alpha".to_owned()]));
    }

    #[test]
    fn release_frees_the_lease_at_once() {
        let t = Instant::now();
        let mut s = ResourceState::default();
        s.apply("alpha", acquire(0, None, false), t);
        assert_eq!(
            s.apply("alpha", Request::Release { epoch: 1 }, t),
            (Reply::Released, true)
        );
        assert_eq!(s.holder, None);
        assert_eq!(
            s.apply("alpha", Request::Release { epoch: 1 }, t).0,
            Reply::Refused(Refusal::Superseded {
                epoch: 1,
                holder: None
            })
        );
        assert_eq!(
            s.apply("beta", acquire(0, None, false), t).0,
            Reply::Granted { epoch: 2 }
        );
    }

    #[test]
    fn outdate_marks_the_peer_and_renews() {
        let t = Instant::now();
        let mut s = ResourceState::default();
        s.apply("alpha", acquire(0, None, false), t);
        let req = Request::Outdate {
            epoch: 1,
            peer: "beta".into(),
        };
        assert_eq!(
            s.apply("alpha", req, t + ms(800)),
            (Reply::PeerOutdated { epoch: 1 }, true)
        );
        assert_eq!(s.holder.as_ref().unwrap().expiry, t + ms(1800));
        assert!(s.outdated.contains("beta"));
        let self_outdate = Request::Outdate {
            epoch: 1,
            peer: "alpha".into(),
        };
        assert!(matches!(
            s.apply("alpha", self_outdate, t).0,
            Reply::Refused(Refusal::Invalid { .. })
        ));
    }

    #[test]
    fn in_sync_clears_the_mark() {
        let t = Instant::now();
        let mut s = ResourceState::default();
        s.apply("alpha", acquire(0, Some("beta"), false), t);
        let req = |epoch| Request::InSync {
            epoch,
            peer: "beta".into(),
        };
        assert!(matches!(
            s.apply("alpha", req(0), t).0,
            Reply::Refused(Refusal::Superseded { .. })
        ));
        assert!(s.outdated.contains("beta"));
        assert_eq!(s.apply("alpha", req(1), t), (Reply::Ok, true));
        assert!(s.outdated.is_empty());
        // Nothing left to change: nothing to persist.
        assert_eq!(s.apply("alpha", req(1), t), (Reply::Ok, false));
        s.apply("alpha", Request::Release { epoch: 1 }, t);
        assert_eq!(
            s.apply("beta", acquire(0, None, false), t).0,
            Reply::Granted { epoch: 2 }
        );
    }

    #[test]
    fn query_reports_everything() {
        let t = Instant::now();
        let mut s = ResourceState::default();
        assert_eq!(
            s.apply("alpha", Request::Query, t),
            (
                Reply::State {
                    epoch: 0,
                    holder: None,
                    lease_remaining_ms: None,
                    outdated: vec![]
                },
                false
            )
        );
        s.apply("alpha", acquire(4, Some("beta"), false), t);
        assert_eq!(
            s.apply("beta", Request::Query, t + ms(400)).0,
            Reply::State {
                epoch: 5,
                holder: Some("alpha".into()),
                lease_remaining_ms: Some(600),
                outdated: vec!["beta".into()]
            }
        );
        let Reply::State {
            lease_remaining_ms, ..
        } = s.apply("beta", Request::Query, t + ms(4000)).0
        else {
            panic!()
        };
        assert_eq!(lease_remaining_ms, Some(0));
    }

    #[test]
    fn malformed_requests_are_refused_without_change() {
        let t = Instant::now();
        let mut s = ResourceState::default();
        for req in [
            Request::Acquire {
                have_epoch: 0,
                lease_ms: 0,
                outdate_peer: None,
                force: false,
            },
            Request::Acquire {
                have_epoch: 0,
                lease_ms: u64::MAX,
                outdate_peer: None,
                force: false,
            },
            acquire(0, Some("alpha"), false),
            acquire(0, Some("../x"), false),
            acquire(u64::MAX, None, false),
        ] {
            let (r, persist) = s.apply("alpha", req, t);
            assert!(
                matches!(r, Reply::Refused(Refusal::Invalid { .. })),
                "{r:?}"
            );
            assert!(!persist);
        }
        assert_eq!(s, ResourceState::default());
    }

    #[test]
    fn resources_are_independent() {
        let t = Instant::now();
        let mut w = WitnessState::default();
        w.apply("r0", "alpha", acquire(0, None, false), t);
        assert_eq!(
            w.apply("r1", "beta", acquire(0, None, false), t).0,
            Reply::Granted { epoch: 1 }
        );
        assert_eq!((w.epoch("r0"), w.epoch("r1"), w.epoch("r2")), (1, 1, 0));
    }

    #[test]
    fn a_failed_save_changes_nothing() {
        let t = Instant::now();
        let mut w = WitnessState::default();
        let r = w.apply_durably("r0", "alpha", acquire(0, None, false), t, |_, _| {
            Err(io::Error::other("disk full"))
        });
        assert!(
            matches!(&r, Reply::Refused(Refusal::Unavailable { reason }) if reason == "disk full"),
            "{r:?}"
        );
        assert_eq!(w.epoch("r0"), 0);
        let mut saved = None;
        let r = w.apply_durably("r0", "alpha", acquire(0, None, false), t, |res, p| {
            saved = Some((res.to_owned(), p.clone()));
            Ok(())
        });
        assert_eq!(r, Reply::Granted { epoch: 1 });
        assert_eq!(saved.unwrap().1.holder.as_deref(), Some("alpha"));
        // Renewals are not saved.
        let r = w.apply_durably("r0", "alpha", Request::Renew { epoch: 1 }, t, |_, _| {
            panic!("renew must not persist")
        });
        assert_eq!(r, Reply::Renewed { epoch: 1 });
    }

    #[test]
    fn a_restart_keeps_the_state_and_restarts_the_holders_lease() {
        let dir = tempfile::tempdir().unwrap();
        let t = Instant::now();
        let mut w = WitnessState::default();
        let save_to = |res: &str, p: &Persisted| save(dir.path(), res, p);
        w.apply_durably("r0", "alpha", acquire(6, Some("beta"), false), t, save_to);
        w.apply_durably("r1", "gamma", acquire(0, None, false), t, save_to);
        w.apply_durably("r1", "gamma", Request::Release { epoch: 1 }, t, save_to);
        // A leftover temp file and unrelated files are ignored.
        std::fs::write(dir.path().join(".r2.state.tmp"), "garbage").unwrap();
        std::fs::write(dir.path().join("r0.secret"), "k").unwrap();

        let later = t + ms(60_000);
        let mut back = WitnessState::load(dir.path(), later).unwrap();
        assert_eq!(back.resources.len(), 2);
        let r0 = &back.resources["r0"];
        assert_eq!(r0.epoch, 7);
        assert_eq!(r0.lease, ms(LEASE));
        assert_eq!(
            r0.holder,
            Some(Holder {
                node: "alpha".into(),
                expiry: later + ms(LEASE)
            })
        );
        assert_eq!(r0.outdated, BTreeSet::from(["beta".to_owned()]));
        assert_eq!(back.resources["r1"].holder, None);
        assert_eq!(back.epoch("r1"), 1);
        // The restored lease holds off a takeover as a fresh one would.
        assert!(matches!(
            back.apply("r0", "gamma", acquire(0, None, false), later + ms(LEASE))
                .0,
            Reply::Refused(Refusal::LeaseHeld { .. })
        ));
        assert_eq!(
            back.apply("r0", "alpha", Request::Renew { epoch: 7 }, later)
                .0,
            Reply::Renewed { epoch: 7 }
        );
    }

    #[test]
    fn a_corrupt_state_file_stops_the_load() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("r0.state"), "{not json").unwrap();
        let e = WitnessState::load(dir.path(), Instant::now()).unwrap_err();
        assert!(e.to_string().contains("r0.state"), "{e}");
    }
}
