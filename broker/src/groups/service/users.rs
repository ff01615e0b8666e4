//! Users: `user create`, `user import` (CSV, every bad row listed, one
//! bad row refuses the file) and `user list`, with the checks of a user's
//! contact details.

use ferry_common::admin::{UserInfo, UserSpec};
use ferry_common::limits::MAX_TEXT_LEN;
use ferry_common::{UnixMillis, UserId};

use super::{GroupError, GroupService, MAX_IMPORT_USERS, MAX_LISTED_PROBLEMS};

impl GroupService {
    /// `user create`.
    pub async fn create_user(
        &self,
        user: UserSpec,
        now: UnixMillis,
    ) -> Result<Vec<UserInfo>, GroupError> {
        checked_user(&user)?;
        self.insert_new_user(user, None, now).await
    }

    /// `user import`: every row is checked first; any bad row refuses the
    /// whole file (with line numbers) and nothing is written.
    pub async fn import_users(
        &self,
        csv: &str,
        now: UnixMillis,
    ) -> Result<Vec<UserInfo>, GroupError> {
        let users = parse_users_csv(csv).map_err(GroupError::Invalid)?;
        let ids: Vec<UserId> = users.iter().map(|u| u.id.clone()).collect();
        self.store.import_users(users, now).await?;
        Ok(self
            .users()
            .await?
            .into_iter()
            .filter(|u| ids.contains(&u.id))
            .collect())
    }

    /// `user list`.
    pub async fn users(&self) -> Result<Vec<UserInfo>, GroupError> {
        Ok(self
            .store
            .list_users()
            .await?
            .into_iter()
            .map(|u| UserInfo {
                id: u.id,
                email: u.email,
                mobile: u.mobile,
                groups: u.groups,
            })
            .collect())
    }
}

/// `user`'s fields as [`check_user`] sees them, as an error listing every problem.
pub(super) fn checked_user(user: &UserSpec) -> Result<(), GroupError> {
    let problems = check_user(user);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(GroupError::Invalid(problems))
    }
}

pub(super) fn check_user(u: &UserSpec) -> Vec<String> {
    let mut problems = Vec::new();
    let email = u.email.trim();
    let ok_email = email.len() <= MAX_TEXT_LEN
        && !email.chars().any(char::is_whitespace)
        && email.split_once('@').is_some_and(|(a, d)| {
            !a.is_empty()
                && d.contains('.')
                && !d.contains('@')
                && !d.starts_with('.')
                && !d.ends_with('.')
        });
    if !ok_email {
        problems.push(format!("email {:?} is not an e-mail address", u.email));
    }
    let digits = u.mobile.strip_prefix('+').unwrap_or(&u.mobile);
    if !(5..=20).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
        problems.push(format!(
            "mobile {:?} is not a phone number (digits with an optional leading +, 5 to 20 digits)",
            u.mobile
        ));
    }
    problems
}

/// Parses `id,email,mobile` CSV (header first; RFC 4180 as spreadsheets
/// write it, see [`crate::csv`]). Every bad row is reported with its line
/// number; one bad row refuses the whole file.
pub fn parse_users_csv(text: &str) -> Result<Vec<UserSpec>, Vec<String>> {
    let mut problems = Vec::new();
    let mut users: Vec<UserSpec> = Vec::new();
    let records = crate::csv::parse(text).map_err(|e| {
        vec![format!(
            "{e}; the file is not valid CSV there, nothing was imported"
        )]
    })?;
    let mut records = records.into_iter().filter(|r| {
        // Lines of blank cells (a spreadsheet's empty rows) are skipped.
        r.fields.iter().any(|f| !f.trim().is_empty())
    });
    match records.next() {
        Some(h)
            if h.fields
                .iter()
                .map(|f| f.trim())
                .eq(["id", "email", "mobile"]) => {}
        Some(h) => problems.push(format!(
            "line {}: header is {:?}; expected \"id,email,mobile\"",
            h.line,
            h.fields.join(",")
        )),
        None => problems.push("the file is empty; expected a header \"id,email,mobile\"".into()),
    }
    for record in records {
        let n = record.line;
        if users.len() >= MAX_IMPORT_USERS {
            problems.push(format!(
                "line {n}: more than {MAX_IMPORT_USERS} users in one file"
            ));
            break;
        }
        let fields: Vec<&str> = record.fields.iter().map(|f| f.trim()).collect();
        let [id, email, mobile] = fields.as_slice() else {
            problems.push(format!(
                "line {n}: {} fields; expected 3 (id,email,mobile)",
                fields.len()
            ));
            continue;
        };
        let id: UserId = match id.parse() {
            Ok(id) => id,
            Err(e) => {
                problems.push(format!("line {n}: {e}"));
                continue;
            }
        };
        if users.iter().any(|u| u.id == id) {
            problems.push(format!("line {n}: user {id} appears twice"));
            continue;
        }
        let u = UserSpec {
            id,
            email: (*email).to_owned(),
            mobile: (*mobile).to_owned(),
        };
        for p in check_user(&u) {
            problems.push(format!("line {n}: {p}"));
        }
        users.push(u);
    }
    if problems.is_empty() {
        Ok(users)
    } else {
        problems.truncate(MAX_LISTED_PROBLEMS);
        Err(problems)
    }
}
