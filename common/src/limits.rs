//! Every limit on data that comes from outside, named once.
//!
//! Each constant says why it has the value it has. Code that reads from the
//! network or from disk refers to these names, never to a bare number.

/// Largest frame payload on the agent link, checked against the length prefix
/// before anything is allocated. The largest legitimate message is a `Hello`
/// carrying [`MAX_SESSIONS_PER_HELLO`] open sessions (a few hundred bytes each),
/// which stays well under this.
pub const MAX_FRAME_LEN: usize = 256 * 1024;

/// Largest frame on the broker's admin socket. Listings of a large fleet go
/// through it, so it is larger than the agent link's, but still bounded.
pub const MAX_ADMIN_FRAME_LEN: usize = 16 * 1024 * 1024;

/// Most open sessions an agent may list in its `Hello`. A streaming host runs a
/// handful of sessions (the spec catalog's largest allows 6 per host); 512 leaves
/// room for unusual hosts without letting one peer make the broker allocate much.
pub const MAX_SESSIONS_PER_HELLO: usize = 512;

/// Longest identifier (resource, session, user, group) in bytes. Identifiers end
/// up in certificates, file names, logs and database keys.
pub const MAX_ID_LEN: usize = 128;

/// Longest resource identifier. Resource ids are also DNS labels in agent
/// certificates, and a DNS label is at most 63 bytes.
pub const MAX_RESOURCE_ID_LEN: usize = 63;

/// Longest free-text field (versions, OS names, reasons, error messages).
pub const MAX_TEXT_LEN: usize = 1024;

/// Longest host name a host reports (`HostFacts::hostname`): a DNS name is
/// at most 253 bytes and a POSIX host name at most 255 (`HOST_NAME_MAX`
/// on Linux is 64). The broker keeps at most this much of one.
pub const MAX_HOST_NAME_LEN: usize = 255;

/// Longest reply to the connection preamble: a status, a version and a short
/// human-readable message.
pub const MAX_PREAMBLE_MESSAGE_LEN: usize = 512;

/// Largest frame on the agent's local Unix socket (session reports from the
/// host's streaming server, status queries). Requests carry a few ids and a
/// reason; replies a status. 64 KiB is far above that and still small.
pub const MAX_LOCAL_FRAME_LEN: usize = 64 * 1024;

/// Largest record in the agent's spool file, checked before a record is read
/// into memory. The largest record is a compaction snapshot listing up to
/// [`MAX_SESSIONS_PER_HELLO`] open sessions, which fits in one link frame.
pub const MAX_SPOOL_RECORD_LEN: usize = MAX_FRAME_LEN;

/// Most unacknowledged session events the agent keeps. A host produces a few
/// events per session; 100,000 covers weeks of a busy host with the broker
/// down. Past it, new reports are refused rather than memory and disk growing.
pub const MAX_SPOOLED_EVENTS: usize = 100_000;

/// Most bytes of unacknowledged session events the agent keeps (encoded size),
/// the byte-side twin of [`MAX_SPOOLED_EVENTS`]: long reasons cannot make the
/// spool large either.
pub const MAX_SPOOLED_BYTES: usize = 64 * 1024 * 1024;

/// Most connections the agent's local socket serves at once. Reports come
/// from one streaming server and a few CLI calls; the cap keeps a runaway
/// local client from exhausting the agent's file descriptors.
pub const MAX_LOCAL_CONNECTIONS: usize = 64;

/// Longest policy document (`Command::ApplyPolicy`), checked by the broker
/// before it sends one and by the agent on receipt. A policy with every part
/// and 21 periods (3 a day) is about 3 KiB; 16 KiB leaves room for parts a
/// later version adds, and still fits a link frame ([`MAX_FRAME_LEN`]) many
/// times over.
pub const MAX_POLICY_DOCUMENT_LEN: usize = 16 * 1024;

/// Longest ticket text (`common::ticket`), checked before it is decoded.
/// The largest claims (ids at their limits) are under 500 bytes, 4/3 of that
/// in base64url plus an 86-character signature: about 760 bytes.
pub const MAX_TICKET_LEN: usize = 1024;

/// Largest encoded ticket claims, the byte limit of their decoder.
pub const MAX_TICKET_CLAIMS_LEN: usize = 640;

/// Longest lifetime (expiry minus issue time) a ticket may claim. Tickets
/// live a minute; the agent keeps each used ticket id until its expiry, so
/// this bounds how long the used-ticket set holds an entry.
pub const MAX_TICKET_LIFETIME_MS: i64 = 10 * 60 * 1000;

/// Longest password a user may present or set. Argon2 hashes any length,
/// but the route protocol and `ferryctl` read it into memory first.
pub const MAX_PASSWORD_LEN: usize = 1024;

/// Shortest password the broker sets for a user, in characters: shorter
/// ones are guessed by trying. Checked when a password is set, not when one
/// is presented (a refusal then says nothing about why).
pub const MIN_PASSWORD_CHARS: usize = 8;

/// Longest user token (`ferryctl user token`): a user id, two integers and
/// an HMAC in base64url are well under it.
pub const MAX_TOKEN_LEN: usize = 512;

/// Length of the broker's ticket public key (`BrokerToAgent::TicketKey`):
/// a raw Ed25519 public key. The agent refuses any other length.
pub const TICKET_PUBLIC_KEY_LEN: usize = 32;

/// Most components an agent lists in one `Inventory` (besides the agent and
/// the image). A host runs a platform and a handful of applications; 64 is
/// far above that and keeps the message a few KiB.
pub const MAX_INVENTORY_COMPONENTS: usize = 64;
