//! `fleetcare copy --from URL --to URL`: every row of one store into a new one
//! (see `storage::copy`). Unlike the other operator commands it talks to the
//! stores directly, not to a server.

use std::io::IsTerminal;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::error::Error;
use crate::storage::StoreLocation;
use crate::storage::copy;

use super::exit;

#[derive(Debug, Clone, Args)]
pub struct CopyArgs {
    /// The store to copy from, left untouched: `sqlite://PATH` (no server may
    /// be running on it) or `postgres://...` (read in one snapshot).
    #[arg(long)]
    pub from: String,

    /// The store to copy into: created and migrated if needed, and refused
    /// unless it is empty.
    #[arg(long)]
    pub to: String,

    /// Rows read and written at a time.
    #[arg(long, default_value_t = copy::PAGE_SIZE, hide = true)]
    pub page_size: usize,
}

/// Why a copy failed, and the exit code to leave with.
#[derive(Debug)]
pub struct CopyFailure {
    pub message: String,
    pub exit_code: u8,
}

/// Runs the copy, printing each table's rows on stdout at the end.
pub async fn run_copy(args: CopyArgs) -> Result<(), CopyFailure> {
    let parse = |flag: &str, url: &str| {
        StoreLocation::parse(url).map_err(|e| CopyFailure {
            message: format!("{flag}: {e}"),
            exit_code: exit::REFUSED,
        })
    };
    let from = parse("--from", &args.from)?;
    let to = parse("--to", &args.to)?;
    let bar = progress_bar();
    let result = copy::copy_paged(&from, &to, args.page_size, &bar).await;
    bar.finish_and_clear();
    let report = result.map_err(|error| CopyFailure {
        exit_code: match &error {
            Error::InvalidArgument(_) | Error::FailedPrecondition(_) => exit::REFUSED,
            Error::Unavailable(_) => exit::UNREACHABLE,
            _ => exit::FAILURE,
        },
        message: match error {
            Error::Internal(detail) => detail,
            other => other.to_string(),
        },
    })?;
    println!(
        "copied {} rows from {} to {}",
        report.total(),
        copy::display_name(&from),
        copy::display_name(&to)
    );
    println!("{report}");
    Ok(())
}

/// A bar over every row to copy, on stderr; hidden when stderr is not a terminal.
fn progress_bar() -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    let style = ProgressStyle::with_template(
        "copying [{bar:40}] {pos}/{len} rows {msg} ({elapsed}, {eta} left)",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar
}
