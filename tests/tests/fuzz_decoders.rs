//! Every decoder of outside data ([`ferry_tests::fuzz::TARGETS`]) driven
//! with seeded mutations of valid inputs: random bytes after each variant
//! tag, bit flips, cuts, insertions and splices. A failure names the
//! target, the seed and the input (hex), so it can be replayed:
//! `FERRY_FUZZ_SEED=<seed> cargo test -p ferry-tests --test fuzz_decoders`.
//! `FERRY_FUZZ_ROUNDS` raises the number of inputs per target (default
//! 2,000, a few seconds in all).

use std::panic::{catch_unwind, AssertUnwindSafe};

use ferry_tests::fuzz::TARGETS;

/// xorshift64*: a small, seeded, reproducible source of bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Valid or nearly valid starting points: every variant tag of the
/// versioned envelopes (bincode's small integers), and the text files
/// Ferry ships.
fn seeds() -> Vec<Vec<u8>> {
    let mut seeds = vec![Vec::new()];
    for version in 0u8..2 {
        for tag in 0u8..48 {
            seeds.push(vec![version, tag]);
        }
    }
    seeds.push(b"FERRY\x00\x00\x01".to_vec());
    seeds.push(include_bytes!("../../packaging/broker.toml").to_vec());
    seeds.push(include_bytes!("../../packaging/agent.toml").to_vec());
    seeds.push(b"id,email,mobile\r\nalice,a@example.com,+8613800000000\r\n".to_vec());
    seeds.push(b"v1.AAAA.BBBB".to_vec());
    seeds
}

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = seeds[rng.below(seeds.len())].clone();
    for _ in 0..=rng.below(4) {
        match rng.below(6) {
            // Random bytes after the seed (a variant's fields).
            0 => {
                let n = rng.below(64);
                data.extend(rng.bytes(n));
            }
            // Flip a bit.
            1 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            // Cut.
            2 if !data.is_empty() => {
                let n = rng.below(data.len());
                data.truncate(n);
            }
            // Insert bytes somewhere.
            3 => {
                let at = rng.below(data.len() + 1);
                let n = rng.below(16);
                let bytes = rng.bytes(n);
                data.splice(at..at, bytes);
            }
            // A large length prefix (bincode varint markers 251-253).
            4 => {
                let at = rng.below(data.len() + 1);
                let marker = 251 + rng.below(3) as u8;
                data.splice(at..at, [marker, 0xff, 0xff, 0xff, 0xff]);
            }
            // Splice in part of another seed.
            _ => {
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len() + 1);
                data.extend_from_slice(&other[from..]);
            }
        }
    }
    data
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn every_decoder_survives_mutated_input_and_round_trips() {
    let seed: u64 = std::env::var("FERRY_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_f3e4_7a11_0001);
    let rounds: usize = std::env::var("FERRY_FUZZ_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000);
    let common = seeds();
    // A failing input is reported here, not as the default panic output.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failure = None;
    for target in TARGETS {
        let mut rng = Rng(seed ^ (target.name.len() as u64).rotate_left(17) | 1);
        // A target with seeds of its own (files with checksums, requests,
        // scenarios) starts from those alone.
        let mut seeds = ferry_tests::fuzz::seeds(target.name);
        if seeds.is_empty() {
            seeds = common.clone();
        } else {
            seeds.push(Vec::new());
        }
        for round in 0..rounds {
            let data = mutate(&mut rng, &seeds);
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| (target.run)(&data))) {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failure = Some(format!(
                    "target {} failed at round {round} (FERRY_FUZZ_SEED={seed}): {why}\ninput: {}",
                    target.name,
                    hex(&data)
                ));
                break;
            }
        }
        if failure.is_some() {
            break;
        }
    }
    std::panic::set_hook(hook);
    if let Some(failure) = failure {
        panic!("{failure}");
    }
}

/// The committed inputs: each crash libFuzzer found, once fixed
/// (`tests/fuzz/regressions/<target>/`), and a minimized corpus per target
/// (`tests/fuzz/corpus-min/<target>/`): replayed on every run, so a fixed
/// crash stays fixed.
#[test]
fn the_committed_corpora_replay_cleanly() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0usize;
    for target in TARGETS {
        for dir in ["corpus-min", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(target.name)) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let data = std::fs::read(&path).unwrap_or_default();
                let run = catch_unwind(AssertUnwindSafe(|| (target.run)(&data)));
                assert!(
                    run.is_ok(),
                    "target {} fails on {}",
                    target.name,
                    path.display()
                );
                replayed += 1;
            }
        }
    }
    eprintln!("replayed {replayed} committed inputs");
}

#[test]
fn the_targets_accept_what_the_encoders_write() {
    use ferry_common::frame;
    use ferry_common::wire::{AgentMessage, AgentToBroker, Presence, PresenceReport};
    let msg = AgentMessage::V1(AgentToBroker::Presence(PresenceReport {
        session: "s1".parse().expect("id"),
        state: Presence::Disconnected,
        at: ferry_common::UnixMillis(1),
    }));
    let bytes = frame::encode_payload(&msg).expect("encode");
    // A valid message goes through the whole round trip without a panic.
    ferry_tests::fuzz::agent_message(&bytes);
    let decoded: AgentMessage = frame::decode_payload(&bytes).expect("decode");
    assert_eq!(decoded, msg);
}

/// The seeds built for the targets are valid inputs: each is accepted, so
/// the mutations start from what the decoder takes, and the target is seen
/// to accept something.
#[test]
fn the_built_seeds_are_accepted_by_their_targets() {
    use ferry_tests::fuzz::{self, Outcome};
    type Check = fn(&[u8]) -> Outcome;
    let checks: [(&str, Check); 5] = [
        ("spool_file", fuzz::check_spool_file),
        ("used_tickets_file", fuzz::check_used_tickets_file),
        ("csr_der", fuzz::check_csr_der),
        ("scenario_toml", fuzz::check_scenario_toml),
        ("policy_json", fuzz::check_policy_json),
    ];
    for (name, check) in checks {
        let seeds = fuzz::seeds(name);
        assert!(!seeds.is_empty(), "target {name} has no seeds");
        for (i, seed) in seeds.iter().enumerate() {
            assert_eq!(
                check(seed),
                Outcome::Accepted,
                "seed {i} of target {name} is refused: {}",
                hex(seed)
            );
        }
    }
}
