//! A delivery group's status machine (SPEC section 3) as pure functions:
//! the purge/delete table, subscription expiry, auto-renew, recycling, manual
//! renew and region immutability.
//!
//! Like the engine, nothing here reads a clock or does I/O: `now` goes in,
//! transitions and orders come out, and [`Lifecycle::next_deadline`] says when
//! to call [`Lifecycle::handle_timeout`] next. The broker's timer task and the
//! unit tests below drive the very same code.
//!
//! Where the spec is silent: a group in `publish-failed` can be deleted,
//! whatever its billing (SPEC 3); `payment-overdue` (pay-as-you-go only) is
//! entered from and left back to `published`, by an admin request.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Months, Utc};
use ferry_common::UnixMillis;

use crate::engine::billing::Term;

/// Most auto-renewals one [`Lifecycle::handle_timeout`] call writes. A broker
/// that was down for a long time catches up period by period; past this many
/// periods something is wrong with the clock or the data, and the group is
/// left for the next call instead of looping without bound.
pub const MAX_CATCH_UP_RENEWALS: usize = 1_000;

/// Where a group is in its life (SPEC section 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    /// Its base resources are being created.
    Publishing,
    /// Serving its users.
    Published,
    /// Creating its base resources failed; nothing is served.
    PublishFailed,
    /// An image update is running on its resources.
    Updating,
    /// The last image update failed on some resources.
    UpdateFailed,
    /// A pay-as-you-go group whose account is in arrears.
    PaymentOverdue,
    /// A subscription whose paid period ended without renewal: no new
    /// sessions, existing ones disconnected.
    Expired,
    /// An expired subscription past its retention: resources are reclaimed.
    Recycling,
    /// Purged or deleted; only its orders and metering remain.
    Gone,
}

/// Every status, in the order of SPEC section 3.
pub const ALL_STATUSES: [Status; 9] = [
    Status::Publishing,
    Status::Published,
    Status::PublishFailed,
    Status::Updating,
    Status::UpdateFailed,
    Status::PaymentOverdue,
    Status::Expired,
    Status::Recycling,
    Status::Gone,
];

impl Status {
    /// The spelling operators type and read (`publish-failed`).
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Publishing => "publishing",
            Status::Published => "published",
            Status::PublishFailed => "publish-failed",
            Status::Updating => "updating",
            Status::UpdateFailed => "update-failed",
            Status::PaymentOverdue => "payment-overdue",
            Status::Expired => "expired",
            Status::Recycling => "recycling",
            Status::Gone => "gone",
        }
    }

    /// Reads [`Status::as_str`]'s spelling.
    pub fn parse(s: &str) -> Option<Status> {
        ALL_STATUSES.into_iter().find(|st| st.as_str() == s)
    }

    /// The paid period runs (and can run out) in these statuses.
    pub fn in_service(self) -> bool {
        matches!(
            self,
            Status::Published | Status::Updating | Status::UpdateFailed | Status::PaymentOverdue
        )
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a group is paid for, as far as its life is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Billing {
    /// Paid ahead for `term`; renewed by itself at the end when `auto_renew`.
    Subscription { term: Term, auto_renew: bool },
    /// Billed by use; never expires.
    PayAsYouGo,
}

impl Billing {
    /// `subscription` or `pay-as-you-go`, as in the table.
    pub fn kind(&self) -> &'static str {
        match self {
            Billing::Subscription { .. } => "subscription",
            Billing::PayAsYouGo => "pay-as-you-go",
        }
    }
}

/// The two ways a group goes away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removal {
    Purge,
    Delete,
}

impl Removal {
    pub fn as_str(self) -> &'static str {
        match self {
            Removal::Purge => "purge",
            Removal::Delete => "delete",
        }
    }
}

/// The purge/delete table of SPEC section 3: what may remove a group with this
/// billing in this status. Every pair not listed allows nothing.
pub fn allowed_removals(billing: &Billing, status: Status) -> &'static [Removal] {
    match (billing, status) {
        (Billing::Subscription { .. }, Status::Expired) => &[Removal::Purge],
        (Billing::Subscription { .. }, Status::Recycling | Status::PublishFailed) => {
            &[Removal::Delete]
        }
        // Nothing was billed: the record goes.
        (Billing::PayAsYouGo, Status::PublishFailed) => &[Removal::Delete],
        (
            Billing::PayAsYouGo,
            Status::Published | Status::Updating | Status::UpdateFailed | Status::PaymentOverdue,
        ) => &[Removal::Purge],
        _ => &[],
    }
}

/// Why an order was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrderKind {
    Publish,
    Renew,
    AutoRenew,
}

impl OrderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderKind::Publish => "publish",
            OrderKind::Renew => "renew",
            OrderKind::AutoRenew => "auto-renew",
        }
    }
}

/// A paid period to be written to the ledger (its amount is priced by the
/// caller with [`crate::engine::billing`], which knows the spec's prices).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Order {
    pub kind: OrderKind,
    /// The duration bought.
    pub term: Term,
    /// When the order was made.
    pub at: UnixMillis,
    /// Start of the period it pays for.
    pub period_start: UnixMillis,
    /// End of the period it pays for (the new expiry).
    pub period_end: UnixMillis,
}

/// A status change and why it happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: Status,
    pub to: Status,
    /// The instant it takes effect (a deadline's instant, not when it was noticed).
    pub at: UnixMillis,
    /// In words an operator reads in `group events`.
    pub reason: String,
}

/// Everything one lifecycle step produced, to be written in one transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub transitions: Vec<Transition>,
    pub orders: Vec<Order>,
}

/// A refused lifecycle action. Every message names the status and what is
/// allowed instead.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LifecycleError {
    #[error("cannot {action} a {billing} group in status {status}; {allowed}")]
    NotAllowed {
        action: &'static str,
        billing: &'static str,
        status: Status,
        /// What the table allows instead, in words.
        allowed: String,
    },
    #[error("the region of a group cannot change after publish (it is {current}; asked for {requested})")]
    RegionImmutable { current: String, requested: String },
    #[error("{0}")]
    Term(String),
}

/// A group's lifecycle state: what the status machine needs, nothing more.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lifecycle {
    pub status: Status,
    pub billing: Billing,
    /// End of the paid period (subscriptions only).
    pub expires_at: Option<UnixMillis>,
    /// When it became `expired` (start of the retention), while expired.
    pub expired_at: Option<UnixMillis>,
}

/// `t + term` in calendar terms: weeks are 7 days, months and years follow the
/// calendar (Jan 31 + 1mo = Feb 28/29), as a paid period is understood.
pub fn add_term(t: UnixMillis, term: Term) -> Result<UnixMillis, LifecycleError> {
    let too_far = || LifecycleError::Term(format!("{term} after {} is out of range", t.0));
    let start = DateTime::<Utc>::from_timestamp_millis(t.0).ok_or_else(too_far)?;
    let end = match term {
        Term::Weeks(n) => start.checked_add_signed(chrono::Duration::weeks(i64::from(n))),
        Term::Months(n) => start.checked_add_months(Months::new(n)),
        Term::Years(n) => n
            .checked_mul(12)
            .and_then(|m| start.checked_add_months(Months::new(m))),
    };
    end.map(|e| UnixMillis(e.timestamp_millis()))
        .ok_or_else(too_far)
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn describe_allowed(billing: &Billing, status: Status) -> String {
    match allowed_removals(billing, status) {
        [] => format!(
            "a {} group in status {status} can be neither purged nor deleted{}",
            billing.kind(),
            match billing {
                Billing::Subscription { .. } =>
                    " (subscriptions: purge when expired, delete when recycling or publish-failed)",
                Billing::PayAsYouGo =>
                    " (pay-as-you-go: purge when published, updating, update-failed or payment-overdue, delete when publish-failed)",
            }
        ),
        [one] => format!("allowed in this status: {}", one.as_str()),
        _ => "allowed in this status: purge, delete".into(),
    }
}

impl Lifecycle {
    /// A group just published at `now`: subscriptions are paid for their term
    /// from `now` (the publish order), pay-as-you-go groups are billed by use.
    pub fn publish(
        billing: Billing,
        now: UnixMillis,
    ) -> Result<(Lifecycle, Outcome), LifecycleError> {
        let mut out = Outcome::default();
        let expires_at = match billing {
            Billing::Subscription { term, .. } => {
                let end = add_term(now, term)?;
                out.orders.push(Order {
                    kind: OrderKind::Publish,
                    term,
                    at: now,
                    period_start: now,
                    period_end: end,
                });
                Some(end)
            }
            Billing::PayAsYouGo => None,
        };
        out.transitions.push(Transition {
            from: Status::Publishing,
            to: Status::Published,
            at: now,
            reason: "published".into(),
        });
        Ok((
            Lifecycle {
                status: Status::Published,
                billing,
                expires_at,
                expired_at: None,
            },
            out,
        ))
    }

    /// A group whose base resources are created through the provisioner: `publishing` until they have all registered
    /// ([`Lifecycle::publish_done`]) or one failed
    /// ([`Lifecycle::publish_failed`]). Nothing is paid yet: a subscription's
    /// period (and its publish order) starts when it is published.
    pub fn publishing(billing: Billing) -> Lifecycle {
        Lifecycle {
            status: Status::Publishing,
            billing,
            expires_at: None,
            expired_at: None,
        }
    }

    /// Every base resource of a `publishing` group registered at `now`: it is
    /// `published`, and a subscription's paid period starts (the publish order).
    pub fn publish_done(&mut self, now: UnixMillis) -> Result<Outcome, LifecycleError> {
        if self.status != Status::Publishing {
            return Err(self.not_publishing("finish publishing"));
        }
        let mut out = Outcome::default();
        if let Billing::Subscription { term, .. } = self.billing {
            let end = add_term(now, term)?;
            out.orders.push(Order {
                kind: OrderKind::Publish,
                term,
                at: now,
                period_start: now,
                period_end: end,
            });
            self.expires_at = Some(end);
        }
        out.transitions.push(Transition {
            from: Status::Publishing,
            to: Status::Published,
            at: now,
            reason: "published: every base resource registered".into(),
        });
        self.status = Status::Published;
        Ok(out)
    }

    /// A base resource of a `publishing` group could not be created or did
    /// not register: `publish-failed` (`why` names the failing resources).
    /// No order was written, so nothing was paid.
    pub fn publish_failed(
        &mut self,
        now: UnixMillis,
        why: String,
    ) -> Result<Transition, LifecycleError> {
        if self.status != Status::Publishing {
            return Err(self.not_publishing("fail publishing"));
        }
        self.status = Status::PublishFailed;
        Ok(Transition {
            from: Status::Publishing,
            to: Status::PublishFailed,
            at: now,
            reason: why,
        })
    }

    /// The billing system (or an operator) says a pay-as-you-go group's
    /// account is in arrears: `published` -> `payment-overdue`.
    pub fn set_payment_overdue(&mut self, now: UnixMillis) -> Result<Transition, LifecycleError> {
        match (self.billing, self.status) {
            (Billing::PayAsYouGo, Status::Published) => {
                self.status = Status::PaymentOverdue;
                Ok(Transition {
                    from: Status::Published,
                    to: Status::PaymentOverdue,
                    at: now,
                    reason: "payment overdue: no new sessions and no scale-out; open sessions go \
                             on and idle elastic resources may still be scaled in"
                        .into(),
                })
            }
            (billing, status) => Err(LifecycleError::NotAllowed {
                action: "set payment-overdue on",
                billing: billing.kind(),
                status,
                allowed: match billing {
                    Billing::PayAsYouGo => "payment-overdue is set on a published pay-as-you-go group only".into(),
                    Billing::Subscription { .. } => "subscription groups are paid ahead and never payment-overdue; only published pay-as-you-go groups are".into(),
                },
            }),
        }
    }

    /// The arrears are paid: `payment-overdue` -> `published`.
    pub fn clear_payment_overdue(&mut self, now: UnixMillis) -> Result<Transition, LifecycleError> {
        match (self.billing, self.status) {
            (Billing::PayAsYouGo, Status::PaymentOverdue) => {
                self.status = Status::Published;
                Ok(Transition {
                    from: Status::PaymentOverdue,
                    to: Status::Published,
                    at: now,
                    reason: "payment received: new sessions and scale-out again".into(),
                })
            }
            (billing, status) => Err(LifecycleError::NotAllowed {
                action: "clear payment-overdue of",
                billing: billing.kind(),
                status,
                allowed: "only a pay-as-you-go group in status payment-overdue is cleared (back to published)".into(),
            }),
        }
    }

    fn not_publishing(&self, action: &'static str) -> LifecycleError {
        LifecycleError::NotAllowed {
            action,
            billing: self.billing.kind(),
            status: self.status,
            allowed: "only a publishing group finishes or fails its publish".into(),
        }
    }

    /// When [`Lifecycle::handle_timeout`] has something to do next: the end of
    /// the paid period while in service, the end of the retention while
    /// expired, else never.
    pub fn next_deadline(&self, retention: Duration) -> Option<UnixMillis> {
        match self.billing {
            Billing::PayAsYouGo => None,
            Billing::Subscription { .. } if self.status.in_service() => self.expires_at,
            Billing::Subscription { .. } if self.status == Status::Expired => {
                let from = self.expired_at.or(self.expires_at)?;
                Some(UnixMillis(from.0.saturating_add(ms(retention))))
            }
            Billing::Subscription { .. } => None,
        }
    }

    /// Applies every deadline due at or before `now`, each at its own instant:
    /// a period ending with auto-renew on is extended (one order per period),
    /// without it the group expires; an expired group past `retention` starts
    /// recycling.
    pub fn handle_timeout(&mut self, now: UnixMillis, retention: Duration) -> Outcome {
        let mut out = Outcome::default();
        let mut renewals = 0;
        while let Some(due) = self.next_deadline(retention).filter(|d| *d <= now) {
            match (self.billing, self.status) {
                (
                    Billing::Subscription {
                        term,
                        auto_renew: true,
                    },
                    s,
                ) if s.in_service() => {
                    if renewals == MAX_CATCH_UP_RENEWALS {
                        break;
                    }
                    let Ok(end) = add_term(due, term) else {
                        break;
                    };
                    renewals += 1;
                    out.orders.push(Order {
                        kind: OrderKind::AutoRenew,
                        term,
                        at: due,
                        period_start: due,
                        period_end: end,
                    });
                    self.expires_at = Some(end);
                }
                (Billing::Subscription { .. }, s) if s.in_service() => {
                    out.transitions.push(Transition {
                        from: s,
                        to: Status::Expired,
                        at: due,
                        reason: "paid period ended without auto-renew: no new sessions, open ones are disconnected".into(),
                    });
                    self.status = Status::Expired;
                    self.expired_at = Some(due);
                }
                (Billing::Subscription { .. }, Status::Expired) => {
                    out.transitions.push(Transition {
                        from: Status::Expired,
                        to: Status::Recycling,
                        at: due,
                        reason: format!(
                            "expired for the retention period ({}): resources are reclaimed",
                            ferry_common::duration::format_duration(retention)
                        ),
                    });
                    self.status = Status::Recycling;
                }
                _ => break,
            }
        }
        out
    }

    /// Manual renew: extends the paid period by `term` and writes an order.
    /// An expired group is paid again from `now` and serves again; a group in
    /// service is extended from its current expiry.
    pub fn renew(&mut self, term: Term, now: UnixMillis) -> Result<Outcome, LifecycleError> {
        let refuse = |status| {
            LifecycleError::NotAllowed {
            action: "renew",
            billing: self.billing.kind(),
            status,
            allowed: match self.billing {
                Billing::PayAsYouGo => "only subscription groups are renewed; pay-as-you-go groups are billed by use".into(),
                Billing::Subscription { .. } => "renew is allowed when published, updating, update-failed, payment-overdue or expired".into(),
            },
        }
        };
        if matches!(self.billing, Billing::PayAsYouGo) {
            return Err(refuse(self.status));
        }
        let mut out = Outcome::default();
        let start = match self.status {
            s if s.in_service() => self.expires_at.unwrap_or(now).max(now),
            Status::Expired => now,
            s => return Err(refuse(s)),
        };
        let end = add_term(start, term)?;
        out.orders.push(Order {
            kind: OrderKind::Renew,
            term,
            at: now,
            period_start: start,
            period_end: end,
        });
        if self.status == Status::Expired {
            out.transitions.push(Transition {
                from: Status::Expired,
                to: Status::Published,
                at: now,
                reason: format!("renewed for {term}"),
            });
            self.status = Status::Published;
            self.expired_at = None;
        }
        self.expires_at = Some(end);
        Ok(out)
    }

    /// Turns auto-renew on or off (subscriptions that have not started recycling).
    pub fn set_auto_renew(&mut self, on: bool) -> Result<(), LifecycleError> {
        match &mut self.billing {
            Billing::Subscription { auto_renew, .. }
                if self.status.in_service() || self.status == Status::Expired =>
            {
                *auto_renew = on;
                Ok(())
            }
            billing => Err(LifecycleError::NotAllowed {
                action: "set auto-renew of",
                billing: billing.kind(),
                status: self.status,
                allowed: "auto-renew applies to subscription groups that are published, updating, update-failed, payment-overdue or expired".into(),
            }),
        }
    }

    /// Purge or delete per the table; the group is `gone` afterwards.
    pub fn remove(
        &mut self,
        action: Removal,
        now: UnixMillis,
    ) -> Result<Transition, LifecycleError> {
        if !allowed_removals(&self.billing, self.status).contains(&action) {
            return Err(LifecycleError::NotAllowed {
                action: action.as_str(),
                billing: self.billing.kind(),
                status: self.status,
                allowed: describe_allowed(&self.billing, self.status),
            });
        }
        let t = Transition {
            from: self.status,
            to: Status::Gone,
            at: now,
            reason: format!("{}d by operator", action.as_str()),
        };
        self.status = Status::Gone;
        Ok(t)
    }

    /// Whether the policy or the assigned users may be changed now: not once
    /// the group is recycling or gone, nor while its publish failed.
    pub fn check_editable(&self, action: &'static str) -> Result<(), LifecycleError> {
        match self.status {
            Status::Recycling | Status::Gone | Status::PublishFailed | Status::Publishing => {
                Err(LifecycleError::NotAllowed {
                    action,
                    billing: self.billing.kind(),
                    status: self.status,
                    allowed: "the policy and users can change when published, updating, update-failed, payment-overdue or expired".into(),
                })
            }
            _ => Ok(()),
        }
    }
}

/// Whether an image update (`group update-image`, SPEC section 9) may start
/// in `status`: from `published` and `update-failed` only.
/// `billing` is [`Billing::kind`]'s spelling.
pub fn check_image_update(billing: &'static str, status: Status) -> Result<(), LifecycleError> {
    match status {
        Status::Published | Status::UpdateFailed => Ok(()),
        _ => Err(LifecycleError::NotAllowed {
            action: "update the image of",
            billing,
            status,
            allowed: "the image can be updated when published or update-failed".into(),
        }),
    }
}

/// Whether an OTA rollout may be scheduled or start (SPEC section 9) in
/// `status`: from `published` and `update-failed` only. `billing` is the
/// group's [`Billing::kind`]. A rollout does not change the status while it
/// runs; one that fails sets `update-failed` ([`after_failed_ota`]).
pub fn check_ota(billing: &'static str, status: Status) -> Result<(), LifecycleError> {
    match status {
        Status::Published | Status::UpdateFailed => Ok(()),
        _ => Err(LifecycleError::NotAllowed {
            action: "roll out an OTA update to",
            billing,
            status,
            allowed: "OTA updates can be scheduled and run when published or update-failed".into(),
        }),
    }
}

/// The status after a failed OTA rollout: `update-failed` from
/// `published`. `None` when the status does not change: a group already
/// `update-failed` stays so (no `update-failed -> update-failed`
/// transition is recorded), any other status is left alone.
pub fn after_failed_ota(status: Status) -> Option<Status> {
    (status == Status::Published).then_some(Status::UpdateFailed)
}

/// The status after an OTA rollout that succeeded on every resource: an
/// `update-failed` group is `published` again (its last update did not
/// fail), like after an image update that succeeds. `None` when the status
/// does not change.
pub fn after_succeeded_ota(status: Status) -> Option<Status> {
    (status == Status::UpdateFailed).then_some(Status::Published)
}

/// Region is fixed at publish (SPEC section 2): asking for the same region is
/// a no-op, any other is refused.
pub fn check_region_change(current: &str, requested: &str) -> Result<(), LifecycleError> {
    if current == requested {
        Ok(())
    } else {
        Err(LifecycleError::RegionImmutable {
            current: current.into(),
            requested: requested.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;
    /// 2026-03-02T00:00:00Z
    const T0: UnixMillis = UnixMillis(1_772_409_600_000);
    const RETENTION: Duration = Duration::from_secs(7 * 86_400);

    fn sub(auto_renew: bool) -> Billing {
        Billing::Subscription {
            term: Term::Weeks(1),
            auto_renew,
        }
    }

    fn at(status: Status, billing: Billing) -> Lifecycle {
        Lifecycle {
            status,
            billing,
            expires_at: Some(UnixMillis(T0.0 + 7 * DAY)),
            expired_at: (status == Status::Expired).then_some(UnixMillis(T0.0 + 7 * DAY)),
        }
    }

    #[test]
    fn the_purge_delete_table_for_every_pair() {
        for billing in [sub(false), Billing::PayAsYouGo] {
            for status in ALL_STATUSES {
                let expected: &[Removal] = match (billing, status) {
                    (Billing::Subscription { .. }, Status::Expired) => &[Removal::Purge],
                    (Billing::Subscription { .. }, Status::Recycling) => &[Removal::Delete],
                    (Billing::Subscription { .. }, Status::PublishFailed) => &[Removal::Delete],
                    (Billing::PayAsYouGo, Status::PublishFailed) => &[Removal::Delete],
                    (
                        Billing::PayAsYouGo,
                        Status::Published
                        | Status::Updating
                        | Status::UpdateFailed
                        | Status::PaymentOverdue,
                    ) => &[Removal::Purge],
                    _ => &[],
                };
                for action in [Removal::Purge, Removal::Delete] {
                    let mut l = at(status, billing);
                    let r = l.remove(action, T0);
                    if expected.contains(&action) {
                        let t = r.expect("allowed");
                        assert_eq!((t.from, t.to), (status, Status::Gone));
                        assert_eq!(l.status, Status::Gone);
                    } else {
                        let err = r.expect_err("refused").to_string();
                        assert!(err.contains(status.as_str()), "{err}");
                        assert!(err.contains(billing.kind()), "{err}");
                        assert!(err.contains(action.as_str()), "{err}");
                        assert!(err.contains("allowed") || err.contains("neither"), "{err}");
                        assert_eq!(l.status, status, "a refusal changes nothing");
                    }
                }
            }
        }
    }

    #[test]
    fn refusals_name_what_is_allowed() {
        let mut l = at(Status::Expired, sub(false));
        let err = l.remove(Removal::Delete, T0).expect_err("refused");
        assert_eq!(
            err.to_string(),
            "cannot delete a subscription group in status expired; allowed in this status: purge"
        );
        let mut l = at(Status::Published, sub(false));
        let err = l
            .remove(Removal::Purge, T0)
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("purge when expired, delete when recycling"),
            "{err}"
        );
    }

    #[test]
    fn expiry_then_recycling_without_auto_renew() {
        let (mut l, out) = Lifecycle::publish(sub(false), T0).expect("publish");
        assert_eq!(out.orders.len(), 1);
        assert_eq!(out.orders[0].kind, OrderKind::Publish);
        let end = UnixMillis(T0.0 + 7 * DAY);
        assert_eq!(l.next_deadline(RETENTION), Some(end));
        // Nothing happens a millisecond early.
        assert_eq!(
            l.handle_timeout(UnixMillis(end.0 - 1), RETENTION),
            Outcome::default()
        );
        let out = l.handle_timeout(end, RETENTION);
        assert_eq!(out.transitions.len(), 1);
        assert_eq!(out.transitions[0].to, Status::Expired);
        assert_eq!(out.transitions[0].at, end);
        assert!(out.orders.is_empty());
        let recycle = UnixMillis(end.0 + 7 * DAY);
        assert_eq!(l.next_deadline(RETENTION), Some(recycle));
        let out = l.handle_timeout(recycle, RETENTION);
        assert_eq!(
            out.transitions.iter().map(|t| t.to).collect::<Vec<_>>(),
            [Status::Recycling]
        );
        assert_eq!(l.next_deadline(RETENTION), None);
    }

    #[test]
    fn a_late_timer_applies_each_deadline_at_its_own_instant() {
        let (mut l, _) = Lifecycle::publish(sub(false), T0).expect("publish");
        let out = l.handle_timeout(UnixMillis(T0.0 + 100 * DAY), RETENTION);
        let steps: Vec<_> = out.transitions.iter().map(|t| (t.to, t.at)).collect();
        assert_eq!(
            steps,
            [
                (Status::Expired, UnixMillis(T0.0 + 7 * DAY)),
                (Status::Recycling, UnixMillis(T0.0 + 14 * DAY)),
            ]
        );
    }

    #[test]
    fn auto_renew_extends_by_the_term_and_orders_each_period() {
        let (mut l, _) = Lifecycle::publish(sub(true), T0).expect("publish");
        let out = l.handle_timeout(UnixMillis(T0.0 + 7 * DAY), RETENTION);
        assert!(out.transitions.is_empty());
        assert_eq!(out.orders.len(), 1);
        assert_eq!(out.orders[0].kind, OrderKind::AutoRenew);
        assert_eq!(out.orders[0].period_end, UnixMillis(T0.0 + 14 * DAY));
        assert_eq!(l.status, Status::Published);
        // Down for three more periods: one order per period, none skipped.
        let out = l.handle_timeout(UnixMillis(T0.0 + 30 * DAY), RETENTION);
        assert_eq!(out.orders.len(), 3);
        assert_eq!(l.expires_at, Some(UnixMillis(T0.0 + 35 * DAY)));
        // Turning it off lets the group expire at the end of the paid period.
        l.set_auto_renew(false).expect("set");
        let out = l.handle_timeout(UnixMillis(T0.0 + 35 * DAY), RETENTION);
        assert_eq!(out.transitions[0].to, Status::Expired);
    }

    #[test]
    fn calendar_terms() {
        // 2026-01-31 + 1mo = 2026-02-28; + 1y = 2027-01-31.
        let jan31 = UnixMillis(1_769_817_600_000);
        assert_eq!(
            add_term(jan31, Term::Months(1)),
            Ok(UnixMillis(1_769_817_600_000 + 28 * DAY))
        );
        assert_eq!(
            add_term(jan31, Term::Years(1)),
            Ok(UnixMillis(1_769_817_600_000 + 365 * DAY))
        );
        assert_eq!(
            add_term(T0, Term::Weeks(2)),
            Ok(UnixMillis(T0.0 + 14 * DAY))
        );
    }

    #[test]
    fn manual_renew() {
        let (mut l, _) = Lifecycle::publish(sub(false), T0).expect("publish");
        let out = l
            .renew(Term::Weeks(2), UnixMillis(T0.0 + DAY))
            .expect("renew");
        assert_eq!(out.orders[0].kind, OrderKind::Renew);
        assert_eq!(out.orders[0].period_start, UnixMillis(T0.0 + 7 * DAY));
        assert_eq!(l.expires_at, Some(UnixMillis(T0.0 + 21 * DAY)));
        // Expired: paid again from now, serving again.
        l.handle_timeout(UnixMillis(T0.0 + 21 * DAY), RETENTION);
        assert_eq!(l.status, Status::Expired);
        let now = UnixMillis(T0.0 + 23 * DAY);
        let out = l.renew(Term::Weeks(1), now).expect("renew expired");
        assert_eq!(out.transitions[0].to, Status::Published);
        assert_eq!(l.expires_at, Some(UnixMillis(now.0 + 7 * DAY)));
        assert_eq!(l.expired_at, None);
        // Recycling and pay-as-you-go groups are not renewed.
        let mut r = at(Status::Recycling, sub(false));
        let err = r
            .renew(Term::Weeks(1), now)
            .expect_err("recycling")
            .to_string();
        assert!(err.contains("status recycling"), "{err}");
        let mut p = at(Status::Published, Billing::PayAsYouGo);
        let err = p.renew(Term::Weeks(1), now).expect_err("payg").to_string();
        assert!(err.contains("billed by use"), "{err}");
    }

    #[test]
    fn pay_as_you_go_never_expires() {
        let (mut l, out) = Lifecycle::publish(Billing::PayAsYouGo, T0).expect("publish");
        assert!(out.orders.is_empty());
        assert_eq!(l.next_deadline(RETENTION), None);
        assert_eq!(
            l.handle_timeout(UnixMillis(T0.0 + 1000 * DAY), RETENTION),
            Outcome::default()
        );
        assert!(l.set_auto_renew(true).is_err());
    }

    #[test]
    fn auto_renew_and_edits_are_refused_once_recycling() {
        let mut l = at(Status::Recycling, sub(false));
        let err = l.set_auto_renew(true).expect_err("refused").to_string();
        assert!(err.contains("status recycling"), "{err}");
        assert!(l.check_editable("update the policy of").is_err());
        assert!(at(Status::Expired, sub(false)).check_editable("x").is_ok());
        assert!(at(Status::Gone, sub(false)).check_editable("x").is_err());
    }

    #[test]
    fn publishing_then_published_starts_the_paid_period() {
        let mut l = Lifecycle::publishing(sub(false));
        assert_eq!(l.status, Status::Publishing);
        assert_eq!(l.next_deadline(RETENTION), None);
        assert!(l.check_editable("update the policy of").is_err());
        let done = UnixMillis(T0.0 + 3_600_000);
        let out = l.publish_done(done).expect("done");
        assert_eq!(l.status, Status::Published);
        assert_eq!(out.orders.len(), 1);
        assert_eq!(out.orders[0].kind, OrderKind::Publish);
        assert_eq!(out.orders[0].period_start, done);
        assert_eq!(l.expires_at, Some(UnixMillis(done.0 + 7 * DAY)));
        assert_eq!(out.transitions[0].to, Status::Published);
        // Not twice.
        let err = l.publish_done(done).expect_err("published").to_string();
        assert!(err.contains("status published"), "{err}");
        assert!(l.publish_failed(done, "x".into()).is_err());
    }

    #[test]
    fn publish_failed_follows_the_table() {
        for billing in [sub(false), Billing::PayAsYouGo] {
            let mut l = Lifecycle::publishing(billing);
            let t = l
                .publish_failed(T0, "g-b1 did not register".into())
                .expect("failed");
            assert_eq!((t.from, t.to), (Status::Publishing, Status::PublishFailed));
            assert_eq!(l.expires_at, None);
            let deletable = l.clone().remove(Removal::Delete, T0).is_ok();
            let purgeable = l.clone().remove(Removal::Purge, T0).is_ok();
            // SPEC 3: either billing may delete a group that failed to publish.
            assert_eq!((deletable, purgeable), (true, false));
            assert!(l.publish_done(T0).is_err());
        }
    }

    #[test]
    fn ota_runs_from_published_and_update_failed_only() {
        for st in ALL_STATUSES {
            let ok = check_ota("pay-as-you-go", st).is_ok();
            assert_eq!(
                ok,
                matches!(st, Status::Published | Status::UpdateFailed),
                "{st}"
            );
            if !ok {
                let e = check_ota("pay-as-you-go", st)
                    .expect_err("refused")
                    .to_string();
                assert!(e.contains(st.as_str()) && e.contains("published"), "{e}");
            }
        }
        assert_eq!(
            after_failed_ota(Status::Published),
            Some(Status::UpdateFailed)
        );
        // Already update-failed: no transition to itself.
        assert_eq!(after_failed_ota(Status::UpdateFailed), None);
        assert_eq!(after_failed_ota(Status::Expired), None);
        // A rollout that succeeded everywhere leaves update-failed, and
        // only update-failed.
        for st in ALL_STATUSES {
            assert_eq!(
                after_succeeded_ota(st),
                (st == Status::UpdateFailed).then_some(Status::Published),
                "{st}"
            );
            for to in [after_failed_ota(st), after_succeeded_ota(st)]
                .into_iter()
                .flatten()
            {
                assert_ne!(st, to, "a transition to the same status");
            }
        }
    }

    #[test]
    fn payment_overdue_only_between_published_and_back_for_pay_as_you_go() {
        let mut l = at(Status::Published, Billing::PayAsYouGo);
        let t = l.set_payment_overdue(T0).expect("set");
        assert_eq!((t.from, t.to), (Status::Published, Status::PaymentOverdue));
        // Purge is allowed while overdue (the table).
        assert!(l.clone().remove(Removal::Purge, T0).is_ok());
        let err = l.set_payment_overdue(T0).expect_err("twice").to_string();
        assert!(err.contains("status payment-overdue"), "{err}");
        let t = l.clear_payment_overdue(T0).expect("clear");
        assert_eq!((t.from, t.to), (Status::PaymentOverdue, Status::Published));
        let err = l
            .clear_payment_overdue(T0)
            .expect_err("not overdue")
            .to_string();
        assert_eq!(
            err,
            "cannot clear payment-overdue of a pay-as-you-go group in status published; \
             only a pay-as-you-go group in status payment-overdue is cleared (back to published)"
        );
        for status in ALL_STATUSES {
            if status != Status::Published {
                let err = at(status, Billing::PayAsYouGo)
                    .set_payment_overdue(T0)
                    .expect_err("refused")
                    .to_string();
                assert!(err.contains(status.as_str()), "{err}");
                assert!(err.contains("published pay-as-you-go"), "{err}");
            }
        }
        let err = at(Status::Published, sub(false))
            .set_payment_overdue(T0)
            .expect_err("subscription")
            .to_string();
        assert!(
            err.contains("subscription group in status published"),
            "{err}"
        );
    }

    #[test]
    fn region_is_immutable() {
        assert!(check_region_change("cn-hangzhou", "cn-hangzhou").is_ok());
        let err = check_region_change("cn-hangzhou", "cn-shanghai").expect_err("refused");
        assert!(
            err.to_string().contains("cannot change after publish"),
            "{err}"
        );
    }

    #[test]
    fn statuses_round_trip() {
        for s in ALL_STATUSES {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
        assert_eq!(Status::parse("nope"), None);
    }
}
