//! The `regscope` command: parses arguments and dispatches. Nothing else lives here.

use anyhow::Context;
use clap::Parser;
use regscope::config::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Serve(config)) => serve(config),
        None => serve(cli.serve),
        Some(Command::Report(config)) => report(config, &runtime()?),
    }
}

/// A current-thread runtime: `serve` starts its further event loops itself (see `--threads`).
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")
}

fn report(config: regscope::config::ReportConfig, runtime: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let wanted = if config.id.is_some() { config.last.max(1000) } else { config.last };
    let transfers = runtime.block_on(regscope::report::fetch(&config.admin, wanted))?;
    if config.svg.is_some() || config.html.is_some() {
        let transfer = match config.id {
            Some(id) => transfers.iter().find(|t| t.id == id).with_context(|| format!("no transfer {id}"))?,
            None => transfers.first().context("no finished pushes or pulls yet")?,
        };
        if let Some(path) = &config.svg {
            std::fs::write(path, regscope::waterfall::render_svg(transfer))
                .with_context(|| format!("writing {}", path.display()))?;
        }
        if let Some(path) = &config.html {
            std::fs::write(path, regscope::ui::transfer_page(transfer))
                .with_context(|| format!("writing {}", path.display()))?;
        }
        return Ok(());
    }
    if config.json {
        println!("{}", serde_json::to_string_pretty(&transfers)?);
        return Ok(());
    }
    if transfers.is_empty() {
        println!("no finished pushes or pulls yet");
    }
    for transfer in &transfers {
        println!("{}", regscope::report::render(transfer));
    }
    Ok(())
}

fn serve(config: regscope::config::ServeConfig) -> anyhow::Result<()> {
    init_logging(config.log_format);
    runtime()?.block_on(async { regscope::serve(config, shutdown_signal()).await.context("regscope serve") })
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
}
