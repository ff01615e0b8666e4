//! `ferry-agent`: runs on every streaming host.
