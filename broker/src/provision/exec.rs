//! The `exec` provisioner: operator-configured commands.
//!
//! `create` and `delete` are argv templates, e.g.
//! `["/usr/local/bin/mk-vm", "{resource}", "{spec}"]`. Placeholders
//! `{group}`, `{spec}`, `{image}`, `{resource}`, `{token}`, `{broker}` and
//! `{ca}` are replaced in each argument (no shell is involved, so values
//! cannot inject commands); the same values are in the environment as
//! `FERRY_GROUP`, `FERRY_SPEC`, `FERRY_IMAGE`, `FERRY_RESOURCE`,
//! `FERRY_ENROLL_TOKEN`, `FERRY_BROKER_ADDR` and `FERRY_CA_CERT` (prefer the
//! environment for the token: arguments are visible to every local user).
//!
//! The command runs through [`ferry_process::child`]: in its own process
//! group with stdin closed; stdout and stderr are read to their end as they
//! come, keeping the last [`super::MAX_CAPTURE`] bytes of each. Exit status
//! 0 is success. Past the timeout the whole process group is killed (a VM
//! tool's children too) and the attempt fails.

use std::time::Duration;

use ferry_process::child::{self, RunError};
use tokio::process::Command;

use super::{show, tail, CreateRequest, DeleteRequest, ProvisionError, MAX_CAPTURE, STDERR_TAIL};

/// Runs the configured commands.
pub struct ExecProvisioner {
    pub create: Vec<String>,
    pub delete: Vec<String>,
    /// How long one run may take.
    pub timeout: Duration,
}

impl ExecProvisioner {
    pub async fn create(&self, req: &CreateRequest) -> Result<(), ProvisionError> {
        let vars = [
            ("group", "FERRY_GROUP", req.group.to_string()),
            ("spec", "FERRY_SPEC", req.spec.clone()),
            ("image", "FERRY_IMAGE", req.image.clone()),
            ("resource", "FERRY_RESOURCE", req.resource.to_string()),
            ("token", "FERRY_ENROLL_TOKEN", req.enrollment_token.clone()),
            ("broker", "FERRY_BROKER_ADDR", req.broker_addr.clone()),
            (
                "ca",
                "FERRY_CA_CERT",
                req.ca_cert_path.display().to_string(),
            ),
        ];
        run(&self.create, &vars, self.timeout).await.map(drop)
    }

    pub async fn delete(&self, req: &DeleteRequest) -> Result<(), ProvisionError> {
        let vars = [
            ("group", "FERRY_GROUP", req.group.to_string()),
            ("resource", "FERRY_RESOURCE", req.resource.to_string()),
        ];
        run(&self.delete, &vars, self.timeout).await.map(drop)
    }
}

/// `template` with every `{name}` of `vars` replaced.
fn expand(template: &str, vars: &[(&str, &str, String)]) -> String {
    let mut out = template.to_owned();
    for (name, _, value) in vars {
        out = out.replace(&format!("{{{name}}}"), value);
    }
    out
}

/// What a successful run printed.
#[derive(Debug)]
pub struct Output {
    pub stdout: String,
}

/// Runs `argv` (expanded) once with `vars` in its environment.
pub async fn run(
    argv: &[String],
    vars: &[(&str, &str, String)],
    timeout: Duration,
) -> Result<Output, ProvisionError> {
    let Some((program, args)) = argv.split_first() else {
        return Err(ProvisionError::Config("no command configured".into()));
    };
    let program = expand(program, vars);
    let mut cmd = Command::new(&program);
    cmd.args(args.iter().map(|a| expand(a, vars)));
    for (_, env, value) in vars {
        cmd.env(env, value);
    }
    let done = child::run(cmd, timeout, MAX_CAPTURE)
        .await
        .map_err(|e| match e {
            RunError::Spawn(error) => ProvisionError::Spawn {
                program: program.clone(),
                error,
            },
            RunError::Wait(error) => ProvisionError::Io {
                what: format!("wait for {program}"),
                error,
            },
        })?;
    let stderr_tail = tail(&done.stderr, STDERR_TAIL);
    match done.status {
        Some(status) if status.success() => Ok(Output {
            stdout: tail(&done.stdout, MAX_CAPTURE),
        }),
        Some(status) => Err(ProvisionError::Exit {
            program,
            status: status.to_string(),
            stderr_tail,
        }),
        None => Err(ProvisionError::Timeout {
            program,
            timeout: show(timeout),
            stderr_tail,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into(), "sh".into()]
    }

    #[tokio::test]
    async fn values_go_in_arguments_and_environment() {
        let vars = [("resource", "FERRY_RESOURCE", "g-e1".to_owned())];
        let mut argv = sh("echo \"$1 $FERRY_RESOURCE\"");
        argv.push("{resource}".into());
        let out = run(&argv, &vars, Duration::from_secs(20))
            .await
            .expect("runs");
        assert_eq!(out.stdout, "g-e1 g-e1");
    }

    #[tokio::test]
    async fn a_failure_carries_its_status_and_stderr_tail() {
        let err = run(&sh("echo broken >&2; exit 3"), &[], Duration::from_secs(20))
            .await
            .expect_err("fails");
        let text = err.to_string();
        assert!(text.contains("exit status: 3"), "{text}");
        assert!(text.contains("broken"), "{text}");
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().expect("tmp");
        let pid_file = dir.path().join("child.pid");
        // A child in the background holding stdout open: only killing the
        // group ends it (and lets the capture finish).
        let script = format!(
            "sleep 600 & echo $! > '{}'; echo started >&2; wait",
            pid_file.display()
        );
        let err = run(&sh(&script), &[], Duration::from_secs(2))
            .await
            .expect_err("times out");
        assert!(matches!(err, ProvisionError::Timeout { .. }), "{err}");
        assert!(err.to_string().contains("started"), "{err}");
        let pid = std::fs::read_to_string(&pid_file).expect("pid");
        let pid = pid.trim().parse().expect("pid");
        // Bounded: its pipes close a moment before it is gone.
        let alive = !child::gone_within(pid, Duration::from_secs(5));
        assert!(!alive, "the background child of the command survived");
    }
}
