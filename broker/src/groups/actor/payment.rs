//! `payment-overdue` in the group's actor (SPEC section 3): while a
//! pay-as-you-go group is overdue its open sessions go on, routing refuses
//! new ones (`group-not-available`, the status named: the route service's
//! accepting statuses), and the engine makes no scale-out: it runs the
//! group's policy with `max_elastic` 0 and no policy periods, so existing
//! elastic resources still scale in when idle and nothing is created. When
//! the payment is cleared the group's own policy is in force again.

use crate::engine::{Input, Policy};

use super::Actor;

/// The status in which the engine makes no scale-out.
const OVERDUE: &str = "payment-overdue";

/// The scaling policy the engine runs for a group with `policy` in `status`.
pub(super) fn engine_policy(policy: &Policy, status: &str) -> Policy {
    let mut p = policy.clone();
    if status == OVERDUE {
        p.max_elastic = 0;
        p.periods.clear();
    }
    p
}

impl Actor {
    /// Puts the engine's policy in line with the group's status (see the
    /// module doc). A closed (expired) group's engine is frozen; it gets
    /// its policy when it reopens.
    pub(super) fn apply_payment(&mut self) {
        if self.closed.is_some() {
            return;
        }
        let want = engine_policy(&self.row.policy, &self.row.status);
        if self.engine.policy() == &want {
            return;
        }
        let overdue = self.row.status == OVERDUE;
        if self.input(Input::Policy(want)) {
            self.note(
                "policy",
                if overdue {
                    "payment overdue: no scale-out until the payment is cleared (the engine runs \
                     with max_elastic 0 and no policy periods); open sessions go on and idle \
                     elastic resources may still be scaled in"
                        .into()
                } else {
                    "the group's scaling policy is in force again".into()
                },
            );
        }
    }
}
