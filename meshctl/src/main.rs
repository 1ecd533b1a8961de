//! meshctl: the mesh's command line. Every listing takes `-o table|json`;
//! JSON is an array of objects with stable snake_case fields.

mod cli;
mod commands;
mod failure;
mod render;
mod session;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command, IdentityCommand, JobCommand, Listing, NodeCommand, TokenCommand, Wait};
use failure::Failure;
use session::Session;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut result = run(Cli::parse()).await;
    if result.is_err() {
        if let Some(leader) = failure::leader_hint() {
            // Nothing was done by the follower that refused: ask the leader.
            eprintln!("meshctl: asking the leader, {leader}");
            let mut cli = Cli::parse();
            cli.server = Some(leader.to_owned());
            result = run(cli).await;
        }
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(message, code)) => {
            eprintln!("meshctl: {message}");
            ExitCode::from(code)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    // Local commands need no server.
    if let Command::Job { command: JobCommand::Validate { file } } = &cli.command {
        return commands::job::validate(file);
    }
    // A bad routes file is refused before any server is asked.
    if let Command::Apply { file, .. } = &cli.command {
        commands::routes::read_file(file)?;
    }
    let output = cli.output;
    let session = Session::open(cli.server, cli.credentials).await?;
    match cli.command {
        Command::Whoami => commands::access::whoami(&session, output).await,
        Command::User { command } => commands::access::user(&session, command, output).await,
        Command::Node { command: NodeCommand::Token { command: TokenCommand::Create { ttl, uses } } } => {
            commands::access::join_token(&session, ttl, uses, output).await
        }
        Command::Get { what: Listing::Routes, service } => {
            commands::routes::list(&session, service, output).await
        }
        Command::Get { what, service: Some(service) } => Err(Failure(
            format!(
                "`get {}` takes no SERVICE (only `get routes` does), got {service:?}",
                clap::ValueEnum::to_possible_value(&what)
                    .map_or_else(String::new, |v| v.get_name().to_owned())
            ),
            2,
        )),
        Command::Get { what, service: None } => commands::get::run(&session, what, output).await,
        Command::Apply { file, wait } => commands::routes::apply(&session, &file, wait).await,
        Command::Delete { what } => commands::routes::delete(&session, what).await,
        Command::Split { service, weights, clear, wait } => {
            commands::traffic::split(&session, service, weights, clear, wait).await
        }
        Command::Policy { service, policy, wait, wait_timeout } => {
            let wait = Wait { wait, timeout: wait_timeout };
            commands::traffic::policy(&session, service, policy, wait).await
        }
        Command::Logs { job, instance, follow, stderr } => {
            commands::logs::run(&session, job, instance, follow, stderr).await
        }
        Command::Identity { command: IdentityCommand::RotateRoot { stage_timeout } } => {
            commands::identity::rotate_root(&session, stage_timeout, output).await
        }
        Command::Check { warn_within } => commands::check::run(&session, warn_within, output).await,
        Command::Top { window } => commands::top::top(&session, window, output).await,
        Command::Stat { service, window } => commands::top::stat(&session, service, window, output).await,
        Command::Status { peers } => commands::status::run(&session, output, peers).await,
        Command::Register { service, version, addr, not_ready, plaintext_ok } => {
            commands::registry::register(&session, service, version, addr, !not_ready, plaintext_ok).await
        }
        Command::Deregister { service, addr } => {
            commands::registry::deregister(&session, service, addr).await
        }
        Command::Job { command } => commands::job::run(&session, command, output).await,
        Command::Rollout { command } => commands::rollout::run(&session, command, output).await,
    }
}
