//! The io_uring engine: one ring, owned by one thread, fed by any number of tokio tasks.
//!
//! Submitters push an `Op` onto a shared queue and await a oneshot. The ring thread drains
//! the queue, turns the ops into SQEs and does one `io_uring_enter` per loop iteration, which
//! both submits the batch and waits for completions. An eventfd READ is kept armed on the
//! ring, so a thread blocked in the kernel wakes when a submitter writes the eventfd; the
//! `sleeping` flag limits those writes to the moments the ring thread is about to block.
//!
//! Lost-wakeup argument: the ring thread stores `sleeping = true` and then inspects the
//! queue under its mutex; a submitter pushes under the mutex and then swaps `sleeping` to
//! false. If the ring's inspection came after the push, it sees the op and does not block.
//! Otherwise store(true) → inspection → push → load/swap is a happens-before chain, so the
//! submitter reads true and writes the eventfd (which completes the armed READ, or makes it
//! complete at once if the ring has not entered the kernel yet), or it reads a later false,
//! written by the ring after waking or by another submitter that wrote the eventfd after the
//! ring's store; either way the ring wakes and drains the queue.
//!
//! Every in-flight op lives in a slab slot that owns its buffer until the CQE is reaped, so
//! a caller dropping its future never frees memory the kernel still reads or writes.

use std::collections::VecDeque;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use bytes::Bytes;
use io_uring::{opcode, squeue, types, IoUring};
use tokio::sync::oneshot;

use super::buf::{is_aligned, AlignedBuf};
use super::file::{
    check_range, extents_sync, fadvise_willneed, is_unsupported, needs_aligned_copy,
    read_only_error, start_read, write_cached, zero_chunks, zeroes, Backing, ReadStart, PUNCH_MODE,
    ZERO_MODE,
};
use super::{BlockStore, Extent, IoFuture};

const RING_ENTRIES: u32 = 256;
/// Largest single read/write SQE; longer requests continue as "short" transfers.
const MAX_IO: usize = 1 << 30;
/// Concurrent chunk writes of the write-zeroes fallback.
const ZERO_QD: usize = 8;
const EVENTFD_TOKEN: u64 = u64::MAX;
/// Registered file slots.
const FILE_BUFFERED: u32 = 0;
const FILE_DIRECT: u32 = 1;

type Reply = io::Result<Option<AlignedBuf>>;

enum Req {
    Read {
        offset: u64,
        buf: AlignedBuf,
        done: usize,
    },
    Write {
        offset: u64,
        data: Bytes,
        done: usize,
        fua: bool,
    },
    Fsync,
    Fallocate {
        offset: u64,
        len: u64,
        mode: i32,
    },
}

struct Op {
    req: Req,
    reply: oneshot::Sender<Reply>,
}

struct Queue {
    ops: Vec<Op>,
    /// The ring thread has exited; nobody will drain `ops`.
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    sleeping: AtomicBool,
    shutdown: AtomicBool,
    eventfd: OwnedFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn submit(&self, req: Req) -> io::Result<oneshot::Receiver<Reply>> {
        let (tx, rx) = oneshot::channel();
        {
            let mut q = self.lock();
            if q.closed {
                return Err(thread_gone());
            }
            q.ops.push(Op { req, reply: tx });
        }
        // The load keeps the common (ring busy) case free of a contended RMW.
        if self.sleeping.load(SeqCst) && self.sleeping.swap(false, SeqCst) {
            self.wake();
        }
        Ok(rx)
    }

    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64. Cannot block: the counter never nears 2^64.
        unsafe {
            libc::write(
                self.eventfd.as_raw_fd(),
                (&one as *const u64).cast(),
                mem::size_of::<u64>(),
            );
        }
    }
}

fn thread_gone() -> io::Error {
    io::Error::other("the io_uring thread has exited")
}

pub struct UringStore {
    shared: Arc<Shared>,
    backing: Arc<Backing>,
    /// preadv2(RWF_NOWAIT) works on this file (see read_cached).
    nowait_reads: AtomicBool,
    thread: Option<JoinHandle<()>>,
}

fn describe_setup_error(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => "kernel has no io_uring".into(),
        Some(libc::EPERM) => {
            "io_uring disabled (kernel.io_uring_disabled or a seccomp profile)".into()
        }
        _ => format!("io_uring setup failed: {e}"),
    }
}

/// Opcodes the engine needs (all Linux 5.6+).
const NEEDED: [(u8, &str); 4] = [
    (opcode::Read::CODE, "READ"),
    (opcode::Write::CODE, "WRITE"),
    (opcode::Fsync::CODE, "FSYNC"),
    (opcode::Fallocate::CODE, "FALLOCATE"),
];

fn check_opcodes(ring: &IoUring) -> Result<(), String> {
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("kernel io_uring is too old (no opcode probe: {e})"))?;
    for (code, name) in NEEDED {
        if !probe.is_supported(code) {
            return Err(format!("kernel io_uring lacks IORING_OP_{name}"));
        }
    }
    Ok(())
}

impl UringStore {
    /// Check that io_uring works here: create a tiny ring and round-trip a NOP.
    pub fn probe() -> Result<(), String> {
        let mut ring = IoUring::new(2).map_err(|e| describe_setup_error(&e))?;
        check_opcodes(&ring)?;
        let nop = opcode::Nop::new().build().user_data(42);
        // SAFETY: NOP references no memory.
        unsafe { ring.submission().push(&nop) }.map_err(|_| "io_uring queue full".to_string())?;
        ring.submit_and_wait(1)
            .map_err(|e| describe_setup_error(&e))?;
        let cqe = ring
            .completion()
            .next()
            .ok_or_else(|| "io_uring returned no completion for a NOP".to_string())?;
        if cqe.result() < 0 {
            let e = io::Error::from_raw_os_error(-cqe.result());
            return Err(format!("io_uring NOP failed: {e}"));
        }
        Ok(())
    }

    pub fn new(backing: Backing) -> io::Result<UringStore> {
        // SAFETY: eventfd(2) returns a new fd or -1. Blocking on purpose: io_uring would
        // complete a READ on a non-blocking eventfd with EAGAIN instead of waiting.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh fd we own.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                ops: Vec::new(),
                closed: false,
            }),
            sleeping: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            eventfd,
        });
        let backing = Arc::new(backing);

        // The ring is created on its own thread so SINGLE_ISSUER holds.
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let thread = {
            let shared = Arc::clone(&shared);
            let backing = Arc::clone(&backing);
            std::thread::Builder::new()
                .name("tandem-uring".into())
                .spawn(move || {
                    let _close = CloseOnExit(Arc::clone(&shared));
                    let mut ring = match Ring::new(shared, backing) {
                        Ok(r) => {
                            let _ = tx.send(Ok(()));
                            r
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    if let Err(e) = ring.run() {
                        tracing::error!("io_uring thread failed: {e}");
                    }
                })?
        };
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(thread_gone());
            }
        }
        Ok(UringStore {
            shared,
            backing,
            nowait_reads: AtomicBool::new(true),
            thread: Some(thread),
        })
    }

    async fn call(&self, req: Req) -> Reply {
        let rx = self.shared.submit(req)?;
        rx.await.unwrap_or_else(|_| Err(thread_gone()))
    }

    fn writable(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.backing.read_only {
            return Err(read_only_error());
        }
        check_range(self.backing.size, offset, len)
    }

    async fn fallocate(&self, offset: u64, len: u64, mode: i32) -> io::Result<()> {
        self.call(Req::Fallocate { offset, len, mode })
            .await
            .map(drop)
    }

    /// The write-zeroes fallback: chunked writes of the shared zero buffer, a few in flight.
    async fn write_zeroes_by_writing(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut pending = VecDeque::with_capacity(ZERO_QD);
        for (pos, n) in zero_chunks(offset, len) {
            if pending.len() == ZERO_QD {
                wait(pending.pop_front().expect("non-empty")).await?;
            }
            pending.push_back(self.shared.submit(Req::Write {
                offset: pos,
                data: Bytes::from_static(zeroes(n)),
                done: 0,
                fua: false,
            })?);
        }
        for rx in pending {
            wait(rx).await?;
        }
        Ok(())
    }

    fn blocking<T, F>(&self, f: F) -> IoFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&Backing) -> io::Result<T> + Send + 'static,
    {
        let backing = Arc::clone(&self.backing);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&backing))
                .await
                .map_err(|e| io::Error::other(format!("blocking I/O task failed: {e}")))?
        })
    }
}

async fn wait(rx: oneshot::Receiver<Reply>) -> io::Result<()> {
    rx.await.unwrap_or_else(|_| Err(thread_gone())).map(drop)
}

impl Drop for UringStore {
    fn drop(&mut self) {
        // No new ops can arrive (we are borrowed mutably); the thread drains in-flight ones.
        self.shared.shutdown.store(true, SeqCst);
        self.shared.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl BlockStore for UringStore {
    fn size(&self) -> u64 {
        self.backing.size
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        Box::pin(async move {
            let (buf, done) = match start_read(&self.backing, &self.nowait_reads, offset, len)? {
                ReadStart::Done(b) => return Ok(b),
                ReadStart::Partial { buf, done } => (buf, done),
            };
            let req = Req::Read { offset, buf, done };
            let buf = self.call(req).await?.expect("a read returns its buffer");
            Ok(buf.into_bytes())
        })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.writable(offset, data.len() as u64)?;
            if data.is_empty() {
                return Ok(());
            }
            let data = if self.backing.direct.is_some() && needs_aligned_copy(offset, &data) {
                AlignedBuf::from_slice(&data).into_bytes()
            } else {
                data
            };
            let done = write_cached(&self.backing, offset, &data, fua)?;
            if done == data.len() {
                return Ok(());
            }
            let req = Req::Write {
                offset,
                data,
                done,
                fua,
            };
            self.call(req).await.map(drop)
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { self.call(Req::Fsync).await.map(drop) })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.writable(offset, len)?;
            if len == 0 {
                return Ok(());
            }
            match self.fallocate(offset, len, PUNCH_MODE).await {
                Err(e) if is_unsupported(&e) => Ok(()),
                r => r,
            }
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.writable(offset, len)?;
            if len == 0 {
                return Ok(());
            }
            if may_trim {
                match self.fallocate(offset, len, PUNCH_MODE).await {
                    Err(e) if is_unsupported(&e) => {}
                    r => return r,
                }
            }
            match self.fallocate(offset, len, ZERO_MODE).await {
                Err(e) if is_unsupported(&e) => {}
                r => return r,
            }
            self.write_zeroes_by_writing(offset, len).await
        })
    }

    fn extents(&self, offset: u64, len: u64, max_extents: usize) -> IoFuture<'_, Vec<Extent>> {
        self.blocking(move |b| {
            extents_sync(&b.file, b.is_block_device, offset, len, b.size, max_extents)
        })
    }

    fn cache(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.blocking(move |b| fadvise_willneed(&b.file, offset, len))
    }

    fn engine(&self) -> &'static str {
        "io_uring"
    }
}

/// Marks the queue closed when the ring thread exits (normally, on error or by panic), so
/// queued and future submitters get an error instead of waiting forever.
struct CloseOnExit(Arc<Shared>);

impl Drop for CloseOnExit {
    fn drop(&mut self) {
        let ops = {
            let mut q = self.0.lock();
            q.closed = true;
            mem::take(&mut q.ops)
        };
        drop(ops); // outside the lock: dropping senders wakes receivers
    }
}

fn build_ring() -> io::Result<IoUring> {
    // Fewer cross-thread task-work interrupts where the kernel supports it (6.1+, 5.19+).
    let mut b = IoUring::builder();
    b.setup_single_issuer()
        .setup_defer_taskrun()
        .setup_taskrun_flag();
    if let Ok(r) = b.build(RING_ENTRIES) {
        return Ok(r);
    }
    let mut b = IoUring::builder();
    b.setup_coop_taskrun().setup_taskrun_flag();
    if let Ok(r) = b.build(RING_ENTRIES) {
        return Ok(r);
    }
    IoUring::new(RING_ENTRIES)
}

struct Ring {
    ring: IoUring,
    shared: Arc<Shared>,
    /// Keeps the fds open for as long as the ring may use them.
    _backing: Arc<Backing>,
    has_direct: bool,
    slots: Vec<Option<Op>>,
    free: Vec<usize>,
    inflight: usize,
    /// Kept below the CQ size so completions never overflow.
    max_inflight: usize,
    /// Taken from the queue but not yet submitted (only when at max_inflight).
    backlog: VecDeque<Op>,
    /// Slots whose remainder (short transfer, EAGAIN) must be resubmitted.
    retry: Vec<usize>,
    incoming: Vec<Op>,
    cqes: Vec<(u64, i32)>,
    /// The kernel writes the eventfd counter here while the READ is armed (a raw
    /// allocation, since the kernel writes it behind Rust's back).
    efd_buf: *mut u64,
    efd_armed: bool,
}

impl Ring {
    fn new(shared: Arc<Shared>, backing: Arc<Backing>) -> io::Result<Ring> {
        let ring = build_ring().map_err(|e| io::Error::new(e.kind(), describe_setup_error(&e)))?;
        check_opcodes(&ring).map_err(io::Error::other)?;
        let mut fds: Vec<RawFd> = vec![backing.file.as_raw_fd()];
        if let Some(d) = &backing.direct {
            fds.push(d.as_raw_fd());
        }
        ring.submitter().register_files(&fds)?;
        let max_inflight = ring.params().cq_entries() as usize - 1;
        Ok(Ring {
            ring,
            shared,
            has_direct: backing.direct.is_some(),
            _backing: backing,
            slots: Vec::new(),
            free: Vec::new(),
            inflight: 0,
            max_inflight,
            backlog: VecDeque::new(),
            retry: Vec::new(),
            incoming: Vec::new(),
            cqes: Vec::new(),
            efd_buf: Box::into_raw(Box::new(0)),
            efd_armed: false,
        })
    }

    fn run(&mut self) -> io::Result<()> {
        self.arm_eventfd()?;
        loop {
            self.reap()?;
            mem::swap(&mut self.shared.lock().ops, &mut self.incoming);
            self.backlog.extend(self.incoming.drain(..));
            self.push_work()?;

            if self.shared.shutdown.load(SeqCst)
                && self.inflight == 0
                && !self.efd_armed
                && self.backlog.is_empty()
            {
                return Ok(());
            }
            if !self.backlog.is_empty() {
                // At max_inflight: any completion frees a slot.
                self.enter(1)?;
                continue;
            }
            self.shared.sleeping.store(true, SeqCst);
            if !self.shared.lock().ops.is_empty() {
                self.shared.sleeping.store(false, SeqCst);
                self.enter(0)?;
                continue;
            }
            self.enter(1)?;
            self.shared.sleeping.store(false, SeqCst);
        }
    }

    fn enter(&mut self, want: usize) -> io::Result<()> {
        match self.ring.submit_and_wait(want) {
            Ok(_) => Ok(()),
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR | libc::EAGAIN | libc::EBUSY | libc::ETIME) => Ok(()),
                _ => Err(e),
            },
        }
    }

    fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every buffer an entry points at is owned by its slot (or is the
            // eventfd buffer / a static) and outlives the operation.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            // SQ full: hand the batch to the kernel and retry.
            self.enter(0)?;
        }
    }

    fn arm_eventfd(&mut self) -> io::Result<()> {
        let entry = opcode::Read::new(
            types::Fd(self.shared.eventfd.as_raw_fd()),
            self.efd_buf.cast(),
            mem::size_of::<u64>() as u32,
        )
        .build()
        .user_data(EVENTFD_TOKEN);
        self.push(&entry)?;
        self.efd_armed = true;
        Ok(())
    }

    fn push_work(&mut self) -> io::Result<()> {
        for idx in mem::take(&mut self.retry) {
            let e = self.entry(idx);
            self.push(&e)?;
        }
        while self.inflight < self.max_inflight {
            let Some(op) = self.backlog.pop_front() else {
                break;
            };
            let idx = match self.free.pop() {
                Some(i) => {
                    self.slots[i] = Some(op);
                    i
                }
                None => {
                    self.slots.push(Some(op));
                    self.slots.len() - 1
                }
            };
            self.inflight += 1;
            let e = self.entry(idx);
            self.push(&e)?;
        }
        Ok(())
    }

    /// The SQE for (the remainder of) the op in slot `idx`.
    fn entry(&mut self, idx: usize) -> squeue::Entry {
        let has_direct = self.has_direct;
        let fd = |off: u64, len: usize, ptr: *const u8| {
            types::Fixed(if has_direct && is_aligned(off, len, ptr) {
                FILE_DIRECT
            } else {
                FILE_BUFFERED
            })
        };
        let op = self.slots[idx].as_mut().expect("live slot");
        let entry = match &mut op.req {
            Req::Read { offset, buf, done } => {
                let len = (buf.len() - *done).min(MAX_IO);
                // SAFETY: done < buf.len(), so the pointer stays inside the allocation.
                let ptr = unsafe { buf.as_mut_ptr().add(*done) };
                let off = *offset + *done as u64;
                opcode::Read::new(fd(off, len, ptr), ptr, len as u32)
                    .offset(off)
                    .build()
            }
            Req::Write {
                offset,
                data,
                done,
                fua,
            } => {
                let rest = &data[*done..];
                let len = rest.len().min(MAX_IO);
                let off = *offset + *done as u64;
                let flags = if *fua { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(fd(off, len, rest.as_ptr()), rest.as_ptr(), len as u32)
                    .offset(off)
                    .rw_flags(flags)
                    .build()
            }
            Req::Fsync => opcode::Fsync::new(types::Fixed(FILE_BUFFERED))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Req::Fallocate { offset, len, mode } => {
                opcode::Fallocate::new(types::Fixed(FILE_BUFFERED), *len)
                    .offset(*offset)
                    .mode(*mode)
                    .build()
            }
        };
        entry.user_data(idx as u64)
    }

    fn reap(&mut self) -> io::Result<()> {
        let mut cqes = mem::take(&mut self.cqes);
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(token, res) in &cqes {
            self.complete(token, res)?;
        }
        cqes.clear();
        self.cqes = cqes;
        Ok(())
    }

    fn complete(&mut self, token: u64, res: i32) -> io::Result<()> {
        if token == EVENTFD_TOKEN {
            self.efd_armed = false;
            if !self.shared.shutdown.load(SeqCst) {
                self.arm_eventfd()?;
            }
            return Ok(());
        }
        let idx = token as usize;
        let op = self.slots[idx]
            .as_mut()
            .expect("completion for a live slot");
        let outcome = if res < 0 {
            match -res {
                libc::EAGAIN | libc::EINTR => None,
                errno => Some(Err(io::Error::from_raw_os_error(errno))),
            }
        } else {
            let n = res as usize;
            match &mut op.req {
                // EOF: the rest reads as zero.
                Req::Read { buf, done, .. } if n == 0 => {
                    buf[*done..].fill(0);
                    Some(Ok(()))
                }
                Req::Read { buf, done, .. } => {
                    *done += n;
                    (*done >= buf.len()).then_some(Ok(()))
                }
                Req::Write { .. } if n == 0 => Some(Err(io::ErrorKind::WriteZero.into())),
                Req::Write { data, done, .. } => {
                    *done += n;
                    (*done >= data.len()).then_some(Ok(()))
                }
                Req::Fsync | Req::Fallocate { .. } => Some(Ok(())),
            }
        };
        match outcome {
            None => self.retry.push(idx),
            Some(result) => {
                let op = self.slots[idx].take().expect("live slot");
                self.free.push(idx);
                self.inflight -= 1;
                let reply = result.map(|()| match op.req {
                    Req::Read { buf, .. } => Some(buf),
                    _ => None,
                });
                // The caller may have dropped its future; that is fine.
                let _ = op.reply.send(reply);
            }
        }
        Ok(())
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Only after a fatal error can ops still be in the kernel's hands: leak their
        // buffers rather than free memory the kernel may still write.
        if self.inflight > 0 {
            for op in self.slots.drain(..).flatten() {
                mem::forget(op.req);
            }
        }
        if !self.efd_armed {
            // SAFETY: allocated by Box::into_raw in new(), and the kernel is done with it.
            drop(unsafe { Box::from_raw(self.efd_buf) });
        }
    }
}
