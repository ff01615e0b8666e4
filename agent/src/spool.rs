//! The durable spool: every session event is on disk before anyone hears of it.
//!
//! # Format
//! One append-only file, `state_dir/spool.log`:
//!
//! * a 22-byte header: magic `FERRYSPL`, format version (u16 BE), the
//!   `spool_id` (u64 BE, random, chosen when the spool is created), and a
//!   CRC-32 of those 18 bytes;
//! * then records: payload length (u32 BE), CRC-32 of the length bytes and the
//!   payload (u32 BE), payload (a bincode [`SpoolRecord`], at most
//!   [`MAX_SPOOL_RECORD_LEN`] bytes). The CRC covers the length so a run of
//!   zeros (a file extended but never written) is not a valid empty record.
//!
//! # Writes
//! A session event is appended and `fdatasync`'d before [`Spool::append`]
//! returns, so before it is sent to the broker and before the local caller
//! is told it is recorded. A failed write (a full or read-only file system,
//! an I/O error) is cut back off the file and the report refused, so the file
//! stays a run of whole records; a failed sync poisons the file (after a
//! failed fsync the page cache cannot be trusted), and the next write first
//! writes the spool again whole from memory (as a compaction does, to a new
//! file synced before it replaces the log). Either way the next report after
//! the disk has room again is written, without a restart; until then
//! [`Spool::write_error`] says why writes fail.
//!
//! Acknowledgements are appended as `Acked { up_to }` records *without* a sync
//! of their own: losing one in a crash only means the agent replays events
//! the broker already has, which the broker acknowledges as duplicates
//! without recording them again. For the same reason an acknowledgement
//! whose record cannot be written (a full disk) is still applied in memory.
//!
//! # Compaction
//! When the acknowledged part of the file exceeds
//! [`SpoolOptions::compact_min_dead_bytes`], the live part is rewritten to
//! a private temporary of its own ([`ferry_process::files`]): the header
//! (same spool id), a `Snapshot` record (ack watermark, last sequence
//! number, the sessions open on the host), then the unacknowledged events.
//! The temp file is synced, renamed over the log and the directory synced.
//! A crash at any point leaves either the old or the new file, both
//! complete. The snapshot keeps the sequence going (next seq =
//! last seq + 1 even when every event was acknowledged) and the open-session
//! set the agent reports in `Hello`.
//!
//! # Recovery
//! On open the file is read record by record, and every whole record is
//! kept. A damaged record (length over the limit or past the end of the
//! file, CRC mismatch) is the mark of a crash in the middle of an append
//! when nothing the spool wrote later follows it: it is cut off, with
//! whatever comes after it (zeros of blocks the file system allocated but
//! never wrote, a partial header or body, leftover bytes of old sectors),
//! with a warning. It is [`SpoolError::Corrupt`], naming the file and the
//! offset, and the file is left as it is, when
//!
//! * an intact record follows it at any byte offset that the spool can only
//!   have written after its last good record (an event past the events
//!   read so far, an acknowledgement past the acknowledged mark, any record
//!   when the damaged one is the first): records of older writes, left in
//!   sectors a torn write did not reach, do not count, since the sequence
//!   only moves forward;
//! * or it lies in what a compaction wrote (the snapshot's events), which
//!   was synced whole before it became the log.
//!
//! A record that is whole but does not decode or does not fit the sequence
//! is [`SpoolError::Corrupt`] too. Nothing is skipped silently. Sequence
//! numbers stop at [`LAST_USABLE_SEQ`]: a snapshot past it is refused, and
//! an append at it fails with [`SpoolError::SequenceExhausted`].
//!
//! # Session ids
//! A session id names one session on a host: a start of an id that ended
//! here is refused. The spool remembers the last [`MAX_REMEMBERED_ENDED`]
//! ended ids, across compactions (the broker refuses older reuses itself).
//! A session's end is written once: an end for a session that is not open
//! is refused, whoever reports it.
//!
//! # Bounds
//! Unacknowledged events are kept in memory for replay and bounded by
//! [`MAX_SPOOLED_EVENTS`] and [`MAX_SPOOLED_BYTES`]; past them new reports are
//! refused with [`SpoolError::Full`]. Open sessions are bounded by
//! [`MAX_SESSIONS_PER_HELLO`], the most a `Hello` can carry.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use ferry_common::frame::{decode_payload, encode_payload};
use ferry_common::limits::{
    MAX_ID_LEN, MAX_SESSIONS_PER_HELLO, MAX_SPOOLED_BYTES, MAX_SPOOLED_EVENTS,
    MAX_SPOOL_RECORD_LEN, MAX_TEXT_LEN,
};
use ferry_common::wire::{EndReason, OpenSession, SequencedEvent, SessionEvent};
use ferry_common::{SessionId, UnixMillis, UserId};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::LinkStatus;

/// File name of the spool inside `state_dir`.
pub const SPOOL_FILE: &str = "spool.log";
const MAGIC: [u8; 8] = *b"FERRYSPL";
const FORMAT_VERSION: u16 = 1;
/// Magic, version, spool id, CRC.
pub const HEADER_LEN: u64 = 8 + 2 + 8 + 4;
/// Length and CRC before each record's payload.
pub const RECORD_HEADER_LEN: u64 = 8;

/// Highest sequence number an event can take: `u64::MAX` is never used, so
/// `last_seq + 1` always fits.
pub const LAST_USABLE_SEQ: u64 = u64::MAX - 1;

/// Dead bytes (acknowledged events, ack records) that trigger a compaction
/// by default: big enough that compaction is rare, small enough that the file
/// stays small on a host that is mostly connected.
pub const DEFAULT_COMPACT_MIN_DEAD_BYTES: u64 = 1024 * 1024;

/// Tunables of a spool. Tests shrink them to reach the edges quickly.
#[derive(Clone, Copy, Debug)]
pub struct SpoolOptions {
    /// Most unacknowledged events kept before new reports are refused.
    pub max_events: usize,
    /// Most encoded bytes of unacknowledged events kept.
    pub max_bytes: usize,
    /// Dead bytes in the file that make an acknowledgement compact it.
    pub compact_min_dead_bytes: u64,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        Self {
            max_events: MAX_SPOOLED_EVENTS,
            max_bytes: MAX_SPOOLED_BYTES,
            compact_min_dead_bytes: DEFAULT_COMPACT_MIN_DEAD_BYTES,
        }
    }
}

/// One record of the spool file. Append-only enum: never reorder or remove
/// a variant (the file outlives the binary that wrote it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum SpoolRecord {
    /// A session event, in sequence.
    Event(SequencedEvent),
    /// The broker durably recorded every event with `seq <= up_to`.
    Acked { up_to: u64 },
    /// Written first by a compaction: the whole state at that moment. The
    /// unacknowledged events that follow it are included in it (they are
    /// kept for replay only).
    Snapshot {
        acked: u64,
        last_seq: u64,
        open: Vec<OpenSession>,
    },
    /// Written right after a compaction's `Snapshot`: the sessions that
    /// ended most recently on the host, oldest first (see [`EndedSessions`]).
    Ended { sessions: Vec<SessionId> },
}

/// Most recently ended session ids the spool remembers, so a start that
/// reuses one is refused: a session id names one session, and the broker
/// keeps the ended one's record. Bounded so the compaction's `Ended`
/// record stays well under [`MAX_SPOOL_RECORD_LEN`]; older ids are
/// forgotten, and the broker still refuses their reuse.
pub const MAX_REMEMBERED_ENDED: usize = 1024;

// Each id encodes in at most its length plus a varint prefix.
const _: () = assert!(MAX_REMEMBERED_ENDED * (MAX_ID_LEN + 9) < MAX_SPOOL_RECORD_LEN);

/// The sessions that ended most recently, oldest first, bounded by
/// [`MAX_REMEMBERED_ENDED`].
#[derive(Debug, Default)]
struct EndedSessions {
    /// Oldest first.
    order: VecDeque<SessionId>,
    /// The same ids, for lookups.
    set: HashSet<SessionId>,
}

impl EndedSessions {
    fn insert(&mut self, session: SessionId) {
        if !self.set.insert(session.clone()) {
            return;
        }
        self.order.push_back(session);
        if self.order.len() > MAX_REMEMBERED_ENDED {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }

    /// A spool written before starts of ended ids were refused may reopen one.
    fn remove(&mut self, session: &SessionId) {
        if self.set.remove(session) {
            self.order.retain(|s| s != session);
        }
    }

    fn contains(&self, session: &SessionId) -> bool {
        self.set.contains(session)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("spool {path} is corrupt at byte offset {offset}: {why}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        why: String,
    },
    #[error("spool is full ({events} events, {bytes} bytes not yet acknowledged by the broker); new reports are refused until the broker catches up")]
    Full { events: usize, bytes: usize },
    #[error("session {0} is already open on this host")]
    DuplicateSession(SessionId),
    #[error(
        "session {0} already ended on this host; a session id names one session: report the \
         new session under a new id"
    )]
    EndedSession(SessionId),
    #[error("session {0} is not open on this host")]
    UnknownSession(SessionId),
    #[error("{0} sessions are already open on this host; no more can be reported")]
    TooManyOpenSessions(usize),
    #[error("invalid event: {0}")]
    InvalidEvent(String),
    #[error("broker acknowledged seq {up_to} but the spool ends at seq {last_seq}")]
    AckBeyondEnd { up_to: u64, last_seq: u64 },
    #[error("spool still holds {0} unacknowledged events; cannot start a new spool")]
    NotEmpty(usize),
    #[error(
        "spool's sequence is at {0}, the last usable number; no event can be added (move \
         the state directory's spool.log away to start a new spool)"
    )]
    SequenceExhausted(u64),
}

impl SpoolError {
    /// What an operator does about a spool that cannot be written (`None`
    /// for refusals that are not about the disk).
    pub fn disk_advice(&self) -> Option<&'static str> {
        use std::io::ErrorKind;
        let SpoolError::Io { source, .. } = self else {
            return None;
        };
        Some(match source.kind() {
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded => {
                "the state directory's file system is full: free space there, then report again"
            }
            ErrorKind::ReadOnlyFilesystem => {
                "the state directory's file system is read-only: remount it read-write, then \
                 report again"
            }
            _ => "the state directory cannot be written: check the disk and the system log",
        })
    }
}

/// The spool of one agent. Blocking I/O: call it from `spawn_blocking` (see
/// [`SpoolHandle`]).
pub struct Spool {
    /// Path of the log file.
    path: PathBuf,
    /// Directory holding it, synced after renames.
    dir: PathBuf,
    /// The log, written at `file_len`.
    file: File,
    /// Identifies this spool's sequence to the broker.
    spool_id: u64,
    /// Highest sequence number written.
    last_seq: u64,
    /// Highest sequence number the broker acknowledged.
    acked: u64,
    /// Events with `seq > acked`, in order, with their record size in the file.
    unacked: VecDeque<(SequencedEvent, u64)>,
    /// Sum of the record sizes in `unacked`.
    unacked_bytes: u64,
    /// Sessions started and not ended, as the host sees them.
    open: BTreeMap<SessionId, OpenSession>,
    /// Sessions that ended recently: their ids are not started again.
    ended: EndedSessions,
    /// Length of the file (where the next record goes).
    file_len: u64,
    /// Header plus the snapshot record: bytes that compaction would keep anyway.
    base_len: u64,
    /// Set after a failed sync (or a partial append that could not be cut
    /// back): the file's state on disk is unknown, and the next write
    /// rewrites it whole first.
    poisoned: bool,
    /// Why the last write failed, until a write succeeds again.
    write_error: Option<String>,
    /// Limits and compaction threshold.
    opts: SpoolOptions,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("path", &self.path)
            .field("spool_id", &self.spool_id)
            .field("last_seq", &self.last_seq)
            .field("acked", &self.acked)
            .finish_non_exhaustive()
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SpoolError + 'a {
    move |source| SpoolError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn encode_header(spool_id: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN as usize);
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    h.extend_from_slice(&spool_id.to_be_bytes());
    let crc = crc32(&h);
    h.extend_from_slice(&crc.to_be_bytes());
    h
}

fn encode_record(rec: &SpoolRecord) -> Result<Vec<u8>, SpoolError> {
    let payload =
        encode_payload(rec).map_err(|e| SpoolError::InvalidEvent(format!("encode: {e}")))?;
    if payload.len() > MAX_SPOOL_RECORD_LEN {
        return Err(SpoolError::InvalidEvent(format!(
            "record of {} bytes is over the limit of {MAX_SPOOL_RECORD_LEN}",
            payload.len()
        )));
    }
    let len = (payload.len() as u32).to_be_bytes();
    let mut crc = Crc32::new();
    crc.update(&len);
    crc.update(&payload);
    let mut out = Vec::with_capacity(RECORD_HEADER_LEN as usize + payload.len());
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc.finish().to_be_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Replaces `dir/name` whole with `bytes`, mode 0600: a temporary of its
/// own (never a planted symlink), fsync, rename, fsync of the directory;
/// the target is either absent/old or complete.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), SpoolError> {
    ferry_process::files::write_atomic(&dir.join(name), bytes, ferry_process::files::PRIVATE)
        .map_err(|e| SpoolError::Io {
            op: e.op,
            path: e.path,
            source: e.source,
        })
}

impl Spool {
    /// Opens the spool in `dir`, creating it (with a new random spool id) if
    /// there is none, and recovers its state.
    pub fn open(dir: &Path, opts: SpoolOptions) -> Result<Self, SpoolError> {
        std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let path = dir.join(SPOOL_FILE);
        if !path.exists() {
            let spool_id = loop {
                // 0 would read as "no spool" in logs; any other value will do.
                let id: u64 = rand::random();
                if id != 0 {
                    break id;
                }
            };
            write_atomically(dir, SPOOL_FILE, &encode_header(spool_id))?;
            tracing::info!(path = %path.display(), spool_id, "created a new spool");
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        let mut spool = Spool {
            dir: dir.to_owned(),
            file,
            spool_id: 0,
            last_seq: 0,
            acked: 0,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            open: BTreeMap::new(),
            ended: EndedSessions::default(),
            file_len: 0,
            base_len: HEADER_LEN,
            poisoned: false,
            write_error: None,
            opts,
            path,
        };
        spool.recover()?;
        Ok(spool)
    }

    fn corrupt(&self, offset: u64, why: impl Into<String>) -> SpoolError {
        SpoolError::Corrupt {
            path: self.path.clone(),
            offset,
            why: why.into(),
        }
    }

    fn recover(&mut self) -> Result<(), SpoolError> {
        let path = self.path.clone();
        let file_len = self.file.metadata().map_err(io_err("stat", &path))?.len();
        // A second handle on the same file, so records can be applied to
        // `self` while reading.
        let mut r = BufReader::new(self.file.try_clone().map_err(io_err("open", &path))?);
        let mut header = [0u8; HEADER_LEN as usize];
        if file_len < HEADER_LEN {
            return Err(self.corrupt(0, "file is shorter than the spool header"));
        }
        r.read_exact(&mut header).map_err(io_err("read", &path))?;
        if header[..8] != MAGIC {
            return Err(self.corrupt(0, "not a Ferry spool (bad magic)"));
        }
        let crc = u32::from_be_bytes([header[18], header[19], header[20], header[21]]);
        if crc32(&header[..18]) != crc {
            return Err(self.corrupt(0, "header checksum mismatch"));
        }
        let version = u16::from_be_bytes([header[8], header[9]]);
        if version != FORMAT_VERSION {
            return Err(self.corrupt(
                8,
                format!("format version {version}; this agent reads {FORMAT_VERSION}"),
            ));
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&header[10..18]);
        self.spool_id = u64::from_be_bytes(id);

        let mut offset = HEADER_LEN;
        let mut first = true;
        let mut torn_at = None;
        while offset < file_len {
            let remaining = file_len - offset;
            if remaining < RECORD_HEADER_LEN {
                // Too short to hold any record: nothing whole can follow.
                torn_at = Some((offset, "partial record header".to_owned()));
                break;
            }
            let mut head = [0u8; RECORD_HEADER_LEN as usize];
            r.read_exact(&mut head).map_err(io_err("read", &path))?;
            let len_bytes = [head[0], head[1], head[2], head[3]];
            let len = u64::from(u32::from_be_bytes(len_bytes));
            let crc = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
            let end = offset + RECORD_HEADER_LEN + len;
            let damage = if len > MAX_SPOOL_RECORD_LEN as u64 {
                Some(format!(
                    "record length {len} is over the limit of {MAX_SPOOL_RECORD_LEN}"
                ))
            } else if end > file_len {
                Some(format!(
                    "record of {len} bytes runs past the end of the file"
                ))
            } else {
                None
            };
            let payload = if damage.is_none() {
                let mut payload = vec![0u8; len as usize];
                r.read_exact(&mut payload).map_err(io_err("read", &path))?;
                Some(payload)
            } else {
                None
            };
            let damage = damage.or_else(|| {
                let mut c = Crc32::new();
                c.update(&len_bytes);
                c.update(payload.as_deref().unwrap_or_default());
                (c.finish() != crc).then(|| "record checksum mismatch".to_owned())
            });
            if let Some(why) = damage {
                self.torn_or_corrupt(offset, file_len, first, &why)?;
                torn_at = Some((offset, why));
                break;
            }
            let payload = payload.unwrap_or_default();
            let rec: SpoolRecord = decode_payload(&payload)
                .map_err(|e| self.corrupt(offset, format!("undecodable record: {e}")))?;
            self.apply(rec, offset, len + RECORD_HEADER_LEN, first)?;
            first = false;
            offset = end;
        }
        drop(r);
        if let Some((at, why)) = torn_at {
            tracing::warn!(
                path = %path.display(),
                offset = at,
                dropped_bytes = file_len - at,
                "spool ends in a torn record ({why}), the mark of a crash mid-append; cutting it off"
            );
            self.file.set_len(at).map_err(io_err("truncate", &path))?;
            self.file.sync_all().map_err(io_err("sync", &path))?;
            offset = at;
        }
        self.file_len = offset;
        Ok(())
    }

    /// Decides whether the damaged record at `bad` is a torn append (`Ok`:
    /// cut it and everything after it) or damage to be reported.
    fn torn_or_corrupt(
        &self,
        bad: u64,
        file_len: u64,
        first: bool,
        why: &str,
    ) -> Result<(), SpoolError> {
        // After a snapshot, up to its last event, the file is what a
        // compaction wrote and synced whole before renaming it: never torn.
        if self.acked + self.unacked.len() as u64 != self.last_seq {
            return Err(self.corrupt(
                bad,
                format!("{why}, inside the part a compaction wrote whole"),
            ));
        }
        if let Some((at, what)) = self.later_intact_record(bad, file_len, first)? {
            return Err(self.corrupt(
                bad,
                format!(
                    "{why}, and an intact record follows at byte offset {at} ({what}): \
                     damage, not a torn append"
                ),
            ));
        }
        Ok(())
    }

    /// Looks at every byte offset after the damaged record at `bad` for an
    /// intact record (length within bounds and the file, decodable, CRC
    /// good) that the spool can only have written after its last good
    /// record: an event past the events already read, or an ack past the
    /// acknowledged mark (or, when the damaged record is the first one,
    /// any record). Older records, left in the disk sectors a torn write
    /// did not reach, are not evidence: the sequence only moves forward.
    fn later_intact_record(
        &self,
        bad: u64,
        file_len: u64,
        first: bool,
    ) -> Result<Option<(u64, String)>, SpoolError> {
        use std::os::unix::fs::FileExt;
        const WINDOW: u64 = RECORD_HEADER_LEN + MAX_SPOOL_RECORD_LEN as u64;
        let held = self.acked + self.unacked.len() as u64;
        // `buf` holds the file's bytes from offset `base` on.
        let mut buf: Vec<u8> = Vec::new();
        let mut base = bad + 1;
        let mut pos = bad + 1;
        while pos + RECORD_HEADER_LEN <= file_len {
            if base + (buf.len() as u64) < (pos + WINDOW).min(file_len) {
                buf.drain(..(pos - base) as usize);
                base = pos;
                let have = buf.len();
                let upto = (pos + 2 * WINDOW).min(file_len);
                buf.resize((upto - base) as usize, 0);
                self.file
                    .read_exact_at(&mut buf[have..], base + have as u64)
                    .map_err(io_err("read", &self.path))?;
            }
            let i = (pos - base) as usize;
            let len_bytes = [buf[i], buf[i + 1], buf[i + 2], buf[i + 3]];
            let len = u32::from_be_bytes(len_bytes) as usize;
            let end = i + RECORD_HEADER_LEN as usize + len;
            if len <= MAX_SPOOL_RECORD_LEN && end <= buf.len() {
                let payload = &buf[i + RECORD_HEADER_LEN as usize..end];
                // Decoding fails fast on noise; the CRC is checked last.
                let later = match decode_payload::<SpoolRecord>(payload) {
                    Ok(SpoolRecord::Event(ev)) if first || ev.seq > held => {
                        Some(format!("event seq {}", ev.seq))
                    }
                    Ok(SpoolRecord::Acked { up_to }) if first || up_to > self.acked => {
                        Some(format!("acknowledgement up to seq {up_to}"))
                    }
                    Ok(SpoolRecord::Snapshot { .. }) if first => Some("snapshot".to_owned()),
                    Ok(SpoolRecord::Ended { .. }) if first => Some("ended sessions".to_owned()),
                    _ => None,
                };
                if let Some(what) = later {
                    let crc = u32::from_be_bytes([buf[i + 4], buf[i + 5], buf[i + 6], buf[i + 7]]);
                    let mut c = Crc32::new();
                    c.update(&len_bytes);
                    c.update(payload);
                    if c.finish() == crc {
                        return Ok(Some((pos, what)));
                    }
                }
            }
            pos += 1;
        }
        Ok(None)
    }

    fn apply(
        &mut self,
        rec: SpoolRecord,
        offset: u64,
        size: u64,
        first: bool,
    ) -> Result<(), SpoolError> {
        match rec {
            SpoolRecord::Snapshot {
                acked,
                last_seq,
                open,
            } => {
                if !first {
                    return Err(self.corrupt(offset, "snapshot record after the first record"));
                }
                if acked > last_seq {
                    return Err(self.corrupt(offset, "snapshot acknowledges past its end"));
                }
                if last_seq > LAST_USABLE_SEQ {
                    return Err(self.corrupt(
                        offset,
                        format!(
                            "snapshot's last sequence number is {last_seq}, past the last \
                             usable one ({LAST_USABLE_SEQ}); the file was not written by an agent"
                        ),
                    ));
                }
                self.acked = acked;
                self.last_seq = last_seq;
                self.open = open.into_iter().map(|s| (s.session.clone(), s)).collect();
                self.base_len = HEADER_LEN + size;
            }
            SpoolRecord::Ended { sessions } => {
                // Only right after the snapshot (which moved `base_len` to
                // its end).
                if offset != self.base_len || self.base_len == HEADER_LEN {
                    return Err(self.corrupt(offset, "ended sessions away from the snapshot"));
                }
                self.ended = EndedSessions::default();
                for session in sessions {
                    self.ended.insert(session);
                }
                self.base_len += size;
            }
            SpoolRecord::Event(ev) => {
                // Events right after a snapshot are already counted in it
                // (its last_seq and open sessions): they are only kept for
                // replay. Any later event extends the state.
                // Both sums stay within u64: `last_seq` is at most
                // LAST_USABLE_SEQ and `acked + unacked.len()` at most `last_seq`.
                let covered = ev.seq <= self.last_seq;
                let expected = if covered {
                    self.acked + self.unacked.len() as u64 + 1
                } else {
                    self.last_seq + 1
                };
                if ev.seq > LAST_USABLE_SEQ {
                    return Err(self.corrupt(
                        offset,
                        format!("event seq {} is past the last usable one", ev.seq),
                    ));
                }
                if ev.seq != expected {
                    return Err(self.corrupt(
                        offset,
                        format!("event seq {} where seq {expected} was due", ev.seq),
                    ));
                }
                if !covered {
                    self.last_seq = ev.seq;
                    apply_to_open(&mut self.open, &mut self.ended, &ev.event);
                }
                self.unacked_bytes += size;
                self.unacked.push_back((ev, size));
            }
            SpoolRecord::Acked { up_to } => {
                if up_to > self.last_seq {
                    return Err(self.corrupt(
                        offset,
                        format!("ack of seq {up_to} past the last event {}", self.last_seq),
                    ));
                }
                self.drop_acked(up_to);
            }
        }
        Ok(())
    }

    fn drop_acked(&mut self, up_to: u64) {
        if up_to <= self.acked {
            return;
        }
        self.acked = up_to;
        while let Some((ev, size)) = self.unacked.front() {
            if ev.seq > up_to {
                break;
            }
            self.unacked_bytes -= size;
            self.unacked.pop_front();
        }
    }

    /// Appends a record at the end; on a write error the partial record is
    /// cut off again so the file stays a sequence of whole records. A
    /// poisoned file is written again whole first.
    fn write_record(&mut self, bytes: &[u8], sync: bool) -> Result<(), SpoolError> {
        if self.poisoned {
            self.repair()?;
        }
        let path = self.path.clone();
        let written = self
            .file
            .seek(SeekFrom::Start(self.file_len))
            .and_then(|_| self.file.write_all(bytes));
        if let Err(e) = written {
            self.cut_back();
            return Err(self.failed(io_err("append to", &path)(e)));
        }
        if sync {
            if let Err(e) = self.file.sync_data() {
                // The caller is told "not recorded": cut the record off now,
                // so a restart before the repair does not read it back; the
                // page cache after a failed sync is not trusted either, so
                // the next write rewrites the file whole.
                self.cut_back();
                self.poisoned = true;
                return Err(self.failed(io_err("sync", &path)(e)));
            }
        }
        self.file_len += bytes.len() as u64;
        // An event written (synced) says the spool takes reports again; an
        // acknowledgement, a few bytes that may still fit on a full disk,
        // does not.
        if sync {
            self.write_error = None;
        }
        Ok(())
    }

    /// Cuts a partial append off the file. If that fails too (a read-only
    /// file system refuses both), the file is still whole when nothing of
    /// the record reached it; otherwise it is poisoned.
    fn cut_back(&mut self) {
        if self.file.set_len(self.file_len).is_ok() {
            return;
        }
        match self.file.metadata() {
            Ok(m) if m.len() == self.file_len => {}
            _ => self.poisoned = true,
        }
    }

    /// Notes why a write failed (for [`Spool::write_error`]) and returns it.
    fn failed(&mut self, e: SpoolError) -> SpoolError {
        self.write_error = Some(e.to_string());
        e
    }

    /// Writes the poisoned file again whole from memory, which holds every
    /// event the file must keep (the failed one was never added).
    fn repair(&mut self) -> Result<(), SpoolError> {
        self.rewrite(self.spool_id, self.acked, self.last_seq)?;
        tracing::info!(path = %self.path.display(),
            "spool written again whole after a failed write; appending again");
        Ok(())
    }

    /// Why the last write to the spool failed, while writes keep failing
    /// (cleared by the next write that succeeds).
    pub fn write_error(&self) -> Option<&str> {
        self.write_error.as_deref()
    }

    /// Checks a new event against the host's open sessions and the limits,
    /// writes it durably and returns its sequence number.
    pub fn append(&mut self, event: SessionEvent) -> Result<u64, SpoolError> {
        match &event {
            SessionEvent::Started { session, .. } => {
                if self.open.contains_key(session) {
                    return Err(SpoolError::DuplicateSession(session.clone()));
                }
                if self.ended.contains(session) {
                    return Err(SpoolError::EndedSession(session.clone()));
                }
                if self.open.len() >= MAX_SESSIONS_PER_HELLO {
                    return Err(SpoolError::TooManyOpenSessions(self.open.len()));
                }
            }
            SessionEvent::Ended {
                session, reason, ..
            } => {
                if !self.open.contains_key(session) {
                    return Err(SpoolError::UnknownSession(session.clone()));
                }
                if let EndReason::Other(text) = reason {
                    if text.len() > MAX_TEXT_LEN {
                        return Err(SpoolError::InvalidEvent(format!(
                            "reason is {} bytes; the limit is {MAX_TEXT_LEN}",
                            text.len()
                        )));
                    }
                }
            }
        }
        if self.last_seq >= LAST_USABLE_SEQ {
            return Err(SpoolError::SequenceExhausted(self.last_seq));
        }
        let ev = SequencedEvent {
            seq: self.last_seq + 1,
            event,
        };
        let bytes = encode_record(&SpoolRecord::Event(ev.clone()))?;
        let size = bytes.len() as u64;
        if self.unacked.len() >= self.opts.max_events
            || self.unacked_bytes + size > self.opts.max_bytes as u64
        {
            return Err(SpoolError::Full {
                events: self.unacked.len(),
                bytes: self.unacked_bytes as usize,
            });
        }
        self.write_record(&bytes, true)?;
        self.last_seq = ev.seq;
        apply_to_open(&mut self.open, &mut self.ended, &ev.event);
        self.unacked_bytes += size;
        self.unacked.push_back((ev, size));
        Ok(self.last_seq)
    }

    /// Records that the broker durably holds every event up to `up_to`, and
    /// compacts the file when enough of it is dead.
    pub fn ack(&mut self, up_to: u64) -> Result<(), SpoolError> {
        if up_to > self.last_seq {
            return Err(SpoolError::AckBeyondEnd {
                up_to,
                last_seq: self.last_seq,
            });
        }
        if up_to <= self.acked {
            return Ok(());
        }
        // Not synced: see the module doc (a lost ack only causes duplicates
        // the broker ignores). The next event's fdatasync carries it along.
        // For the same reason an ack that cannot be written (a full disk)
        // is applied anyway: the broker holds those events.
        let bytes = encode_record(&SpoolRecord::Acked { up_to })?;
        if let Err(e) = self.write_record(&bytes, false) {
            tracing::warn!(error = %e, up_to,
                "acknowledgement not written to the spool; applied in memory (after a restart \
                 the broker drops the events it holds as duplicates)");
        }
        self.drop_acked(up_to);
        if self.dead_bytes() >= self.opts.compact_min_dead_bytes {
            if let Err(e) = self.compact() {
                tracing::warn!(error = %e, "spool not compacted; trying again at the next acknowledgement");
            }
        }
        Ok(())
    }

    fn dead_bytes(&self) -> u64 {
        self.file_len
            .saturating_sub(self.base_len + self.unacked_bytes)
    }

    /// Rewrites the file with only what is still needed (see the module doc).
    pub fn compact(&mut self) -> Result<(), SpoolError> {
        self.rewrite(self.spool_id, self.acked, self.last_seq)
    }

    fn rewrite(&mut self, spool_id: u64, acked: u64, last_seq: u64) -> Result<(), SpoolError> {
        let snapshot = encode_record(&SpoolRecord::Snapshot {
            acked,
            last_seq,
            open: self.open.values().cloned().collect(),
        })?;
        let ended = encode_record(&SpoolRecord::Ended {
            sessions: self.ended.order.iter().cloned().collect(),
        })?;
        let mut bytes = encode_header(spool_id);
        bytes.extend_from_slice(&snapshot);
        bytes.extend_from_slice(&ended);
        let base_len = bytes.len() as u64;
        for (ev, _) in &self.unacked {
            bytes.extend_from_slice(&encode_record(&SpoolRecord::Event(ev.clone()))?);
        }
        // From here the file on disk may already be the new one (a rename
        // whose directory sync failed is still a rename): nothing is
        // appended through the old handle, the next write rewrites whole.
        self.poisoned = true;
        write_atomically(&self.dir, SPOOL_FILE, &bytes).map_err(|e| self.failed(e))?;
        self.spool_id = spool_id;
        self.acked = acked;
        self.last_seq = last_seq;
        self.file_len = bytes.len() as u64;
        self.base_len = base_len;
        // The old handle points at the replaced inode; write to the new one.
        let reopened = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(io_err("reopen", &self.path));
        self.file = reopened.map_err(|e| self.failed(e))?;
        self.poisoned = false;
        self.write_error = None;
        tracing::debug!(path = %self.path.display(), bytes = self.file_len, "compacted the spool");
        Ok(())
    }

    /// Starts a new sequence under a new spool id, keeping the open sessions.
    /// Used when the broker has recorded more of this spool than the file
    /// holds (a state directory restored from an old copy): going on with the
    /// old id would make the broker drop new events as duplicates.
    pub fn start_new_spool(&mut self) -> Result<u64, SpoolError> {
        if !self.unacked.is_empty() {
            return Err(SpoolError::NotEmpty(self.unacked.len()));
        }
        let id = loop {
            let id: u64 = rand::random();
            if id != 0 && id != self.spool_id {
                break id;
            }
        };
        self.rewrite(id, 0, 0)?;
        Ok(id)
    }

    /// Up to `max` unacknowledged events with `seq > after`, in order.
    pub fn events_after(&self, after: u64, max: usize) -> Vec<SequencedEvent> {
        let skip = after.saturating_sub(self.acked) as usize;
        self.unacked
            .iter()
            .skip(skip)
            .take(max)
            .map(|(ev, _)| ev.clone())
            .collect()
    }

    /// The stamp of the oldest event not acknowledged, if there is one.
    pub fn oldest_unacked_at(&self) -> Option<UnixMillis> {
        self.unacked.front().map(|(ev, _)| match &ev.event {
            SessionEvent::Started { at, .. } | SessionEvent::Ended { at, .. } => *at,
        })
    }

    /// The sessions open on the host, for `Hello`.
    pub fn open_sessions(&self) -> Vec<OpenSession> {
        self.open.values().cloned().collect()
    }

    /// Number of open sessions.
    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    pub fn spool_id(&self) -> u64 {
        self.spool_id
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    pub fn acked_seq(&self) -> u64 {
        self.acked
    }

    /// Number of events not yet acknowledged.
    pub fn spooled(&self) -> u64 {
        self.unacked.len() as u64
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn apply_to_open(
    open: &mut BTreeMap<SessionId, OpenSession>,
    ended: &mut EndedSessions,
    event: &SessionEvent,
) {
    match event {
        SessionEvent::Started { session, user, at } => {
            ended.remove(session);
            open.insert(
                session.clone(),
                OpenSession {
                    session: session.clone(),
                    user: user.clone(),
                    started_at: *at,
                },
            );
        }
        SessionEvent::Ended { session, .. } => {
            open.remove(session);
            ended.insert(session.clone());
        }
    }
}

/// The spool shared by the local socket (appends) and the link (acks,
/// replay). Each operation takes the lock inside `spawn_blocking`, never
/// across an `.await`, and publishes the new counters.
#[derive(Clone)]
pub struct SpoolHandle {
    /// The spool; a std mutex because every use is short and blocking.
    inner: Arc<Mutex<Spool>>,
    /// The agent's status, whose spool counters this keeps current.
    status: Arc<watch::Sender<LinkStatus>>,
    /// Last sequence number written; the link waits on it for new events.
    appended: Arc<watch::Sender<u64>>,
    /// Held while the counters are read and published, so a publish that
    /// read them before another change cannot overwrite that change's.
    publishing: Arc<Mutex<()>>,
}

impl SpoolHandle {
    pub fn new(spool: Spool, status: Arc<watch::Sender<LinkStatus>>) -> Self {
        let last = spool.last_seq();
        let handle = Self {
            inner: Arc::new(Mutex::new(spool)),
            status,
            appended: Arc::new(watch::channel(last).0),
            publishing: Arc::new(Mutex::new(())),
        };
        handle.publish();
        handle
    }

    /// Runs `f` on the spool on the blocking pool and publishes the counters.
    pub async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Spool) -> T + Send + 'static,
    ) -> T {
        let this = self.clone();
        let task = tokio::task::spawn_blocking(move || {
            let out = f(&mut this.lock());
            this.publish();
            out
        });
        match task.await {
            Ok(out) => out,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Short, non-blocking reads (no file I/O) can take the lock directly.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Spool> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Durably appends an event; returns its sequence number.
    pub async fn append(&self, event: SessionEvent) -> Result<u64, SpoolError> {
        self.with(move |s| s.append(event)).await
    }

    /// Applies a broker acknowledgement.
    pub async fn ack(&self, up_to: u64) -> Result<(), SpoolError> {
        self.with(move |s| s.ack(up_to)).await
    }

    /// A receiver of the last written sequence number.
    pub fn subscribe_appended(&self) -> watch::Receiver<u64> {
        self.appended.subscribe()
    }

    /// Why the spool cannot be written, as the status's `last_error` says
    /// it while writes fail.
    pub fn failure(&self) -> Option<String> {
        self.lock().write_error().map(failure_text)
    }

    fn publish(&self) {
        // Two changes on two blocking threads (an append and an ack) each
        // publish: serialised, the last one sends what it read last, never
        // an older snapshot over a newer one.
        let _order = self
            .publishing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (last, acked, spooled, failure) = {
            let s = self.lock();
            (
                s.last_seq(),
                s.acked_seq(),
                s.spooled(),
                s.write_error().map(failure_text),
            )
        };
        // Tests widen the gap between the read and the send, where another
        // change can come in.
        #[cfg(test)]
        std::thread::sleep(std::time::Duration::from_micros(300));
        self.appended.send_if_modified(|v| {
            let changed = *v != last;
            *v = last;
            changed
        });
        self.status.send_if_modified(|st| {
            let mut changed = st.last_seq != last || st.acked_seq != acked || st.spooled != spooled;
            st.last_seq = last;
            st.acked_seq = acked;
            st.spooled = spooled;
            // A spool that cannot be written is the first thing to say; once
            // it writes again its failure is no longer news (the link sets
            // its own errors when it has any).
            let shown_by_spool = st
                .last_error
                .as_deref()
                .is_some_and(|e| e.starts_with(SPOOL_FAILURE_PREFIX));
            if failure.is_some() || shown_by_spool {
                changed |= st.last_error != failure;
                st.last_error = failure;
            }
            changed
        });
    }
}

/// How the status's `last_error` begins while the spool cannot be written.
pub const SPOOL_FAILURE_PREFIX: &str = "spool cannot be written, session reports are refused: ";

fn failure_text(why: &str) -> String {
    format!("{SPOOL_FAILURE_PREFIX}{why}")
}

/// A session-started event stamped now.
pub fn started(session: SessionId, user: UserId, at: UnixMillis) -> SessionEvent {
    SessionEvent::Started { session, user, at }
}

/// CRC-32 (IEEE 802.3, the zlib/PNG polynomial), table-driven.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut c = Crc32::new();
    c.update(bytes);
    c.finish()
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

struct Crc32(u32);

impl Crc32 {
    fn new() -> Self {
        Self(0xFFFF_FFFF)
    }

    fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = CRC_TABLE[((self.0 ^ u32::from(*b)) & 0xFF) as usize] ^ (self.0 >> 8);
        }
    }

    fn finish(&self) -> u32 {
        !self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sid(s: &str) -> SessionId {
        s.parse().unwrap()
    }

    fn start(s: &str) -> SessionEvent {
        started(sid(s), "alice".parse().unwrap(), UnixMillis(1_000))
    }

    fn end(s: &str) -> SessionEvent {
        SessionEvent::Ended {
            session: sid(s),
            at: UnixMillis(2_000),
            reason: EndReason::Logout,
        }
    }

    fn small() -> SpoolOptions {
        SpoolOptions {
            compact_min_dead_bytes: 64,
            ..SpoolOptions::default()
        }
    }

    /// Makes every later write fail (as a full or read-only disk does):
    /// the log is reached through a read-only handle.
    fn break_writes(s: &mut Spool) {
        s.file = File::open(&s.path).unwrap();
    }

    /// Writes reach the log again (the disk has room again).
    fn mend_writes(s: &mut Spool) {
        s.file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&s.path)
            .unwrap();
    }

    #[test]
    fn the_oldest_unacknowledged_event_is_the_first_not_acked() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        assert_eq!(s.oldest_unacked_at(), None);
        s.append(start("s1")).unwrap();
        s.append(end("s1")).unwrap();
        assert_eq!(s.oldest_unacked_at(), Some(UnixMillis(1_000)));
        s.ack(1).unwrap();
        assert_eq!(s.oldest_unacked_at(), Some(UnixMillis(2_000)));
        s.ack(2).unwrap();
        assert_eq!(s.oldest_unacked_at(), None);
    }

    #[test]
    fn a_report_that_cannot_be_written_is_refused_and_the_next_one_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        s.append(start("s1")).unwrap();
        s.append(start("s2")).unwrap();
        let len = std::fs::metadata(s.path()).unwrap().len();

        break_writes(&mut s);
        let e = s.append(start("s3")).unwrap_err();
        assert!(matches!(e, SpoolError::Io { .. }), "{e}");
        assert!(e.disk_advice().is_some(), "{e}");
        assert!(s.write_error().is_some_and(|w| w.contains("append to")));
        assert_eq!(
            s.last_seq(),
            2,
            "the refused report takes no sequence number"
        );
        assert!(matches!(
            s.append(end("s3")),
            Err(SpoolError::UnknownSession(_))
        ));
        // The broker's acknowledgement is applied even though its record
        // cannot be written: losing it only replays what the broker has.
        s.ack(1).unwrap();
        assert_eq!(s.acked_seq(), 1);
        assert_eq!(std::fs::metadata(s.path()).unwrap().len(), len);

        mend_writes(&mut s);
        assert_eq!(s.append(start("s3")).unwrap(), 3);
        assert_eq!(s.write_error(), None);
        drop(s);
        let s = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        assert_eq!(s.last_seq(), 3);
        assert_eq!(s.open_count(), 3);
        // The unwritten ack: event 1 is replayed, the broker drops it.
        assert_eq!(s.acked_seq(), 0);
        assert_eq!(s.events_after(0, 10).len(), 3);
    }

    #[test]
    fn a_compaction_that_cannot_be_written_leaves_the_log_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), small()).unwrap();
        for i in 0..8 {
            s.append(start(&format!("s{i}"))).unwrap();
        }
        let before = std::fs::read(s.path()).unwrap();
        // Neither the ack record nor the compaction's new file can be
        // written (its directory is a file's name).
        let real_dir = std::mem::replace(&mut s.dir, s.path.join("not-a-directory"));
        break_writes(&mut s);
        s.ack(8).unwrap();
        assert_eq!(s.acked_seq(), 8);
        assert_eq!(std::fs::read(s.path()).unwrap(), before);
        s.dir = real_dir;
        mend_writes(&mut s);
        s.append(start("t")).unwrap();
        drop(s);
        let s = Spool::open(dir.path(), small()).unwrap();
        assert_eq!(s.last_seq(), 9);
        assert_eq!(s.open_count(), 9);
    }

    #[test]
    fn after_a_failed_sync_the_log_is_written_again_whole_and_appends_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        s.append(start("s1")).unwrap();
        s.append(start("s2")).unwrap();
        s.ack(1).unwrap();
        s.append(end("s1")).unwrap();
        let good = std::fs::metadata(s.path()).unwrap().len();
        // What a failed sync leaves: bytes of unknown state past the end.
        let mut f = OpenOptions::new().append(true).open(s.path()).unwrap();
        f.write_all(&[0xAB; 37]).unwrap();
        drop(f);
        s.poisoned = true;

        assert_eq!(s.append(start("s3")).unwrap(), 4);
        assert!(!s.poisoned);
        drop(s);
        let bytes = std::fs::read(dir.path().join(SPOOL_FILE)).unwrap();
        assert!(
            !bytes.windows(37).any(|w| w == [0xAB; 37]),
            "stale bytes kept"
        );
        assert!(bytes.len() as u64 > HEADER_LEN && good > HEADER_LEN);
        let s = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        assert_eq!(
            std::fs::metadata(s.path()).unwrap().len(),
            bytes.len() as u64
        );
        assert_eq!(s.last_seq(), 4);
        assert_eq!(s.acked_seq(), 1);
        let seqs: Vec<u64> = s.events_after(0, 10).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [2, 3, 4]);
        assert_eq!(
            s.open_sessions()
                .iter()
                .map(|o| o.session.to_string())
                .collect::<Vec<_>>(),
            ["s2", "s3"]
        );
    }

    #[tokio::test]
    async fn the_status_says_the_spool_fails_while_it_does() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        let (tx, rx) = watch::channel(LinkStatus::default());
        let h = SpoolHandle::new(spool, Arc::new(tx));
        h.append(start("s1")).await.unwrap();
        assert_eq!(rx.borrow().last_error, None);

        break_writes(&mut h.lock());
        h.append(start("s2")).await.unwrap_err();
        let shown = rx.borrow().last_error.clone().unwrap_or_default();
        assert!(shown.starts_with(SPOOL_FAILURE_PREFIX), "{shown}");
        assert_eq!(h.failure(), Some(shown.clone()));

        // An acknowledgement written meanwhile is no sign that events fit.
        mend_writes(&mut h.lock());
        h.ack(1).await.unwrap();
        assert_eq!(h.failure(), Some(shown));
        h.append(start("s2")).await.unwrap();
        assert_eq!(rx.borrow().last_error, None);
        assert_eq!(h.failure(), None);
        assert_eq!(rx.borrow().last_seq, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_status_ends_on_the_spools_latest_counters_when_changes_race() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        let (tx, rx) = watch::channel(LinkStatus::default());
        let h = SpoolHandle::new(spool, Arc::new(tx));
        // An append and the acknowledgement of the one before race, as a
        // session report and the broker's Ack do.
        for i in 0..200u64 {
            let (a, b) = (h.clone(), h.clone());
            let append = tokio::spawn(async move { a.append(start(&format!("s{i}"))).await });
            let ack = tokio::spawn(async move { b.ack(i).await });
            append.await.unwrap().unwrap();
            ack.await.unwrap().unwrap();
            let st = rx.borrow().clone();
            let s = h.lock();
            assert_eq!(
                (st.last_seq, st.acked_seq, st.spooled),
                (s.last_seq(), s.acked_seq(), s.spooled()),
                "round {i}: the status shows an older state than the spool's"
            );
        }
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn the_spool_is_private_and_not_written_through_a_planted_symlink() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"untouched").unwrap();
        // At the fixed temporary name earlier versions used.
        std::os::unix::fs::symlink(&victim, dir.path().join("spool.log.tmp")).unwrap();
        let mut s = Spool::open(dir.path(), small()).unwrap();
        for i in 0..8 {
            s.append(start(&format!("s{i}"))).unwrap();
        }
        s.ack(8).unwrap();
        s.append(start("t")).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
        let meta = std::fs::symlink_metadata(dir.path().join(SPOOL_FILE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn append_ack_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id;
        {
            let mut s = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
            id = s.spool_id();
            assert_eq!(s.append(start("a")).unwrap(), 1);
            assert_eq!(s.append(start("b")).unwrap(), 2);
            assert_eq!(s.append(end("a")).unwrap(), 3);
            s.ack(2).unwrap();
            assert_eq!(s.spooled(), 1);
        }
        let s = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        assert_eq!(s.spool_id(), id);
        assert_eq!(s.last_seq(), 3);
        assert_eq!(s.acked_seq(), 2);
        let rest = s.events_after(0, 10);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].seq, 3);
        assert_eq!(s.events_after(3, 10), vec![]);
        let open: Vec<_> = s.open_sessions().into_iter().map(|o| o.session).collect();
        assert_eq!(open, vec![sid("b")]);
    }

    #[test]
    fn duplicate_start_and_unknown_end_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        s.append(start("a")).unwrap();
        assert!(matches!(
            s.append(start("a")),
            Err(SpoolError::DuplicateSession(_))
        ));
        assert!(matches!(
            s.append(end("zz")),
            Err(SpoolError::UnknownSession(_))
        ));
        assert_eq!(s.last_seq(), 1);
        assert!(matches!(
            s.ack(5),
            Err(SpoolError::AckBeyondEnd {
                up_to: 5,
                last_seq: 1
            })
        ));
    }

    #[test]
    fn an_ended_session_id_is_not_started_again_across_reopen_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), small()).unwrap();
        s.append(start("s-offline-1")).unwrap();
        s.append(end("s-offline-1")).unwrap();
        let refused = s.append(start("s-offline-1")).unwrap_err();
        assert!(matches!(&refused, SpoolError::EndedSession(id) if id.as_str() == "s-offline-1"));
        assert!(refused.to_string().contains("new id"), "{refused}");
        assert_eq!(s.last_seq(), 2, "nothing was written");
        // Still refused after a restart (the events are replayed) ...
        drop(s);
        let mut s = Spool::open(dir.path(), small()).unwrap();
        assert!(matches!(
            s.append(start("s-offline-1")),
            Err(SpoolError::EndedSession(_))
        ));
        // ... and after a compaction dropped the events (the ended ids are
        // in the rewritten file).
        s.append(start("other")).unwrap();
        s.ack(3).unwrap();
        assert_eq!(s.spooled(), 0);
        drop(s);
        let mut s = Spool::open(dir.path(), small()).unwrap();
        assert!(matches!(
            s.append(start("s-offline-1")),
            Err(SpoolError::EndedSession(_))
        ));
        assert_eq!(s.append(end("other")).unwrap(), 4);
    }

    #[test]
    fn the_ended_ids_remembered_are_bounded_oldest_forgotten_first() {
        let mut ended = EndedSessions::default();
        for i in 0..=MAX_REMEMBERED_ENDED {
            ended.insert(sid(&format!("s{i}")));
        }
        assert_eq!(ended.order.len(), MAX_REMEMBERED_ENDED);
        assert_eq!(ended.set.len(), MAX_REMEMBERED_ENDED);
        assert!(!ended.contains(&sid("s0")));
        assert!(ended.contains(&sid("s1")));
        assert!(ended.contains(&sid(&format!("s{MAX_REMEMBERED_ENDED}"))));
        ended.remove(&sid("s1"));
        assert!(!ended.contains(&sid("s1")));
        assert_eq!(ended.order.len(), MAX_REMEMBERED_ENDED - 1);
    }

    #[test]
    fn sequence_continues_after_restart_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Spool::open(dir.path(), small()).unwrap();
            for i in 0..10 {
                s.append(start(&format!("s{i}"))).unwrap();
            }
            s.ack(10).unwrap();
            assert_eq!(s.spooled(), 0);
        }
        // Compaction dropped every event; the snapshot keeps seq and sessions.
        let len = std::fs::metadata(dir.path().join(SPOOL_FILE))
            .unwrap()
            .len();
        assert!(len < 400, "compacted file is {len} bytes");
        let mut s = Spool::open(dir.path(), small()).unwrap();
        assert_eq!(s.last_seq(), 10);
        assert_eq!(s.open_count(), 10);
        assert_eq!(s.append(end("s3")).unwrap(), 11);
        drop(s);
        let s = Spool::open(dir.path(), small()).unwrap();
        assert_eq!(s.last_seq(), 11);
        assert_eq!(s.open_count(), 9);
    }

    #[test]
    fn torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SPOOL_FILE);
        {
            let mut s = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
            s.append(start("a")).unwrap();
            s.append(start("b")).unwrap();
        }
        let full = std::fs::read(&path).unwrap();
        let good_len = {
            let s = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
            assert_eq!(s.last_seq(), 2);
            s.file_len
        };
        assert_eq!(good_len, full.len() as u64);
        // Every cut inside the last record is a torn append.
        let one_record = {
            let d2 = tempfile::tempdir().unwrap();
            let mut s = Spool::open(d2.path(), SpoolOptions::default()).unwrap();
            s.append(start("a")).unwrap();
            s.file_len
        };
        for cut in one_record as usize + 1..full.len() {
            std::fs::write(&path, &full[..cut]).unwrap();
            let s = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
            assert_eq!(s.last_seq(), 1, "cut at {cut}");
            assert_eq!(
                std::fs::metadata(&path).unwrap().len(),
                one_record,
                "truncated to the last whole record"
            );
        }
        // A garbled final record and a zero-filled tail are torn too.
        let mut garbled = full.clone();
        let last = garbled.len() - 1;
        garbled[last] ^= 0xff;
        std::fs::write(&path, &garbled).unwrap();
        assert_eq!(
            Spool::open(dir.path(), SpoolOptions::default())
                .unwrap()
                .last_seq(),
            1
        );
        let mut zeros = full.clone();
        zeros.extend_from_slice(&[0u8; 100]);
        std::fs::write(&path, &zeros).unwrap();
        let mut s = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        assert_eq!(s.last_seq(), 2);
        assert_eq!(s.append(start("c")).unwrap(), 3);
    }

    #[test]
    fn corruption_in_the_middle_is_an_error_naming_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SPOOL_FILE);
        {
            let mut s = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
            s.append(start("a")).unwrap();
            s.append(start("b")).unwrap();
        }
        let mut bytes = std::fs::read(&path).unwrap();
        let at = HEADER_LEN as usize + RECORD_HEADER_LEN as usize + 2;
        bytes[at] ^= 0x55;
        std::fs::write(&path, &bytes).unwrap();
        let err = Spool::open(dir.path(), SpoolOptions::default()).unwrap_err();
        match &err {
            SpoolError::Corrupt {
                path: p, offset, ..
            } => {
                assert_eq!(p, &path);
                assert_eq!(*offset, HEADER_LEN);
            }
            other => panic!("expected Corrupt, got {other}"),
        }
        let text = err.to_string();
        assert!(text.contains("spool.log") && text.contains(&HEADER_LEN.to_string()));
        // The file is left as it was for an operator to look at.
        assert_eq!(std::fs::read(&path).unwrap(), bytes);

        let mut bad_header = bytes.clone();
        bad_header[12] ^= 1;
        std::fs::write(&path, &bad_header).unwrap();
        assert!(matches!(
            Spool::open(dir.path(), SpoolOptions::default()),
            Err(SpoolError::Corrupt { offset: 0, .. })
        ));
    }

    #[test]
    fn limit_is_enforced_and_acks_make_room() {
        let dir = tempfile::tempdir().unwrap();
        let opts = SpoolOptions {
            max_events: 3,
            ..SpoolOptions::default()
        };
        let mut s = Spool::open(dir.path(), opts).unwrap();
        for i in 0..3 {
            s.append(start(&format!("s{i}"))).unwrap();
        }
        let err = s.append(start("s3")).unwrap_err();
        assert!(matches!(err, SpoolError::Full { events: 3, .. }), "{err}");
        assert_eq!(s.last_seq(), 3);
        s.ack(1).unwrap();
        assert_eq!(s.append(start("s3")).unwrap(), 4);

        let dir = tempfile::tempdir().unwrap();
        let opts = SpoolOptions {
            max_bytes: 100,
            ..SpoolOptions::default()
        };
        let mut s = Spool::open(dir.path(), opts).unwrap();
        let mut n = 0;
        while s.append(start(&format!("s{n}"))).is_ok() {
            n += 1;
            assert!(n < 100, "byte limit never reached");
        }
        assert!(n >= 1);
    }

    #[test]
    fn new_spool_keeps_open_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        s.append(start("a")).unwrap();
        assert!(matches!(s.start_new_spool(), Err(SpoolError::NotEmpty(1))));
        s.ack(1).unwrap();
        let old = s.spool_id();
        let new = s.start_new_spool().unwrap();
        assert_ne!(old, new);
        drop(s);
        let mut s = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        assert_eq!(s.spool_id(), new);
        assert_eq!(s.last_seq(), 0);
        assert_eq!(s.open_count(), 1);
        assert_eq!(s.append(end("a")).unwrap(), 1);
    }

    /// Appends starts until a record straddles byte `boundary`; returns
    /// the file and the offset where that last record begins.
    fn spool_crossing(dir: &Path, boundary: u64) -> (Vec<u8>, u64, u64) {
        let mut s = Spool::open(dir, SpoolOptions::default()).unwrap();
        let mut i = 0;
        loop {
            let before = s.file_len;
            s.append(start(&format!("session-{i}"))).unwrap();
            i += 1;
            if s.file_len > boundary {
                assert!(before < boundary, "a record ends exactly on the boundary");
                let bytes = std::fs::read(dir.join(SPOOL_FILE)).unwrap();
                return (bytes, before, s.last_seq());
            }
        }
    }

    #[test]
    fn a_record_torn_at_a_sector_boundary_before_zeroed_blocks_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SPOOL_FILE);
        let (full, last_start, last_seq) = spool_crossing(dir.path(), 512);
        // The sectors up to 512 reached the disk, the rest of the 4 KiB
        // block and the next one read back as zeros.
        let mut torn = full[..512].to_vec();
        torn.resize(8192, 0);
        std::fs::write(&path, &torn).unwrap();
        let mut s = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        assert_eq!(s.last_seq(), last_seq - 1, "every complete record is kept");
        assert_eq!(s.spooled(), last_seq - 1);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), last_start);
        assert_eq!(s.append(start("after-the-cut")).unwrap(), last_seq);
        drop(s);
        // Still opens (the agent would otherwise refuse at every restart).
        let s = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        assert_eq!(s.last_seq(), last_seq);
        let open: Vec<_> = s
            .open_sessions()
            .into_iter()
            .map(|o| o.session.to_string())
            .collect();
        assert!(open.contains(&"after-the-cut".to_string()));
        assert!(open.contains(&format!("session-{}", last_seq - 2)));
    }

    #[test]
    fn a_torn_record_followed_by_garbage_is_cut_off() {
        use rand::{Rng, SeedableRng};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SPOOL_FILE);
        let (full, last_start, last_seq) = spool_crossing(dir.path(), 512);
        for seed in 0..32u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut torn = full[..512].to_vec();
            let mut garbage = vec![0u8; 4096 - 512];
            rng.fill(&mut garbage[..]);
            torn.extend_from_slice(&garbage);
            std::fs::write(&path, &torn).unwrap();
            let mut s = Spool::open(dir.path(), SpoolOptions::default())
                .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            assert_eq!(s.last_seq(), last_seq - 1, "seed {seed}");
            assert_eq!(std::fs::metadata(&path).unwrap().len(), last_start);
            assert_eq!(s.append(start("after-the-cut")).unwrap(), last_seq);
            drop(s);
            std::fs::write(&path, &full).unwrap();
        }
        // A record header cut short, a header whose length is over the
        // limit, and one whose length runs past the end: torn as well.
        for tail in [
            &[0u8, 0, 1][..],
            &[0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4, 5][..],
            &[0, 0, 0x10, 0, 1, 2, 3, 4, 5][..],
        ] {
            let mut torn = full.clone();
            torn.extend_from_slice(tail);
            std::fs::write(&path, &torn).unwrap();
            let s = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
            assert_eq!(s.last_seq(), last_seq, "tail {tail:?}");
            assert_eq!(std::fs::metadata(&path).unwrap().len(), full.len() as u64);
        }
    }

    #[test]
    fn damage_followed_by_intact_records_is_reported_not_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SPOOL_FILE);
        {
            let mut s = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
            for i in 0..4 {
                s.append(start(&format!("s{i}"))).unwrap();
            }
        }
        let full = std::fs::read(&path).unwrap();
        let second = {
            // Offset of the second record: the first one's length plus headers.
            let len = u32::from_be_bytes(full[22..26].try_into().unwrap()) as usize;
            HEADER_LEN as usize + RECORD_HEADER_LEN as usize + len
        };
        // A length that runs past the end of the file, over the limit, and
        // a failed checksum: each with whole records after it.
        for (what, patch) in [
            ("past the end", 0x0001_0000u32.to_be_bytes()),
            ("over the limit", u32::MAX.to_be_bytes()),
        ] {
            let mut bytes = full.clone();
            bytes[second..second + 4].copy_from_slice(&patch);
            std::fs::write(&path, &bytes).unwrap();
            match Spool::open(dir.path(), SpoolOptions::default()) {
                Err(SpoolError::Corrupt { offset, why, .. }) => {
                    assert_eq!(offset, second as u64, "{what}");
                    assert!(why.contains("intact record"), "{what}: {why}");
                }
                other => panic!("{what}: expected Corrupt, got {other:?}"),
            }
            assert_eq!(std::fs::read(&path).unwrap(), bytes, "left as it was");
        }
        let mut bytes = full.clone();
        bytes[second + RECORD_HEADER_LEN as usize + 1] ^= 0x20;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            Spool::open(dir.path(), SpoolOptions::default()),
            Err(SpoolError::Corrupt { .. })
        ));
    }

    #[test]
    fn damage_inside_what_a_compaction_wrote_is_reported_even_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SPOOL_FILE);
        {
            let mut s = Spool::open(dir.path(), small()).unwrap();
            for i in 0..6 {
                s.append(start(&format!("s{i}"))).unwrap();
            }
            s.ack(4).unwrap();
            assert_eq!(s.base_len, s.file_len - s.unacked_bytes, "compacted");
        }
        // The last record is an unacknowledged event the compaction wrote
        // and synced whole: damage to it is not a torn append.
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let err = Spool::open(dir.path(), small()).unwrap_err();
        assert!(matches!(err, SpoolError::Corrupt { .. }), "{err}");
    }

    fn crafted_spool(dir: &Path, records: &[SpoolRecord]) {
        let mut bytes = encode_header(7);
        for r in records {
            bytes.extend_from_slice(&encode_record(r).unwrap());
        }
        std::fs::write(dir.join(SPOOL_FILE), bytes).unwrap();
    }

    #[test]
    fn a_snapshot_at_the_end_of_the_sequence_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        crafted_spool(
            dir.path(),
            &[SpoolRecord::Snapshot {
                acked: 0,
                last_seq: u64::MAX,
                open: vec![],
            }],
        );
        let err = Spool::open(dir.path(), SpoolOptions::default()).unwrap_err();
        match &err {
            SpoolError::Corrupt { offset, why, .. } => {
                assert_eq!(*offset, HEADER_LEN);
                assert!(why.contains("sequence"), "{why}");
            }
            other => panic!("expected Corrupt, got {other}"),
        }
        // One below: opens, and the event that takes the last number is
        // written, but nothing after it.
        crafted_spool(
            dir.path(),
            &[SpoolRecord::Snapshot {
                acked: u64::MAX - 1,
                last_seq: u64::MAX - 1,
                open: vec![],
            }],
        );
        let mut s = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        let err = s.append(start("a")).unwrap_err();
        assert!(err.to_string().contains("sequence"), "{err}");
        assert_eq!(s.last_seq(), u64::MAX - 1);
    }

    /// What a crash leaves after the byte where the file stops matching
    /// what was written.
    #[derive(Clone, Copy, Debug)]
    enum Tail {
        /// Nothing: the file ends there.
        Cut,
        Zeros,
        Ones,
        Random,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        // Writes `n` events and acks, keeps the file up to a random byte
        // and fills the rest with a random tail: reopening keeps exactly the
        // records that are still whole and cuts the rest, and the spool
        // goes on from there. Replay a failure with the printed case (the
        // fill seed is part of it).
        #[test]
        fn a_torn_tail_loses_exactly_the_incomplete_records(
            n in 1usize..40,
            acks in proptest::collection::vec(any::<bool>(), 40),
            cut_at in any::<proptest::sample::Index>(),
            tail in prop_oneof![Just(Tail::Cut), Just(Tail::Zeros), Just(Tail::Ones), Just(Tail::Random)],
            tail_len in 0usize..9000,
            seed in any::<u64>(),
        ) {
            use rand::{Rng, SeedableRng};
            let case = format!("n={n} cut_at={cut_at:?} tail={tail:?} tail_len={tail_len} seed={seed}");
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(SPOOL_FILE);
            // (file length, last seq, acked) after each record.
            let mut states = vec![(HEADER_LEN, 0u64, 0u64)];
            {
                let mut s = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
                for (i, ack) in acks.iter().take(n).enumerate() {
                    s.append(start(&format!("s{i}"))).unwrap();
                    states.push((s.file_len, s.last_seq(), s.acked_seq()));
                    if *ack {
                        s.ack(s.last_seq() - 1).unwrap();
                        if s.file_len != states.last().unwrap().0 {
                            states.push((s.file_len, s.last_seq(), s.acked_seq()));
                        }
                    }
                }
            }
            let full = std::fs::read(&path).unwrap();
            let cut = HEADER_LEN as usize + cut_at.index(full.len() + 1 - HEADER_LEN as usize);
            let mut torn = full[..cut].to_vec();
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut fill = vec![0u8; tail_len];
            match tail {
                Tail::Cut => fill.clear(),
                Tail::Zeros => {}
                Tail::Ones => fill.fill(0xff),
                Tail::Random => rng.fill(&mut fill[..]),
            }
            torn.extend_from_slice(&fill);
            std::fs::write(&path, &torn).unwrap();
            // The fill may repeat some of the bytes it replaced.
            let same = full.iter().zip(&torn).take_while(|(a, b)| a == b).count() as u64;
            let &(keep_len, keep_seq, keep_acked) =
                states.iter().rev().find(|st| st.0 <= same).unwrap();

            let mut s = match Spool::open(dir.path(), SpoolOptions::default()) {
                Ok(s) => s,
                Err(e) => return Err(TestCaseError::fail(format!("{case}: {e}"))),
            };
            prop_assert_eq!(s.last_seq(), keep_seq, "{}", case);
            prop_assert_eq!(s.acked_seq(), keep_acked, "{}", case);
            prop_assert_eq!(std::fs::metadata(&path).unwrap().len(), keep_len, "{}", case);
            let kept: Vec<u64> = s.events_after(0, usize::MAX).iter().map(|e| e.seq).collect();
            let want: Vec<u64> = (keep_acked + 1..=keep_seq).collect();
            prop_assert_eq!(kept, want, "{}", case);
            prop_assert_eq!(&std::fs::read(&path).unwrap()[..], &full[..keep_len as usize], "{}", case);
            prop_assert_eq!(s.append(start("after")).unwrap(), keep_seq + 1, "{}", case);
            drop(s);
            let s = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
            prop_assert_eq!(s.last_seq(), keep_seq + 1, "{}", case);
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Start,
        End(usize),
        Ack(u64),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Start),
            3 => (0usize..8).prop_map(Op::End),
            3 => (0u64..6).prop_map(Op::Ack),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        // Random appends, acks and reopens: what is not acknowledged is
        // always there, in order, and sequence numbers never repeat.
        #[test]
        fn random_histories_lose_nothing_unacked(ops in proptest::collection::vec(op(), 1..60)) {
            let dir = tempfile::tempdir().unwrap();
            let mut s = Spool::open(dir.path(), small()).unwrap();
            let mut all: Vec<SequencedEvent> = Vec::new();
            let mut acked = 0u64;
            let mut open: Vec<String> = Vec::new();
            let mut next_name = 0;
            for op in ops {
                match op {
                    Op::Start => {
                        let name = format!("s{next_name}");
                        next_name += 1;
                        let ev = start(&name);
                        let seq = s.append(ev.clone()).unwrap();
                        prop_assert_eq!(seq, all.len() as u64 + 1);
                        all.push(SequencedEvent { seq, event: ev });
                        open.push(name);
                    }
                    Op::End(i) => {
                        if open.is_empty() { continue; }
                        let name = open.remove(i % open.len());
                        let ev = end(&name);
                        let seq = s.append(ev.clone()).unwrap();
                        all.push(SequencedEvent { seq, event: ev });
                    }
                    Op::Ack(k) => {
                        let up_to = (acked + k).min(all.len() as u64);
                        s.ack(up_to).unwrap();
                        acked = acked.max(up_to);
                    }
                    Op::Reopen => {
                        drop(s);
                        s = Spool::open(dir.path(), small()).unwrap();
                    }
                }
                prop_assert_eq!(s.last_seq(), all.len() as u64);
                prop_assert_eq!(s.acked_seq(), acked);
                let expected: Vec<_> = all[acked as usize..].to_vec();
                prop_assert_eq!(s.events_after(acked, usize::MAX), expected);
                let mut have: Vec<String> =
                    s.open_sessions().into_iter().map(|o| o.session.to_string()).collect();
                let mut want = open.clone();
                have.sort();
                want.sort();
                prop_assert_eq!(have, want);
            }
        }
    }
}
