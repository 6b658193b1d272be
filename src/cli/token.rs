//! `fleetcare token new`: a fresh bearer token and the auth file entry for it.
//! Runs locally; no server is involved.

use std::io::Write;

use clap::{Args, Subcommand, ValueEnum};
use rand::Rng;

use crate::domain::auth::{self, Role};

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    pub command: TokenCommand,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a new random token on the first line, then the entry to append to
    /// the auth file (which keeps only the token's SHA-256).
    New(NewToken),
}

#[derive(Debug, Args)]
pub struct NewToken {
    /// The caller's name, recorded as the actor of what it changes.
    #[arg(long)]
    pub name: String,
    /// What the caller may do.
    #[arg(long, value_enum)]
    pub role: RoleArg,
    /// For role agent: an agent id or `prefix*` pattern it acts for (repeatable).
    #[arg(long = "agents", value_name = "PATTERN")]
    pub agents: Vec<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RoleArg {
    Agent,
    Scheduler,
    Reader,
    Operator,
}

impl From<RoleArg> for Role {
    fn from(role: RoleArg) -> Role {
        match role {
            RoleArg::Agent => Role::Agent,
            RoleArg::Scheduler => Role::Scheduler,
            RoleArg::Reader => Role::Reader,
            RoleArg::Operator => Role::Operator,
        }
    }
}

/// A new token: `fct_` and 32 random bytes in hex (from the thread's CSPRNG,
/// seeded by the operating system).
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill(&mut bytes);
    format!("fct_{}", hex::encode(bytes))
}

/// The token line and the entry, checked by the server's own parser.
pub fn render(args: &NewToken, token: &str) -> Result<String, String> {
    let entry = auth::caller_entry(
        &args.name,
        args.role.into(),
        &auth::token_digest(token),
        &args.agents,
    );
    auth::parse_auth_file(&entry).map_err(|e| {
        // The entry's own line numbers mean nothing to the user: only the what.
        e.split_once(": ")
            .map_or(e.clone(), |(_, what)| what.to_owned())
    })?;
    Ok(format!("{token}\n{entry}"))
}

pub fn run(args: TokenArgs) -> Result<(), String> {
    match args.command {
        TokenCommand::New(new) => {
            let text = render(&new, &new_token())?;
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .map_err(|e| format!("cannot write the token: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(role: RoleArg, agents: &[&str]) -> NewToken {
        NewToken {
            name: "runner".into(),
            role,
            agents: agents.iter().map(|a| a.to_string()).collect(),
        }
    }

    #[test]
    fn the_token_comes_first_and_the_entry_holds_only_its_digest() {
        let token = new_token();
        assert_eq!(token.len(), 4 + 64);
        assert_ne!(token, new_token());
        let text = render(&args(RoleArg::Agent, &["eu-*"]), &token).unwrap();
        let (first, entry) = text.split_once('\n').unwrap();
        assert_eq!(first, token);
        assert!(!entry.contains(&token));
        let table = auth::parse_auth_file(entry).unwrap();
        assert_eq!(table.callers[0].0, auth::token_digest(&token));
        assert_eq!(table.callers[0].1.role, Role::Agent);
    }

    #[test]
    fn an_entry_the_server_would_refuse_is_refused_here() {
        let agent = render(&args(RoleArg::Agent, &[]), "t").unwrap_err();
        assert!(agent.contains("needs `agents`"), "{agent}");
        let reader = render(&args(RoleArg::Reader, &["x"]), "t").unwrap_err();
        assert!(reader.contains("only apply to role agent"), "{reader}");
    }
}
