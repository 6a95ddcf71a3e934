//! Large sync messages read on other cores ahead of their turn.
//!
//! A node handles network events one at a time on its actor, in the order
//! `Actor::take_in` queued them. Most of what a large message costs —
//! decoding it, parsing its changes and, for a whole document, automerge's
//! load — needs nothing of the node's state but whether the peer may send
//! documents ([`engine::read_ahead`]). So while the actor handles earlier
//! events, reader threads read large messages queued behind them, and the
//! actor takes what was read when a message's turn comes
//! ([`Readers::turn`]). A message no reader has begun by then is read by
//! the actor itself, as before, and no reader starts it later; the actor
//! waits only for a reader already on it.
//!
//! Readers leave the oldest message waiting to the actor and take the
//! next: the actor reads one while a reader reads the one after it, instead
//! of both waiting on the same message (a lone large message, as in live
//! use, is read by the actor as before). A centre that a city's quarters
//! reconnect to at once is sent each quarter's document whole, and its
//! actor loaded them one after the other on one core while the other was
//! idle (`docs/benchmarks.md`, runs 132 and 156).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use crate::engine::{self, ReadAhead};

/// Messages at least this large are read ahead: a whole document, or a
/// batch of dozens of changes. A small message costs the actor less than
/// handing it over would.
pub const READ_AHEAD_ABOVE: usize = 16 * 1024;

/// Bytes of the messages handed to the readers and not taken yet, at most
/// (each is copied for the readers); beyond that the actor reads a message
/// in its turn.
pub const MAX_AHEAD_BYTES: usize = 16 << 20;

/// Messages begun or read by a reader and not taken yet, at most: the
/// readers wait while so many are, so the documents loaded ahead of their
/// turn stay few.
pub const MAX_READ: usize = 8;

/// Reader threads at most, whatever the machine has.
const MAX_READERS: usize = 3;

/// Where a message handed to the readers stands.
enum State {
    /// No reader has begun it.
    Waiting,
    Reading,
    Read(ReadAhead),
    /// Taken, or its turn came before a reader began it.
    Done,
}

/// One message handed to the readers, shared by the actor and them.
struct Slot {
    state: Mutex<State>,
    read: Condvar,
}

impl Slot {
    fn new() -> Self {
        Self {
            state: Mutex::new(State::Waiting),
            read: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn waiting(&self) -> bool {
        matches!(*self.lock(), State::Waiting)
    }

    /// By a reader: whether the message is still to be read; if so, it is
    /// now being read.
    fn begin(&self) -> bool {
        let mut state = self.lock();
        let waiting = matches!(*state, State::Waiting);
        if waiting {
            *state = State::Reading;
        }
        waiting
    }

    fn finish(&self, read: ReadAhead) {
        *self.lock() = State::Read(read);
        self.read.notify_all();
    }

    /// By the actor, in the message's turn: what a reader read, after
    /// waiting for one that is on it (then also true: a reader began it);
    /// `None` when no reader began it, and none will now.
    fn take(&self) -> (Option<ReadAhead>, bool) {
        let mut state = self.lock();
        loop {
            match std::mem::replace(&mut *state, State::Done) {
                State::Read(read) => return (Some(read), true),
                State::Reading => {
                    *state = State::Reading;
                    state = self
                        .read
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                State::Waiting | State::Done => return (None, false),
            }
        }
    }

    /// The message will not be taken (it was refused before it was read):
    /// no reader needs to begin it. Says whether one did.
    fn drop_unread(&self) -> bool {
        let mut state = self.lock();
        let begun = !matches!(*state, State::Waiting | State::Done);
        *state = State::Done;
        begun
    }
}

/// A message for the readers: its slot, a copy of it, and whether its
/// sender may send documents.
type Job = (Arc<Slot>, Vec<u8>, bool);

/// What the actor and the readers share.
struct Shared {
    queue: Mutex<Queue>,
    /// Readers wait on it for a message to read, or for room to read it.
    work: Condvar,
}

struct Queue {
    /// Messages handed over and not begun, in their order (those whose
    /// turn came meanwhile are skipped).
    jobs: VecDeque<Job>,
    /// Messages begun by a reader and not taken yet ([`MAX_READ`]).
    begun: usize,
    stop: bool,
}

impl Shared {
    fn new() -> Self {
        Self {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                begun: 0,
                stop: false,
            }),
            work: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A message a reader began was taken, or dropped.
    fn done_with_one(&self) {
        let mut queue = self.lock();
        queue.begun = queue.begun.saturating_sub(1);
        drop(queue);
        self.work.notify_all();
    }

    /// A reader's loop: the next message to read, read, until stopped.
    fn read(&self) {
        let mut queue = self.lock();
        loop {
            if queue.stop {
                return;
            }
            queue.jobs.retain(|(slot, _, _)| slot.waiting());
            // The oldest is left to the actor, which comes to it first.
            if queue.begun < MAX_READ && queue.jobs.len() > 1 {
                let Some((slot, data, documents_taken)) = queue.jobs.remove(1) else {
                    continue;
                };
                if !slot.begin() {
                    continue;
                }
                queue.begun += 1;
                drop(queue);
                // Never panics: automerge's panics are caught inside, so a
                // message begun is always read.
                slot.finish(engine::read_ahead(&data, documents_taken));
                queue = self.lock();
                continue;
            }
            queue = self
                .work
                .wait(queue)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// The reader threads and the messages handed to them, by a key of the
/// caller's (the inbound request's id).
pub struct Readers<K> {
    /// `None` without reader threads.
    shared: Option<Arc<Shared>>,
    ahead: HashMap<K, (Arc<Slot>, usize)>,
    ahead_bytes: usize,
}

impl<K: Hash + Eq> Readers<K> {
    /// One reader per core but the actor's, at most [`MAX_READERS`]: none
    /// on a single core, where reading ahead gains nothing.
    pub fn for_this_machine() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::start(cores.saturating_sub(1).min(MAX_READERS))
    }

    /// Starts `threads` readers (with none, every message is read in its
    /// turn). They stop once this is dropped.
    pub fn start(threads: usize) -> Self {
        let shared = Arc::new(Shared::new());
        let mut started = 0;
        for _ in 0..threads {
            let shared = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name("iq-read-ahead".into())
                .spawn(move || shared.read());
            // Without the thread, there is one reader fewer.
            started += usize::from(spawned.is_ok());
        }
        Self {
            shared: (started > 0).then_some(shared),
            ahead: HashMap::new(),
            ahead_bytes: 0,
        }
    }

    /// Hands `data` under `key` to the readers if it is large enough
    /// ([`READ_AHEAD_ABOVE`]) and within [`MAX_AHEAD_BYTES`];
    /// `documents_taken` as `Engine::takes_documents` says now. Says
    /// whether it did.
    pub fn offer(&mut self, key: K, data: &[u8], documents_taken: bool) -> bool {
        let Some(shared) = &self.shared else {
            return false;
        };
        if data.len() < READ_AHEAD_ABOVE
            || self.ahead_bytes + data.len() > MAX_AHEAD_BYTES
            || self.ahead.contains_key(&key)
        {
            return false;
        }
        let slot = Arc::new(Slot::new());
        shared
            .lock()
            .jobs
            .push_back((Arc::clone(&slot), data.to_vec(), documents_taken));
        shared.work.notify_one();
        self.ahead_bytes += data.len();
        self.ahead.insert(key, (slot, data.len()));
        true
    }

    /// The turn of the message under `key` has come: take what was read
    /// with [`Turn::take`], or drop the turn if the message is refused
    /// before it is read.
    pub fn turn(&mut self, key: &K) -> Turn {
        let slot = self.ahead.remove(key).map(|(slot, bytes)| {
            self.ahead_bytes -= bytes;
            slot
        });
        Turn {
            slot,
            shared: self.shared.clone(),
        }
    }

    /// Messages handed to the readers and not taken yet.
    pub fn ahead(&self) -> usize {
        self.ahead.len()
    }
}

impl<K> Drop for Readers<K> {
    fn drop(&mut self) {
        if let Some(shared) = &self.shared {
            shared.lock().stop = true;
            shared.work.notify_all();
        }
    }
}

impl<K> std::fmt::Debug for Readers<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readers")
            .field("reading", &self.shared.is_some())
            .field("ahead", &self.ahead.len())
            .field("ahead_bytes", &self.ahead_bytes)
            .finish()
    }
}

/// A message's turn (see [`Readers::turn`]).
pub struct Turn {
    slot: Option<Arc<Slot>>,
    shared: Option<Arc<Shared>>,
}

impl Turn {
    /// What a reader read, waiting for one that is on it; `None` when the
    /// message was not handed to the readers or none began it: then the
    /// caller reads it.
    pub fn take(mut self) -> Option<ReadAhead> {
        let slot = self.slot.take()?;
        let (read, begun) = slot.take();
        if begun && let Some(shared) = &self.shared {
            shared.done_with_one();
        }
        read
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take()
            && slot.drop_unread()
            && let Some(shared) = &self.shared
        {
            shared.done_with_one();
        }
    }
}

impl std::fmt::Debug for Turn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Turn")
            .field("handed_over", &self.slot.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn message(len: usize) -> Vec<u8> {
        // Not a sync message: what is read is its refusal, which is enough
        // to tell read from not read.
        vec![0x42; len]
    }

    /// Waits, for at most ten seconds, until `done` holds.
    fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{what}: not within 10 s");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn begun(readers: &Readers<u32>, key: u32) -> bool {
        readers
            .ahead
            .get(&key)
            .is_some_and(|(slot, _)| !slot.waiting())
    }

    #[test]
    fn a_large_message_is_read_ahead_and_taken_in_its_turn() {
        let mut readers = Readers::start(1);
        assert!(readers.offer(1, &message(READ_AHEAD_ABOVE), false));
        assert!(readers.offer(2, &message(READ_AHEAD_ABOVE), false));
        assert!(!readers.offer(3, &message(READ_AHEAD_ABOVE - 1), false));
        until("the reader begins", || begun(&readers, 2));
        let read = readers.turn(&2).take().expect("read ahead");
        assert!(read.result.is_err(), "not a sync message");
        assert!(readers.turn(&1).take().is_none(), "left to the caller");
        assert!(readers.turn(&3).take().is_none(), "never handed over");
        assert_eq!((readers.ahead(), readers.ahead_bytes), (0, 0));
    }

    #[test]
    fn without_readers_nothing_is_handed_over() {
        let mut readers = Readers::start(0);
        assert!(!readers.offer(1, &message(READ_AHEAD_ABOVE), false));
        assert!(readers.turn(&1).take().is_none());
    }

    /// With several messages waiting, a reader leaves the oldest to the
    /// actor and reads the next; the oldest, taken in its turn before any
    /// reader began it, is left to the caller, and no reader reads it
    /// afterwards.
    #[test]
    fn readers_leave_the_oldest_message_to_the_actor() {
        let shared = Arc::new(Shared::new());
        let mut readers = Readers {
            shared: Some(Arc::clone(&shared)),
            ahead: HashMap::new(),
            ahead_bytes: 0,
        };
        for key in 1..=3 {
            assert!(readers.offer(key, &message(READ_AHEAD_ABOVE), false));
        }
        let reader = std::thread::spawn({
            let shared = Arc::clone(&shared);
            move || shared.read()
        });
        until("the reader reads 2 and 3", || {
            begun(&readers, 2) && begun(&readers, 3)
        });
        std::thread::sleep(Duration::from_millis(20));
        assert!(!begun(&readers, 1), "the oldest was left");
        assert!(readers.turn(&1).take().is_none());
        assert!(readers.turn(&2).take().is_some());
        assert!(readers.turn(&3).take().is_some());
        drop(readers);
        reader.join().expect("the reader stops");
        let slot = Slot::new();
        assert!(!slot.take().1);
        assert!(!slot.begin(), "a reader must not begin it now");
    }

    /// The caller waits for a reader that is on its message.
    #[test]
    fn the_turn_waits_for_a_reader_on_its_message() {
        let slot = Arc::new(Slot::new());
        assert!(slot.begin());
        let reader = {
            let slot = Arc::clone(&slot);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                slot.finish(engine::read_ahead(&message(10), false));
            })
        };
        let (read, begun) = slot.take();
        assert!(read.is_some() && begun, "what the reader read");
        reader.join().expect("the reader");
    }

    /// Readers stop at `MAX_READ` messages read and not taken, and go on
    /// once one is taken; what is handed over is bounded by its bytes.
    #[test]
    fn readers_hold_at_most_so_many_messages_read() {
        let mut readers = Readers::start(1);
        let n = MAX_READ as u32 + 2;
        for key in 0..n {
            assert!(readers.offer(key, &message(READ_AHEAD_ABOVE), false));
        }
        until("MAX_READ are read", || {
            (0..n).filter(|k| begun(&readers, *k)).count() == MAX_READ
        });
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!((0..n).filter(|k| begun(&readers, *k)).count(), MAX_READ);
        let first = (0..n).find(|k| begun(&readers, *k)).expect("one read");
        assert!(readers.turn(&first).take().is_some());
        until("one more is read", || {
            (0..n).filter(|k| begun(&readers, *k)).count() == MAX_READ
        });
        let big = message(MAX_AHEAD_BYTES - readers.ahead_bytes + 1);
        assert!(!readers.offer(99, &big, false), "over the bytes");
    }
}
