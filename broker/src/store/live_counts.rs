//! What the metrics endpoint reads from the store at each scrape: the
//! activation notifications not delivered yet, and rollouts by kind and
//! state. Counts only; the rows stay with their own doors.

use super::sql::args;
use super::{to_u64, Store, StoreError};

/// Store-side numbers of one scrape.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LiveCounts {
    /// Notifications of the outbox not delivered yet.
    pub outbox: u64,
    /// (kind `image` or `ota`, state, count), sorted.
    pub rollouts: Vec<(String, String, i64)>,
}

impl Store {
    /// The outbox depth and the rollouts by kind and state.
    pub async fn live_counts(&self) -> Result<LiveCounts, StoreError> {
        self.read_with(|c| {
            let outbox = to_u64(
                c.query_one(
                    "SELECT COUNT(*) FROM notifications WHERE delivered_at IS NULL",
                    args![],
                )?,
                "outbox depth",
            )?;
            let rollouts = c.query::<(String, String, i64)>(
                "SELECT 'image', state, COUNT(*) FROM image_updates GROUP BY state
                 UNION ALL
                 SELECT 'ota', state, COUNT(*) FROM ota_schedules GROUP BY state
                 ORDER BY 1, 2",
                args![],
            )?;
            Ok(LiveCounts { outbox, rollouts })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::open_for_test;
    use super::*;

    #[tokio::test]
    async fn a_new_store_has_an_empty_outbox_and_no_rollouts() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = open_for_test(tmp.path());
        assert_eq!(
            store.live_counts().await.expect("counts"),
            LiveCounts::default()
        );
    }
}
