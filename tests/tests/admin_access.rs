//! The admin socket checks its peer's credentials: a process of another
//! user that can reach the socket file (its mode widened here on purpose)
//! is refused with the group to join, before anything it sends is read.
//! Runs `ferryctl` as `nobody` with `setpriv` (util-linux), so it needs root.

use std::os::unix::fs::PermissionsExt;

use ferry_tests::bins::bin;
use ferry_tests::harness::{init_logging, TestBroker};
use ferry_tests::procs::run;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_ferryctl_is_refused_with_the_group_to_join() -> anyhow::Result<()> {
    init_logging();
    let me = std::fs::metadata("/proc/self")?;
    anyhow::ensure!(
        std::os::unix::fs::MetadataExt::uid(&me) == 0,
        "this test switches to uid 65534 with setpriv and needs root"
    );
    let tmp = tempfile::tempdir()?;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))?;
    let broker = TestBroker::start(tmp.path()).await?;
    let socket = broker.admin_socket().to_owned();
    // Anyone may open the file: only the credential check stands.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))?;
    let ferryctl = bin("ferryctl");
    let socket_arg = socket.to_str().expect("utf-8 path");

    let out = run(
        std::path::Path::new("setpriv"),
        [
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            ferryctl.to_str().expect("utf-8 path"),
            "--socket",
            socket_arg,
            "status",
        ],
    )
    .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr.contains("uid 65534 is not allowed to use the admin socket")
            && stderr.contains("add it to group root (gid 0)"),
        "{stderr}"
    );

    // Root still is.
    let out = run(&ferryctl, ["--socket", socket_arg, "status"]).await?;
    assert!(out.status.success(), "{out:?}");
    Ok(())
}
