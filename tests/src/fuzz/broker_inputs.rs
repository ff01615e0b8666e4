//! Targets for what the broker reads from agents and operators besides the
//! protocols: certificate signing requests, scenario files and policy JSON.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_agent::policy::check_document;
use ferry_broker::engine::{Policy, PolicyPeriod, Retention};
use ferry_broker::groups::policy_parts::{policy_document, stored_json, PolicyParts};
use ferry_broker::pki::{self, CsrNames, PkiError, Validity};
use ferry_broker::simulate::{self, SimError, MAX_SCENARIO_EVENTS};
use ferry_common::{ResourceId, UnixMillis};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer as _, GeneralName, ParsedExtension, X509Certificate};

use super::Outcome;

/// The resource a certificate signing request is answered for.
const RESOURCE: &str = "h1";

/// The scratch CA of this thread, made on first use.
fn pki_dir() -> PathBuf {
    let dir = super::scratch("pki");
    if !dir.join(pki::CA_CERT).exists() {
        pki::init(&dir, &[]).expect("a scratch CA");
    }
    dir
}

/// A certificate signing request in DER, as an agent sends it at enrollment
/// (any names: the broker decides) and renewal (no name, or only its own).
///
/// Promises: never panics; a request the broker cannot use is refused as
/// such (`PkiError::Csr`, never as the broker's own failure); an accepted
/// one gets a certificate for the resource alone with the request's public
/// key; a renewal is accepted only for a request an enrollment accepts, and
/// that asks for no name but the resource's.
pub fn csr_der(data: &[u8]) {
    let _ = check_csr_der(data);
}

/// [`csr_der`], saying whether an enrollment accepted the request.
pub fn check_csr_der(data: &[u8]) -> Outcome {
    let dir = pki_dir();
    let resource: ResourceId = RESOURCE.parse().expect("id");
    let validity = Validity {
        issued: UnixMillis(1_800_000_000_000),
        lifetime: pki::DEFAULT_AGENT_LIFETIME,
    };
    let enroll = pki::issue_from_csr(&dir, &resource, data, CsrNames::Ignored, validity);
    let renew = pki::issue_from_csr(&dir, &resource, data, CsrNames::OnlyResource, validity);
    for r in [&enroll, &renew] {
        if let Err(e) = r {
            assert!(
                matches!(e, PkiError::Csr(_)),
                "a bad request is refused as a bad request, not: {e}"
            );
        }
    }
    let Ok(pem) = enroll else {
        assert!(
            renew.is_err(),
            "a renewal accepted a request enrollment refuses"
        );
        return Outcome::Refused;
    };
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(data)
        .expect("an accepted request parses");
    let key = csr.certification_request_info.subject_pki.raw;
    check_issued(&pem, key);
    if let Ok(pem) = renew {
        check_issued(&pem, key);
        let mut names = Vec::new();
        for ext in csr.requested_extensions().into_iter().flatten() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                names.extend(san.general_names.iter().cloned());
            }
        }
        assert!(
            matches!(names.as_slice(), [] | [GeneralName::DNSName(RESOURCE)]),
            "a renewal accepted a request for {names:?}"
        );
    }
    Outcome::Accepted
}

/// `pem` is one certificate for [`RESOURCE`] alone, with the public key `key`.
fn check_issued(pem: &str, key: &[u8]) {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).expect("an issued certificate");
    let info = pki::certificate_info(&der).expect("an issued certificate reads");
    assert_eq!(info.resource.as_str(), RESOURCE);
    let (_, cert) = X509Certificate::from_der(&der).expect("an issued certificate parses");
    assert_eq!(
        cert.tbs_certificate.subject_pki.raw, key,
        "the certificate has another key than the request"
    );
}

/// Certificate signing requests as agents make them: ECDSA P-256 and
/// Ed25519 keys, without a name, with the resource's, with others.
pub fn csr_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for (alg, names) in [
        (&rcgen::PKCS_ECDSA_P256_SHA256, vec![]),
        (&rcgen::PKCS_ECDSA_P256_SHA256, vec![RESOURCE.to_owned()]),
        (&rcgen::PKCS_ED25519, vec![RESOURCE.to_owned()]),
        (
            &rcgen::PKCS_ECDSA_P256_SHA256,
            vec!["h2".to_owned(), "host.example".to_owned()],
        ),
    ] {
        let key = rcgen::KeyPair::generate_for(alg).expect("a key");
        let csr = rcgen::CertificateParams::new(names)
            .and_then(|p| p.serialize_request(&key))
            .expect("a request");
        seeds.push(csr.der().to_vec());
    }
    seeds
}

/// A scenario file of `ferryctl simulate` (SPEC section 7).
///
/// Promises: never panics; a refused file lists its problems, each on a
/// line of the file; an accepted scenario has its events in time order
/// within its period, and replays (or stops at an event with its line)
/// and renders without a panic.
pub fn scenario_toml(data: &[u8]) {
    let _ = check_scenario_toml(data);
}

/// [`scenario_toml`], saying whether the file was accepted.
pub fn check_scenario_toml(data: &[u8]) -> Outcome {
    let Ok(text) = std::str::from_utf8(data) else {
        return Outcome::Refused;
    };
    let path = Path::new("scenario.toml");
    let lines = text.lines().count().max(1);
    let sc = match simulate::parse(path, text) {
        Ok(sc) => sc,
        Err(SimError::Invalid { problems, .. }) => {
            assert!(!problems.is_empty(), "a refusal without a problem");
            for p in &problems {
                assert!(
                    (1..=lines + 1).contains(&p.line),
                    "problem on line {} of a {lines}-line file: {}",
                    p.line,
                    p.message
                );
            }
            return Outcome::Refused;
        }
        Err(e) => panic!("parsing fails only as invalid, not: {e}"),
    };
    assert!(sc.start < sc.end, "an empty period accepted");
    assert!(sc.events.len() <= MAX_SCENARIO_EVENTS);
    assert!(
        sc.events
            .windows(2)
            .all(|w| w[0].at <= w[1].at && w[1].at <= sc.end),
        "events out of order or after the end"
    );
    match simulate::replay(path, &sc) {
        Ok(outcome) => {
            simulate::render_json(&sc, &outcome).expect("a replay renders as JSON");
            simulate::render_table(&sc, &outcome);
        }
        Err(SimError::Replay { line, .. }) => {
            assert!(
                sc.events.iter().any(|e| e.line == line),
                "a replay stopped at line {line}, where no event is"
            );
        }
        Err(e) => panic!("a replay fails only at an event, not: {e}"),
    }
    Outcome::Accepted
}

/// The scenarios the broker's own tests run.
pub fn scenario_seeds() -> Vec<Vec<u8>> {
    [
        &include_bytes!("../../../broker/tests/scenarios/cooldown-drain.toml")[..],
        include_bytes!("../../../broker/tests/scenarios/period-warm-up.toml"),
        include_bytes!("../../../broker/tests/scenarios/period-weekdays.toml"),
        include_bytes!("../../../broker/tests/scenarios/seed-elastic-billing.toml"),
        include_bytes!("../../../broker/tests/scenarios/waiting-room.toml"),
        include_bytes!("../../../broker/tests/scenarios/zero-cooldown.toml"),
    ]
    .iter()
    .map(|s| s.to_vec())
    .collect()
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Policy JSON: as an agent receives it (`Command::ApplyPolicy`), and as
/// the broker stores a group's policy (the engine's [`Policy`] with the
/// session and display parts beside it).
///
/// Promises: never panics; a stored policy that loads is written back to
/// the same policy; a valid one makes a document every agent accepts, with
/// the session limits the broker set.
pub fn policy_json(data: &[u8]) {
    let _ = check_policy_json(data);
}

/// [`policy_json`], saying whether the agent or the broker accepted it.
pub fn check_policy_json(data: &[u8]) -> Outcome {
    let Ok(text) = std::str::from_utf8(data) else {
        return Outcome::Refused;
    };
    let agent = check_document(text);
    let (Ok(policy), Ok(parts)) = (
        serde_json::from_str::<Policy>(text),
        PolicyParts::from_stored(text),
    ) else {
        return if agent.is_ok() {
            Outcome::Accepted
        } else {
            Outcome::Refused
        };
    };
    let stored = stored_json(&policy, &parts).expect("a loaded policy is written back");
    assert_eq!(
        serde_json::from_str::<Policy>(&stored).expect("a written policy loads"),
        policy,
        "load(store(x)) != x"
    );
    assert_eq!(
        PolicyParts::from_stored(&stored).expect("written parts load"),
        parts,
        "load(store(x)) != x"
    );
    let valid = policy.validate(None).is_ok()
        && parts.session.validate().is_ok()
        && parts.display.validate().is_ok();
    if valid {
        let doc = policy_document(&policy, &parts).expect("a valid policy makes a document");
        let (_, limits) = check_document(&doc)
            .unwrap_or_else(|e| panic!("an agent refuses the document of a valid policy: {e}"));
        assert_eq!(
            limits.max_session_duration_ms,
            parts.session.max_session_duration.map(ms)
        );
        assert_eq!(
            limits.idle_disconnect_ms,
            parts.session.idle_disconnect.map(ms)
        );
    }
    Outcome::Accepted
}

/// Stored policies (defaults, limits, a period) and the documents agents
/// receive for them.
pub fn policy_seeds() -> Vec<Vec<u8>> {
    let plain = Policy::new(2, 80, 1, 3, Duration::from_secs(600));
    let mut with_period = plain.clone();
    with_period.periods.push(PolicyPeriod {
        weekdays: 0b001_1111,
        start_minute: 8 * 60,
        end_minute: 9 * 60,
        min_ready: 2,
        warm_up: Duration::from_secs(600),
    });
    let mut limited = PolicyParts::default();
    limited.session.disconnect_retention = Retention::Forever;
    limited.session.max_session_duration = Some(Duration::from_secs(4 * 3600));
    limited.session.idle_disconnect = Some(Duration::from_secs(900));
    let mut seeds = Vec::new();
    for (policy, parts) in [(&plain, &PolicyParts::default()), (&with_period, &limited)] {
        seeds.push(stored_json(policy, parts).expect("json").into_bytes());
        seeds.push(
            policy_document(policy, parts)
                .expect("document")
                .into_bytes(),
        );
    }
    seeds.push(b"{}".to_vec());
    seeds
}
