//! `ferryctl simulate`: replays a scenario file through the engine on a virtual clock.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("simulate is not built yet")]
    NotBuilt,
}

/// Runs the scenario in `path` and returns what `ferryctl simulate` prints.
pub fn run_cli(_path: &Path, _json: bool) -> Result<String, SimError> {
    Err(SimError::NotBuilt)
}
