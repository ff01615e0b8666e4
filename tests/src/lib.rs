//! Ferry integration-test harness.
