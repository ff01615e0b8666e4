//! Targets for the agent's state files, read back after a crash: the spool
//! and the used-ticket set. Each input is written to a scratch directory of
//! the thread (see [`super::scratch`]) and opened the way the agent opens it
//! at start.

use std::collections::HashMap;
use std::path::Path;

use ferry_agent::spool::{
    crc32, started, Spool, SpoolError, SpoolOptions, HEADER_LEN, RECORD_HEADER_LEN, SPOOL_FILE,
};
use ferry_agent::ticket::{
    TicketStoreError, TicketVerifier, VerifyError, COMPACT_SLACK, PRUNE_GRACE_MS, TICKET_KEY_FILE,
    USED_TICKETS_FILE, VERIFIED_SESSIONS_FILE,
};
use ferry_common::limits::MAX_SPOOL_RECORD_LEN;
use ferry_common::ticket::{sign_ticket, TicketClaims};
use ferry_common::wire::{OpenSession, SequencedEvent, SessionEvent};
use ferry_common::{ResourceId, SessionId, UnixMillis, UserId};
use ring::signature::{Ed25519KeyPair, KeyPair as _};

use super::Outcome;

/// A spool file: the first byte picks how the rest is read.
///
/// * Even: the rest is the file, byte for byte.
/// * Odd: the rest is a list of record payloads, each a big-endian `u16`
///   length and the payload, framed with their lengths and checksums behind
///   a valid header, so mutations reach the records' decoding and the
///   sequence checks instead of stopping at a checksum. Bytes left that do
///   not make a whole payload are added as they are (a torn tail).
///
/// Promises: opening never panics; a refused file is `Corrupt` and left as
/// it is; an opened file is the input cut at its first damaged record (or
/// whole), so every complete record is kept; opening it again gives the same
/// state and leaves it alone; an event appended after recovery, and an
/// acknowledgement with its compaction, are there after a reopen; the
/// session's end is kept too (its id is not started again).
pub fn spool_file(data: &[u8]) {
    let _ = check_spool_file(data);
}

/// [`spool_file`], saying whether the spool opened.
pub fn check_spool_file(data: &[u8]) -> Outcome {
    let file = match data.split_first() {
        Some((mode, rest)) if mode % 2 == 1 => framed_spool(rest),
        Some((_, rest)) => rest.to_vec(),
        None => Vec::new(),
    };
    let dir = super::scratch("spool");
    let path = dir.join(SPOOL_FILE);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    std::fs::write(&path, &file).expect("write the spool file");
    let opts = SpoolOptions::default();
    let spool = match Spool::open(&dir, opts) {
        Ok(spool) => spool,
        Err(e) => {
            assert!(
                matches!(e, SpoolError::Corrupt { .. }),
                "a bad spool file is refused as corrupt, not: {e}"
            );
            assert_eq!(read(&path), file, "a refused spool file is left as it is");
            return Outcome::Refused;
        }
    };
    let kept = read(&path);
    assert_eq!(
        kept.len() as u64,
        whole_records_end(&file),
        "recovery keeps every complete record and cuts only the damaged tail"
    );
    assert!(file.starts_with(&kept), "recovery only cuts the file");
    let before = SpoolState::of(&spool);
    drop(spool);

    let mut spool = Spool::open(&dir, opts).expect("a recovered spool opens again");
    assert_eq!(SpoolState::of(&spool), before, "recovering twice differs");
    assert_eq!(read(&path), kept, "a second recovery changed the file");

    // An event appended after recovery is there after a reopen.
    let session: SessionId = "fuzz-appended".parse().expect("id");
    let user: UserId = "fuzz".parse().expect("id");
    let event = started(session.clone(), user.clone(), UnixMillis(1));
    match spool.append(event.clone()) {
        Ok(seq) => {
            assert_eq!(seq, before.last_seq + 1, "an append takes the next number");
            drop(spool);
            let spool = Spool::open(&dir, opts).expect("a spool appended to opens again");
            let after = SpoolState::of(&spool);
            assert_eq!(after.spool_id, before.spool_id);
            assert_eq!(after.last_seq, seq);
            assert_eq!(after.acked, before.acked);
            assert_eq!(after.events[..before.events.len()], before.events[..]);
            assert_eq!(
                after.events.last(),
                Some(&SequencedEvent { seq, event }),
                "the appended event is lost after a reopen"
            );
            assert!(after.open.contains(&OpenSession {
                session: session.clone(),
                user: user.clone(),
                started_at: UnixMillis(1),
            }));
            drop(spool);
            // An acknowledgement of everything, compacting at once, keeps
            // the sequence and the open sessions.
            let compacting = SpoolOptions {
                compact_min_dead_bytes: 0,
                ..opts
            };
            let mut spool = Spool::open(&dir, compacting).expect("reopen");
            spool.ack(seq).expect("acknowledge and compact");
            drop(spool);
            let spool = Spool::open(&dir, opts).expect("a compacted spool opens again");
            let compacted = SpoolState::of(&spool);
            assert_eq!(
                compacted,
                SpoolState {
                    acked: seq,
                    spooled: 0,
                    events: Vec::new(),
                    ..after
                },
                "compaction changed the state"
            );
            drop(spool);
            // Its end, then a compaction: the ended id is not started
            // again, after a reopen or the compaction.
            let mut spool = Spool::open(&dir, compacting).expect("reopen");
            let end = SessionEvent::Ended {
                session: session.clone(),
                at: UnixMillis(2),
                reason: ferry_common::wire::EndReason::Logout,
            };
            let ended = spool.append(end).expect("the end of an open session");
            drop(spool);
            for ack in [false, true] {
                let mut spool = Spool::open(&dir, compacting).expect("reopen");
                assert!(!spool.open_sessions().iter().any(|s| s.session == session));
                let again = started(session.clone(), user.clone(), UnixMillis(3));
                let r = spool.append(again);
                assert!(
                    matches!(r, Err(SpoolError::EndedSession(_))),
                    "an ended session started again (after a compaction: {ack}): {r:?}"
                );
                if !ack {
                    spool.ack(ended).expect("acknowledge and compact");
                }
            }
        }
        Err(
            SpoolError::DuplicateSession(_)
            | SpoolError::EndedSession(_)
            | SpoolError::TooManyOpenSessions(_)
            | SpoolError::Full { .. }
            | SpoolError::SequenceExhausted(_),
        ) => {}
        Err(e) => panic!("append after recovery failed: {e}"),
    }
    Outcome::Accepted
}

/// The spool file of [`spool_file`]'s framed form: a valid header, each
/// payload framed as the spool frames it, then what is left unframed.
fn framed_spool(mut rest: &[u8]) -> Vec<u8> {
    let mut file = b"FERRYSPL\x00\x01\x00\x00\x00\x00\x00\x00\x00\x01".to_vec();
    file.extend_from_slice(&crc32(&file).to_be_bytes());
    while let Some((len, after)) = rest.split_first_chunk::<2>() {
        let len = usize::from(u16::from_be_bytes(*len));
        let Some(payload) = after.get(..len) else {
            break;
        };
        let len_bytes = (len as u32).to_be_bytes();
        let mut framed = len_bytes.to_vec();
        framed.extend_from_slice(payload);
        file.extend_from_slice(&len_bytes);
        file.extend_from_slice(&crc32(&framed).to_be_bytes());
        file.extend_from_slice(payload);
        rest = &after[len..];
    }
    file.extend_from_slice(rest);
    file
}

/// The framed form of a spool file (the inverse of [`framed_spool`] for
/// files of whole records with payloads below 64 KiB), for seeds.
pub fn unframed_spool(file: &[u8]) -> Vec<u8> {
    let mut out = vec![1u8];
    let mut at = HEADER_LEN as usize;
    while let Some(head) = file.get(at..at + RECORD_HEADER_LEN as usize) {
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let Some(payload) = file.get(at + head.len()..at + head.len() + len) else {
            break;
        };
        out.extend_from_slice(&(len as u16).to_be_bytes());
        out.extend_from_slice(payload);
        at += head.len() + len;
    }
    out
}

/// Where a file's records stop being whole: the first record whose length
/// is over the limit or past the end, or whose checksum is wrong, or a
/// partial record header; the file's end when every record is whole.
fn whole_records_end(file: &[u8]) -> u64 {
    let mut at = HEADER_LEN as usize;
    while let Some(head) = file.get(at..at + RECORD_HEADER_LEN as usize) {
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        if len > MAX_SPOOL_RECORD_LEN {
            break;
        }
        let Some(payload) = file.get(at + head.len()..at + head.len() + len) else {
            break;
        };
        let mut covered = head[..4].to_vec();
        covered.extend_from_slice(payload);
        if crc32(&covered) != crc {
            break;
        }
        at += head.len() + len;
    }
    at.min(file.len()) as u64
}

/// What a spool holds, to compare two opens.
#[derive(Debug, PartialEq)]
struct SpoolState {
    spool_id: u64,
    last_seq: u64,
    acked: u64,
    spooled: u64,
    open: Vec<OpenSession>,
    events: Vec<SequencedEvent>,
}

impl SpoolState {
    fn of(s: &Spool) -> SpoolState {
        SpoolState {
            spool_id: s.spool_id(),
            last_seq: s.last_seq(),
            acked: s.acked_seq(),
            spooled: s.spooled(),
            open: s.open_sessions(),
            events: s.events_after(s.acked_seq(), usize::MAX),
        }
    }
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("read back the file")
}

/// First bytes of the used-ticket file.
const USED_MAGIC: &[u8] = b"FYUSED01";
/// One used-ticket record: the id and the expiry (i64, big-endian).
const USED_RECORD_LEN: usize = 24;
/// The agent's clock in [`used_tickets_file`].
const NOW: UnixMillis = UnixMillis(1_800_000_000_000);

/// The key the used-ticket target signs its tickets with.
fn ticket_key() -> Ed25519KeyPair {
    Ed25519KeyPair::from_seed_unchecked(&[7u8; 32]).expect("an Ed25519 seed")
}

/// A ticket for this host with `id`, valid at [`NOW`].
fn ticket_with_id(key: &Ed25519KeyPair, id: [u8; 16]) -> String {
    let claims = TicketClaims {
        ticket_id: id,
        group: "g".parse().expect("id"),
        resource: "h1".parse().expect("id"),
        user: "alice".parse().expect("id"),
        session: "s-fuzz".parse().expect("id"),
        issued_at: UnixMillis(NOW.0 - 1_000),
        expires_at: UnixMillis(NOW.0 + 60_000),
    };
    sign_ticket(&claims, key)
}

/// The agent's used-ticket file (`state_dir/used-tickets`): a magic header
/// and 24-byte records (id, expiry).
///
/// Promises: opening never panics; a refused file is `Corrupt` (a bad
/// header) and left as it is; an opened one remembers exactly the ids of
/// its whole records that are not yet dead, cuts only a partial record at
/// the end (or compacts the file to those ids); a ticket with a remembered
/// id is refused as reused; a new ticket is accepted, and remembered after a
/// reopen.
pub fn used_tickets_file(data: &[u8]) {
    let _ = check_used_tickets_file(data);
}

/// [`used_tickets_file`], saying whether the file opened.
pub fn check_used_tickets_file(data: &[u8]) -> Outcome {
    let dir = super::scratch("tickets");
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let path = dir.join(USED_TICKETS_FILE);
    let key = ticket_key();
    std::fs::write(dir.join(TICKET_KEY_FILE), key.public_key().as_ref()).expect("write the key");
    match std::fs::remove_file(dir.join(VERIFIED_SESSIONS_FILE)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("remove the verified sessions: {e}"),
    }
    std::fs::write(&path, data).expect("write the used-ticket file");
    let resource: ResourceId = "h1".parse().expect("id");
    let verifier = match TicketVerifier::open(&dir, resource.clone(), NOW) {
        Ok(v) => v,
        Err(e) => {
            assert!(
                matches!(e, TicketStoreError::Corrupt { .. }),
                "a bad used-ticket file is refused as corrupt, not: {e}"
            );
            assert!(
                !data.starts_with(USED_MAGIC),
                "a file with the header refused: {e}"
            );
            assert_eq!(read(&path), data, "a refused file is left as it is");
            return Outcome::Refused;
        }
    };
    assert!(
        data.starts_with(USED_MAGIC),
        "a file without the header opened"
    );
    let body = &data[USED_MAGIC.len()..];
    let whole = body.len() / USED_RECORD_LEN;
    let mut live = HashMap::new();
    for r in body.chunks_exact(USED_RECORD_LEN) {
        let id: [u8; 16] = r[..16].try_into().expect("16 bytes");
        let exp = i64::from_be_bytes(r[16..].try_into().expect("8 bytes"));
        if exp.saturating_add(PRUNE_GRACE_MS) > NOW.0 {
            live.insert(id, exp);
        }
    }
    assert_eq!(verifier.used_count(), live.len(), "live used tickets");
    let kept = read(&path);
    if whole <= live.len() * 2 + COMPACT_SLACK {
        assert_eq!(
            kept,
            data[..USED_MAGIC.len() + whole * USED_RECORD_LEN],
            "opening keeps every whole record and cuts only a partial one"
        );
    } else {
        // Compacted: the live records, in any order.
        assert!(kept.starts_with(USED_MAGIC));
        let mut records: Vec<&[u8]> = kept[USED_MAGIC.len()..].chunks(USED_RECORD_LEN).collect();
        records.sort();
        let mut expected: Vec<Vec<u8>> = live
            .iter()
            .map(|(id, exp)| [&id[..], &exp.to_be_bytes()].concat())
            .collect();
        expected.sort();
        assert_eq!(records, expected, "a compacted file holds the live tickets");
    }
    drop(verifier);
    let verifier = TicketVerifier::open(&dir, resource.clone(), NOW).expect("reopen");
    assert_eq!(
        verifier.used_count(),
        live.len(),
        "reopening changed the set"
    );
    if let Some(id) = live.keys().min() {
        let r = verifier.verify_blocking(&ticket_with_id(&key, *id), NOW);
        assert!(
            matches!(r, Err(VerifyError::Reused { .. })),
            "a remembered ticket is accepted again: {r:?}"
        );
    }
    let fresh = (0u128..)
        .map(|n| (0xeeee_eeee_eeee_eeee_eeee_eeee_0000_0000 + n).to_be_bytes())
        .find(|id| !live.contains_key(id))
        .expect("an id the file does not hold");
    let ticket = ticket_with_id(&key, fresh);
    verifier
        .verify_blocking(&ticket, NOW)
        .expect("a new ticket is accepted");
    drop(verifier);
    let verifier = TicketVerifier::open(&dir, resource, NOW).expect("reopen");
    assert_eq!(verifier.used_count(), live.len() + 1);
    let r = verifier.verify_blocking(&ticket, NOW);
    assert!(
        matches!(r, Err(VerifyError::Reused { .. })),
        "a ticket accepted before the reopen is accepted again: {r:?}"
    );
    Outcome::Accepted
}

/// Valid spool files, in both forms: empty, with events, an acknowledgement,
/// a compaction, a torn tail.
pub fn spool_seeds() -> Vec<Vec<u8>> {
    let dir = super::scratch("spool-seeds");
    let _ = std::fs::remove_dir_all(&dir);
    let opts = SpoolOptions::default();
    let mut spool = Spool::open(&dir, opts).expect("a new spool");
    let path = dir.join(SPOOL_FILE);
    let mut files = vec![read(&path)];
    let user: UserId = "alice".parse().expect("id");
    let sid = |s: &str| -> SessionId { s.parse().expect("id") };
    spool
        .append(started(sid("s1"), user.clone(), UnixMillis(1_000)))
        .expect("append");
    spool
        .append(started(sid("s2"), user.clone(), UnixMillis(2_000)))
        .expect("append");
    spool
        .append(SessionEvent::Ended {
            session: sid("s1"),
            at: UnixMillis(3_000),
            reason: ferry_common::wire::EndReason::Logout,
        })
        .expect("append");
    files.push(read(&path));
    spool.ack(2).expect("ack");
    files.push(read(&path));
    spool.compact().expect("compact");
    spool
        .append(started(sid("s3"), user, UnixMillis(4_000)))
        .expect("append");
    let compacted = read(&path);
    let mut torn = compacted.clone();
    torn.truncate(torn.len() - 3);
    files.push(compacted);
    drop(spool);
    let _ = std::fs::remove_dir_all(&dir);
    let mut seeds = Vec::new();
    for file in &files {
        seeds.push([&[0u8][..], file].concat());
        seeds.push(unframed_spool(file));
    }
    seeds.push([&[0u8][..], &torn].concat());
    seeds
}

/// Valid used-ticket files: empty, live and dead records, a torn record.
pub fn used_tickets_seeds() -> Vec<Vec<u8>> {
    let rec = |id: u8, exp: i64| [&[id; 16][..], &exp.to_be_bytes()].concat();
    let empty = USED_MAGIC.to_vec();
    let live = [
        USED_MAGIC.to_vec(),
        rec(1, NOW.0 + 30_000),
        rec(2, NOW.0 - 1),
    ]
    .concat();
    let dead = [USED_MAGIC.to_vec(), rec(3, NOW.0 - PRUNE_GRACE_MS)].concat();
    let mut torn = live.clone();
    torn.extend_from_slice(&rec(4, NOW.0)[..10]);
    vec![empty, live, dead, torn]
}
