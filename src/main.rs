//! The `fleetcare` binary: `serve` runs the server, `migrate` applies
//! migrations, `copy` moves every row of one store into another, and the
//! other commands are the operator CLI (`fleetcare::cli`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use fleetcare::config::{DatabaseArgs, LogFormat, ServeArgs};
use fleetcare::startup::Application;
use fleetcare::{cli, storage, telemetry};

#[derive(Parser)]
#[command(
    name = "fleetcare",
    version,
    about = "A gRPC control plane that keeps fleets of AI agents healthy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC server.
    Serve(Box<ServeArgs>),
    /// Apply the database migrations and exit.
    Migrate(DatabaseArgs),
    /// Copy every row of one store into a new one (e.g. the embedded store
    /// into Postgres), with a progress bar; the target must be empty.
    Copy(cli::CopyArgs),
    /// Make bearer tokens for the auth file (`token new`).
    Token(cli::token::TokenArgs),
    #[command(flatten)]
    Client(cli::ClientCommand),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Client(command) => {
            return match cli::run(command).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("fleetcare: {error}");
                    ExitCode::from(error.exit_code())
                }
            };
        }
        Command::Copy(args) => {
            return match cli::run_copy(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(failure) => {
                    eprintln!("fleetcare: {}", failure.message);
                    ExitCode::from(failure.exit_code)
                }
            };
        }
        Command::Token(args) => cli::token::run(args),
        Command::Migrate(args) => {
            telemetry::init(LogFormat::Text);
            match args.store_options() {
                Ok(options) => storage::migrate(&options)
                    .await
                    .map(|location| tracing::info!(store = %location.url(), "migrations applied"))
                    .map_err(|e| e.to_string()),
                Err(why) => Err(why),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fleetcare: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    args.validate()?;
    let telemetry = telemetry::init_serve(args.log_format, &args.tracing)?;
    let served = serve_with(args).await;
    // The last spans (this shutdown's own included) go out before the exit.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    served
}

async fn serve_with(args: ServeArgs) -> Result<(), String> {
    // A low soft limit (1,024 by default) would cap connections long before
    // --max-connections; the hard limit is ours to take.
    match fleetcare::runtime::connections::raise_descriptor_limit() {
        Ok((soft, hard)) => {
            tracing::info!(soft, hard, "descriptor limit");
            if (soft as usize) < args.limits.max_connections {
                tracing::warn!(
                    soft,
                    max_connections = args.limits.max_connections,
                    "--max-connections is above the descriptor limit: new connections may fail before the cap"
                );
            }
        }
        Err(error) => tracing::warn!(%error, "cannot read or raise the descriptor limit"),
    }
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let shutdown = CancellationToken::new();
    let app = Application::build(args, listener, shutdown.clone())
        .await
        .map_err(|e| match e {
            fleetcare::error::Error::Internal(detail) => detail,
            other => other.to_string(),
        })?;
    tokio::spawn(cancel_on_signal(shutdown));
    app.run().await.map_err(|e| match e {
        fleetcare::error::Error::Internal(detail) => detail,
        other => other.to_string(),
    })
}

/// SIGINT or SIGTERM starts a graceful shutdown.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    tracing::info!("signal received");
    shutdown.cancel();
}
