//! `ferryctl user`: end users, their passwords and tokens.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use ferry_common::admin::{AdminRequestV1, Secret, UserSpec};
use ferry_common::limits::MAX_ADMIN_FRAME_LEN;

use crate::{parse_ttl, Usage};

#[derive(Subcommand)]
pub(crate) enum UserCmd {
    /// Create one user; with a password (never on the command line) the
    /// user can be routed at once.
    Create {
        #[arg(long)]
        id: String,
        #[arg(long)]
        email: String,
        #[arg(long)]
        mobile: String,
        #[command(flatten)]
        password: PasswordSource,
    },
    /// Create or update users from a CSV file (header id,email,mobile); all or
    /// nothing. Passwords are not imported: a user without one cannot be
    /// routed until `user set-password` (or `user token`).
    Import { file: PathBuf },
    /// Every user.
    List,
    /// Set or replace a user's password (stored as a salted Argon2id hash).
    SetPassword {
        /// The user id.
        name: String,
        #[command(flatten)]
        password: PasswordSource,
    },
    /// Issue a token the user presents instead of a password; printed once.
    Token {
        /// The user id.
        name: String,
        /// How long the token is valid (e.g. 8h, 30d; at most 90d).
        #[arg(long, default_value = "8h", value_parser = parse_ttl)]
        ttl: std::time::Duration,
    },
    /// Invalidate every token of the user issued so far.
    RevokeTokens {
        /// The user id.
        name: String,
    },
}

/// Where a password comes from: never the command line (it would show in
/// `ps` and shell history).
#[derive(clap::Args)]
#[group(multiple = false)]
pub(crate) struct PasswordSource {
    /// Read the password from this file (its first line).
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// Read the password from standard input (its first line).
    #[arg(long)]
    password_stdin: bool,
}

impl PasswordSource {
    /// The password, if one was asked for: one line, without its line end,
    /// at most `MAX_PASSWORD_LEN` bytes.
    fn read(&self) -> anyhow::Result<Option<String>> {
        use std::io::Read;
        let limit = ferry_common::limits::MAX_PASSWORD_LEN;
        let mut bytes = Vec::new();
        if let Some(f) = &self.password_file {
            std::fs::File::open(f)
                .and_then(|file| file.take(limit as u64 + 3).read_to_end(&mut bytes))
                .with_context(|| format!("read {}", f.display()))?;
        } else if self.password_stdin {
            std::io::stdin()
                .take(limit as u64 + 3)
                .read_to_end(&mut bytes)
                .context("read the password from standard input")?;
        } else {
            return Ok(None);
        }
        let text = String::from_utf8(bytes).context("the password is not UTF-8")?;
        let line = text.lines().next().unwrap_or("").to_owned();
        if line.is_empty() {
            anyhow::bail!("the password is empty");
        }
        // The broker refuses it too; saying so here spares a round trip.
        let min = ferry_common::limits::MIN_PASSWORD_CHARS;
        let chars = line.chars().count();
        if chars < min {
            return Err(Usage(format!(
                "the password has {chars} characters; a password needs at least {min} \
                 characters (a longer phrase is better)"
            ))
            .into());
        }
        if line.len() > limit {
            anyhow::bail!("the password is longer than {limit} bytes");
        }
        Ok(Some(line))
    }

    fn require(&self) -> anyhow::Result<String> {
        self.read()?
            .ok_or_else(|| anyhow::anyhow!("give --password-file FILE or --password-stdin"))
    }
}

/// The admin request of a `user` verb.
pub(crate) fn request(cmd: UserCmd) -> anyhow::Result<AdminRequestV1> {
    Ok(match cmd {
        UserCmd::Create {
            id,
            email,
            mobile,
            password,
        } => create(id, email, mobile, &password)?,
        UserCmd::SetPassword { name, password } => AdminRequestV1::UserSetPassword {
            user: name.parse()?,
            password: Secret(password.require()?),
        },
        UserCmd::Token { name, ttl } => AdminRequestV1::UserToken {
            user: name.parse()?,
            ttl_secs: ttl.as_secs(),
        },
        UserCmd::RevokeTokens { name } => AdminRequestV1::UserRevokeTokens {
            user: name.parse()?,
        },
        UserCmd::Import { file } => import(&file)?,
        UserCmd::List => AdminRequestV1::UserListDetailed,
    })
}

/// `user create`, with the password when one is given.
fn create(
    id: String,
    email: String,
    mobile: String,
    password: &PasswordSource,
) -> anyhow::Result<AdminRequestV1> {
    let user = UserSpec {
        id: id.parse()?,
        email,
        mobile,
    };
    Ok(match password.read()? {
        Some(p) => AdminRequestV1::UserCreateWithPassword {
            user,
            password: Secret(p),
        },
        None => AdminRequestV1::UserCreate(user),
    })
}

/// `user import`: the CSV file, read whole (it travels in one admin frame).
fn import(file: &Path) -> anyhow::Result<AdminRequestV1> {
    let meta = std::fs::metadata(file).with_context(|| format!("read {}", file.display()))?;
    // The whole file travels in one admin frame; refuse before reading more.
    if meta.len() > (MAX_ADMIN_FRAME_LEN / 2) as u64 {
        anyhow::bail!(
            "{} is larger than {} bytes; split it",
            file.display(),
            MAX_ADMIN_FRAME_LEN / 2
        );
    }
    let bytes = std::fs::read(file).with_context(|| format!("read {}", file.display()))?;
    let csv = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not UTF-8 text (byte {} is not); save it as \"CSV UTF-8\"",
            file.display(),
            e.utf8_error().valid_up_to() + 1
        )
    })?;
    Ok(AdminRequestV1::UserImport { csv })
}
